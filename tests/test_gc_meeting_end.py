"""Ending assignments (SPEC §6.4): ``NotifyMeetingEnded`` from the owning MC
only, under a generation not older than the recorded one (§7.3), and the
cleanup task's bounded batches - real gRPC, real PostgreSQL.

Ages are produced by back-dating rows on the database clock, never by waiting.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest
from gc_fleet import ended_at, insert_assignment, load_of
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


async def generation_of(pool: asyncpg.Pool, meeting_id: uuid.UUID) -> int:
    value: int = await run_aio(
        pool.fetchval,
        "SELECT generation FROM meeting_assignments WHERE meeting_id = $1",
        meeting_id,
    )
    return value


async def reassign_to_same_mc(pool: asyncpg.Pool, meeting_id: uuid.UUID) -> int:
    """As if the meeting had been assigned again to the MC that holds it,
    under a fresh (newer) generation, as the record statement leaves it; the
    new generation."""
    value: int = await run_aio(
        pool.fetchval,
        "UPDATE meeting_assignments SET generation = nextval('meeting_generation_seq'),"
        " assigned_at = now() WHERE meeting_id = $1 RETURNING generation",
        meeting_id,
    )
    return value


async def notify(
    clients: GcClients,
    keys: DevKeys,
    mc_id: str,
    meeting_id: str,
    region: str = "local",
    *,
    generation: int,
) -> pb.NotifyMeetingEndedResponse:
    response: pb.NotifyMeetingEndedResponse = await run_aio(
        clients.mc.NotifyMeetingEnded,
        pb.NotifyMeetingEndedRequest(meeting_id=meeting_id, region=region, generation=generation),
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
    generation = await generation_of(db_pool, meeting_id)
    before = counted("ended")

    response = await notify(clients, keys, "mc-1", str(meeting_id), generation=generation)

    assert response.acknowledged
    assert await ended_at(db_pool, meeting_id) is not None
    assert counted("ended") == before + 1
    # The load estimate gives the slot back until the next heartbeat.
    assert await load_of(db_pool, "mc-1") == 2
    # A repeat (the MC retrying) is harmless and changes nothing.
    again = await notify(clients, keys, "mc-1", str(meeting_id), generation=generation)
    assert not again.acknowledged
    assert await load_of(db_pool, "mc-1") == 2


async def test_a_late_report_of_an_earlier_assignment_leaves_the_later_one(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The MC hosted the meeting under G, was fenced out, and the meeting was
    later assigned to the same MC again under G' > G. Its report of the end
    under G, arriving late, must not end the assignment under G'."""
    await register(clients, keys, "mc-1")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    old = await generation_of(db_pool, meeting_id)
    new = await reassign_to_same_mc(db_pool, meeting_id)
    assert new > old
    ended_before, stale_before = counted("ended"), counted("stale_generation")
    not_owner_before = counted("not_owner")

    response = await notify(clients, keys, "mc-1", str(meeting_id), generation=old)

    assert not response.acknowledged
    assert await ended_at(db_pool, meeting_id) is None
    assert await generation_of(db_pool, meeting_id) == new
    assert await load_of(db_pool, "mc-1") == 3
    assert (counted("ended"), counted("stale_generation"), counted("not_owner")) == (
        ended_before,
        stale_before + 1,
        not_owner_before,
    )
    # The end of the assignment under G' does end it.
    assert (await notify(clients, keys, "mc-1", str(meeting_id), generation=new)).acknowledged
    assert await ended_at(db_pool, meeting_id) is not None
    assert await load_of(db_pool, "mc-1") == 2


async def test_a_report_under_a_newer_generation_ends_the_recorded_assignment(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """An MC re-assigned a meeting it hosts under a newer generation (whose
    record lost to this one) reports that newer one; the recorded, older
    assignment names an MC that no longer hosts the meeting, so it ends."""
    await register(clients, keys, "mc-1")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    generation = await generation_of(db_pool, meeting_id)

    response = await notify(clients, keys, "mc-1", str(meeting_id), generation=generation + 1)

    assert response.acknowledged
    assert await ended_at(db_pool, meeting_id) is not None
    # The largest generation the database can hold is a valid one.
    other = await insert_assignment(db_pool, "mc-1")
    assert (await notify(clients, keys, "mc-1", str(other), generation=2**63 - 1)).acknowledged
    assert await ended_at(db_pool, other) is not None


async def test_a_report_without_a_generation_is_accepted_unfenced(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """0 is what an MC built without the field sends (SPEC §3 has none):
    its report still ends its own assignment, as before the field existed;
    never another MC's."""
    await register(clients, keys, "mc-1", "mc-2")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    await reassign_to_same_mc(db_pool, meeting_id)

    assert not (await notify(clients, keys, "mc-2", str(meeting_id), generation=0)).acknowledged
    assert await ended_at(db_pool, meeting_id) is None
    assert (await notify(clients, keys, "mc-1", str(meeting_id), generation=0)).acknowledged
    assert await ended_at(db_pool, meeting_id) is not None


async def test_another_mc_cannot_end_the_owners_meeting(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The orphan of a lost race (or an MC replaced after an outage) reports
    its end; the owner's assignment must stand."""
    await register(clients, keys, "mc-1", "mc-2")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    generation = await generation_of(db_pool, meeting_id)
    before = counted("not_owner")

    # Even under the recorded generation (the loser of a race was offered it).
    response = await notify(clients, keys, "mc-2", str(meeting_id), generation=generation)

    assert not response.acknowledged
    assert await ended_at(db_pool, meeting_id) is None
    assert counted("not_owner") == before + 1
    assert await load_of(db_pool, "mc-1") == 3
    assert await load_of(db_pool, "mc-2") == 3


async def test_end_in_another_region_leaves_this_one(
    gc: RunningGc, clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register(clients, keys, "mc-1")
    meeting_id = await insert_assignment(db_pool, "mc-1")
    generation = await generation_of(db_pool, meeting_id)
    response = await notify(clients, keys, "mc-1", str(meeting_id), "eu", generation=generation)
    assert not response.acknowledged
    assert await ended_at(db_pool, meeting_id) is None


MEETING = "00000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("meeting_id", "region", "generation", "field"),
    [
        ("m-1", "local", 1, "meeting_id"),
        ("", "local", 1, "meeting_id"),
        ("00000000-0000-4000-8000-00000000000g", "local", 1, "meeting_id"),
        ("{00000000-0000-4000-8000-000000000001}", "local", 1, "meeting_id"),
        (MEETING, "", 1, "region"),
        (MEETING, "r" * 51, 1, "region"),
        # Beyond the stored bigint: refused, never wrapped or clamped.
        (MEETING, "local", 2**63, "generation"),
        (MEETING, "local", 2**64 - 1, "generation"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    gc: RunningGc,
    clients: GcClients,
    keys: DevKeys,
    meeting_id: str,
    region: str,
    generation: int,
    field: str,
) -> None:
    with pytest.raises(GRPCError) as info:
        await notify(clients, keys, "mc-1", meeting_id, region, generation=generation)
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
