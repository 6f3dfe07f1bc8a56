"""Ending assignments (SPEC §6.4): ``NotifyMeetingEnded`` from the owning MC
only, and the cleanup task's bounded batches - real gRPC, real PostgreSQL.

Ages are produced by back-dating rows on the database clock, never by waiting.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest
from gc_fleet import ended_at, insert_assignment
from gc_harness import DevKeys, GcClients, RunningGc, mc_registration, metadata, mh_registration
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from darktower.gc.cleanup import AssignmentCleanup
from darktower.gc.metrics import MEETING_ENDED_NOTIFICATIONS
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys, gc, clients


async def register(clients: GcClients, keys: DevKeys, *mc_ids: str) -> None:
    for mc_id in mc_ids:
        response = await run_aio(
            clients.mc.RegisterMC, mc_registration(mc_id), metadata=metadata(keys.mc_token(mc_id))
        )
        assert response.accepted
        await run_aio(
            clients.mc.FastHeartbeat,
            pb.FastHeartbeatRequest(
                controller_id=mc_id,
                capacity=pb.ControllerCapacity(max_meetings=100, current_meetings=3),
                health=pb.HEALTHY,
            ),
            metadata=metadata(keys.mc_token(mc_id)),
        )
    mh_response = await run_aio(
        clients.mh.RegisterMH, mh_registration("mh-1"), metadata=metadata(keys.mh_token("mh-1"))
    )
    assert mh_response.accepted


async def current_meetings(pool: asyncpg.Pool, controller_id: str) -> int:
    value: int = await run_aio(
        pool.fetchval,
        "SELECT current_meetings FROM meeting_controllers WHERE controller_id = $1",
        controller_id,
    )
    return value


async def notify(
    clients: GcClients, keys: DevKeys, mc_id: str, meeting_id: str, region: str = "local"
) -> pb.NotifyMeetingEndedResponse:
    response: pb.NotifyMeetingEndedResponse = await run_aio(
        clients.mc.NotifyMeetingEnded,
        pb.NotifyMeetingEndedRequest(meeting_id=meeting_id, region=region),
        metadata=metadata(keys.mc_token(mc_id)),
    )
    return response


def counted(result: str) -> float:
    value: float = MEETING_ENDED_NOTIFICATIONS.labels(result)._value.get()
    return value


async def test_owner_ends_its_meeting(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register(clients, keys, "mc-1")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    before = counted("ended")

    response = await notify(clients, keys, "mc-1", str(meeting_id))

    assert response.acknowledged
    assert await ended_at(db_pool, meeting_id) is not None
    assert counted("ended") == before + 1
    # The load estimate gives the slot back until the next heartbeat.
    assert await current_meetings(db_pool, "mc-1") == 2
    # A repeat (the MC retrying) is harmless and changes nothing.
    assert not (await notify(clients, keys, "mc-1", str(meeting_id))).acknowledged
    assert await current_meetings(db_pool, "mc-1") == 2


async def test_another_mc_cannot_end_the_owners_meeting(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The orphan of a lost race (or an MC replaced after an outage) reports
    its end; the owner's assignment must stand."""
    await register(clients, keys, "mc-1", "mc-2")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    before = counted("not_owner")

    response = await notify(clients, keys, "mc-2", str(meeting_id))

    assert not response.acknowledged
    assert await ended_at(db_pool, meeting_id) is None
    assert counted("not_owner") == before + 1
    assert await current_meetings(db_pool, "mc-1") == 3
    assert await current_meetings(db_pool, "mc-2") == 3


async def test_end_in_another_region_leaves_this_one(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register(clients, keys, "mc-1")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    assert not (await notify(clients, keys, "mc-1", str(meeting_id), region="eu")).acknowledged
    assert await ended_at(db_pool, meeting_id) is None


@pytest.mark.parametrize(
    ("meeting_id", "region", "field"),
    [
        ("m-1", "local", "meeting_id"),
        ("", "local", "meeting_id"),
        ("00000000-0000-4000-8000-00000000000g", "local", "meeting_id"),
        ("{00000000-0000-4000-8000-000000000001}", "local", "meeting_id"),
        ("00000000-0000-4000-8000-000000000001", "", "region"),
        ("00000000-0000-4000-8000-000000000001", "r" * 51, "region"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    gc: RunningGc, clients: GcClients, keys: DevKeys, meeting_id: str, region: str, field: str
) -> None:
    with pytest.raises(GRPCError) as info:
        await notify(clients, keys, "mc-1", meeting_id, region)
    assert info.value.status is Status.INVALID_ARGUMENT
    assert info.value.message is not None
    assert info.value.message.startswith(field + ":")


async def test_cleanup_deletes_old_ended_rows_in_bounded_batches(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register(clients, keys, "mc-1")
    old = [await insert_assignment(db_pool, "mc-1", ended_ago=timedelta(days=8)) for _ in range(7)]
    recent = await insert_assignment(db_pool, "mc-1", ended_ago=timedelta(days=6))
    active = await insert_assignment(db_pool, "mc-1")
    cleanup = AssignmentCleanup(
        db_pool,
        interval_s=60,
        retention_s=7 * 86400,
        inactive_after_s=3600,
        stale_after_s=30,
        batch_size=3,
        max_batches=2,
    )

    first = await cleanup.tick()
    second = await cleanup.tick()

    # Two batches of three per tick: the backlog drains over ticks.
    assert (first.deleted, second.deleted) == (6, 1)
    remaining = await run_aio(db_pool.fetch, "SELECT meeting_id FROM meeting_assignments")
    assert {r["meeting_id"] for r in remaining} == {recent, active}
    assert not set(old) & {r["meeting_id"] for r in remaining}


async def test_cleanup_ends_inactive_meetings_of_dead_mcs_only(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register(clients, keys, "mc-live", "mc-dead")
    await run_aio(
        db_pool.execute,
        "UPDATE meeting_controllers SET health_status = 'unhealthy' WHERE controller_id = $1",
        "mc-dead",
    )
    idle_on_dead = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(hours=2))
    idle_on_live = await insert_assignment(db_pool, "mc-live", assigned_ago=timedelta(hours=2))
    fresh_on_dead = await insert_assignment(db_pool, "mc-dead", assigned_ago=timedelta(minutes=5))
    cleanup = AssignmentCleanup(
        db_pool, interval_s=60, retention_s=7 * 86400, inactive_after_s=3600, stale_after_s=30
    )

    result = await cleanup.tick()

    assert result.ended == 1
    assert await ended_at(db_pool, idle_on_dead) is not None
    # A live MC ends its own empty meetings; ending one under its
    # participants would split the meeting.
    assert await ended_at(db_pool, idle_on_live) is None
    assert await ended_at(db_pool, fresh_on_dead) is None
