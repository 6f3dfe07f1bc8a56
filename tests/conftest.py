"""The test harness (SPEC §10): real PostgreSQL and Redis, never mocks of them.

Servers. ``DT_TEST_DATABASE_URL`` / ``DT_TEST_REDIS_URL`` point the session
at existing servers (CI, a developer's own); without them the session starts
private embedded servers (:mod:`darktower.shared.devstack`) once and stops
them at the end.

Isolation on a shared server. The session creates its own database
(``dt_test_<hex>``) and drops it at the end, and touches no other database.
In Redis every test gets its own key prefix and deletes only keys under it,
so several sessions (and developers) can share one server; nothing here ever
runs FLUSHDB or FLUSHALL.

Isolation between tests. ``db_pool`` and ``clean_database`` empty every table
and restart every sequence before the test, so each test starts from the
empty schema whatever the previous one left.

Hangs. Every test is bounded (``DT_TEST_TIMEOUT_S``, default 60 s, ``0``
disables; per test ``@pytest.mark.dt_timeout(seconds)``) in *wall-clock*
time - see :func:`pytest_runtest_call` and :func:`pytest_runtest_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import inspect
import os
import secrets
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import coredis
import pytest
import trio

from darktower.gc.schema import apply_schema
from darktower.shared.db import create_pool, open_pool
from darktower.shared.devstack import (
    create_database,
    drop_database,
    embedded_postgres,
    embedded_redis,
)
from darktower.shared.seam import asyncio_loop, run_aio

T = TypeVar("T")

pytest_plugins = ("pytester",)  # test_devstack runs the timeout guard in a child session

DEFAULT_TEST_TIMEOUT_S = 60.0
#: After the trio-level timeout, how long before each process-level backstop
#: (``DT_TEST_BACKSTOP_GRACE_S``; only the harness's own tests change it).
DEFAULT_BACKSTOP_GRACE_S = 30.0
_REAL_STDERR_FD = pytest.StashKey[int]()


#: Empties every table and restarts every sequence of the schema, in one round
#: trip and without a table list to keep in step with schema.sql (only the
#: test database's own ``public`` schema is touched). Only what a test used is
#: reset: TRUNCATE of the four tables costs 25-50 ms even when they are empty
#: (new files for every table and index), the checks cost well under 1 ms,
#: and most tests write to few tables.
_RESET_DATABASE_SQL = """
DO $$
DECLARE
    t record;
    dirty text[] := '{}';
    has_rows boolean;
BEGIN
    FOR t IN SELECT schemaname, tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I)', t.schemaname, t.tablename)
           INTO has_rows;
        IF has_rows THEN
            dirty := dirty || format('%I.%I', t.schemaname, t.tablename);
        END IF;
    END LOOP;
    IF cardinality(dirty) > 0 THEN
        EXECUTE 'TRUNCATE ' || array_to_string(dirty, ', ') || ' CASCADE';
    END IF;
    -- setval, not ALTER SEQUENCE ... RESTART, which gives the sequence new
    -- storage; and only sequences that have been used.
    PERFORM setval(format('%I.%I', schemaname, sequencename)::regclass, start_value, false)
       FROM pg_sequences
      WHERE schemaname = 'public' AND last_value IS NOT NULL;
END
$$;
"""


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread and return its result.

    Sync fixtures use this to run an event loop (``asyncio.run``,
    ``trio.run``): a private thread works even when the calling thread is
    already inside ``trio.run`` (a fixture requested lazily from a trio test).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dt-harness") as pool:
        return pool.submit(fn).result()


def _asyncio_blocking(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return _in_thread(lambda: asyncio.run(fn()))


# --------------------------------------------------------------------------
# PostgreSQL


async def _apply_schema(dsn: str) -> None:
    """Apply schema.sql exactly as a starting GC does (advisory-locked)."""
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        await apply_schema(pool)
    finally:
        await pool.close()


async def _reset_database(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(_RESET_DATABASE_SQL, timeout=30)
    finally:
        await conn.close(timeout=5)


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the PostgreSQL *server* for the session: ``DT_TEST_DATABASE_URL``
    if set (any database on it that we may connect to, e.g. ``postgres``),
    else a private embedded server started once per session.

    Only for creating and dropping databases; tests use :func:`database_dsn`.
    """
    url = os.environ.get("DT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def database_dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of this session's own database, ``dt_test_<hex>``, with schema.sql
    applied; dropped (``WITH (FORCE)``) at the end of the session. Its
    contents persist between tests: use :func:`db_pool` or
    :func:`clean_database` for an empty one."""
    name = f"dt_test_{secrets.token_hex(8)}"
    dsn = create_database(pg_server_dsn, name)
    try:
        _asyncio_blocking(lambda: _apply_schema(dsn))
        yield dsn
    finally:
        drop_database(pg_server_dsn, name)


@pytest.fixture
def clean_database(database_dsn: str) -> str:
    """The session database, emptied (all tables truncated, sequences
    restarted); returns its DSN. For tests that hand the DSN to real
    processes rather than using :func:`db_pool`."""
    _asyncio_blocking(lambda: _reset_database(database_dsn))
    return database_dsn


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The asyncio loop inside trio (:func:`darktower.shared.seam.asyncio_loop`)
    for the test: pytest-trio runs a test and its fixtures in one context, so
    the test and every fixture that depends on this one share the loop."""
    async with asyncio_loop():
        yield


@pytest.fixture
async def db_pool(aio_loop: None, database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool (:func:`darktower.shared.db.open_pool`) on the session
    database, emptied before the test."""
    async with open_pool(database_dsn) as pool:
        await run_aio(pool.execute, _RESET_DATABASE_SQL)
        yield pool


# --------------------------------------------------------------------------
# Redis


async def _delete_keys_with_prefix(url: str, prefix: str) -> int:
    """Delete every key that starts with ``prefix``; returns how many.

    SCAN, not KEYS, so a large shared server is not blocked. The prefix is
    used as a glob pattern, so it must not contain glob metacharacters.
    """
    if not prefix or any(c in prefix for c in "*?[]\\"):
        raise ValueError(f"not a plain key prefix: {prefix!r}")
    client = coredis.Redis.from_url(url)
    deleted = 0
    async with client:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 500):
            deleted += await client.delete(keys[start : start + 500])
    return deleted


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of the Redis server for the session (``redis://host:port/db``, as
    ``coredis.Redis.from_url`` takes it): ``DT_TEST_REDIS_URL`` if set, else
    a private embedded server started once per session. Shared: tests keep to
    their :func:`redis_key_prefix`."""
    url = os.environ.get("DT_TEST_REDIS_URL")
    if url:
        yield url
        return
    with embedded_redis() as embedded_url:
        yield embedded_url


@pytest.fixture
def redis_key_prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix unique to this test, ``dt-test-<hex>:``; every key under
    it is deleted after the test (and nothing else)."""
    prefix = f"dt-test-{secrets.token_hex(8)}:"
    yield prefix
    _in_thread(lambda: trio.run(_delete_keys_with_prefix, redis_server_url, prefix))


# --------------------------------------------------------------------------
# Timeouts
#
# Two layers, both in wall-clock time: trio time is no measure of a hang,
# because tests that use MockClock/autojump_clock move it at will (a test may
# legitimately simulate an hour), and a deadlocked autojump test has no
# deadline left to jump to.
#
# 1. Trio tests (nearly all): the test *body* runs in a cancel scope that a
#    watchdog thread cancels after the timeout. The test fails with a
#    TimeoutError listing where every trio task was waiting; its fixtures then
#    tear down normally and the session goes on.
# 2. Every test, as a backstop for what cancellation cannot reach (sync tests,
#    fixture set-up/teardown, a trio loop blocked by synchronous code): after
#    a further grace period the stacks of all threads are dumped and SIGINT is
#    sent to the main thread - pytest stops the session but still runs the
#    fixture teardown, so embedded servers stop and the test database is
#    dropped. Only if even that does not end the process does faulthandler
#    dump the stacks again and exit hard (embedded servers are then left
#    running: the one case that leaks).


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "dt_timeout(seconds): wall-clock limit for this test instead of DT_TEST_TIMEOUT_S",
    )
    # Capture is suspended while plugins are configured, so this is the real
    # stderr; during tests fd 2 is pytest's capture file.
    config.stash[_REAL_STDERR_FD] = os.dup(sys.__stderr__.fileno() if sys.__stderr__ else 2)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()
    if _REAL_STDERR_FD in config.stash:
        os.close(config.stash[_REAL_STDERR_FD])
        del config.stash[_REAL_STDERR_FD]


def _timeout_for(item: pytest.Item) -> float | None:
    """The test's wall-clock limit in seconds, or ``None`` for no limit."""
    configured = os.environ.get("DT_TEST_TIMEOUT_S") or None
    if configured is not None and float(configured) <= 0:
        return None  # e.g. while debugging
    marker = item.get_closest_marker("dt_timeout")
    if marker is not None:
        return float(marker.args[0])
    return float(configured) if configured else DEFAULT_TEST_TIMEOUT_S


def _format_trio_tasks(max_lines: int = 200) -> str:
    """Where every trio task of the current run is waiting (frames outside
    trio itself), as an indented tree."""
    trio_dir = str(Path(trio.__file__).parent)
    lines: list[str] = []

    def visit(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [
            f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{lineno})"
            for frame, lineno in task.iter_await_frames()
            if not frame.f_code.co_filename.startswith(trio_dir)
        ]
        lines.append(f"{'  ' * depth}{task.name}")
        lines.extend(f"{'  ' * depth}  at {where}" for where in frames[-6:])
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                visit(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        visit(root, 0)
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... {len(lines) - max_lines} more lines"]
    return "\n".join(lines)


def _with_wall_clock_limit(
    test_fn: Callable[..., Coroutine[Any, Any, None]], seconds: float
) -> Callable[..., Coroutine[Any, Any, None]]:
    """Wrap a trio test function so that its body is cancelled after
    ``seconds`` of wall-clock time, and fails with :class:`TimeoutError`."""

    @functools.wraps(test_fn)
    async def limited(**kwargs: Any) -> None:
        token = trio.lowlevel.current_trio_token()
        finished = threading.Event()
        where: list[str] = []

        with trio.CancelScope() as scope:

            def expire() -> None:  # in the trio thread
                where.append(_format_trio_tasks())
                scope.cancel()

            def watchdog() -> None:  # in its own thread: immune to MockClock
                if finished.wait(seconds):
                    return
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(expire, trio_token=token)

            threading.Thread(target=watchdog, name="dt-test-watchdog", daemon=True).start()
            try:
                await test_fn(**kwargs)
            finally:
                finished.set()
        # Nothing else cancels this scope: if it caught a cancellation, the
        # watchdog fired while the test was still running.
        if scope.cancelled_caught:
            raise TimeoutError(
                f"test still running after {seconds:g} s (wall clock) and was cancelled; "
                f"trio tasks at that moment:\n{where[0] if where else '?'}"
            )

    return limited


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Layer 1: limit the body of trio tests. Runs before pytest-trio's own
    hook replaces ``item.obj`` with its runner, which then runs our wrapper as
    the test (so fixtures stay outside the limit and tear down normally)."""
    seconds = _timeout_for(item)
    if (
        seconds is not None
        and isinstance(item, pytest.Function)
        and item.get_closest_marker("trio") is not None
        and inspect.iscoroutinefunction(item.obj)
        and not hasattr(item.obj, "hypothesis")
    ):
        item.obj = _with_wall_clock_limit(item.obj, seconds)
    return (yield)


def _interrupt_session(nodeid: str, seconds: float, stderr_fd: int) -> None:
    os.write(
        stderr_fd,
        f"\n*** {nodeid} still running after {seconds:g} s; stacks of all threads follow; "
        "interrupting the session (fixtures will tear down) ***\n".encode(),
    )
    faulthandler.dump_traceback(file=stderr_fd, all_threads=True)
    main_ident = threading.main_thread().ident
    assert main_ident is not None
    # To the main thread itself, so a blocking system call there is interrupted.
    signal.pthread_kill(main_ident, signal.SIGINT)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Layer 2: the process-level backstop around set-up, call and teardown."""
    seconds = _timeout_for(item)
    if seconds is None:
        return (yield)
    stderr_fd = item.config.stash[_REAL_STDERR_FD]
    grace = float(os.environ.get("DT_TEST_BACKSTOP_GRACE_S") or DEFAULT_BACKSTOP_GRACE_S)
    interrupt_after = seconds + grace
    timer = threading.Timer(
        interrupt_after, _interrupt_session, args=(item.nodeid, interrupt_after, stderr_fd)
    )
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(interrupt_after + grace, exit=True, file=stderr_fd)
    try:
        result = yield
    except BaseException:
        # Interrupted: leave the hard exit armed, it bounds the session
        # teardown that follows.
        timer.cancel()
        raise
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
    return result


#: Figures the failure drills measured (detection time, reassignment time,
#: errors during an outage), shown in the run's summary so CI logs carry them.
_DRILL_FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def drill_figures(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``record(name, value)``: one figure of this drill for the run's summary."""
    figures = request.config.stash.setdefault(_DRILL_FIGURES, [])

    def record(name: str, value: str) -> None:
        figures.append(f"{request.node.name}: {name} = {value}")

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(_DRILL_FIGURES, [])
    if figures:
        terminalreporter.section("failure drill figures")
        for line in figures:
            terminalreporter.write_line(line)
