"""``dt db init`` and ``dt up`` driven as a user would run them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
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


@pytest.mark.slow
async def test_dt_up_runs_the_gc_and_ctrl_c_cleans_up(empty_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GC_", "DATABASE_URL"))}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "darktower.cli", "up", "--database-url", empty_database],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"Press Ctrl-C" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"dt up ended early: {output.decode()}"
                output += chunk
        text = output.decode()
        http_port = int(re.search(r"GC HTTP\s+http://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        workdir = trio.Path(re.search(r"keys\s+(\S+)", text).group(1))  # type: ignore[union-attr]
        assert await (workdir / "jwks.json").is_file()
        async with httpx.AsyncClient(timeout=2) as client:
            ready = await client.get(f"http://127.0.0.1:{http_port}/health/ready")
        assert ready.status_code == 200

        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            async for chunk in process.stdout:
                output += chunk
            status = await process.wait()
        assert status == 0, output.decode()
        assert "stopped; removed" in output.decode()
        assert not await workdir.exists()
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient(timeout=1) as client:
                await client.get(f"http://127.0.0.1:{http_port}/health/live")
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
