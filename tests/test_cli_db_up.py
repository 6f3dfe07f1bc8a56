"""``dt db init`` driven as a user would run it (``dt up``: :mod:`test_cli_up`)."""

from __future__ import annotations

import pytest
import trio
from process_harness import fetch

from darktower.cli.__main__ import main as dt_main

pytest_plugins = ("gc_fixtures",)  # empty_database

TABLES = {
    "meetings",
    "meeting_controllers",
    "media_handlers",
    "meeting_assignments",
    "meeting_assignment_leases",
}
_TABLES_QUERY = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"


async def test_db_init_applies_the_schema_idempotently(
    empty_database: str, aio_loop: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # dt runs its own trio.run: call it from a worker thread, as a shell would.
    for _ in range(2):
        status = await trio.to_thread.run_sync(
            dt_main, ["db", "init", "--database-url", empty_database]
        )
        assert status == 0
    assert capsys.readouterr().out.count("schema applied") == 2
    rows = await fetch(empty_database, _TABLES_QUERY)
    assert {row[0] for row in rows} == TABLES


def test_db_init_refuses_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert dt_main(["db", "init", "--database-url", "mysql://nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "postgresql://" in err


def test_db_init_reports_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    assert dt_main(["db", "init", "--database-url", "postgresql://postgres@127.0.0.1:1/x"]) == 1
    assert "unreachable" in capsys.readouterr().err
