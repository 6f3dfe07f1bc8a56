"""The join's assignment lease under failures, and the MC deadline inside the
flow (SPEC §6.3; ``gc/join_flow.py`` explains the lease).

Real PostgreSQL and fake MCs over real gRPC (:mod:`mc_fakes`), driven through
the public :class:`JoinService` API; what the flow left behind is read from
the tables themselves (``meeting_assignment_leases``,
``meeting_assignments``). Where a test needs to know what the lease looked
like *while* the GC was asking an MC, the join runs with a
:class:`LeaseProbingMcClient`: the real :class:`McClient`, which reads the
meeting's lease rows and the database clock just before each call.

Time. Lease expiry is judged on the database clock, which no ``MockClock``
moves: the tests make leases that have already expired, that never expire
while they matter, or (one test) that expire one real second from now. The
MC deadline is an asyncio timer, which inside trio-asyncio runs on trio's
clock, so that test uses ``mock_clock`` and explicit jumps, as
``test_gc_mc_client.py`` does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import trio
import trio.testing
from gc_fleet import (
    GC_ID,
    REGION,
    add_mc,
    add_mh,
    assignment_rows,
    close_mc_client,
    fakes,
    held_leases,
    join,
    join_service,
    jump_and_settle,
    load_of,
    new_meeting,
    open_mc_client,
    virtually_within,
)
from gc_harness import DevKeys
from mc_fakes import ACCEPT, STALL

from darktower.gc.join_flow import JoinResult
from darktower.gc.mc_client import AssignOutcome, McClient
from darktower.gc.metrics import MC_RPCS
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

#: Real-clock bound on each flow that should finish in milliseconds.
GUARD_S = 20.0
#: A poll interval no test waits out: a join that has to wait for a lease
#: first sleeps at least half of it (``FirstChoice`` draws 0, the jitter
#: factor is 0.5..1.5), so within :data:`GUARD_S` it cannot have waited.
NEVER_POLL_S = 3600.0
#: The dead holder's GC.
DEAD_GC = "gc-dead"


@pytest.fixture
def gc_token(keys: DevKeys) -> str:
    """The GC service token (the fakes insist on it)."""
    return keys.gc_token()


@dataclass(frozen=True, slots=True)
class Lease:
    holder: uuid.UUID
    gc_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseAtCall:
    """The database clock and the meeting's lease rows just before a call."""

    controller_id: str
    db_now: datetime
    leases: tuple[Lease, ...]


class LeaseProbingMcClient(McClient):
    """The real client; before each call it reads the meeting's lease rows
    and the database clock into :attr:`seen` (the probe runs on the join's
    own asyncio task, so the call follows it)."""

    def __init__(self, token: str, pool: asyncpg.Pool, **timeouts: float) -> None:
        super().__init__(token, **timeouts)
        self._pool = pool
        self.seen: list[LeaseAtCall] = []

    async def assign(
        self, *, controller_id: str, endpoint: str, request: pb.AssignMeetingWithMhRequest
    ) -> AssignOutcome:
        rows = await self._pool.fetch(
            "SELECT holder, gc_id, expires_at FROM meeting_assignment_leases"
            " WHERE meeting_id = $1 AND region = $2 AND holder IS NOT NULL",
            uuid.UUID(request.meeting_id),
            REGION,
        )
        db_now: datetime = await self._pool.fetchval("SELECT clock_timestamp()")
        leases = tuple(Lease(r["holder"], r["gc_id"], r["expires_at"]) for r in rows)
        self.seen.append(LeaseAtCall(controller_id, db_now, leases))
        return await super().assign(controller_id=controller_id, endpoint=endpoint, request=request)


@asynccontextmanager
async def probing_client(token: str, pool: asyncpg.Pool) -> AsyncIterator[LeaseProbingMcClient]:
    client = LeaseProbingMcClient(token, pool, rpc_timeout_s=5, connect_timeout_s=2)
    try:
        yield client
    finally:
        await close_mc_client(client)


async def meeting_id_of(pool: asyncpg.Pool, code: str) -> uuid.UUID:
    meeting_id: uuid.UUID = await run_aio(
        pool.fetchval, "SELECT meeting_id FROM meetings WHERE meeting_code = $1", code
    )
    return meeting_id


async def insert_dead_holders_lease(
    pool: asyncpg.Pool, meeting_id: uuid.UUID, *, expires_in_s: float
) -> Lease:
    """The lease row a GC leaves when it dies holding the meeting's lease,
    expiring ``expires_in_s`` from now on the database clock (negative:
    expired already)."""
    holder = uuid.uuid4()
    expires_at: datetime = await run_aio(
        pool.fetchval,
        "INSERT INTO meeting_assignment_leases (meeting_id, region, holder, gc_id, expires_at)"
        " VALUES ($1, $2, $3, $4, clock_timestamp() + make_interval(secs => $5))"
        " RETURNING expires_at",
        meeting_id,
        REGION,
        holder,
        DEAD_GC,
        expires_in_s,
    )
    return Lease(holder, DEAD_GC, expires_at)


async def database_clock(pool: asyncpg.Pool) -> datetime:
    now: datetime = await run_aio(pool.fetchval, "SELECT clock_timestamp()")
    return now


def assert_assigned_once(
    result: JoinResult, requests: list[pb.AssignMeetingWithMhRequest], rows: list[Any]
) -> None:
    """One call to the MC, and its generation recorded as the one active row."""
    assert result.assigned
    (request,) = requests
    assert request.generation == result.assignment.generation
    assert [
        (r["meeting_id"], r["meeting_controller_id"], r["generation"], r["assigned_by_gc_id"])
        for r in rows
        if r["ended_at"] is None
    ] == [(result.meeting.meeting_id, "mc-1", request.generation, GC_ID)]
    assert len(rows) == 1


def counter(metric: Any, *labels: str) -> float:
    value: float = metric.labels(*labels)._value.get()
    return value


# --- takeover after a holder failure ---------------------------------------------------------


async def test_expired_lease_of_a_dead_holder_is_taken_over_at_once(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """A GC died holding the meeting's lease, and that lease has expired: the
    next join takes it over at once (no waiting: its poll interval is
    :data:`NEVER_POLL_S`, so a join that waited could not finish within
    :data:`GUARD_S`), asks one MC while holding the lease itself, records the
    assignment, and leaves the lease held by nobody."""
    async with (
        fakes(gc_token, ACCEPT) as (mc,),
        probing_client(gc_token, db_pool) as client,
        join_service(db_pool, gc_token, mc_client=client, poll_interval_s=NEVER_POLL_S) as service,
    ):
        await add_mc(db_pool, "mc-1", mc.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        dead = await insert_dead_holders_lease(
            db_pool, await meeting_id_of(db_pool, code), expires_in_s=-1
        )

        with trio.fail_after(GUARD_S):
            result = await join(service, code)

        assert result.assignment.controller_id == "mc-1"
        assert_assigned_once(result, mc.requests, await assignment_rows(db_pool))
        # While it asked the MC the lease was the join's own, not the dead one's.
        (probe,) = client.seen
        assert [lease.gc_id for lease in probe.leases] == [GC_ID]
        assert probe.leases[0].holder != dead.holder
        assert probe.leases[0].expires_at > probe.db_now
        # The record consumed the lease: nobody holds it.
        assert await held_leases(db_pool) == []
        assert await load_of(db_pool, "mc-1") == 1


async def test_live_lease_of_a_crashed_holder_is_waited_out_then_taken_over(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """A GC crashed holding the meeting's lease, which is still live: the
    join asks no MC while it is, takes the lease over once it has expired,
    and assigns - within a bounded time.

    Real time, on purpose: lease expiry is judged on PostgreSQL's clock
    (``now()`` in the lease statement), which a ``MockClock`` cannot move.
    So the dead holder's lease expires one real second after it is written,
    and the join polls with its default interval (backing off to at most
    0.32 s x 1.5). Nothing here depends on how the two clocks line up: the
    join starts while the lease is live (database clock, asserted) and the
    MC is called after it expired (database clock, read by the probe just
    before the call).
    """
    lease_s = 1.0
    async with (
        fakes(gc_token, ACCEPT) as (mc,),
        probing_client(gc_token, db_pool) as client,
        join_service(db_pool, gc_token, mc_client=client) as service,
    ):
        await add_mc(db_pool, "mc-1", mc.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        dead = await insert_dead_holders_lease(
            db_pool, await meeting_id_of(db_pool, code), expires_in_s=lease_s
        )

        started_db = await database_clock(db_pool)
        started = trio.current_time()
        with trio.fail_after(lease_s + GUARD_S):
            result = await join(service, code)
        took = trio.current_time() - started

        assert started_db < dead.expires_at, "the join must start while the lease is live"
        assert result.assignment.controller_id == "mc-1"
        assert_assigned_once(result, mc.requests, await assignment_rows(db_pool))
        # The one MC call came after the dead holder's lease expired, under
        # the join's own lease.
        (probe,) = client.seen
        assert probe.db_now > dead.expires_at
        assert [lease.gc_id for lease in probe.leases] == [GC_ID]
        assert probe.leases[0].holder != dead.holder
        assert await held_leases(db_pool) == []
        # Bounded: expiry plus at most one backed-off poll (and the flow).
        assert took < lease_s + 3.0


# --- a cancelled holder ----------------------------------------------------------------------


async def test_cancelled_join_gives_its_lease_back_and_leaves_no_assignment(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """The request of the join holding the lease goes away while its MC has
    not answered: its lease is released (not left to expire), nothing is
    recorded, and the next join assigns at once with a healthy MC."""
    async with (
        fakes(gc_token, STALL) as (mc,),
        join_service(db_pool, gc_token, poll_interval_s=NEVER_POLL_S) as service,
    ):
        await add_mc(db_pool, "mc-1", mc.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        meeting_id = await meeting_id_of(db_pool, code)

        with trio.fail_after(GUARD_S):
            with trio.CancelScope() as request_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(join, service, code)
                    await mc.wait_for_requests(1)
                    # The join holds the lease while it waits for the MC.
                    held = await held_leases(db_pool)
                    assert [(r["meeting_id"], r["gc_id"]) for r in held] == [(meeting_id, GC_ID)]
                    request_scope.cancel()
            assert request_scope.cancelled_caught

            # run_aio returns only once the asyncio side has finished its
            # cleanup, so the release has happened (or never will).
            assert await held_leases(db_pool) == []
            assert await assignment_rows(db_pool) == []
            assert await load_of(db_pool, "mc-1") == 0

            mc.behaviour = ACCEPT
            result = await join(service, code)

        assert result.assigned
        assert result.assignment.controller_id == "mc-1"
        stalled, accepted = mc.requests
        assert accepted.generation == result.assignment.generation > stalled.generation
        rows = await assignment_rows(db_pool)
        assert [(r["meeting_controller_id"], r["generation"], r["ended_at"]) for r in rows] == [
            ("mc-1", accepted.generation, None)
        ]
        assert await held_leases(db_pool) == []


# --- the MC deadline inside the flow ---------------------------------------------------------

RPC_TIMEOUT_S = 10.0  # SPEC §6.3
CONNECT_TIMEOUT_S = 5.0


@pytest.mark.dt_timeout(30)
async def test_mc_stalling_past_the_rpc_deadline_is_excluded_and_the_next_one_accepts(
    db_pool: asyncpg.Pool, gc_token: str, mock_clock: trio.testing.MockClock
) -> None:
    """The first MC asked never answers: at the RPC deadline (SPEC §6.3,
    10 s; the GC's own timer, on trio's clock) the flow gives up on it,
    excludes it and asks the next one, which accepts. The time is virtual:
    the join ends at exactly the deadline of trio's clock, in far less real
    time. (A join still waiting past the deadline fails within seconds:
    :func:`gc_fleet.virtually_within`.)
    """
    async with (
        fakes(gc_token, STALL, ACCEPT) as (slow, good),
        open_mc_client(
            gc_token, rpc_timeout_s=RPC_TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S
        ) as client,
        join_service(db_pool, gc_token, mc_client=client) as service,
    ):
        await add_mc(db_pool, "mc-slow", slow.endpoint)  # least loaded: asked first
        await add_mc(db_pool, "mc-good", good.endpoint, meetings_now=10)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        deadlines = counter(MC_RPCS, "deadline_exceeded", "")
        results: list[JoinResult] = []
        done = trio.Event()

        async def one() -> None:
            results.append(await join(service, code))
            done.set()

        wall = time.perf_counter()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await slow.wait_for_requests(1)
            await jump_and_settle(mock_clock, RPC_TIMEOUT_S - 0.01)
            # Still waiting for the slow MC: no outcome, no second call.
            assert counter(MC_RPCS, "deadline_exceeded", "") == deadlines
            assert (results, good.requests) == ([], [])
            mock_clock.jump(0.01)  # the deadline: the join ends with no further jump
            await virtually_within(mock_clock, 1.0, done.wait)
        elapsed = trio.current_time() - start
        wall_elapsed = time.perf_counter() - wall

        (result,) = results
        assert result.assigned
        assert result.assignment.controller_id == "mc-good"
        assert counter(MC_RPCS, "deadline_exceeded", "") == deadlines + 1
        # The deadline went to the MC too, and the next attempt drew a new generation.
        assert slow.timeouts[0] is not None
        assert RPC_TIMEOUT_S - 0.01 <= slow.timeouts[0] <= RPC_TIMEOUT_S
        (late,), (accepted,) = slow.requests, good.requests
        assert accepted.generation == result.assignment.generation > late.generation
        rows = await assignment_rows(db_pool)
        assert [(r["meeting_controller_id"], r["ended_at"]) for r in rows] == [("mc-good", None)]
        assert await held_leases(db_pool) == []
        assert await load_of(db_pool, "mc-slow") == 0
    assert elapsed == pytest.approx(RPC_TIMEOUT_S)
    assert wall_elapsed < RPC_TIMEOUT_S / 2
