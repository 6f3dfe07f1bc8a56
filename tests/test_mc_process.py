"""The Meeting Controller as a real process next to a real GC process, over
real PostgreSQL, Redis and gRPC (SPEC §7.1, §7.2, §7.5). The MCs outliving a
GC outage is failure drill (5), in test_drill_store_outages.py."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio
from gc_harness import DevKeys, gc_environ, grpc_channel, metadata
from process_harness import POLL_STEP_S, GcProcess, fetch, gc_process, mc_process

from darktower.mc.repositories.meeting_state import MeetingStateStore
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

pytestmark = pytest.mark.slow
pytest_plugins = ("gc_fixtures",)  # keys

#: Heartbeat interval the GC hands out in these tests (ms).
FAST_MS = 300


def mc_environ(keys: DevKeys, gc: GcProcess, redis_url: str, mc_id: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "GC_GRPC_URL": f"http://127.0.0.1:{gc.grpc_port}",
        "AUTH_JWKS": str(keys.jwks_path),
        "MC_SERVICE_TOKEN": keys.mc_token(mc_id),
        "MC_DRAIN_TIMEOUT_S": "1",
        "MC_MAX_MEETINGS": "50",
    }


async def forget_meeting(redis_url: str, meeting_id: str) -> None:
    """Delete a test meeting's keys (the MCs use no key prefix) once no MC
    process is left that could write them again."""
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with redis:
        await redis.delete(MeetingStateStore(redis).keys(meeting_id))


async def poll_row(dsn: str, mc_id: str, **expected: Any) -> dict[str, Any]:
    """The MC's row once it shows ``expected`` (bounded poll of the shared
    database while the processes heartbeat)."""
    row: dict[str, Any] = {}
    for _ in range(int(10 / POLL_STEP_S)):
        rows = await fetch(dsn, "SELECT * FROM meeting_controllers")
        row = next((dict(r) for r in rows if r["controller_id"] == mc_id), {})
        if row and all(row.get(k) == v for k, v in expected.items()):
            return row
        await trio.sleep(POLL_STEP_S)
    pytest.fail(f"row never showed {expected}: {row}")


async def test_mc_registers_hosts_an_assignment_and_drains_on_sigterm(
    aio_loop: None,
    keys: DevKeys,
    clean_database: str,
    redis_server_url: str,
    tmp_path: Path,
) -> None:
    mc_id = f"mc-{secrets.token_hex(3)}"
    gc_env = gc_environ(keys, clean_database, GC_FAST_HEARTBEAT_MS=str(FAST_MS))
    async with gc_process(gc_env, tmp_path, "gc-e2e") as gc:
        await gc.wait_ready()
        async with mc_process(mc_environ(keys, gc, redis_server_url, mc_id), tmp_path, mc_id) as mc:
            await mc.wait_ready()  # Redis up, registered with the GC, not draining
            row = await poll_row(clean_database, mc_id, health_status="healthy")
            assert row["grpc_endpoint"] == f"http://127.0.0.1:{mc.grpc_port}"

            # The GC's side of an assignment, sent as the GC would.
            meeting_id = f"e2e-{secrets.token_hex(4)}"
            request = pb.AssignMeetingWithMhRequest(
                meeting_id=meeting_id,
                requesting_gc_id="gc-e2e",
                generation=41,
                mh_assignments=[
                    pb.MhAssignment(
                        mh_id="mh-1", webtransport_endpoint="https://mh-1:4434",
                        role=pb.MH_ROLE_PRIMARY,
                    )
                ],
            )  # fmt: skip
            async with grpc_channel(mc.grpc_port) as channel:
                stub = internal_grpc.MeetingControllerServiceStub(channel)
                reply = await run_aio(
                    stub.AssignMeetingWithMh, request, metadata=metadata(keys.gc_token("gc-e2e"))
                )
            assert reply is not None
            assert reply.accepted

            redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
            async with redis:
                state = await MeetingStateStore(redis).read(meeting_id)
                assert (state.generation, state.owner) == (41, mc_id)
            # The claim went through the store's batcher, whose counters
            # are exposed.
            assert await mc.metric("mc_redis_batched_operations_total") >= 1
            assert await mc.metric("mc_redis_batches_total") >= 1
            # The next heartbeat carries the live load.
            await poll_row(clean_database, mc_id, current_meetings=1)

            status = await mc.stop(signal.SIGTERM)
            log = mc.stderr()
            assert status == 0, log
            assert "event=mc_draining" in log
            # The drain was reported at once (the GC stops placing here).
            rows = await fetch(
                clean_database, "SELECT controller_id, health_status FROM meeting_controllers"
            )
            assert dict((row[0], row[1]) for row in rows)[mc_id] == "draining"
            assert "event=mc_stopped" in log
            assert "Traceback" not in log
    await forget_meeting(redis_server_url, meeting_id)


async def test_an_unreachable_redis_stops_the_start_with_one_line(
    aio_loop: None, keys: DevKeys, clean_database: str, tmp_path: Path
) -> None:
    gc_env = gc_environ(keys, clean_database)
    async with gc_process(gc_env, tmp_path, "gc-e2e") as gc:
        env = mc_environ(keys, gc, "redis://127.0.0.1:1/0", "mc-noredis")
        async with mc_process(env, tmp_path, "mc-noredis") as mc:
            with trio.fail_after(20):
                status = await mc.process.wait()
            err = mc.stderr().strip()
    assert status == 1, err
    assert err.splitlines()[-1] == "error: Redis (REDIS_URL) is unreachable"
    assert "Traceback" not in err


async def assign_over_grpc(
    keys: DevKeys, mc: GcProcess, meeting_id: str, generation: int
) -> pb.AssignMeetingWithMhResponse:
    primary = pb.MhAssignment(
        mh_id="mh-1", webtransport_endpoint="https://mh-1:4434", role=pb.MH_ROLE_PRIMARY
    )
    request = pb.AssignMeetingWithMhRequest(
        meeting_id=meeting_id,
        requesting_gc_id="gc-e2e",
        generation=generation,
        mh_assignments=[primary],
    )
    async with grpc_channel(mc.grpc_port) as channel:
        stub = internal_grpc.MeetingControllerServiceStub(channel)
        reply = await run_aio(
            stub.AssignMeetingWithMh, request, metadata=metadata(keys.gc_token("gc-e2e"))
        )
    assert reply is not None
    return reply


async def poll_metric(process: GcProcess, name: str, value: float) -> None:
    seen = -1.0
    for _ in range(int(10 / POLL_STEP_S)):
        seen = await process.metric(name)
        if seen == value:
            return
        await trio.sleep(POLL_STEP_S)
    pytest.fail(f"{name} stayed {seen}, expected {value}")


async def test_two_mcs_given_one_meeting_the_older_generation_is_fenced_out(
    aio_loop: None,
    keys: DevKeys,
    clean_database: str,
    redis_server_url: str,
    tmp_path: Path,
) -> None:
    meeting_id = f"e2e-{secrets.token_hex(4)}"
    gc_env = gc_environ(keys, clean_database, GC_FAST_HEARTBEAT_MS=str(FAST_MS))
    async with gc_process(gc_env, tmp_path, "gc-e2e") as gc:
        await gc.wait_ready()
        envs = {
            name: mc_environ(keys, gc, redis_server_url, name)
            | {"MC_FENCE_CHECK_INTERVAL_S": "0.2"}
            for name in ("mc-first", "mc-second")
        }
        async with (
            mc_process(envs["mc-first"], tmp_path, "mc-first") as first,
            mc_process(envs["mc-second"], tmp_path, "mc-second") as second,
        ):
            await first.wait_ready()
            await second.wait_ready()
            assert (await assign_over_grpc(keys, first, meeting_id, 1)).accepted
            await poll_metric(first, "mc_meetings", 1)
            # The GC gave the meeting to another MC under a newer generation.
            assert (await assign_over_grpc(keys, second, meeting_id, 2)).accepted

            await poll_metric(first, "mc_fenced_out_total", 1)
            await poll_metric(first, "mc_meetings", 0)
            assert await second.metric("mc_meetings") == 1
            assert await second.metric("mc_fenced_out_total") == 0
            assert "event=fenced_out" in first.stderr()

            redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
            async with redis:
                store = MeetingStateStore(redis)
                state = await store.read(meeting_id)
                assert (state.generation, state.owner) == (2, "mc-second")

            # Fenced out is not fatal: both keep running and stop cleanly.
            assert first.process.returncode is None
            assert await first.stop(signal.SIGTERM) == 0
            assert await second.stop(signal.SIGTERM) == 0
    await forget_meeting(redis_server_url, meeting_id)
