"""A meeting's whole life across real processes (SPEC §6.3 step 8, §6.4,
§7.4): a GC process and an MC process on loopback, real PostgreSQL and Redis,
an MH registered over gRPC.

Join over HTTP → the GC records an assignment and the MC hosts the meeting
under the recorded generation in Redis; nobody connects to the MC → after
``MC_EMPTY_MEETING_TIMEOUT_S`` the MC ends the meeting, gives its Redis keys
back and calls ``NotifyMeetingEnded`` under that generation → the GC
soft-deletes the assignment; the next join makes a new assignment under a
newer generation. And a meeting fenced out of its recorded MC (another MC
claimed a newer generation in Redis): the MC's fence check stops it and
reports it under its own generation, the GC ends that row, and the next join
assigns anew above the other MC's generation.

Every wait is a bounded poll of what the processes publish (database rows,
``/metrics``, Redis), never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import re
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import coredis
import httpx
import pytest
import trio
from gc_harness import DevKeys, GcClients, gc_clients, gc_environ, metadata, mh_registration
from process_harness import POLL_STEP_S, GcProcess, fetch, gc_process, mc_process

from darktower.mc.repositories.meeting_state import MeetingState, MeetingStateStore
from darktower.protos import internal_pb2 as pb
from darktower.shared import tokens
from darktower.shared.seam import run_aio

pytestmark = pytest.mark.slow
pytest_plugins = ("gc_fixtures",)  # keys

T = TypeVar("T")

ORG = uuid.UUID("33333333-3333-4333-8333-333333333333")
MH_ID = "mh-1"
#: Intervals short enough for a test of seconds, long enough for the GC's
#: config guards (a fast heartbeat and a load report well inside the
#: staleness threshold, with 1.5 health-check ticks of slack).
FAST_MS = 500
STALE_AFTER_S = 5
#: How long the MC keeps a meeting nobody joined (SPEC §6.3 step 8).
EMPTY_TIMEOUT_S = 3.0
#: Bound on each wait for something the processes do on their own.
WITHIN_S = 10.0


def user_headers(keys: DevKeys) -> dict[str, str]:
    token = tokens.mint_user_token(
        keys.private_key, kid=keys.kid, user_id="user-1", org_id=str(ORG)
    )
    return {"Authorization": f"Bearer {token}"}


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str | Callable[[], str]) -> T:
    """``probe``'s first result that is not ``None`` (bounded poll); else the
    test fails saying ``what`` did not happen."""
    with trio.move_on_after(WITHIN_S):
        while True:
            result = await probe()
            if result is not None:
                return result
            await trio.sleep(POLL_STEP_S)
    pytest.fail(f"not within {WITHIN_S} s: {what if isinstance(what, str) else what()}")


async def assignment_rows(dsn: str) -> list[dict[str, Any]]:
    rows = await fetch(
        dsn,
        "SELECT meeting_id, region, meeting_controller_id, generation, primary_mh_id,"
        " backup_mh_id, assigned_at, ended_at FROM meeting_assignments",
    )
    return [dict(row) for row in rows]


async def redis_state(redis_url: str, meeting_id: str) -> MeetingState:
    """The meeting's keys as the MCs write them (they use no key prefix)."""
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with redis:
        return await MeetingStateStore(redis).read(meeting_id)


async def forget_meeting(redis_url: str, meeting_id: str) -> None:
    """Delete the test meeting's keys once no MC is left to write them."""
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with redis:
        await redis.delete(MeetingStateStore(redis).keys(meeting_id))


async def keep_mh_fresh(clients: GcClients, keys: DevKeys) -> None:
    """Register the MH, then report its load every interval (as an MH does)
    so it stays a healthy candidate under the short staleness threshold."""
    registered = await run_aio(
        clients.mh.RegisterMH, mh_registration(MH_ID), metadata=metadata(keys.mh_token(MH_ID))
    )
    assert registered.accepted
    report = pb.MHLoadReportRequest(handler_id=MH_ID, current_streams=0, health=pb.HEALTHY)
    while True:
        await run_aio(clients.mh.SendLoadReport, report, metadata=metadata(keys.mh_token(MH_ID)))
        await trio.sleep(FAST_MS / 1000)


async def join(http: httpx.AsyncClient, keys: DevKeys, code: str) -> dict[str, Any]:
    response = await http.get(f"/api/v1/meetings/{code}", headers=user_headers(keys))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def active_assignment(dsn: str, meeting_id: str) -> dict[str, Any]:
    """The meeting's one assignment row, which must be active."""
    rows = await assignment_rows(dsn)
    assert len(rows) == 1, rows
    (row,) = rows
    assert str(row["meeting_id"]) == meeting_id
    assert row["ended_at"] is None
    return row


async def assert_hosted(
    mc: GcProcess, mc_id: str, redis_url: str, meeting_id: str, generation: int
) -> None:
    """The MC hosts the meeting and Redis holds it fenced under ``generation``."""
    assert await mc.metric("mc_meetings") == 1
    state = await redis_state(redis_url, meeting_id)
    assert (state.generation, state.owner) == (generation, mc_id)
    assert state.mh_assignments_json() == [
        {
            "mh_id": MH_ID,
            "role": pb.MH_ROLE_PRIMARY,
            "webtransport_endpoint": "https://127.0.0.1:4434",
        }
    ]


@dataclass
class System:
    """A running GC and MC (and a fresh MH) of :func:`running_system`."""

    gc: GcProcess
    mc: GcProcess
    mc_id: str
    http: httpx.AsyncClient
    #: Meetings to delete from Redis at the end (no MC is left to).
    meetings: list[str]


@asynccontextmanager
async def running_system(
    keys: DevKeys, dsn: str, redis_url: str, tmp_path: Path, **mc_settings: str
) -> AsyncIterator[System]:
    """A GC process, an MC process (``mc_settings`` added to its environment)
    healthy in the GC, and an MH kept fresh; both processes must stop cleanly
    on SIGTERM afterwards, without a traceback."""
    mc_id = f"mc-{secrets.token_hex(3)}"
    gc_env = gc_environ(
        keys,
        dsn,
        # The MC checks that the GC's token is for the GC id the request names.
        GC_ID="gc-sys",
        GC_SERVICE_TOKEN=keys.gc_token("gc-sys"),
        GC_FAST_HEARTBEAT_MS=str(FAST_MS),
        GC_LOAD_REPORT_MS=str(FAST_MS),
        GC_STALE_AFTER_S=str(STALE_AFTER_S),
        GC_HEALTH_CHECK_INTERVAL_S="1",
    )
    meetings: list[str] = []
    try:
        async with gc_process(gc_env, tmp_path, "gc-sys") as gc:
            await gc.wait_ready()
            mc_env = {
                "REDIS_URL": redis_url,
                "GC_GRPC_URL": f"http://127.0.0.1:{gc.grpc_port}",
                "AUTH_JWKS": str(keys.jwks_path),
                "MC_SERVICE_TOKEN": keys.mc_token(mc_id),
                "MC_DRAIN_TIMEOUT_S": "1",
                "MC_MAX_MEETINGS": "50",
                **mc_settings,
            }
            async with (
                gc_clients(gc.grpc_port) as clients,
                trio.open_nursery() as nursery,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.http_port}") as http,
            ):
                nursery.start_soon(keep_mh_fresh, clients, keys)
                async with mc_process(mc_env, tmp_path, mc_id) as mc:
                    await mc.wait_ready()

                    async def mc_healthy() -> bool | None:
                        rows = await fetch(
                            dsn,
                            "SELECT controller_id FROM meeting_controllers"
                            " WHERE health_status = 'healthy'",
                        )
                        return True if [r[0] for r in rows] == [mc_id] else None

                    await eventually(mc_healthy, f"{mc_id} is healthy")
                    yield System(gc, mc, mc_id, http, meetings)
                    assert "Traceback" not in mc.stderr()
                    assert await mc.stop(signal.SIGTERM) == 0, mc.stderr()
                nursery.cancel_scope.cancel()
            assert "Traceback" not in gc.stderr()
            assert await gc.stop(signal.SIGTERM) == 0, gc.stderr()
    finally:
        for meeting_id in meetings:
            with trio.move_on_after(5, shield=True):
                await forget_meeting(redis_url, meeting_id)


async def create_and_join(system: System, keys: DevKeys) -> tuple[str, str, dict[str, Any]]:
    """Create a meeting over HTTP and join it (the MC is asked and accepts):
    its code, id and the join response."""
    created = await system.http.post(
        "/api/v1/meetings", json={"display_name": "Retro"}, headers=user_headers(keys)
    )
    assert created.status_code == 201, created.text
    code: str = created.json()["meeting_code"]
    meeting_id: str = created.json()["meeting_id"]
    system.meetings.append(meeting_id)
    first = await join(system.http, keys, code)
    assert first["meeting_id"] == meeting_id
    assert first["mc"]["id"] == system.mc_id
    return code, meeting_id, first


@pytest.mark.dt_timeout(45)
async def test_an_empty_meeting_is_ended_by_its_mc_and_the_next_join_reassigns_it(
    aio_loop: None,
    keys: DevKeys,
    clean_database: str,
    redis_server_url: str,
    tmp_path: Path,
) -> None:
    async with running_system(
        keys,
        clean_database,
        redis_server_url,
        tmp_path,
        MC_EMPTY_MEETING_TIMEOUT_S=str(EMPTY_TIMEOUT_S),
    ) as system:
        gc, mc, mc_id, http = system.gc, system.mc, system.mc_id, system.http
        # 1. Create and join over HTTP: the MC is asked and accepts.
        code, meeting_id, first = await create_and_join(system, keys)
        assert first["mc"]["grpc_endpoint"] == f"http://127.0.0.1:{mc.grpc_port}"
        assert [(m["id"], m["role"]) for m in first["media_handlers"]] == [(MH_ID, "primary")]
        row = await active_assignment(clean_database, meeting_id)
        assert row["meeting_controller_id"] == mc_id
        assert (row["primary_mh_id"], row["backup_mh_id"]) == (MH_ID, None)
        generation: int = row["generation"]
        await assert_hosted(mc, mc_id, redis_server_url, meeting_id, generation)
        assert await gc.metric("gc_joins_total", kind="user", result="assigned") == 1
        ended_before = await gc.metric("gc_meeting_ended_notifications_total", result="ended")

        # 2. Nobody connects to the MC: it ends the meeting and says so.
        ended = await eventually(lambda: ended_row(clean_database), "the assignment is ended")
        assert (ended["meeting_controller_id"], ended["generation"]) == (mc_id, generation)
        # Not before the bound (both times on the database clock; the MC's
        # clock started at its accept, just before the record).
        assert (ended["ended_at"] - ended["assigned_at"]).total_seconds() > (EMPTY_TIMEOUT_S - 1)
        assert "reason=empty_timeout" in mc.stderr()
        # The MC reported the end under the generation it hosted the meeting
        # under (not 0, which the GC would accept unfenced).
        await eventually_reported(gc, meeting_id, mc_id, generation)
        assert (
            await gc.metric("gc_meeting_ended_notifications_total", result="ended")
            == ended_before + 1
        )
        assert await gc.metric("gc_meeting_ended_notifications_total", result="not_owner") == 0
        assert await mc.metric("mc_meetings") == 0

        # ... and gives its Redis keys back: the owner and the MHs are gone,
        # the generation stays as a tombstone.
        seen: list[MeetingState] = []

        async def released() -> MeetingState | None:
            seen[:] = [await redis_state(redis_server_url, meeting_id)]
            return seen[0] if seen[0].owner is None else None

        state = await eventually(released, lambda: f"the MC released the meeting in Redis: {seen}")
        assert state.generation == generation
        assert state.mh_assignments is None
        assert state.state == {}

        # 3. The next join makes a new assignment, under a newer generation.
        second = await join(http, keys, code)
        assert second["meeting_id"] == meeting_id
        assert second["mc"]["id"] == mc_id
        again = await active_assignment(clean_database, meeting_id)
        assert again["meeting_controller_id"] == mc_id
        assert again["generation"] > generation
        await assert_hosted(mc, mc_id, redis_server_url, meeting_id, again["generation"])
        assert await gc.metric("gc_joins_total", kind="user", result="assigned") == 2
        assert "level=error" not in mc.stderr()


@pytest.mark.dt_timeout(45)
async def test_a_meeting_fenced_out_of_its_recorded_mc_is_ended_and_reassigned(
    aio_loop: None,
    keys: DevKeys,
    clean_database: str,
    redis_server_url: str,
    tmp_path: Path,
) -> None:
    """The row names our MC, but a newer generation was claimed in Redis by
    another MC (an MC that accepted a newer assignment whose record did not
    win). Our MC's fence check stops the meeting and reports it under its own
    generation: the GC ends that row (joins would otherwise keep going to an
    MC that no longer hosts the meeting), the other MC's claim is left alone,
    and the next join assigns anew above the other MC's generation."""
    async with running_system(
        keys,
        clean_database,
        redis_server_url,
        tmp_path,
        MC_EMPTY_MEETING_TIMEOUT_S="3600",
        MC_FENCE_CHECK_INTERVAL_S="0.5",
    ) as system:
        gc, mc, mc_id = system.gc, system.mc, system.mc_id
        code, meeting_id, _ = await create_and_join(system, keys)
        generation: int = (await active_assignment(clean_database, meeting_id))["generation"]
        await assert_hosted(mc, mc_id, redis_server_url, meeting_id, generation)
        # Another MC's claim, under a generation drawn as the GC draws them.
        [(newer,)] = await fetch(clean_database, "SELECT nextval('meeting_generation_seq')")
        redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        async with redis, MeetingStateStore(redis).running() as store:
            claim = await store.claim(meeting_id, newer, "mc-other", b"[]")
        assert claim.ok

        ended = await eventually(
            lambda: ended_row(clean_database), "the fenced-out assignment is ended"
        )
        assert (ended["meeting_controller_id"], ended["generation"]) == (mc_id, generation)
        assert await mc.metric("mc_fenced_out_total") == 1
        assert await mc.metric("mc_meetings") == 0
        await eventually_reported(gc, meeting_id, mc_id, generation)
        # The other MC's claim stands: ours was not released over it.
        state = await redis_state(redis_server_url, meeting_id)
        assert (state.generation, state.owner) == (newer, "mc-other")

        again = await join(system.http, keys, code)
        assert again["mc"]["id"] == mc_id
        row = await active_assignment(clean_database, meeting_id)
        assert row["generation"] > newer
        await assert_hosted(mc, mc_id, redis_server_url, meeting_id, row["generation"])


async def ended_row(dsn: str) -> dict[str, Any] | None:
    """The one assignment row once it is ended."""
    rows = await assignment_rows(dsn)
    return rows[0] if rows and rows[0]["ended_at"] is not None else None


async def eventually_reported(gc: GcProcess, meeting_id: str, mc_id: str, generation: int) -> None:
    """The GC logged the MC's end report for its own row, under ``generation``."""
    pattern = re.compile(
        rf"event=meeting_ended\b(?=.*\bmeeting_id={meeting_id}\b)(?=.*\bcontroller_id={mc_id}\b)"
        rf"(?=.*\bgeneration={generation}\b)(?=.*\bresult=ended\b)"
    )

    async def reported() -> bool | None:
        return True if pattern.search(gc.stderr()) else None

    await eventually(reported, lambda: f"{pattern.pattern!r} in the GC's log")
