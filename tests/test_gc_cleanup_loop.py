"""The assignment cleanup *loop* (SPEC §6.4, ``AssignmentCleanup.run``):
it ticks every ``GC_CLEANUP_INTERVAL_S``, each tick deletes assignments ended
past the retention, ends idle assignments of MCs that are not live and drops
long-expired leases, and a database error in one tick is logged while the
loop goes on to the next. (What one tick does in detail, batches included, is
in ``test_gc_meeting_end.py``.)

Real PostgreSQL; ages are produced by back-dating rows on the database
clock. The loop sleeps on trio's clock, so the tests use ``mock_clock`` (no
autojump) and jump to each tick. The cleanup under test is the real one,
with :meth:`AssignmentCleanup.tick` observed: each tick's start time and
outcome arrive on a channel. The failures are real database errors: the
statement of a tick cancelled by the server while it waits for a lock the
test holds (``DatabaseUnavailable``), or a table missing (``SchemaMissing``).

Last, the wiring: a whole GC in-process (:func:`gc_harness.running_gc`) ticks
its own cleanup with its configured interval, retention and idle time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import trio
import trio.testing
from gc_fleet import (
    REGION,
    add_mc,
    add_mh,
    ended_at,
    fetch,
    insert_assignment,
    jump_and_settle,
    virtually_within,
)
from gc_harness import DevKeys, gc_environ, running_gc

from darktower.gc.cleanup import AssignmentCleanup, CleanupResult
from darktower.shared.seam import run_aio

INTERVAL_S = 60.0
RETENTION_S = 7 * 86400.0
INACTIVE_S = 3600.0
STALE_S = 30.0
#: At most this many lock probes while a tick's statement gets to the lock
#: (each is a round trip; the statement is there within milliseconds).
MAX_PROBES = 2000


@dataclass(frozen=True, slots=True)
class Tick:
    """One tick: when it started (trio's clock) and how it ended."""

    at: float
    result: CleanupResult | None
    error: Exception | None


class ObservedCleanup(AssignmentCleanup):
    """The real cleanup task; every tick is reported on ``ticks``."""

    def __init__(self, pool: asyncpg.Pool, ticks: trio.MemorySendChannel[Tick]) -> None:
        super().__init__(
            pool, interval_s=INTERVAL_S, retention_s=RETENTION_S,
            inactive_after_s=INACTIVE_S, stale_after_s=STALE_S,
        )  # fmt: skip
        self._ticks = ticks

    async def tick(self) -> CleanupResult:
        at = trio.current_time()
        try:
            result = await super().tick()
        except Exception as exc:
            self._ticks.send_nowait(Tick(at, None, exc))
            raise
        self._ticks.send_nowait(Tick(at, result, None))
        return result


async def add_lease(pool: asyncpg.Pool, *, expired_ago: timedelta) -> uuid.UUID:
    """A held lease of a meeting, expiring ``expired_ago`` ago (negative:
    still live)."""
    meeting_id = uuid.uuid4()
    await run_aio(
        pool.execute,
        "INSERT INTO meeting_assignment_leases (meeting_id, region, holder, gc_id, expires_at)"
        " VALUES ($1, $2, $3, 'gc-gone', now() - $4::interval)",
        meeting_id,
        REGION,
        uuid.uuid4(),
        expired_ago,
    )
    return meeting_id


async def assignment_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {
        r["meeting_id"] for r in await fetch(pool, "SELECT meeting_id FROM meeting_assignments")
    }


async def lease_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    rows = await fetch(pool, "SELECT meeting_id FROM meeting_assignment_leases")
    return {r["meeting_id"] for r in rows}


# --- the two real failures -----------------------------------------------------------------------


Provoke = Callable[[], Awaitable[None]]


@asynccontextmanager
async def statement_cancelled(pool: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Provoke]:
    """A tick's first statement waits for a lock the test holds and is
    cancelled by the server (``pg_cancel_backend``, as an operator would):
    asyncpg raises ``QueryCanceledError``, the cleanup sees
    ``DatabaseUnavailable``. Start the tick, then await the provocation."""
    locker: asyncpg.Connection = await run_aio(asyncpg.connect, database_dsn)

    async def cancel_the_waiting_statement() -> None:
        for _ in range(MAX_PROBES):
            waiting = await fetch(
                pool,
                "SELECT pid FROM pg_locks WHERE locktype = 'relation'"
                " AND relation = 'meeting_assignments'::regclass AND NOT granted",
            )
            if waiting:
                break
        else:
            pytest.fail("no statement of the tick waited for the lock")
        (pid,) = [r["pid"] for r in waiting]
        assert await run_aio(pool.fetchval, "SELECT pg_cancel_backend($1)", pid)

    try:
        await run_aio(
            locker.execute, "BEGIN; LOCK TABLE meeting_assignments IN ACCESS EXCLUSIVE MODE"
        )
        yield cancel_the_waiting_statement
    finally:
        with trio.CancelScope(shield=True):
            await run_aio(locker.close)  # rolls the lock back


@asynccontextmanager
async def schema_missing(pool: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Provoke]:
    """The assignments table is gone while the block runs (renamed away, and
    back afterwards): a tick's statement fails with ``UndefinedTableError``,
    the cleanup sees ``SchemaMissing``. Nothing more to provoke."""

    async def nothing() -> None:
        pass

    await run_aio(pool.execute, "ALTER TABLE meeting_assignments RENAME TO assignments_away")
    try:
        yield nothing
    finally:
        with trio.CancelScope(shield=True):
            await run_aio(
                pool.execute, "ALTER TABLE assignments_away RENAME TO meeting_assignments"
            )


FAILURES = {
    # name: (how, the error the tick raised, the level the loop logs it at)
    "statement_cancelled": (statement_cancelled, "DatabaseUnavailable", logging.WARNING),
    "schema_missing": (schema_missing, "SchemaMissing", logging.ERROR),
}


# --- the loop ------------------------------------------------------------------------------------


@pytest.mark.dt_timeout(30)
@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_cleanup_ticks_every_interval_and_a_failed_tick_does_not_stop_it(
    db_pool: asyncpg.Pool,
    database_dsn: str,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """The first tick comes one interval after the start, not before, and
    does the three jobs; the second fails on the database, is logged, and
    changes nothing; the loop is still there for the third, one interval
    later (no retry in between), which does the work the second could not."""
    fail, error_type, level = FAILURES[failure]
    caplog.set_level(logging.INFO, logger="darktower.gc.cleanup")
    await add_mc(db_pool, "mc-live", "http://127.0.0.1:1")
    await add_mc(db_pool, "mc-dead", "http://127.0.0.1:2", health="unhealthy")
    await add_mh(db_pool, "mh-1")
    await insert_assignment(db_pool, "mc-live", ended_ago=timedelta(days=8))  # past retention
    recent_ended = await insert_assignment(db_pool, "mc-live", ended_ago=timedelta(days=6))
    idle_on_dead = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(hours=2))
    idle_on_live = await insert_assignment(db_pool, "mc-live", assigned_ago=timedelta(hours=2))
    busy_on_dead = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(minutes=5))
    await add_lease(db_pool, expired_ago=timedelta(minutes=10))  # its GC is long gone
    live_lease = await add_lease(db_pool, expired_ago=timedelta(seconds=-30))
    send, ticks = trio.open_memory_channel[Tick](10)
    cleanup = ObservedCleanup(db_pool, send)

    async def next_tick() -> Tick:
        return await virtually_within(mock_clock, 1.0, ticks.receive)

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(cleanup.run)

        # 1. Nothing before the interval; at the interval, one tick does all
        #    three jobs.
        await jump_and_settle(mock_clock, INTERVAL_S - 0.001)
        assert ticks.statistics().current_buffer_used == 0
        assert len(await assignment_ids(db_pool)) == 5
        mock_clock.jump(0.001)
        first = await next_tick()
        assert first.at == pytest.approx(start + INTERVAL_S)
        assert (first.result, first.error) == (CleanupResult(1, 1, 1), None)
        left = {recent_ended, idle_on_dead, idle_on_live, busy_on_dead}
        assert await assignment_ids(db_pool) == left
        assert await ended_at(db_pool, idle_on_dead) is not None
        # A live MC ends its own meetings; a fresh assignment is not idle.
        assert await ended_at(db_pool, idle_on_live) is None
        assert await ended_at(db_pool, busy_on_dead) is None
        assert await lease_ids(db_pool) == {live_lease}

        # 2. New work arrives, and the next tick fails on the database.
        overdue = await insert_assignment(db_pool, "mc-live", ended_ago=timedelta(days=9))
        async with fail(db_pool, database_dsn) as provoke:
            mock_clock.jump(INTERVAL_S)
            await provoke()
            second = await next_tick()
        assert second.at == pytest.approx(start + 2 * INTERVAL_S)
        assert second.result is None
        assert type(second.error).__name__ == error_type
        logged = [r for r in caplog.records if r.getMessage() == "cleanup_failed"]
        assert [r.levelno for r in logged] == [level]
        assert await assignment_ids(db_pool) == {*left, overdue}

        # 3. The loop goes on: no retry burst, the next tick on time does the work.
        await jump_and_settle(mock_clock, INTERVAL_S - 0.001)
        assert ticks.statistics().current_buffer_used == 0
        mock_clock.jump(0.001)
        third = await next_tick()
        assert third.at == pytest.approx(start + 3 * INTERVAL_S)
        assert (third.result, third.error) == (CleanupResult(1, 0, 0), None)
        assert await assignment_ids(db_pool) == left
        nursery.cancel_scope.cancel()


# --- the GC's own wiring -------------------------------------------------------------------------

#: The running GC's cleanup settings: none of them the default, so a GC that
#: ignored one (or scaled it wrongly) would do a different tick.
GC_INTERVAL_S = 2.0
GC_RETENTION_DAYS = 2
GC_INACTIVE_S = 600
#: Bound (wall clock) on reading the table while the GC's tick does its
#: work: each read is a round trip, the tick's statements take milliseconds
#: on a quiet machine; a slow commit on a busy one must not fail the test.
TICK_BOUND_S = 20.0


async def assignment_states(pool: asyncpg.Pool) -> dict[uuid.UUID, bool]:
    """Every assignment row: whether it has ended."""
    rows = await fetch(
        pool, "SELECT meeting_id, ended_at IS NOT NULL AS ended FROM meeting_assignments"
    )
    return {r["meeting_id"]: r["ended"] for r in rows}


@pytest.mark.dt_timeout(30)
async def test_a_running_gc_ticks_its_cleanup_with_its_configuration(
    db_pool: asyncpg.Pool, database_dsn: str, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``run_gc`` starts the cleanup task with GC_CLEANUP_INTERVAL_S,
    GC_ASSIGNMENT_RETENTION_DAYS and GC_INACTIVE_MEETING_S: one interval after
    the GC started (not before), the assignment ended past the retention is
    deleted and the idle one on an MC that is not live is ended; the rows on
    the near side of either threshold stay as they were."""
    environ = gc_environ(
        DevKeys.create(tmp_path / "keys"),
        database_dsn,
        GC_CLEANUP_INTERVAL_S=str(GC_INTERVAL_S),
        GC_ASSIGNMENT_RETENTION_DAYS=str(GC_RETENTION_DAYS),
        GC_INACTIVE_MEETING_S=str(GC_INACTIVE_S),
    )
    start = trio.current_time()
    async with running_gc(environ):
        # Only the test moves this clock: the GC's ticks fall at start + k * interval.
        await add_mc(db_pool, "mc-dead", "http://127.0.0.1:1", health="unhealthy")
        await add_mh(db_pool, "mh-1")
        past_retention = await insert_assignment(db_pool, "mc-dead", ended_ago=timedelta(days=3))
        within_retention = await insert_assignment(db_pool, "mc-dead", ended_ago=timedelta(days=1))
        idle = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(minutes=20))
        recent = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(minutes=5))
        before = {past_retention: True, within_retention: True, idle: False, recent: False}
        after = {within_retention: True, idle: True, recent: False}
        assert await assignment_states(db_pool) == before

        await jump_and_settle(mock_clock, start + GC_INTERVAL_S - 0.001 - trio.current_time())
        assert await assignment_states(db_pool) == before  # not yet
        mock_clock.jump(start + GC_INTERVAL_S - trio.current_time())  # the tick
        # The tick's statements run on the database: read until they show
        # (a bound, not a pause: every read is a round trip).
        deadline = time.monotonic() + TICK_BOUND_S
        while (states := await assignment_states(db_pool)) != after:
            if time.monotonic() > deadline:
                pytest.fail(f"no cleanup tick at the interval: {states}")
