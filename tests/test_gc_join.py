"""The join flow (SPEC §6.3) with real PostgreSQL and real gRPC MCs.

The MCs are :mod:`mc_fakes` servers (real grpclib over loopback) that accept,
refuse with each reason, fail or drop the connection. Flow-level tests drive
:class:`JoinService` directly with a deterministic "random" source (the
candidate order decides who is asked first); the HTTP tests go through a
whole GC in-process (:func:`gc_harness.running_gc`) the way a client does.
The fleet set-up helpers are in :mod:`gc_fleet`.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import trio
from gc_fleet import (
    GC_ID,
    ORG,
    REGION,
    FixedDraw,
    LastChoice,
    add_mc,
    add_mh,
    assignment_rows,
    fakes,
    fetch,
    held_leases,
    join,
    join_service,
    load_of,
    new_meeting,
    open_mc_client,
    set_mc_health,
)
from gc_harness import DevKeys, RunningGc, gc_environ, running_gc
from grpclib.const import Status
from mc_fakes import ACCEPT, DISCONNECT, Behaviour, Fail, FakeMc, Gate, Reject

from darktower.gc.join_errors import MeetingNotFound, ServiceUnavailable
from darktower.gc.join_flow import JoinResult, JoinService
from darktower.gc.metrics import ASSIGNMENT_RETRIES, MC_RPCS, REGISTRY
from darktower.protos import internal_pb2 as pb
from darktower.shared import tokens
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

OTHER_ORG = uuid.UUID("22222222-2222-4222-8222-222222222222")


@pytest.fixture
def gc_token(keys: DevKeys) -> str:
    """The GC service token of the flow-level tests (the fakes insist on it)."""
    return keys.gc_token()


def counter(metric: Any, *labels: str) -> float:
    child = metric.labels(*labels) if labels else metric
    value: float = child._value.get()
    return value


# --- the flow ------------------------------------------------------------------------------


async def test_first_join_assigns_then_rejoins_reuse_without_any_rpc(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with fakes(gc_token, ACCEPT) as (mc,), join_service(db_pool, gc_token) as service:
        await add_mc(db_pool, "mc-1", mc.endpoint, meetings_now=4)
        await add_mh(db_pool, "mh-a", zone="zone-a")
        await add_mh(db_pool, "mh-b", zone="zone-b", streams=10)
        code = await new_meeting(db_pool)

        first = await join(service, code)
        again = await join(service, code)

        assert first.assigned
        assert not again.assigned
        assert first.assignment == again.assignment
        assert first.assignment.controller_id == "mc-1"
        assert [(m.handler_id, m.role) for m in first.assignment.media_handlers] == [
            ("mh-a", "primary"),
            ("mh-b", "backup"),
        ]
        # Exactly one MC call, carrying the generation and the MHs recorded.
        assert len(mc.requests) == 1
        request = mc.requests[0]
        assert request.meeting_id == str(first.meeting.meeting_id)
        assert request.requesting_gc_id == "gc-test"
        assert request.generation == first.assignment.generation > 0
        assert [(a.mh_id, a.role) for a in request.mh_assignments] == [
            ("mh-a", pb.MH_ROLE_PRIMARY),
            ("mh-b", pb.MH_ROLE_BACKUP),
        ]
        assert mc.authorizations == [f"Bearer {gc_token}"]
        # The load bump: the next join sees the new meeting before any heartbeat.
        assert await load_of(db_pool, "mc-1") == 5
        streams = await fetch(
            db_pool, "SELECT handler_id, current_streams FROM media_handlers ORDER BY 1"
        )
        assert [(r[0], r[1]) for r in streams] == [("mh-a", 1), ("mh-b", 11)]


async def assigned_to_the_idler(
    pool: asyncpg.Pool, service: JoinService, mc1: FakeMc, mc2: FakeMc
) -> tuple[str, JoinResult]:
    """mc-1 and a busier mc-2, one MH, a meeting joined once: on mc-1."""
    await add_mc(pool, "mc-1", mc1.endpoint)
    await add_mc(pool, "mc-2", mc2.endpoint, meetings_now=50)
    await add_mh(pool, "mh-a")
    code = await new_meeting(pool)
    first = await join(service, code)
    assert first.assignment.controller_id == "mc-1"
    return code, first


async def test_assignment_of_an_unhealthy_mc_is_replaced(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with (
        fakes(gc_token, ACCEPT, ACCEPT) as (mc1, mc2),
        join_service(db_pool, gc_token) as service,
    ):
        code, first = await assigned_to_the_idler(db_pool, service, mc1, mc2)

        await run_aio(
            db_pool.execute,
            "UPDATE meeting_controllers SET health_status = 'unhealthy' WHERE controller_id = $1",
            "mc-1",
        )
        second = await join(service, code)

        assert second.assigned
        assert second.assignment.controller_id == "mc-2"
        assert second.assignment.generation > first.assignment.generation
        assert len(mc2.requests) == 1
        assert mc2.requests[0].generation == second.assignment.generation
        rows = await assignment_rows(db_pool)
        # One row per meeting and region: the dead MC's assignment is gone.
        assert [(r["meeting_controller_id"], r["ended_at"]) for r in rows] == [("mc-2", None)]


async def test_mc_back_to_life_during_the_attempt_stays_replaced(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """mc-1 is unhealthy when the join reads, so it asks mc-2, which accepts
    the newer generation (a real MC claims the meeting in Redis with it,
    fencing mc-1 out). mc-1 heartbeats back to health while mc-2 answers:
    the record follows the fence - the joiner, and every later one, gets
    mc-2, not the fenced-out mc-1."""
    answer = asyncio.Event()
    async with (
        fakes(gc_token, ACCEPT, Gate(answer, ACCEPT)) as (mc1, mc2),
        join_service(db_pool, gc_token) as service,
    ):
        code, first = await assigned_to_the_idler(db_pool, service, mc1, mc2)
        await set_mc_health(db_pool, "mc-1", "unhealthy")
        results: list[JoinResult] = []

        async def second_join() -> None:
            results.append(await join(service, code))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_join)
            await mc2.wait_for_requests(1)
            await set_mc_health(db_pool, "mc-1", "healthy")
            answer.set()
        [second] = results
        assert second.assigned
        assert second.assignment.controller_id == "mc-2"
        assert second.assignment.generation == mc2.requests[0].generation
        assert second.assignment.generation > first.assignment.generation
        rows = await assignment_rows(db_pool)
        assert [(r["meeting_controller_id"], r["generation"], r["ended_at"]) for r in rows] == [
            ("mc-2", second.assignment.generation, None)
        ]
        third = await join(service, code)
        assert (third.assigned, third.assignment.controller_id) == (False, "mc-2")
        assert len(mc1.requests) == 1


async def test_stale_heartbeat_counts_as_dead(db_pool: asyncpg.Pool, gc_token: str) -> None:
    async with (
        fakes(gc_token, ACCEPT, ACCEPT) as (mc1, mc2),
        join_service(db_pool, gc_token) as service,
    ):
        await add_mc(db_pool, "mc-1", mc1.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        assert (await join(service, code)).assignment.controller_id == "mc-1"
        await run_aio(
            db_pool.execute,
            "UPDATE meeting_controllers SET last_heartbeat_at = now() - interval '31 seconds'",
        )
        await add_mc(db_pool, "mc-2", mc2.endpoint)

        assert (await join(service, code)).assignment.controller_id == "mc-2"


async def test_only_mcs_of_this_region_with_room_are_asked(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with (
        fakes(gc_token, ACCEPT, ACCEPT, ACCEPT, ACCEPT) as (eu, full, draining, good),
        join_service(db_pool, gc_token) as service,
    ):
        await add_mc(db_pool, "mc-eu", eu.endpoint, region="eu")
        await add_mc(db_pool, "mc-full", full.endpoint, meetings_now=100)
        await add_mc(db_pool, "mc-draining", draining.endpoint, health="draining")
        await add_mc(db_pool, "mc-good", good.endpoint, meetings_now=90)
        await add_mh(db_pool, "mh-a")

        for _ in range(5):
            result = await join(service, await new_meeting(db_pool))
            assert result.assignment.controller_id == "mc-good"

        assert (len(eu.requests), len(full.requests), len(draining.requests)) == (0, 0, 0)
        assert len(good.requests) == 5


async def test_no_media_handler_is_503_without_any_rpc(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with fakes(gc_token, ACCEPT) as (mc,), join_service(db_pool, gc_token) as service:
        await add_mc(db_pool, "mc-1", mc.endpoint)
        await add_mh(db_pool, "mh-sick", health="unhealthy")
        await add_mh(db_pool, "mh-full", streams=100)
        await add_mh(db_pool, "mh-eu", region="eu")
        code = await new_meeting(db_pool)

        with pytest.raises(ServiceUnavailable) as info:
            await join(service, code)

        assert info.value.reason == "no_media_handler"
        assert mc.requests == []
        assert await assignment_rows(db_pool) == []


async def test_all_mcs_full_is_503(db_pool: asyncpg.Pool, gc_token: str) -> None:
    async with (
        fakes(gc_token, ACCEPT, ACCEPT) as (a, b),
        join_service(db_pool, gc_token) as service,
    ):
        await add_mc(db_pool, "mc-a", a.endpoint, meetings_now=100)
        await add_mc(db_pool, "mc-b", b.endpoint, meetings_now=7, max_meetings=7)
        await add_mh(db_pool, "mh-a")

        with pytest.raises(ServiceUnavailable) as info:
            await join(service, await new_meeting(db_pool))

        assert info.value.reason == "no_controller"
        assert a.requests == b.requests == []


async def test_degraded_mh_is_backup_and_zones_differ(db_pool: asyncpg.Pool, gc_token: str) -> None:
    async with fakes(gc_token, ACCEPT) as (mc,), join_service(db_pool, gc_token) as service:
        await add_mc(db_pool, "mc-1", mc.endpoint)
        # Least loaded but degraded (score halved): not the primary.
        await add_mh(db_pool, "mh-degraded", zone="zone-b", health="degraded")
        await add_mh(db_pool, "mh-a1", zone="zone-a", streams=30)
        await add_mh(db_pool, "mh-a2", zone="zone-a", streams=20)

        result = await join(service, await new_meeting(db_pool))

        assert [(m.handler_id, m.role) for m in result.assignment.media_handlers] == [
            ("mh-a2", "primary"),
            ("mh-degraded", "backup"),  # the other zone beats mh-a1's better score
        ]


REFUSALS: list[tuple[str, Behaviour, str, str]] = [
    ("at_capacity", Reject(pb.REJECTION_REASON_AT_CAPACITY), "rejected", "at_capacity"),
    ("draining", Reject(pb.REJECTION_REASON_DRAINING), "rejected", "draining"),
    ("unhealthy", Reject(pb.REJECTION_REASON_UNHEALTHY), "rejected", "unhealthy"),
    ("unspecified", Reject(pb.REJECTION_REASON_UNSPECIFIED), "rejected", "unspecified"),
    ("timeout", Fail(Status.DEADLINE_EXCEEDED, "late"), "deadline_exceeded", ""),
    ("unavailable", Fail(Status.UNAVAILABLE, "down"), "unavailable", ""),
    ("disconnect", DISCONNECT, "unavailable", ""),
]


@pytest.mark.parametrize(
    ("refusal", "expected_status", "expected_reason"),
    [pytest.param(b, s, r, id=name) for name, b, s, r in REFUSALS],
)
async def test_a_refusing_mc_is_excluded_and_the_next_one_asked(
    db_pool: asyncpg.Pool,
    gc_token: str,
    refusal: Behaviour,
    expected_status: str,
    expected_reason: str,
) -> None:
    async with (
        fakes(gc_token, refusal, ACCEPT) as (bad, good),
        join_service(db_pool, gc_token) as service,
    ):
        await add_mc(db_pool, "mc-bad", bad.endpoint)  # least loaded: asked first
        await add_mc(db_pool, "mc-good", good.endpoint, meetings_now=10)
        await add_mh(db_pool, "mh-a")
        retries = counter(ASSIGNMENT_RETRIES)
        outcomes = counter(MC_RPCS, expected_status, expected_reason)

        result = await join(service, await new_meeting(db_pool))

        assert result.assignment.controller_id == "mc-good"
        assert len(bad.requests) == 1
        assert len(good.requests) == 1
        # A fresh generation per attempt: the refusing MC may have claimed
        # the first one before failing.
        assert good.requests[0].generation > bad.requests[0].generation
        assert result.assignment.generation == good.requests[0].generation
        assert counter(ASSIGNMENT_RETRIES) == retries + 1
        assert counter(MC_RPCS, expected_status, expected_reason) == outcomes + 1
        assert await load_of(db_pool, "mc-bad") == 0


async def test_three_refusals_are_503_and_leave_no_assignment(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with (
        fakes(
            gc_token, Reject(pb.REJECTION_REASON_AT_CAPACITY), Fail(Status.INTERNAL, "x"),
            DISCONNECT, ACCEPT,
        ) as (a, b, c, never),
        join_service(db_pool, gc_token) as service,
    ):  # fmt: skip
        await add_mc(db_pool, "mc-a", a.endpoint, meetings_now=1)
        await add_mc(db_pool, "mc-b", b.endpoint, meetings_now=2)
        await add_mc(db_pool, "mc-c", c.endpoint, meetings_now=3)
        await add_mc(db_pool, "mc-never", never.endpoint, meetings_now=4)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)

        with pytest.raises(ServiceUnavailable) as info:
            await join(service, code)

        assert info.value.reason == "assignment_failed"
        assert info.value.retry_after_s >= 1
        assert (len(a.requests), len(b.requests), len(c.requests)) == (1, 1, 1)
        assert never.requests == []  # three attempts in total
        assert await assignment_rows(db_pool) == []
        # The lease went back: the next join starts at once.
        assert await held_leases(db_pool) == []
        assert [await load_of(db_pool, m) for m in ("mc-a", "mc-b", "mc-c")] == [1, 2, 3]


async def test_unknown_code_and_other_orgs_meeting_are_not_found(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    async with join_service(db_pool, gc_token) as service:
        code = await new_meeting(db_pool, org=OTHER_ORG)
        with pytest.raises(MeetingNotFound):
            await join(service, code, ORG)
        with pytest.raises(MeetingNotFound):
            await join(service, "abc-defg-hjk", ORG)


async def test_concurrent_first_joins_make_one_assignment_with_one_rpc(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """50 joins of one new meeting at once: the lease lets one of them ask an
    MC; the others get its assignment. No orphan is created anywhere."""
    async with (
        fakes(gc_token, ACCEPT, ACCEPT, ACCEPT) as mcs,
        join_service(db_pool, gc_token, random.Random(7)) as service,
    ):
        for i, mc in enumerate(mcs):
            await add_mc(db_pool, f"mc-{i}", mc.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)
        results: list[JoinResult] = []

        async def one() -> None:
            results.append(await join(service, code))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)

        assert len(results) == 50
        assert len({r.assignment for r in results}) == 1
        assert sum(r.assigned for r in results) == 1
        assert sum(len(mc.requests) for mc in mcs) == 1
        assert len(await assignment_rows(db_pool)) == 1


def statements() -> dict[str, float]:
    """How many times each join-path statement ran (``gc_db_query_seconds``)."""
    names = ("meeting_find_for_join", "assignment_begin_attempt", "assignment_record",
             "assignment_find_active", "assignment_release_lease")  # fmt: skip
    return {
        name: REGISTRY.get_sample_value("gc_db_query_seconds_count", {"query": name}) or 0.0
        for name in names
    }


def ran_since(before: dict[str, float]) -> dict[str, int]:
    return {name: int(count - before[name]) for name, count in statements().items()
            if count != before[name]}  # fmt: skip


async def test_round_trips_of_first_joins_and_rejoins(db_pool: asyncpg.Pool, gc_token: str) -> None:
    """A first join: the lookup (which also takes the lease, draws the
    generation and reads the candidates), the MC call, the record. A re-join:
    the lookup alone. A meeting this GC saw assigned whose MC then died: the
    lookup, a separate attempt (the lookup was not asked to begin one), the
    MC call, the record. Another GC (or this one after a restart) that never
    saw the meeting re-joins it in one lookup too."""
    async with (
        fakes(gc_token, ACCEPT, ACCEPT) as (mc1, mc2),
        join_service(db_pool, gc_token) as service,
    ):
        await add_mc(db_pool, "mc-1", mc1.endpoint)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)

        before = statements()
        assert (await join(service, code)).assigned
        assert ran_since(before) == {"meeting_find_for_join": 1, "assignment_record": 1}

        before = statements()
        assert not (await join(service, code)).assigned
        assert ran_since(before) == {"meeting_find_for_join": 1}

        await add_mc(db_pool, "mc-2", mc2.endpoint, meetings_now=50)
        await fetch(db_pool, "UPDATE meeting_controllers SET health_status = 'unhealthy'"
                    " WHERE controller_id = 'mc-1'")  # fmt: skip
        before = statements()
        moved = await join(service, code)
        assert moved.assigned
        assert moved.assignment.controller_id == "mc-2"
        assert ran_since(before) == {
            "meeting_find_for_join": 1,
            "assignment_begin_attempt": 1,
            "assignment_record": 1,
        }

    async with join_service(db_pool, gc_token) as elsewhere:
        before = statements()
        found = await join(elsewhere, code)
        assert found.assignment == moved.assignment
        assert ran_since(before) == {"meeting_find_for_join": 1}
    assert await held_leases(db_pool) == []


async def test_only_the_five_least_loaded_mcs_are_drawn_from_on_each_attempt(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """The production candidate limit (top 5 MCs, SPEC §6.3 step 5) of both
    statements that read candidates: the lookup (first attempt) and
    ``begin_attempt`` (the retry). Seven MCs loaded 0..6 and a draw that
    always takes the last candidate: the first attempt asks mc-4, the fifth
    least loaded (never mc-5 or mc-6); mc-4 refuses and is excluded, so the
    retry asks mc-5, fifth now (never mc-6)."""
    behaviours: list[Behaviour] = [ACCEPT] * 7
    behaviours[4] = Reject(pb.REJECTION_REASON_AT_CAPACITY)
    async with (
        fakes(gc_token, *behaviours) as mcs,
        join_service(db_pool, gc_token, LastChoice()) as service,
    ):
        for load, mc in enumerate(mcs):
            await add_mc(db_pool, f"mc-{load}", mc.endpoint, meetings_now=load)
        await add_mh(db_pool, "mh-a")
        code = await new_meeting(db_pool)

        before = statements()
        result = await join(service, code)

        assert [len(mc.requests) for mc in mcs] == [0, 0, 0, 0, 1, 1, 0]
        assert (result.assigned, result.assignment.controller_id) == (True, "mc-5")
        assert result.assignment.generation == mcs[5].requests[0].generation
        assert mcs[5].requests[0].generation > mcs[4].requests[0].generation
        # Each limit is a separate statement's default: both were exercised.
        assert ran_since(before) == {
            "meeting_find_for_join": 1,
            "assignment_begin_attempt": 1,
            "assignment_record": 1,
        }


async def test_the_mc_is_drawn_with_weights_by_free_share(
    db_pool: asyncpg.Pool, gc_token: str
) -> None:
    """Loads 0, 50 and 90 of 100 weigh 1.0, 0.5 and 0.1 (``1 - load ratio``,
    :func:`~darktower.gc.selection.controller_weight`), cumulatively 1.0, 1.5
    and 1.6. A draw of 0.75 lands at 1.2 of 1.6: the second candidate, mc-50.
    Taking the least loaded would ask mc-0; an unweighted draw
    (floor(0.75 x 3) = 2) or weights by load rather than free share (0, 0.5,
    0.9: 1.05 of 1.4) would ask mc-90."""
    async with (
        fakes(gc_token, ACCEPT, ACCEPT, ACCEPT) as (idle, half, busy),
        join_service(db_pool, gc_token, FixedDraw(0.75)) as service,
    ):
        await add_mc(db_pool, "mc-0", idle.endpoint, meetings_now=0)
        await add_mc(db_pool, "mc-50", half.endpoint, meetings_now=50)
        await add_mc(db_pool, "mc-90", busy.endpoint, meetings_now=90)
        await add_mh(db_pool, "mh-a")

        result = await join(service, await new_meeting(db_pool))

        assert (len(idle.requests), len(half.requests), len(busy.requests)) == (0, 1, 0)
        assert (result.assigned, result.assignment.controller_id) == (True, "mc-50")


async def test_the_draw_uses_the_os_csprng_by_default(db_pool: asyncpg.Pool, gc_token: str) -> None:
    """SPEC §6.3: without an ``rng`` the controller draw comes from
    :class:`secrets.SystemRandom`, not a seedable PRNG. (``_rng`` is private;
    it is the only place the default shows.)"""
    async with open_mc_client(gc_token) as client:
        service = JoinService(
            db_pool, client, gc_id=GC_ID, region=REGION, stale_after_s=30, lease_ttl_s=35
        )
        assert isinstance(service._rng, secrets.SystemRandom)


# --- over HTTP, through a whole GC -----------------------------------------------------------


@asynccontextmanager
async def gc_with_fleet(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str, behaviours: Sequence[Behaviour]
) -> AsyncIterator[tuple[RunningGc, list[FakeMc], httpx.AsyncClient]]:
    async with (
        fakes(None, *behaviours) as mcs,
        running_gc(gc_environ(keys, database_dsn)) as gc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.endpoints.http_port}") as http,
    ):
        for i, mc in enumerate(mcs):
            await add_mc(db_pool, f"mc-{i}", mc.endpoint, meetings_now=i)
        await add_mh(db_pool, "mh-a", zone="zone-a")
        await add_mh(db_pool, "mh-b", zone="zone-b")
        yield gc, mcs, http


def user_token(keys: DevKeys, org: uuid.UUID = ORG, sub: str = "user-1") -> dict[str, str]:
    token = tokens.mint_user_token(keys.private_key, kid=keys.kid, user_id=sub, org_id=str(org))
    return {"Authorization": f"Bearer {token}"}


async def create_over_http(
    http: httpx.AsyncClient, keys: DevKeys, *, guests: bool = False, org: uuid.UUID = ORG
) -> str:
    response = await http.post(
        "/api/v1/meetings",
        json={"display_name": "Design review", "allow_guests": guests},
        headers=user_token(keys, org),
    )
    assert response.status_code == 201, response.text
    code: str = response.json()["meeting_code"]
    return code


async def test_join_over_http_returns_the_assignment_and_a_meeting_token(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    async with gc_with_fleet(db_pool, keys, database_dsn, [ACCEPT]) as (_, (mc,), http):
        code = await create_over_http(http, keys)

        response = await http.get(f"/api/v1/meetings/{code}", headers=user_token(keys))

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["mc"] == {
            "id": "mc-0",
            "grpc_endpoint": mc.endpoint,
            "webtransport_endpoint": "https://mc-0.example:4433",
        }
        assert [(m["id"], m["role"]) for m in body["media_handlers"]] == [
            ("mh-a", "primary"),
            ("mh-b", "backup"),
        ]
        assert body["expires_in"] == 600
        claims = jwt.decode(
            body["token"], keys.private_key.public_key(), algorithms=["EdDSA"], audience="mc"
        )
        assert claims["meeting_id"] == body["meeting_id"] == mc.requests[0].meeting_id
        assert claims["sub"] == "user-1"
        assert claims["scope"] == "meeting.participant"


async def test_other_orgs_user_gets_404_and_no_data(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    async with gc_with_fleet(db_pool, keys, database_dsn, [ACCEPT]) as (_, (mc,), http):
        code = await create_over_http(http, keys, org=OTHER_ORG)

        response = await http.get(f"/api/v1/meetings/{code}", headers=user_token(keys, ORG))

        assert response.status_code == 404
        assert response.json() == {"error": {"code": "NOT_FOUND", "message": "meeting not found"}}
        assert mc.requests == []


async def test_guest_joins_only_meetings_that_admit_guests(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    async with gc_with_fleet(db_pool, keys, database_dsn, [ACCEPT]) as (_, (mc,), http):
        open_code = await create_over_http(http, keys, guests=True)
        closed_code = await create_over_http(http, keys, guests=False)

        ok = await http.post(
            f"/api/v1/meetings/{open_code}/guest-token", json={"display_name": "Ada"}
        )
        refused = await http.post(
            f"/api/v1/meetings/{closed_code}/guest-token", json={"display_name": "Ada"}
        )

        assert ok.status_code == 200, ok.text
        assert ok.json()["mc"]["id"] == "mc-0"
        claims = jwt.decode(
            ok.json()["token"], keys.private_key.public_key(), algorithms=["EdDSA"], audience="mc"
        )
        assert claims["sub"].startswith("guest-")
        assert claims["display_name"] == "Ada"
        # Exactly like a missing code: a guest learns nothing about
        # members-only meetings.
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "NOT_FOUND"
        status = await run_aio(
            db_pool.fetchval, "SELECT status FROM meetings WHERE meeting_code = $1", closed_code
        )
        assert status == "scheduled"  # and the refused guest left no trace
        assert len(mc.requests) == 1


async def test_exhausted_attempts_are_503_with_retry_after(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    refuse = Reject(pb.REJECTION_REASON_AT_CAPACITY)
    async with gc_with_fleet(db_pool, keys, database_dsn, [refuse] * 3) as (_, mcs, http):
        code = await create_over_http(http, keys)

        response = await http.get(f"/api/v1/meetings/{code}", headers=user_token(keys))

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert int(response.headers["Retry-After"]) >= 1
        assert [len(mc.requests) for mc in mcs] == [1, 1, 1]
        assert await assignment_rows(db_pool) == []


async def test_concurrent_http_joins_all_get_the_same_mc(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    async with gc_with_fleet(db_pool, keys, database_dsn, [ACCEPT] * 3) as (_, mcs, http):
        codes = [await create_over_http(http, keys) for _ in range(5)]
        answers: dict[str, list[str]] = {code: [] for code in codes}

        async def one(code: str) -> None:
            response = await http.get(f"/api/v1/meetings/{code}", headers=user_token(keys))
            assert response.status_code == 200, response.text
            answers[code].append(response.json()["mc"]["id"])

        async with trio.open_nursery() as nursery:
            for code in codes:
                for _ in range(10):
                    nursery.start_soon(one, code)

        assert all(len(set(ids)) == 1 and len(ids) == 10 for ids in answers.values())
        assert sum(len(mc.requests) for mc in mcs) == len(codes)
        assert len(await assignment_rows(db_pool)) == len(codes)
