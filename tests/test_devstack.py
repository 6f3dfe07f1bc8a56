"""The embedded dev stack and the test harness built on it.

If these fail, every other test's verdict is suspect: they prove that the
servers start and leave nothing behind, that each test gets an empty schema
and its own Redis keys, and that a hanging test fails instead of hanging.

The lifecycle tests start their own embedded servers whatever
``DT_TEST_DATABASE_URL`` / ``DT_TEST_REDIS_URL`` say, so they run in both
harness modes.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import secrets
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import coredis
import psutil
import pytest
import trio

from darktower.shared.devstack import (
    create_database,
    drop_database,
    dsn_for_database,
    embedded_postgres,
    embedded_redis,
)
from darktower.shared.seam import run_aio

SCHEMA_TABLES = {
    "meetings",
    "meeting_controllers",
    "media_handlers",
    "meeting_assignments",
    "meeting_assignment_leases",
}
SCHEMA_SEQUENCES = {"meeting_generation_seq"}


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """An empty directory to pass as ``base_dir``; must be empty again at
    the end (``rmdir`` fails otherwise).

    Not ``tmp_path``: pytest makes its directories private (0700), and when
    the tests run as root the embedded PostgreSQL runs as an unprivileged
    account that must be able to reach its directory.
    """
    path = Path(tempfile.mkdtemp(prefix="dt-test-base-"))
    path.chmod(0o711)
    yield path
    path.rmdir()


# --------------------------------------------------------------------------
# Embedded servers


@pytest.mark.slow
@pytest.mark.parametrize("where", ["system temp", "base_dir"])
def test_embedded_postgres_serves_asyncpg_and_leaves_nothing_behind(
    where: str, base_dir: Path
) -> None:
    async def inspect(dsn: str) -> tuple[list[psutil.Process], str | None]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            row = await conn.fetchrow("SELECT pg_backend_pid() AS pid, inet_server_addr() AS addr")
            assert row is not None
            # Our backend's parent is the postmaster; it lives while we are connected.
            postmaster = psutil.Process(row["pid"]).parent()
            assert postmaster is not None
            return [postmaster, *postmaster.children(recursive=True)], row["addr"]
        finally:
            await conn.close()

    with embedded_postgres(base_dir if where == "base_dir" else None) as dsn:
        socket_dir = Path(parse_qs(urlsplit(dsn).query)["host"][0])
        assert socket_dir.is_dir()
        processes, server_addr = asyncio.run(inspect(dsn))
        assert server_addr is None  # a unix-socket connection: no TCP port to collide on
        assert len(processes) > 2  # postmaster, our backend, background workers

    assert not socket_dir.exists()
    assert [p.pid for p in processes if p.is_running()] == []
    assert list(base_dir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["system temp", "base_dir"])
def test_embedded_redis_serves_coredis_and_leaves_nothing_behind(
    where: str, base_dir: Path
) -> None:
    async def inspect(url: str) -> tuple[int, str]:
        async with coredis.Redis.from_url(url, decode_responses=True) as client:
            assert await client.ping() == "PONG"
            assert await client.config_get(["save"]) == {"save": ""}  # no snapshots
            info = await client.info("server")
            directory = (await client.config_get(["dir"]))["dir"]
            pid = info["process_id"]
            assert isinstance(pid, int)
            return pid, directory

    with embedded_redis(base_dir if where == "base_dir" else None) as url:
        assert urlsplit(url).hostname == "127.0.0.1"
        pid, directory = trio.run(inspect, url)
        server = psutil.Process(pid)
        assert Path(directory).is_dir()

    assert not server.is_running()
    assert not Path(directory).exists()
    assert list(base_dir.iterdir()) == []


def test_create_and_drop_database(pg_server_dsn: str) -> None:
    name = f"dt_test_{secrets.token_hex(8)}"

    async def databases() -> set[str]:
        conn = await asyncpg.connect(pg_server_dsn, timeout=10)
        try:
            return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()

    async def current_database(dsn: str) -> str:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return str(await conn.fetchval("SELECT current_database()"))
        finally:
            await conn.close()

    before = asyncio.run(databases())
    dsn = create_database(pg_server_dsn, name)
    try:
        assert dsn == dsn_for_database(pg_server_dsn, name)
        assert asyncio.run(current_database(dsn)) == name
    finally:
        drop_database(pg_server_dsn, name)
    assert asyncio.run(databases()) == before
    drop_database(pg_server_dsn, name)  # dropping twice is harmless


@pytest.mark.parametrize(
    ("server", "database"),
    [
        (
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "postgresql://postgres@127.0.0.1:5432/dt_x",
        ),
        ("postgresql://postgres@/postgres?host=/tmp/s", "postgresql://postgres@/dt_x?host=/tmp/s"),
    ],
)
def test_dsn_for_database_keeps_everything_but_the_database(server: str, database: str) -> None:
    assert dsn_for_database(server, "dt_x") == database


@pytest.mark.parametrize("name", ["Upper", "semi;colon", 'quo"te', "", "x" * 64, "postgres"])
def test_database_names_must_be_plain_identifiers(name: str) -> None:
    # Checked before any connection: the server in the DSN does not exist.
    with pytest.raises(ValueError, match=r"identifier|connects to"):
        create_database("postgresql://postgres@/postgres?host=/nonexistent", name)
    with pytest.raises(ValueError, match=r"identifier|connects to"):
        drop_database("postgresql://postgres@/postgres?host=/nonexistent", name)


# --------------------------------------------------------------------------
# Database fixtures


async def _schema_objects(pool: asyncpg.Pool) -> tuple[set[str], set[str], set[str]]:
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    sequences = await pool.fetch(
        "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = 'public'"
    )
    indexes = await pool.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    return (
        {r["tablename"] for r in tables},
        {r["sequence_name"] for r in sequences},
        {r["indexname"] for r in indexes},
    )


async def _assert_empty_then_dirty(pool: asyncpg.Pool) -> None:
    """Assert the state a fresh test must see, then leave a mess behind."""
    for table in SCHEMA_TABLES:
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table  # noqa: S608
    assert await pool.fetchval("SELECT nextval('meeting_generation_seq')") == 1
    await pool.execute(
        "INSERT INTO meeting_controllers (controller_id, region, grpc_endpoint,"
        " webtransport_endpoint, max_meetings, max_participants)"
        " VALUES ('mc-1', 'us-west', 'mc-1:50051', 'https://mc-1:4433', 10, 100)"
    )


async def test_database_has_the_whole_schema(db_pool: asyncpg.Pool) -> None:
    database = await run_aio(db_pool.fetchval, "SELECT current_database()")
    assert database.startswith("dt_test_")
    tables, sequences, _ = await run_aio(_schema_objects, db_pool)
    assert tables == SCHEMA_TABLES
    assert sequences == SCHEMA_SEQUENCES


# Every run checks that it starts empty and then dirties the database; with
# two runs of each fixture on the one session database, whichever runs later
# proves the reset, in any order.
@pytest.mark.parametrize("run", [1, 2])
async def test_db_pool_starts_empty(db_pool: asyncpg.Pool, run: int) -> None:
    await run_aio(_assert_empty_then_dirty, db_pool)


@pytest.mark.parametrize("run", [1, 2])
def test_clean_database_starts_empty(clean_database: str, run: int) -> None:
    async def check() -> None:
        pool = await asyncpg.create_pool(clean_database, min_size=1, max_size=1)
        try:
            await _assert_empty_then_dirty(pool)
        finally:
            await pool.close()

    asyncio.run(check())


async def test_schema_sql_applies_twice_harmlessly(db_pool: asyncpg.Pool) -> None:
    schema = importlib.resources.files("darktower.gc").joinpath("schema.sql").read_text()

    async def apply_twice() -> None:
        await _assert_empty_then_dirty(db_pool)
        before = await _schema_objects(db_pool)
        # The fixture applied it once already: these are the second and third.
        await db_pool.execute(schema)
        await db_pool.execute(schema)
        assert await _schema_objects(db_pool) == before
        assert await db_pool.fetchval("SELECT count(*) FROM meeting_controllers") == 1
        assert await db_pool.fetchval("SELECT nextval('meeting_generation_seq')") == 2

    await run_aio(apply_twice)


# --------------------------------------------------------------------------
# Redis fixtures


async def _count_keys(url: str, prefix: str) -> int:
    async with coredis.Redis.from_url(url) as client:
        return len([key async for key in client.scan_iter(match=prefix + "*")])


async def _delete_keys(url: str, prefix: str) -> None:
    async with coredis.Redis.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(keys)


@pytest.fixture
def prefix_teardown_probe(redis_server_url: str) -> Iterator[dict[str, str]]:
    """Checks what ``redis_key_prefix``'s teardown left behind.

    A test requests this *before* ``redis_key_prefix``, so it is set up
    before it and torn down after it. It owns a second unique prefix that
    stands for everyone else's keys, and deletes those itself.
    """
    probe = {"bystander": f"dt-test-{secrets.token_hex(8)}:"}
    yield probe
    try:
        own_left = trio.run(_count_keys, redis_server_url, probe["own"])
        bystander_left = trio.run(_count_keys, redis_server_url, probe["bystander"])
    finally:
        trio.run(_delete_keys, redis_server_url, probe["bystander"])
    assert own_left == 0
    assert bystander_left == 2


async def test_redis_key_prefix_teardown_deletes_only_its_own_keys(
    prefix_teardown_probe: dict[str, str], redis_key_prefix: str, redis_server_url: str
) -> None:
    assert redis_key_prefix.startswith("dt-test-")
    assert redis_key_prefix.endswith(":")
    prefix_teardown_probe["own"] = redis_key_prefix
    bystander = prefix_teardown_probe["bystander"]
    async with coredis.Redis.from_url(redis_server_url) as client:
        await client.set(redis_key_prefix + "string", "1")
        await client.hset(redis_key_prefix + "hash", {"field": "1"})
        await client.set(redis_key_prefix[:-1], "not under the prefix: the colon is part of it")
        await client.set(bystander + "a", "1")
        await client.set(bystander + "b", "1")
    assert await _count_keys(redis_server_url, redis_key_prefix) == 2
    # The near-miss key is not the teardown's to delete; remove it ourselves.
    async with coredis.Redis.from_url(redis_server_url) as client:
        assert await client.delete([redis_key_prefix[:-1]]) == 1


# --------------------------------------------------------------------------
# The timeout guard, run in a child pytest session with short limits

_GUARDED_TESTS = """
    import os
    import pathlib
    import threading
    import time

    import pytest
    import trio

    @pytest.fixture(scope="session")
    def session_resource():
        yield
        # Must run even when the session is interrupted.
        pathlib.Path(os.environ["DT_PROBE_FILE"]).write_text("teardown ran")

    async def test_hanging_trio_test_fails_with_task_tree():
        async def stuck_helper():
            await trio.Event().wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_helper)

    async def test_deadlock_under_autojump_clock_still_fails(autojump_clock):
        await trio.Event().wait()

    async def test_long_simulated_time_is_not_a_hang(autojump_clock):
        await trio.sleep(3600)

    @pytest.mark.dt_timeout(30)
    async def test_marker_extends_the_limit():
        await trio.to_thread.run_sync(time.sleep, 0.5)  # past the default limit

    def test_z_hanging_sync_test_interrupts_the_session(session_resource):
        threading.Event().wait()
"""


@pytest.mark.slow
def test_timeout_guard(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DT_TEST_TIMEOUT_S", "0.3")
    # Long enough for the interrupted child to report and tear down before
    # the hard exit.
    monkeypatch.setenv("DT_TEST_BACKSTOP_GRACE_S", "1.5")
    probe_file = pytester.path / "teardown-probe"
    monkeypatch.setenv("DT_PROBE_FILE", str(probe_file))
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini(
        """
        [pytest]
        trio_mode = true
        addopts = --strict-markers -p no:cacheprovider
        filterwarnings =
            error
            ignore::UserWarning:platformdirs.*
        """
    )
    pytester.makepyfile(test_guarded=textwrap.dedent(_GUARDED_TESTS))

    result = pytester.runpytest_subprocess("-v", timeout=60)

    output = result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            "*test_hanging_trio_test_fails_with_task_tree FAILED*",
            "*test_deadlock_under_autojump_clock_still_fails FAILED*",
            "*test_long_simulated_time_is_not_a_hang PASSED*",
            "*test_marker_extends_the_limit PASSED*",
        ]
    )
    assert "TimeoutError: test still running after 0.3 s" in output
    assert "stuck_helper" in output  # the task tree names the stuck task
    assert "stacks of all threads follow" in output
    assert "KeyboardInterrupt" in output
    assert probe_file.read_text() == "teardown ran"
    assert result.ret == pytest.ExitCode.INTERRUPTED
