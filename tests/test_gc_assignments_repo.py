"""The assignment repositories (SPEC §6.3, §6.4) against real PostgreSQL:
``gc/repositories/assignments.py`` and the join's candidate queries of the MC
and MH repositories, as an attempt's statement (``begin_attempt``) reads them.
Leases are taken as the product takes them: by that statement.

MCs and MHs are inserted through their own repositories (register, then a
heartbeat or load report). Staleness and age are produced by back-dating rows
on the database clock, never by waiting. The race tests run many trio tasks
against one database through a pool of 20 connections.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import cast

import asyncpg
import pytest
import trio
from gc_fleet import set_mc_health, wait_until_blocked_by

from darktower.gc.registry_requests import McHeartbeat, McRegistration, MhLoadReport, MhRegistration
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers
from darktower.gc.repositories.assignments import (
    ActiveAssignment,
    AssignedMh,
    AssignmentSummary,
    EndOutcome,
    RecordOutcome,
)
from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meeting_controllers import McCandidate, MeetingControllerRow
from darktower.shared.db import open_pool
from darktower.shared.seam import run_aio

REGION = "local"
STALE = 30.0
GC_ID = "gc-test"

# --- helpers -------------------------------------------------------------------------------------


def mc_grpc(controller_id: str) -> str:
    return f"http://{controller_id}.test:50052"


def mc_wt(controller_id: str) -> str:
    return f"https://{controller_id}.test:4433"


def mh_wt(handler_id: str) -> str:
    return f"https://{handler_id}.test:4434"


async def add_mc(
    pool: asyncpg.Pool,
    controller_id: str,
    *,
    region: str = REGION,
    health: str = "healthy",
    max_meetings: int = 100,
    meetings: int = 0,
) -> None:
    """Register an MC and (unless ``pending``) heartbeat it with ``health``."""
    reg = McRegistration(controller_id, region, mc_grpc(controller_id), mc_wt(controller_id),
                         max_meetings, 1000)  # fmt: skip
    await run_aio(meeting_controllers.register, pool, reg)
    if health != "pending":
        hb = McHeartbeat(controller_id, meetings, 0, health)
        written = await run_aio(meeting_controllers.heartbeat_batch, pool, [hb])
        assert controller_id in written


async def add_mh(
    pool: asyncpg.Pool,
    handler_id: str,
    *,
    region: str = REGION,
    zone: str = "zone-a",
    health: str = "healthy",
    max_streams: int = 500,
    streams: int = 0,
) -> None:
    reg = MhRegistration(handler_id, region, zone, mh_wt(handler_id),
                         f"http://{handler_id}.test:50060", max_streams)  # fmt: skip
    await run_aio(media_handlers.register, pool, reg)
    if health != "pending":
        report = MhLoadReport(handler_id, streams, health, 1.0, 2.0, 3.0)
        assert await run_aio(media_handlers.load_report, pool, report) is not None


async def backdate(pool: asyncpg.Pool, kind: str, seconds: float, *ids: str) -> None:
    """Age the nodes' last heartbeat on the database clock."""
    table, key = {"mc": ("meeting_controllers", "controller_id"),
                  "mh": ("media_handlers", "handler_id")}[kind]  # fmt: skip
    await run_aio(
        pool.execute,
        f"UPDATE {table} SET last_heartbeat_at = now() - make_interval(secs => $1) "  # noqa: S608
        f"WHERE {key} = any($2::text[])",
        seconds,
        list(ids),
    )


async def mc_row(pool: asyncpg.Pool, controller_id: str) -> MeetingControllerRow:
    row = await run_aio(meeting_controllers.get, pool, controller_id)
    assert row is not None
    return row


async def mc_load(pool: asyncpg.Pool, *controller_ids: str) -> list[int]:
    return [(await mc_row(pool, c)).current_meetings for c in controller_ids]


async def mh_load(pool: asyncpg.Pool, *handler_ids: str) -> list[int]:
    loads = []
    for handler_id in handler_ids:
        row = await run_aio(media_handlers.get, pool, handler_id)
        assert row is not None
        loads.append(row.current_streams)
    return loads


async def next_generation(pool: asyncpg.Pool) -> int:
    generation: int = await run_aio(pool.fetchval, "SELECT nextval('meeting_generation_seq')")
    return generation


async def take(
    pool: asyncpg.Pool,
    meeting_id: uuid.UUID,
    holder: uuid.UUID,
    *,
    ttl_s: float = 10.0,
    gc_id: str = GC_ID,
    region: str = REGION,
    exclude: tuple[str, ...] = (),
    mc_limit: int = 5,
    mh_limit: int = 20,
) -> assignments.AttemptStart:
    """Take (or renew) the meeting's lease as a GC does, by an attempt's
    statement, which also draws the attempt's generation and reads the
    candidates when the lease is taken."""
    return await run_aio(
        assignments.begin_attempt, pool, meeting_id=meeting_id, region=region, holder=holder,
        gc_id=gc_id, ttl_s=ttl_s, stale_after_s=STALE, exclude=exclude, mc_limit=mc_limit,
        mh_limit=mh_limit,
    )  # fmt: skip


async def acquire(
    pool: asyncpg.Pool,
    meeting_id: uuid.UUID,
    holder: uuid.UUID,
    *,
    ttl_s: float = 10.0,
    gc_id: str = GC_ID,
    region: str = REGION,
) -> bool:
    """Whether the lease was taken (see :func:`take`)."""
    start = await take(pool, meeting_id, holder, ttl_s=ttl_s, gc_id=gc_id, region=region)
    return start.taken


async def record(
    pool: asyncpg.Pool,
    meeting_id: uuid.UUID,
    controller_id: str,
    holder: uuid.UUID,
    *,
    generation: int | None = None,
    primary: str = "mh-1",
    backup: str | None = "mh-2",
    region: str = REGION,
    replaces: int | None = None,
) -> RecordOutcome:
    if generation is None:
        generation = await next_generation(pool)
    return await run_aio(
        assignments.record, pool, meeting_id=meeting_id, region=region,
        controller_id=controller_id, generation=generation, gc_id=GC_ID, primary_mh_id=primary,
        backup_mh_id=backup, holder=holder, stale_after_s=STALE, replaces=replaces,
    )  # fmt: skip


async def lease_and_record(
    pool: asyncpg.Pool,
    meeting_id: uuid.UUID,
    controller_id: str,
    *,
    generation: int | None = None,
    primary: str = "mh-1",
    backup: str | None = "mh-2",
) -> RecordOutcome:
    """What a GC does: take the lease, draw a generation, record."""
    holder = uuid.uuid4()
    assert await acquire(pool, meeting_id, holder)
    return await record(pool, meeting_id, controller_id, holder, generation=generation,
                        primary=primary, backup=backup)  # fmt: skip


async def find_active(
    pool: asyncpg.Pool, meeting_id: uuid.UUID, *, stale_after_s: float = STALE
) -> ActiveAssignment | None:
    return await run_aio(assignments.find_active, pool, meeting_id=meeting_id, region=REGION,
                         stale_after_s=stale_after_s)  # fmt: skip


async def assignment_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await run_aio(pool.fetch, "SELECT * FROM meeting_assignments ORDER BY meeting_id"))


async def lease_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """The leases someone holds (a record leaves its lease free: holder NULL)."""
    return list(
        await run_aio(
            pool.fetch, "SELECT * FROM meeting_assignment_leases WHERE holder IS NOT NULL"
        )
    )


def expected(
    meeting_id: uuid.UUID,
    controller_id: str,
    generation: int,
    *,
    live: bool = True,
    primary: str = "mh-1",
    backup: str | None = "mh-2",
) -> ActiveAssignment:
    mhs = [AssignedMh(primary, mh_wt(primary), "primary")]
    if backup is not None:
        mhs.append(AssignedMh(backup, mh_wt(backup), "backup"))
    return ActiveAssignment(meeting_id, REGION, controller_id, mc_grpc(controller_id),
                            mc_wt(controller_id), generation, live, tuple(mhs))  # fmt: skip


@pytest.fixture
async def fleet(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    """Two healthy MCs (``mc-1``, ``mc-2``) and MHs (``mh-1`` in zone a,
    ``mh-2`` in zone b) in the region; the pool."""
    await add_mc(db_pool, "mc-1")
    await add_mc(db_pool, "mc-2")
    await add_mh(db_pool, "mh-1", zone="zone-a")
    await add_mh(db_pool, "mh-2", zone="zone-b")
    return db_pool


# --- find_active ---------------------------------------------------------------------------------


async def test_find_active_returns_every_field_of_the_recorded_assignment(
    fleet: asyncpg.Pool,
) -> None:
    meeting_id = uuid.uuid4()
    assert await find_active(fleet, meeting_id) is None
    outcome = await lease_and_record(fleet, meeting_id, "mc-2", generation=7)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-2", 7))
    assert await find_active(fleet, meeting_id) == expected(meeting_id, "mc-2", 7)
    # Another region has no assignment of this meeting.
    assert await run_aio(assignments.find_active, fleet, meeting_id=meeting_id, region="other",
                         stale_after_s=STALE) is None  # fmt: skip


async def test_single_media_handler_assignment_has_no_backup(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    outcome = await lease_and_record(fleet, meeting_id, "mc-1", generation=3, backup=None)
    want = expected(meeting_id, "mc-1", 3, backup=None)
    assert outcome.assignment == want
    assert await find_active(fleet, meeting_id) == want
    assert len(want.media_handlers) == 1


async def test_mc_live_needs_a_healthy_fresh_mc(db_pool: asyncpg.Pool) -> None:
    await add_mh(db_pool, "mh-1")
    await add_mh(db_pool, "mh-2")
    cases = [  # MC health, heartbeat age (s), live
        ("healthy", 0, True),
        ("healthy", STALE - 1, True),
        ("healthy", STALE + 1, False),
        ("unhealthy", 0, False),
        ("degraded", 0, False),
        ("draining", 0, False),
    ]
    meetings = []
    for i, (health, age_s, _) in enumerate(cases):
        controller_id = f"mc-{i}"
        await add_mc(db_pool, controller_id)
        meeting_id = uuid.uuid4()
        await lease_and_record(db_pool, meeting_id, controller_id, generation=i + 1)
        await set_mc_health(db_pool, controller_id, health)
        await backdate(db_pool, "mc", age_s, controller_id)
        meetings.append(meeting_id)
    found = [await find_active(db_pool, m) for m in meetings]
    assert found == [
        expected(m, f"mc-{i}", i + 1, live=live)
        for i, (m, (_, _, live)) in enumerate(zip(meetings, cases, strict=True))
    ]


async def test_find_active_ignores_ended_assignments(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    outcome = await lease_and_record(fleet, meeting_id, "mc-1")
    assert outcome.assignment is not None
    assert await run_aio(assignments.end_by_owner, fleet, meeting_id=meeting_id, region=REGION,
                         controller_id="mc-1",
                         generation=outcome.assignment.generation) is EndOutcome.ENDED  # fmt: skip
    assert await find_active(fleet, meeting_id) is None


# --- leases --------------------------------------------------------------------------------------


async def test_lease_is_exclusive_renewable_and_records_its_holder(db_pool: asyncpg.Pool) -> None:
    meeting_id, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert await acquire(db_pool, meeting_id, a, gc_id="gc-a")
    assert not await acquire(db_pool, meeting_id, b, gc_id="gc-b")
    assert await acquire(db_pool, meeting_id, a, gc_id="gc-a")  # renewal by the holder
    # Other meetings and other regions are separate leases.
    assert await acquire(db_pool, uuid.uuid4(), b, gc_id="gc-b")
    assert await acquire(db_pool, meeting_id, b, gc_id="gc-b", region="other")
    rows = await run_aio(
        db_pool.fetch,
        "SELECT holder, gc_id, expires_at - now() AS left FROM meeting_assignment_leases "
        "WHERE meeting_id = $1 AND region = $2",
        meeting_id,
        REGION,
    )
    assert [(r["holder"], r["gc_id"]) for r in rows] == [(a, "gc-a")]
    assert 9.0 < rows[0]["left"].total_seconds() <= 10.0


async def test_expired_lease_is_taken_over(db_pool: asyncpg.Pool) -> None:
    meeting_id, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert await acquire(db_pool, meeting_id, a, ttl_s=5)
    # Still 1 s to go on the database clock: not yet.
    await run_aio(db_pool.execute, "UPDATE meeting_assignment_leases SET expires_at = now() + "
                                   "interval '1 second'")  # fmt: skip
    assert not await acquire(db_pool, meeting_id, b)
    await run_aio(db_pool.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                                   "interval '1 millisecond'")  # fmt: skip
    assert await acquire(db_pool, meeting_id, b, gc_id="gc-b")
    assert [(r["holder"], r["gc_id"]) for r in await lease_rows(db_pool)] == [(b, "gc-b")]
    assert not await acquire(db_pool, meeting_id, a)


async def test_release_removes_only_the_callers_own_lease(db_pool: asyncpg.Pool) -> None:
    meeting_id, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert await acquire(db_pool, meeting_id, a)
    await run_aio(assignments.release_lease, db_pool, meeting_id=meeting_id, region=REGION,
                  holder=b)  # fmt: skip
    assert [r["holder"] for r in await lease_rows(db_pool)] == [a]
    assert not await acquire(db_pool, meeting_id, b)
    await run_aio(assignments.release_lease, db_pool, meeting_id=meeting_id, region=REGION,
                  holder=a)  # fmt: skip
    assert await lease_rows(db_pool) == []
    assert await acquire(db_pool, meeting_id, b)


async def test_release_keeps_the_mark_of_the_last_record(db_pool: asyncpg.Pool) -> None:
    """A joiner that took a lease freed by a record, found the assignment and
    released: the record's generation mark must outlive the release, or a
    join whose snapshot predates the record would trust it."""
    meeting_id, holder = uuid.uuid4(), uuid.uuid4()
    assert await acquire(db_pool, meeting_id, holder)
    await run_aio(db_pool.execute, "UPDATE meeting_assignment_leases SET recorded_generation = 7")
    await run_aio(assignments.release_lease, db_pool, meeting_id=meeting_id, region=REGION,
                  holder=holder)  # fmt: skip
    rows = await run_aio(
        db_pool.fetch, "SELECT holder, recorded_generation FROM meeting_assignment_leases"
    )
    assert [(r["holder"], r["recorded_generation"]) for r in rows] == [(None, 7)]


async def test_delete_expired_leases_counts_and_keeps_live_ones(db_pool: asyncpg.Pool) -> None:
    live, dead1, dead2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for meeting_id in (live, dead1, dead2):
        assert await acquire(db_pool, meeting_id, uuid.uuid4())
    await run_aio(
        db_pool.execute,
        "UPDATE meeting_assignment_leases SET expires_at = now() - interval '6 minutes' "
        "WHERE meeting_id = any($1::uuid[])",
        [dead1, dead2],
    )
    # Just expired: still its slow holder's to record with - not swept yet.
    await run_aio(
        db_pool.execute,
        "UPDATE meeting_assignment_leases SET expires_at = now() - interval '1 second' "
        "WHERE meeting_id = $1",
        live,
    )
    assert await run_aio(assignments.delete_expired_leases, db_pool) == 2
    assert [r["meeting_id"] for r in await lease_rows(db_pool)] == [live]
    assert await run_aio(assignments.delete_expired_leases, db_pool) == 0


# --- begin_attempt -------------------------------------------------------------------------------


async def begin(
    pool: asyncpg.Pool, meeting_id: uuid.UUID, holder: uuid.UUID, *, exclude: tuple[str, ...] = ()
) -> assignments.AttemptStart:
    return await take(pool, meeting_id, holder, exclude=exclude)


async def test_begin_attempt_reads_everything_an_attempt_needs(fleet: asyncpg.Pool) -> None:
    await add_mc(fleet, "mc-3", region="elsewhere")
    await add_mh(fleet, "mh-far", region="elsewhere")
    meeting_id, holder = uuid.uuid4(), uuid.uuid4()
    before = await next_generation(fleet)
    # mc-1's heartbeat is older: mc-2 ranks first (same load ratio).
    await backdate(fleet, "mc", 1, "mc-1")
    start = await begin(fleet, meeting_id, holder)
    assert start.taken
    assert start.snapshot_current
    assert start.active is None
    assert start.generation > before
    # Every field of the candidates of the region (not mc-3 and mh-far).
    assert start.mc_candidates == (
        McCandidate("mc-2", mc_grpc("mc-2"), mc_wt("mc-2"), 0, 100),
        McCandidate("mc-1", mc_grpc("mc-1"), mc_wt("mc-1"), 0, 100),
    )
    assert sorted(start.mh_candidates, key=lambda c: c.handler_id) == [
        MhCandidate("mh-1", "zone-a", mh_wt("mh-1"), 0, 500, "healthy"),
        MhCandidate("mh-2", "zone-b", mh_wt("mh-2"), 0, 500, "healthy"),
    ]
    [lease] = await lease_rows(fleet)
    assert (lease["meeting_id"], lease["holder"], lease["gc_id"]) == (meeting_id, holder, GC_ID)
    # A renewal excludes refused MCs and draws a newer generation.
    again = await begin(fleet, meeting_id, holder, exclude=("mc-1",))
    assert again.taken
    assert again.generation > start.generation
    assert [c.controller_id for c in again.mc_candidates] == ["mc-2"]


async def test_begin_attempt_is_refused_while_another_holds_the_lease(fleet: asyncpg.Pool) -> None:
    meeting_id, theirs = uuid.uuid4(), uuid.uuid4()
    assert await acquire(fleet, meeting_id, theirs)
    before = await next_generation(fleet)
    assert await begin(fleet, meeting_id, uuid.uuid4()) == assignments.AttemptStart(taken=False)
    # Nothing was drawn for the refused attempt.
    assert await next_generation(fleet) == before + 1
    assert [r["holder"] for r in await lease_rows(fleet)] == [theirs]


async def test_begin_attempt_sees_the_active_assignment(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    generation = await next_generation(fleet)
    await lease_and_record(fleet, meeting_id, "mc-2", generation=generation)
    # The record freed its lease: the next holder takes it and sees the record.
    start = await begin(fleet, meeting_id, uuid.uuid4())
    assert start.taken
    assert start.snapshot_current
    assert start.active == expected(meeting_id, "mc-2", generation)
    # Not live any more: reported so (the flow then replaces it).
    await backdate(fleet, "mc", STALE + 1, "mc-2")
    later = await begin(fleet, meeting_id, uuid.uuid4())
    assert later.taken is False  # the previous attempt's lease is still live
    await run_aio(fleet.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                  "interval '1 second'")  # fmt: skip
    later = await begin(fleet, meeting_id, uuid.uuid4())
    assert later.active == expected(meeting_id, "mc-2", generation, live=False)
    assert [c.controller_id for c in later.mc_candidates] == ["mc-1"]


async def test_begin_attempt_notices_a_record_its_snapshot_missed(
    fleet: asyncpg.Pool, database_dsn: str
) -> None:
    """The hazard of reading the assignment and taking the lease in one
    statement: holder A's lease expired, and A records while B's attempt
    runs. B's statement takes its snapshot before A commits, then waits on
    the lease row A is consuming and takes it once A commits. B's snapshot
    misses A's assignment - and B must be told so (``snapshot_current``
    false), or it would call an MC with a newer generation and fence A's
    live assignment out. Deterministic: B is observed blocked on the row lock
    (pg_locks) before A commits."""
    meeting_id, a_holder = uuid.uuid4(), uuid.uuid4()
    assert await acquire(fleet, meeting_id, a_holder)
    await run_aio(fleet.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                  "interval '1 second'")  # fmt: skip
    generation = await next_generation(fleet)
    a_con = await run_aio(asyncpg.connect, database_dsn)
    try:
        a_tx = a_con.transaction()
        await run_aio(a_tx.start)
        a_pid = a_con.get_server_pid()
        outcome = await run_aio(
            # One connection, so the record stays uncommitted; it has the
            # pool's fetchrow.
            assignments.record, cast(asyncpg.Pool, a_con), meeting_id=meeting_id, region=REGION,
            controller_id="mc-1", generation=generation, gc_id="gc-a", primary_mh_id="mh-1",
            backup_mh_id="mh-2", holder=a_holder, stale_after_s=STALE, replaces=None,
        )  # fmt: skip
        assert outcome.won
        result: list[assignments.AttemptStart] = []

        async def attempt_b() -> None:
            result.append(await begin(fleet, meeting_id, uuid.uuid4()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt_b)
            await wait_until_blocked_by(fleet, a_pid)  # B blocks on A's row lock at once
            await run_aio(a_tx.commit)
        [b] = result
    finally:
        await run_aio(a_con.close)
    assert b.taken
    assert not b.snapshot_current
    assert b.active is None
    assert b.generation > generation
    # What the flow then does: read again, and find A's live assignment.
    assert await find_active(fleet, meeting_id) == expected(meeting_id, "mc-1", generation)


# --- record --------------------------------------------------------------------------------------


async def test_record_inserts_bumps_load_once_and_consumes_the_lease(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    generation = await next_generation(fleet)
    outcome = await lease_and_record(fleet, meeting_id, "mc-1", generation=generation)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-1", generation))
    [row] = await assignment_rows(fleet)
    assert (row["meeting_id"], row["region"], row["meeting_controller_id"], row["generation"],
            row["assigned_by_gc_id"], row["ended_at"], row["primary_mh_id"],
            row["backup_mh_id"]) == (meeting_id, REGION, "mc-1", generation, GC_ID, None,
                                     "mh-1", "mh-2")  # fmt: skip
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 0]
    assert await mh_load(fleet, "mh-1", "mh-2") == [1, 1]
    assert await lease_rows(fleet) == []
    # The consumed lease stays, free, marked with what was recorded under it.
    [lease] = await run_aio(fleet.fetch, "SELECT * FROM meeting_assignment_leases")
    assert (lease["holder"], lease["recorded_generation"]) == (None, generation)


async def test_record_without_the_lease_writes_nothing(fleet: asyncpg.Pool) -> None:
    meeting_id, mine, theirs = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # No lease at all.
    assert await record(fleet, meeting_id, "mc-1", mine) == RecordOutcome(False, None)
    # Someone else's lease: refused, and theirs stays.
    assert await acquire(fleet, meeting_id, theirs)
    assert await record(fleet, meeting_id, "mc-1", mine) == RecordOutcome(False, None)
    assert [r["holder"] for r in await lease_rows(fleet)] == [theirs]
    assert await assignment_rows(fleet) == []
    assert await mc_load(fleet, "mc-1") == [0]
    assert await mh_load(fleet, "mh-1", "mh-2") == [0, 0]


async def test_record_after_the_lease_was_taken_over_loses(fleet: asyncpg.Pool) -> None:
    meeting_id, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert await acquire(fleet, meeting_id, a)
    gen_a = await next_generation(fleet)
    await run_aio(fleet.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                                 "interval '1 second'")  # fmt: skip
    assert await acquire(fleet, meeting_id, b)
    gen_b = await next_generation(fleet)
    lost = await record(fleet, meeting_id, "mc-1", a, generation=gen_a)
    assert lost == RecordOutcome(False, None)
    outcome = await record(fleet, meeting_id, "mc-2", b, generation=gen_b)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-2", gen_b))
    assert await mc_load(fleet, "mc-1", "mc-2") == [0, 1]


async def test_expired_lease_nobody_took_is_still_the_holders(fleet: asyncpg.Pool) -> None:
    meeting_id, a = uuid.uuid4(), uuid.uuid4()
    assert await acquire(fleet, meeting_id, a)
    await run_aio(fleet.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                                 "interval '1 second'")  # fmt: skip
    outcome = await record(fleet, meeting_id, "mc-1", a, generation=4)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-1", 4))


async def test_record_never_replaces_a_live_assignment(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    first = await lease_and_record(fleet, meeting_id, "mc-1", generation=10)
    before = await assignment_rows(fleet)
    # Another GC got the lease after the first record and assigned mc-2.
    loser = uuid.uuid4()
    assert await acquire(fleet, meeting_id, loser)
    second = await record(fleet, meeting_id, "mc-2", loser, generation=11, primary="mh-2",
                          backup="mh-1")  # fmt: skip
    assert second == RecordOutcome(False, first.assignment)
    assert await assignment_rows(fleet) == before
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 0]
    assert await mh_load(fleet, "mh-1", "mh-2") == [1, 1]
    # A lost record has no more use for its lease.
    assert await lease_rows(fleet) == []


async def test_record_replaces_the_live_assignment_its_attempt_judged_gone(
    fleet: asyncpg.Pool,
) -> None:
    """mc-1 was not live when the attempt read (``replaces`` = its
    generation) and came back before the record: the MC that accepted the
    newer generation has fenced it out, so the row follows the fence. Any
    other live row (a generation the attempt did not judge) still stands."""
    meeting_id = uuid.uuid4()
    await lease_and_record(fleet, meeting_id, "mc-1", generation=10)
    holder = uuid.uuid4()
    assert await acquire(fleet, meeting_id, holder)
    # Not the row the attempt judged (it saw generation 9): refused.
    refused = await record(fleet, meeting_id, "mc-2", holder, generation=11, replaces=9)
    assert refused == RecordOutcome(False, expected(meeting_id, "mc-1", 10))
    holder = uuid.uuid4()
    assert await acquire(fleet, meeting_id, holder)
    outcome = await record(fleet, meeting_id, "mc-2", holder, generation=12, replaces=10)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-2", 12))
    [row] = await assignment_rows(fleet)
    assert (row["meeting_controller_id"], row["generation"], row["ended_at"]) == ("mc-2", 12, None)
    # mc-1's estimate is left to its next heartbeat, as for a dead MC.
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 1]
    assert await lease_rows(fleet) == []


async def test_record_replaces_an_ended_assignment(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    await lease_and_record(fleet, meeting_id, "mc-1", generation=10)
    await run_aio(fleet.execute, "UPDATE meeting_assignments SET ended_at = now(), "
                                 "assigned_at = now() - interval '1 hour'")  # fmt: skip
    outcome = await lease_and_record(fleet, meeting_id, "mc-2", generation=11, backup=None)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-2", 11, backup=None))
    [row] = await assignment_rows(fleet)
    assert row["ended_at"] is None
    assert row["backup_mh_id"] is None
    age = await run_aio(fleet.fetchval, "SELECT now() - assigned_at FROM meeting_assignments")
    assert age.total_seconds() < 60
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 1]


async def test_loser_gets_a_winner_committed_while_its_record_waited(
    fleet: asyncpg.Pool, database_dsn: str
) -> None:
    """SPEC §6.3 step 7's snapshot pitfall: the record starts, then waits on a
    concurrent, not yet committed insert of the meeting's row; that winner
    commits. The record must lose *and* hand back that winner, which its own
    statement's snapshot cannot see."""
    meeting_id, holder = uuid.uuid4(), uuid.uuid4()
    assert await acquire(fleet, meeting_id, holder)
    other: asyncpg.Connection = await run_aio(asyncpg.connect, database_dsn)
    outcomes: list[RecordOutcome] = []

    async def record_in_background() -> None:
        outcomes.append(await record(fleet, meeting_id, "mc-2", holder, generation=6))

    try:
        winner = other.transaction()
        await run_aio(winner.start)
        await run_aio(
            other.execute,
            "INSERT INTO meeting_assignments (meeting_id, region, meeting_controller_id, "
            "generation, assigned_by_gc_id, primary_mh_id, backup_mh_id) "
            "VALUES ($1, $2, 'mc-1', 5, 'gc-other', 'mh-1', 'mh-2')",
            meeting_id,
            REGION,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record_in_background)
            # Until the record is blocked on the uncommitted row (no sleeping:
            # each check is a round trip).
            while not await run_aio(
                fleet.fetchval,
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ):
                await trio.lowlevel.checkpoint()
            await run_aio(winner.commit)
    finally:
        await run_aio(other.close)
    assert outcomes == [RecordOutcome(False, expected(meeting_id, "mc-1", 5))]
    assert await mc_load(fleet, "mc-1", "mc-2") == [0, 0]
    assert await lease_rows(fleet) == []


async def test_record_overwrites_an_assignment_whose_mc_is_not_live(
    fleet: asyncpg.Pool,
) -> None:
    """The old assignment ends by being overwritten in place: the primary
    key is (meeting, region), so no history of it remains."""
    meetings = {}
    for how in ("unhealthy", "stale", "draining"):
        await add_mc(fleet, f"mc-{how}")
        meetings[how] = uuid.uuid4()
        await lease_and_record(fleet, meetings[how], f"mc-{how}", generation=10)
    await set_mc_health(fleet, "mc-unhealthy", "unhealthy")
    await backdate(fleet, "mc", STALE + 1, "mc-stale")
    await set_mc_health(fleet, "mc-draining", "draining")
    for meeting_id in meetings.values():
        outcome = await lease_and_record(fleet, meeting_id, "mc-2", generation=11)
        assert outcome == RecordOutcome(True, expected(meeting_id, "mc-2", 11))
    rows = await assignment_rows(fleet)
    assert {(r["meeting_id"], r["meeting_controller_id"], r["generation"], r["ended_at"])
            for r in rows} == {(m, "mc-2", 11, None) for m in meetings.values()}  # fmt: skip
    # The dead MCs' estimates are left to their next heartbeat.
    assert await mc_load(fleet, "mc-unhealthy", "mc-stale", "mc-draining", "mc-2") == [1, 1, 1, 3]
    assert await mh_load(fleet, "mh-1", "mh-2") == [6, 6]


async def test_record_never_moves_the_generation_backwards(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    await lease_and_record(fleet, meeting_id, "mc-1", generation=10)
    await set_mc_health(fleet, "mc-1", "unhealthy")
    outcome = await lease_and_record(fleet, meeting_id, "mc-2", generation=9)
    assert outcome == RecordOutcome(False, expected(meeting_id, "mc-1", 10, live=False))
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 0]


async def test_recorded_mc_that_is_not_live_is_reported_so(fleet: asyncpg.Pool) -> None:
    """The record reports the MC's liveness as the statement saw it."""
    meeting_id = uuid.uuid4()
    await backdate(fleet, "mc", STALE + 5, "mc-1")
    outcome = await lease_and_record(fleet, meeting_id, "mc-1", generation=2)
    assert outcome == RecordOutcome(True, expected(meeting_id, "mc-1", 2, live=False))


# --- ending and cleanup --------------------------------------------------------------------------


async def test_end_by_owner_only_for_the_owning_mc(fleet: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    await lease_and_record(fleet, meeting_id, "mc-1", generation=3)
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 0]

    async def end(controller_id: str) -> EndOutcome:
        return await run_aio(assignments.end_by_owner, fleet, meeting_id=meeting_id,
                             region=REGION, controller_id=controller_id,
                             generation=3)  # fmt: skip

    assert await end("mc-2") is EndOutcome.NOT_OWNER
    assert await find_active(fleet, meeting_id) is not None
    assert await mc_load(fleet, "mc-1", "mc-2") == [1, 0]

    assert await end("mc-1") is EndOutcome.ENDED
    [row] = await assignment_rows(fleet)
    assert row["ended_at"] is not None
    assert await mc_load(fleet, "mc-1", "mc-2") == [0, 0]
    # Ending again changes nothing; the count never goes below zero.
    assert await end("mc-1") is EndOutcome.NOT_OWNER
    await run_aio(fleet.execute, "UPDATE meeting_assignments SET ended_at = NULL")
    assert await end("mc-1") is EndOutcome.ENDED
    assert await mc_load(fleet, "mc-1") == [0]


async def test_end_by_owner_never_ends_a_newer_assignment_of_the_owner(
    fleet: asyncpg.Pool,
) -> None:
    """A late report of the owner's end under an older generation (it was
    fenced out, then assigned the meeting again) leaves the newer assignment;
    a generation at least the recorded one, or none (0), ends it."""
    meetings = [uuid.uuid4() for _ in range(3)]
    for meeting_id in meetings:
        await lease_and_record(fleet, meeting_id, "mc-1", generation=10)
    assert await mc_load(fleet, "mc-1") == [3]

    async def end(meeting_id: uuid.UUID, generation: int) -> EndOutcome:
        return await run_aio(assignments.end_by_owner, fleet, meeting_id=meeting_id,
                             region=REGION, controller_id="mc-1",
                             generation=generation)  # fmt: skip

    for meeting_id in meetings:
        assert await end(meeting_id, 9) is EndOutcome.STALE_GENERATION
        assert await find_active(fleet, meeting_id) == expected(meeting_id, "mc-1", 10)
    assert await mc_load(fleet, "mc-1") == [3]
    outcomes = [await end(m, g) for m, g in zip(meetings, (10, 11, 0), strict=True)]
    assert outcomes == [EndOutcome.ENDED] * 3
    assert [r["ended_at"] is not None for r in await assignment_rows(fleet)] == [True] * 3
    assert await mc_load(fleet, "mc-1") == [0]


@pytest.mark.parametrize(
    "concurrently",
    [
        "UPDATE meeting_assignments SET meeting_controller_id = 'mc-2', generation = 6",
        "UPDATE meeting_assignments SET ended_at = now()",
    ],
    ids=["replaced", "ended"],
)
async def test_end_by_owner_that_waited_on_a_concurrent_change_is_not_the_owner(
    fleet: asyncpg.Pool, database_dsn: str, concurrently: str
) -> None:
    """mc-1's report (generation 5) waits on a transaction that replaces the
    row by mc-2's or ends it, then ends nothing: it is told ``not_owner`` -
    what its own statement's snapshot still shows (mc-1's active row) would
    say ``stale_generation``."""
    meeting_id = uuid.uuid4()
    await lease_and_record(fleet, meeting_id, "mc-1", generation=5)
    other: asyncpg.Connection = await run_aio(asyncpg.connect, database_dsn)
    outcomes: list[EndOutcome] = []

    async def end() -> None:
        outcomes.append(await run_aio(assignments.end_by_owner, fleet, meeting_id=meeting_id,
                                      region=REGION, controller_id="mc-1",
                                      generation=5))  # fmt: skip

    try:
        change = other.transaction()
        await run_aio(change.start)
        await run_aio(other.execute, concurrently)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end)
            await wait_until_blocked_by(fleet, other.get_server_pid())
            await run_aio(change.commit)
    finally:
        await run_aio(other.close)
    assert outcomes == [EndOutcome.NOT_OWNER]
    assert await mc_load(fleet, "mc-1") == [1]  # nothing of mc-1's was ended


async def insert_assignment(
    pool: asyncpg.Pool,
    controller_id: str,
    *,
    assigned_ago_s: float = 0,
    ended_ago_s: float | None = None,
    meeting_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """An assignment row written directly, aged on the database clock."""
    meeting_id = meeting_id or uuid.uuid4()
    await run_aio(
        pool.execute,
        "INSERT INTO meeting_assignments (meeting_id, region, meeting_controller_id, generation, "
        "assigned_at, assigned_by_gc_id, ended_at, primary_mh_id) VALUES ($1, $2, $3, "
        "nextval('meeting_generation_seq'), now() - make_interval(secs => $4), $5, "
        "now() - make_interval(secs => $6), 'mh-1')",
        meeting_id,
        REGION,
        controller_id,
        assigned_ago_s,
        GC_ID,
        ended_ago_s,
    )
    return meeting_id


async def test_delete_ended_before_in_bounded_batches_oldest_first(fleet: asyncpg.Pool) -> None:
    day = 86400.0
    old = [await insert_assignment(fleet, "mc-1", ended_ago_s=8 * day + i) for i in range(7)]
    recent = await insert_assignment(fleet, "mc-1", ended_ago_s=6 * day)
    active = await insert_assignment(fleet, "mc-1", assigned_ago_s=30 * day)

    async def delete(batch: int) -> int:
        return await run_aio(assignments.delete_ended_before, fleet, older_than_s=7 * day,
                             batch=batch)  # fmt: skip

    assert await delete(3) == 3
    # Oldest first: the three ended longest ago went.
    left = {r["meeting_id"] for r in await assignment_rows(fleet)}
    assert left == {*old[:4], recent, active}
    assert [await delete(3), await delete(3), await delete(3)] == [3, 1, 0]
    assert {r["meeting_id"] for r in await assignment_rows(fleet)} == {recent, active}


async def test_end_inactive_ends_only_idle_meetings_of_dead_mcs(fleet: asyncpg.Pool) -> None:
    hour = 3600.0
    await add_mc(fleet, "mc-dead")
    await backdate(fleet, "mc", STALE + 1, "mc-dead")
    await add_mc(fleet, "mc-sick", health="unhealthy")

    async def meeting(last_active_ago_s: float | None) -> uuid.UUID:
        meeting_id = uuid.uuid4()
        await run_aio(
            fleet.execute,
            "INSERT INTO meetings (meeting_id, org_id, meeting_code, display_name, created_by, "
            "status, last_active_at) VALUES ($1, $2, $3, 'm', 'u', 'active', "
            "now() - make_interval(secs => $4))",
            meeting_id,
            uuid.uuid4(),
            f"code-{meeting_id.hex[:12]}",
            last_active_ago_s,
        )
        return meeting_id

    # Idle for 2 h on a dead MC: ended (also with no meeting row at all, or a
    # meeting never joined since it was assigned).
    idle_dead = await insert_assignment(fleet, "mc-dead", assigned_ago_s=3 * hour,
                                        meeting_id=await meeting(2 * hour))  # fmt: skip
    idle_sick = await insert_assignment(fleet, "mc-sick", assigned_ago_s=3 * hour,
                                        meeting_id=await meeting(None))  # fmt: skip
    orphan = await insert_assignment(fleet, "mc-dead", assigned_ago_s=3 * hour)
    # Kept: the MC is live (it ends its own meetings) ...
    on_live = await insert_assignment(fleet, "mc-1", assigned_ago_s=3 * hour,
                                      meeting_id=await meeting(2 * hour))  # fmt: skip
    # ... joined recently ...
    recent_join = await insert_assignment(fleet, "mc-dead", assigned_ago_s=3 * hour,
                                          meeting_id=await meeting(10))  # fmt: skip
    # ... assigned recently (a re-assignment of a long-idle meeting) ...
    recent_assign = await insert_assignment(fleet, "mc-dead", assigned_ago_s=10,
                                            meeting_id=await meeting(2 * hour))  # fmt: skip
    # ... or already ended.
    ended = await insert_assignment(fleet, "mc-dead", assigned_ago_s=3 * hour, ended_ago_s=hour)

    async def end_inactive(batch: int) -> int:
        return await run_aio(assignments.end_inactive, fleet, inactive_s=hour,
                             stale_after_s=STALE, batch=batch)  # fmt: skip

    assert await end_inactive(2) == 2
    assert await end_inactive(2) == 1
    assert await end_inactive(2) == 0
    rows = {r["meeting_id"]: r["ended_at"] for r in await assignment_rows(fleet)}
    assert {m for m, e in rows.items() if e is not None} == {idle_dead, idle_sick, orphan, ended}
    assert {m for m, e in rows.items() if e is None} == {on_live, recent_join, recent_assign}


async def test_list_active_newest_first_with_limit(fleet: asyncpg.Pool) -> None:
    oldest = await insert_assignment(fleet, "mc-1", assigned_ago_s=300)
    middle = await insert_assignment(fleet, "mc-2", assigned_ago_s=200)
    await insert_assignment(fleet, "mc-1", assigned_ago_s=100, ended_ago_s=50)
    newest = await lease_and_record(fleet, uuid.uuid4(), "mc-2", generation=99)
    assert newest.assignment is not None
    listed = await run_aio(assignments.list_active, fleet, limit=10)
    assert [a.meeting_id for a in listed] == [newest.assignment.meeting_id, middle, oldest]
    first = listed[0]
    assert isinstance(first.assigned_at, datetime)
    # Assignments of lease_and_record have no meetings row: no code to show.
    assert first == AssignmentSummary(newest.assignment.meeting_id, None, REGION, "mc-2", 99,
                                      first.assigned_at, GC_ID, "mh-1", "mh-2")  # fmt: skip
    assert [a.meeting_id for a in await run_aio(assignments.list_active, fleet, limit=2)] == [
        newest.assignment.meeting_id,
        middle,
    ]


# --- candidates ----------------------------------------------------------------------------------


async def first_attempt(
    pool: asyncpg.Pool,
    exclude: tuple[str, ...] = (),
    *,
    mc_limit: int = 5,
    mh_limit: int = 20,
    region: str = REGION,
) -> assignments.AttemptStart:
    """The first attempt of a fresh meeting (its lease is free): what an
    attempt's statement reads."""
    start = await take(pool, uuid.uuid4(), uuid.uuid4(), region=region, exclude=exclude,
                       mc_limit=mc_limit, mh_limit=mh_limit)  # fmt: skip
    assert start.taken
    return start


async def mc_candidates(
    pool: asyncpg.Pool, exclude: tuple[str, ...] = (), *, limit: int = 5, region: str = REGION
) -> tuple[int, list[str]]:
    """An attempt's generation and its MC candidates' ids, best first."""
    start = await first_attempt(pool, exclude, mc_limit=limit, region=region)
    return start.generation, [c.controller_id for c in start.mc_candidates]


async def mh_candidates(pool: asyncpg.Pool, *, limit: int = 20) -> list[MhCandidate]:
    """An attempt's MH candidates, by id: their order is not part of the
    statement's answer (the selection ranks them itself)."""
    start = await first_attempt(pool, mh_limit=limit)
    return sorted(start.mh_candidates, key=lambda c: c.handler_id)


async def mh_candidate_ids(pool: asyncpg.Pool, *, limit: int = 20) -> list[str]:
    return [c.handler_id for c in await mh_candidates(pool, limit=limit)]


async def test_mc_candidates_filter_by_region_health_freshness_and_room(
    db_pool: asyncpg.Pool,
) -> None:
    await add_mc(db_pool, "ok")
    await add_mc(db_pool, "other-region", region="elsewhere")
    for health in ("pending", "degraded", "unhealthy", "draining"):
        await add_mc(db_pool, health, health=health)
    await add_mc(db_pool, "stale")
    await backdate(db_pool, "mc", STALE + 1, "stale")
    await add_mc(db_pool, "nearly-stale")
    await backdate(db_pool, "mc", STALE - 1, "nearly-stale")
    await add_mc(db_pool, "full", max_meetings=10, meetings=10)
    await add_mc(db_pool, "overfull", max_meetings=10, meetings=11)
    await add_mc(db_pool, "one-left", max_meetings=10, meetings=9)
    _, ids = await mc_candidates(db_pool)
    assert sorted(ids) == ["nearly-stale", "ok", "one-left"]
    _, ids = await mc_candidates(db_pool, region="elsewhere")
    assert ids == ["other-region"]
    _, ids = await mc_candidates(db_pool, ("ok", "one-left", "not-registered"))
    assert ids == ["nearly-stale"]


async def test_mc_candidates_order_limit_and_fields(db_pool: asyncpg.Pool) -> None:
    # Load ratios: a 0.5, b 0.1, c 0.1 (older heartbeat), d 0.0, e 0.9, f 0.3, g 0.2.
    for cid, cur, cap in [("a", 50, 100), ("b", 1, 10), ("c", 10, 100), ("d", 0, 7),
                          ("e", 9, 10), ("f", 3, 10), ("g", 20, 100)]:  # fmt: skip
        await add_mc(db_pool, cid, max_meetings=cap, meetings=cur)
    await backdate(db_pool, "mc", 5, "c")
    await backdate(db_pool, "mc", 1, "b")
    _, ids = await mc_candidates(db_pool, limit=10)
    assert ids == ["d", "b", "c", "g", "f", "a", "e"]
    _, ids = await mc_candidates(db_pool)
    assert ids == ["d", "b", "c", "g", "f"]
    # Freshest heartbeat first among equal ratios.
    await backdate(db_pool, "mc", 10, "b")
    _, ids = await mc_candidates(db_pool, limit=3)
    assert ids == ["d", "c", "b"]
    start = await first_attempt(db_pool, mc_limit=1)
    assert start.mc_candidates == (McCandidate("d", mc_grpc("d"), mc_wt("d"), 0, 7),)


async def test_attempts_draw_strictly_increasing_generations(db_pool: asyncpg.Pool) -> None:
    # Drawn even when there is no candidate at all.
    generations = [(await mc_candidates(db_pool))[0] for _ in range(3)]
    await add_mc(db_pool, "mc-1")
    generations += [(await mc_candidates(db_pool))[0] for _ in range(3)]
    assert generations == sorted(set(generations))
    assert len(generations) == 6
    assert (await mc_candidates(db_pool))[1] == ["mc-1"]


async def test_live_endpoints_are_healthy_fresh_mcs(db_pool: asyncpg.Pool) -> None:
    await add_mc(db_pool, "live")
    await add_mc(db_pool, "far", region="elsewhere")
    await add_mc(db_pool, "stale")
    await backdate(db_pool, "mc", STALE + 1, "stale")
    await add_mc(db_pool, "draining", health="draining")
    await add_mc(db_pool, "pending", health="pending")
    live = await run_aio(meeting_controllers.live_endpoints, db_pool, stale_after_s=STALE)
    assert live == {"live": mc_grpc("live"), "far": mc_grpc("far")}


async def test_mh_candidates_include_degraded_and_exclude_the_unusable(
    db_pool: asyncpg.Pool,
) -> None:
    await add_mh(db_pool, "h-half", streams=50, max_streams=100)
    await add_mh(db_pool, "h-empty", zone="zone-b")
    await add_mh(db_pool, "h-degraded", health="degraded", streams=1, max_streams=10)
    await add_mh(db_pool, "h-one-left", streams=9, max_streams=10)
    for health in ("pending", "unhealthy", "draining"):
        await add_mh(db_pool, f"h-{health}", health=health)
    await add_mh(db_pool, "h-stale")
    await backdate(db_pool, "mh", STALE + 1, "h-stale")
    await add_mh(db_pool, "h-full", streams=10, max_streams=10)
    await add_mh(db_pool, "h-far", region="elsewhere")
    candidates = await mh_candidates(db_pool)
    assert [c.handler_id for c in candidates] == ["h-degraded", "h-empty", "h-half", "h-one-left"]
    assert candidates[0] == MhCandidate(
        "h-degraded", "zone-a", mh_wt("h-degraded"), 1, 10, "degraded"
    )
    assert candidates[1] == MhCandidate("h-empty", "zone-b", mh_wt("h-empty"), 0, 500, "healthy")
    # The limit keeps the best by score: free share, halved when degraded
    # (0.9 / 2 ranks below 0.5, above 0.1).
    assert await mh_candidate_ids(db_pool, limit=2) == ["h-empty", "h-half"]
    assert await mh_candidate_ids(db_pool, limit=3) == ["h-degraded", "h-empty", "h-half"]
    # The best of every zone comes along beyond the limit: a backup in
    # another zone is never cut off by a crowd in one zone.
    await add_mh(db_pool, "h-c", zone="zone-c", streams=80, max_streams=100)
    assert await mh_candidate_ids(db_pool, limit=1) == ["h-c", "h-empty", "h-half"]


# --- races ---------------------------------------------------------------------------------------

N_MCS = 5


class Wakeups:
    """In-process stand-in for the join flow's polling: a contender that
    finds the lease taken waits until some contender of the meeting has
    recorded, instead of spinning on the database or sleeping on the wall
    clock. Each record wakes ``FANOUT`` waiters, which then race for the
    lease (waking all would cost O(n²) acquires)."""

    FANOUT = 4

    def __init__(self) -> None:
        self.records = 0
        self._waiters: deque[trio.Event] = deque()

    def notify(self) -> None:
        self.records += 1
        for _ in range(min(self.FANOUT, len(self._waiters))):
            self._waiters.popleft().set()

    async def wait_after(self, seen: int) -> None:
        """Wait for a record after the ``seen``-th (at once if there was one)."""
        if self.records != seen:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        self._waiters.append(event)
        await event.wait()


async def contend(
    pool: asyncpg.Pool,
    meeting_id: uuid.UUID,
    controller_id: str,
    calls: list[RecordOutcome],
    wakeups: Wakeups,
    generations: Iterator[int] | None = None,
) -> RecordOutcome:
    """A GC's assignment race without the join flow's look-before-lease:
    take the lease (waiting while another holds it) with the attempt's
    generation (or one from ``generations``), record; until the record
    yields an assignment."""
    holder = uuid.uuid4()
    while True:
        # Read before trying, so a record finishing meanwhile is not missed.
        seen = wakeups.records
        start = await take(pool, meeting_id, holder)
        if not start.taken:
            await wakeups.wait_after(seen)
            continue
        generation = start.generation if generations is None else next(generations)
        outcome = await record(pool, meeting_id, controller_id, holder, generation=generation)
        calls.append(outcome)
        wakeups.notify()
        if outcome.assignment is not None:
            return outcome


async def check_one_assignment_per_meeting(
    pool: asyncpg.Pool, results: dict[uuid.UUID, list[RecordOutcome]]
) -> None:
    rows = await assignment_rows(pool)
    assert len(rows) == len(results)
    active = {row["meeting_id"]: row for row in rows if row["ended_at"] is None}
    assert set(active) == set(results)
    for meeting_id, outcomes in results.items():
        row = active[meeting_id]
        assert sum(o.won for o in outcomes) == 1, meeting_id
        want = expected(meeting_id, row["meeting_controller_id"], row["generation"])
        assert {o.assignment for o in outcomes} == {want}
    per_mc = [sum(1 for r in rows if r["meeting_controller_id"] == f"mc-{i}") for i in range(N_MCS)]
    assert await mc_load(pool, *(f"mc-{i}" for i in range(N_MCS))) == per_mc
    assert await mh_load(pool, "mh-1", "mh-2") == [len(results), len(results)]
    assert await lease_rows(pool) == []


@pytest.fixture
async def race_pool(db_pool: asyncpg.Pool, database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A 20-connection pool on the emptied database, with ``N_MCS`` MCs and
    two MHs; every task contends through it."""
    for i in range(N_MCS):
        await add_mc(db_pool, f"mc-{i}")
    await add_mh(db_pool, "mh-1", zone="zone-a")
    await add_mh(db_pool, "mh-2", zone="zone-b")
    async with open_pool(database_dsn, max_size=20) as pool:
        yield pool


async def test_fifty_concurrent_records_of_one_meeting(race_pool: asyncpg.Pool) -> None:
    meeting_id = uuid.uuid4()
    calls: list[RecordOutcome] = []
    outcomes: list[RecordOutcome] = []

    wakeups = Wakeups()

    async def task(i: int) -> None:
        outcomes.append(await contend(race_pool, meeting_id, f"mc-{i % N_MCS}", calls, wakeups))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(task, i)
    # Every task recorded exactly once: nobody's lease was taken over.
    assert len(calls) == 50
    await check_one_assignment_per_meeting(race_pool, {meeting_id: outcomes})


async def test_concurrent_records_of_two_hundred_meetings(race_pool: asyncpg.Pool) -> None:
    """Two contenders per meeting, each with its own MC choice, all meetings
    at once on the same MCs and MHs (their load rows are hot)."""
    rng = random.Random(3)
    meetings = [uuid.uuid4() for _ in range(200)]
    results: dict[uuid.UUID, list[RecordOutcome]] = {m: [] for m in meetings}
    calls: list[RecordOutcome] = []
    wakeups = {m: Wakeups() for m in meetings}
    # Monotonic like the sequence (tested above), one round trip cheaper.
    generations = itertools.count(1)

    async def task(meeting_id: uuid.UUID, controller_id: str) -> None:
        outcome = await contend(race_pool, meeting_id, controller_id, calls, wakeups[meeting_id],
                                generations)  # fmt: skip
        results[meeting_id].append(outcome)

    async with trio.open_nursery() as nursery:
        for meeting_id in meetings:
            for _ in range(2):
                nursery.start_soon(task, meeting_id, f"mc-{rng.randrange(N_MCS)}")
    assert len(calls) == 400
    await check_one_assignment_per_meeting(race_pool, results)


async def test_records_racing_with_lease_takeovers(race_pool: asyncpg.Pool) -> None:
    """Leases that expire at once: every acquire takes the lease over, so
    records race with takeovers. Each of 20 tasks tries once; a record whose
    lease was taken loses without writing, so at most one wins. A last GC with
    a proper lease then records: exactly one assignment, one load bump."""
    meeting_id = uuid.uuid4()
    outcomes: list[RecordOutcome] = []

    async def task(i: int) -> None:
        holder = uuid.uuid4()
        # A takeover can still fail: a concurrent acquire that started later
        # (a later now()) may commit first, and its lease is then unexpired.
        start = await take(race_pool, meeting_id, holder, ttl_s=0.0)
        if not start.taken:
            return
        outcomes.append(await record(race_pool, meeting_id, f"mc-{i % N_MCS}", holder,
                                     generation=start.generation))  # fmt: skip

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(task, i)
    assert sum(o.won for o in outcomes) <= 1
    assert len({o.assignment for o in outcomes if o.assignment is not None}) <= 1
    outcomes.append(await contend(race_pool, meeting_id, "mc-0", [], Wakeups()))
    finals = [o for o in outcomes if o.assignment is not None]
    await check_one_assignment_per_meeting(race_pool, {meeting_id: finals})
