"""A GC's fleet for join tests: MCs and MHs registered in PostgreSQL, fake
MCs serving over loopback, meetings, and a :class:`JoinService` to drive.

MCs and MHs go in through the GC's own registry repositories (register, then
a heartbeat or load report), exactly as a registration over gRPC leaves
them; the fake MCs are :mod:`mc_fakes` servers. Everything here is
trio-flavoured (call it inside the ``aio_loop`` fixture); rows are read back
with plain SQL, so tests check the tables themselves rather than the
repositories' read helpers.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import trio
import trio.testing
from mc_fakes import Behaviour, FakeMc, fake_mc

from darktower.gc.join_flow import LEASE_POLL_INTERVAL_S, JoinResult, JoinService
from darktower.gc.mc_client import McClient
from darktower.gc.registry_requests import (
    McHeartbeat,
    McRegistration,
    MhLoadReport,
    MhRegistration,
)
from darktower.gc.repositories import media_handlers, meeting_controllers, meetings
from darktower.shared.seam import run_aio

T = TypeVar("T")

#: The organisation of the meetings made here unless a test says otherwise.
ORG = uuid.UUID("11111111-1111-4111-8111-111111111111")
REGION = "local"
#: The GC id of :func:`join_service` (and of its lease rows and records).
GC_ID = "gc-test"


class FirstChoice(random.Random):
    """Always draws the first candidate (the least loaded): which MC is asked
    first is then fixed by the load the test sets, not by chance."""

    def random(self) -> float:
        return 0.0


class LastChoice(random.Random):
    """Always draws the last candidate (the most loaded of those the query
    returned). With the controller weights (each in [0.01, 1], see
    :func:`~darktower.gc.selection.controller_weight`) the last of at most
    five candidates owns more than the top 0.2 % of the total weight
    (0.01 / 4.01), so a draw at 99.99 % of it always lands there."""

    def random(self) -> float:
        return 0.9999


class FixedDraw(random.Random):
    """Every draw is ``value`` (in [0, 1)): a test works out from the
    candidates' weights which one it picks."""

    def __init__(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"a draw is in [0, 1), not {value}")
        self.value = value
        super().__init__(0)

    def random(self) -> float:
        return self.value


# --- the fleet in the database ---------------------------------------------------------------


async def add_mc(
    pool: asyncpg.Pool,
    controller_id: str,
    endpoint: str,
    *,
    region: str = REGION,
    meetings_now: int = 0,
    max_meetings: int = 100,
    max_participants: int = 10_000,
    health: str = "healthy",
) -> None:
    """Register the MC at gRPC ``endpoint`` and heartbeat it with ``health``
    and ``meetings_now`` meetings (its load, as the candidate query sees it)."""
    await run_aio(
        meeting_controllers.register,
        pool,
        McRegistration(
            controller_id=controller_id,
            region=region,
            grpc_endpoint=endpoint,
            webtransport_endpoint=f"https://{controller_id}.example:4433",
            max_meetings=max_meetings,
            max_participants=max_participants,
        ),
    )
    await run_aio(
        meeting_controllers.heartbeat_batch,
        pool,
        [
            McHeartbeat(
                controller_id=controller_id,
                current_meetings=meetings_now,
                current_participants=0,
                health=health,
                cpu_usage_percent=None,
                memory_usage_percent=None,
            )
        ],
    )


async def add_mh(
    pool: asyncpg.Pool,
    handler_id: str,
    *,
    zone: str = "zone-a",
    streams: int = 0,
    health: str = "healthy",
    region: str = REGION,
    max_streams: int = 100,
) -> None:
    """Register the MH and report its load (``streams``) and ``health``."""
    await run_aio(
        media_handlers.register,
        pool,
        MhRegistration(
            handler_id=handler_id,
            region=region,
            zone=zone,
            webtransport_endpoint=f"https://{handler_id}.example:4434",
            grpc_endpoint=f"http://{handler_id}.example:50060",
            max_streams=max_streams,
        ),
    )
    await run_aio(
        media_handlers.load_report,
        pool,
        MhLoadReport(
            handler_id=handler_id,
            current_streams=streams,
            health=health,
            cpu_usage_percent=0.0,
            memory_usage_percent=0.0,
            bandwidth_usage_percent=0.0,
        ),
    )


async def set_mc_health(pool: asyncpg.Pool, controller_id: str, health: str) -> None:
    """The MC reports ``health`` in a heartbeat (a fresh one; its meeting
    count unchanged, its participant count 0)."""
    row = await run_aio(meeting_controllers.get, pool, controller_id)
    assert row is not None
    hb = McHeartbeat(controller_id, row.current_meetings, 0, health)
    assert controller_id in await run_aio(meeting_controllers.heartbeat_batch, pool, [hb])


async def new_meeting(pool: asyncpg.Pool, *, org: uuid.UUID = ORG, guests: bool = False) -> str:
    """A new meeting of ``org``; its code."""
    row = await run_aio(
        meetings.create,
        pool,
        org_id=org,
        created_by="user-1",
        display_name="Standup",
        allow_guests=guests,
        max_participants=100,
    )
    return row.meeting_code


async def insert_assignment(
    pool: asyncpg.Pool,
    controller_id: str,
    *,
    region: str = REGION,
    ended_ago: timedelta | None = None,
    assigned_ago: timedelta = timedelta(0),
) -> uuid.UUID:
    """An assignment row as the record statement leaves it (plus its meeting,
    last active when it was assigned), aged on the database clock. Its
    primary MH is ``mh-1``, which must be registered."""
    meeting_id = uuid.uuid4()
    await run_aio(
        pool.execute,
        "INSERT INTO meetings (meeting_id, org_id, meeting_code, display_name, created_by,"
        " last_active_at) VALUES ($1, $2, $3, 'm', 'u', now() - $4::interval)",
        meeting_id,
        uuid.uuid4(),
        "c-" + meeting_id.hex[:12],
        assigned_ago,
    )
    await run_aio(
        pool.execute,
        "INSERT INTO meeting_assignments (meeting_id, region, meeting_controller_id, generation,"
        " assigned_at, assigned_by_gc_id, ended_at, primary_mh_id)"
        " VALUES ($1, $2, $3, nextval('meeting_generation_seq'), now() - $4::interval, 'gc-x',"
        " now() - $5::interval, 'mh-1')",
        meeting_id,
        region,
        controller_id,
        assigned_ago,
        ended_ago,
    )
    return meeting_id


# --- reading the tables back -----------------------------------------------------------------


async def fetch(pool: asyncpg.Pool, sql: str, *args: Any) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await run_aio(pool.fetch, sql, *args)
    return rows


async def wait_until_blocked_by(pool: asyncpg.Pool, pid: int) -> None:
    """Return once some session waits on a lock the backend ``pid`` holds
    (each check is a round trip, no pause; a test that never gets there fails
    after 10 s)."""
    with trio.fail_after(10):
        while not await run_aio(
            pool.fetchval,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND $1 = any("
            "SELECT unnest(pg_blocking_pids(pid)))",
            pid,
        ):
            await trio.lowlevel.checkpoint()


async def assignment_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await fetch(pool, "SELECT * FROM meeting_assignments ORDER BY assigned_at")


async def held_leases(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """The assignment leases somebody holds (expired or not). A lease that
    was released or consumed by a record holds nobody: its row is gone, or
    kept with ``holder`` NULL."""
    return await fetch(
        pool,
        "SELECT * FROM meeting_assignment_leases WHERE holder IS NOT NULL ORDER BY meeting_id",
    )


async def ended_at(pool: asyncpg.Pool, meeting_id: uuid.UUID) -> datetime | None:
    """When the meeting's assignment ended (``None``: active, or no row)."""
    value: datetime | None = await run_aio(
        pool.fetchval,
        "SELECT ended_at FROM meeting_assignments WHERE meeting_id = $1",
        meeting_id,
    )
    return value


async def load_of(pool: asyncpg.Pool, controller_id: str) -> int:
    value: int = await run_aio(
        pool.fetchval,
        "SELECT current_meetings FROM meeting_controllers WHERE controller_id = $1",
        controller_id,
    )
    return value


# --- fake MCs and the join service -----------------------------------------------------------


@asynccontextmanager
async def fakes(token: str | None, *behaviours: Behaviour) -> AsyncIterator[list[FakeMc]]:
    """Fake MCs; with a ``token`` they refuse calls that do not present it."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(fake_mc(b, expected_token=token)) for b in behaviours
        ]


@asynccontextmanager
async def open_mc_client(
    token: str, *, rpc_timeout_s: float = 5, connect_timeout_s: float = 2
) -> AsyncIterator[McClient]:
    """An :class:`McClient`, closed on the asyncio loop afterwards."""
    client = McClient(token, rpc_timeout_s=rpc_timeout_s, connect_timeout_s=connect_timeout_s)
    try:
        yield client
    finally:
        await close_mc_client(client)


async def close_mc_client(client: McClient) -> None:
    """Trio-flavoured: close ``client`` on the asyncio loop (bounded)."""

    async def close() -> None:
        client.close()

    with trio.move_on_after(2, shield=True):
        await run_aio(close)


@asynccontextmanager
async def join_service(
    pool: asyncpg.Pool,
    token: str,
    rng: random.Random | None = None,
    *,
    mc_client: McClient | None = None,
    poll_interval_s: float = LEASE_POLL_INTERVAL_S,
) -> AsyncIterator[JoinService]:
    """The join service of GC :data:`GC_ID` in :data:`REGION` (staleness
    30 s, lease 35 s), drawing the first candidate unless ``rng`` says
    otherwise. Its MC client is ``mc_client`` (the caller closes it) or a
    fresh one (RPC 5 s, connect 2 s) closed afterwards."""
    async with AsyncExitStack() as stack:
        if mc_client is None:
            mc_client = await stack.enter_async_context(open_mc_client(token))
        yield JoinService(
            pool,
            mc_client,
            gc_id=GC_ID,
            region=REGION,
            stale_after_s=30,
            lease_ttl_s=35,
            rng=rng or FirstChoice(),
            poll_interval_s=poll_interval_s,
        )


async def join(service: JoinService, code: str, org: uuid.UUID | None = ORG) -> JoinResult:
    """Trio-flavoured: one join, the way the HTTP handler runs it."""
    return await run_aio(service.join, code, org)


# --- waiting under a MockClock -----------------------------------------------------------------

#: Real seconds of complete idleness after which :func:`virtually_within`
#: gives up on waiting: far above any loopback round trip.
IDLE_S = 5.0


async def jump_and_settle(clock: trio.testing.MockClock, seconds: float) -> None:
    """Move trio's clock, then let every task run until it waits again."""
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def virtually_within(
    clock: trio.testing.MockClock, seconds: float, fn: Callable[[], Awaitable[T]]
) -> T:
    """``await fn()``, failing (``trio.TooSlowError``) if it needs more than
    ``seconds`` of trio's clock.

    Under a ``MockClock`` without autojump a wait for something that never
    happens hangs until the harness's wall-clock limit. Here the clock
    autojumps once every task has been idle for :data:`IDLE_S` real seconds,
    so such a wait ends in seconds, at the virtual deadline; while there is
    loopback I/O in flight tasks are not idle that long, so nothing jumps.
    """
    clock.autojump_threshold = IDLE_S
    try:
        with trio.fail_after(seconds):
            return await fn()
    finally:
        clock.autojump_threshold = math.inf
