"""The MC's real GC client (grpclib over loopback) against a real GC
in-process, and the GC task driving it end to end."""

from __future__ import annotations

import socket
import struct
import time
from functools import partial
from pathlib import Path

import asyncpg
import pytest
import trio
from gc_harness import DevKeys, RunningGc, gc_environ, mc_registration, running_gc
from grpclib.protocol import Connection

from darktower.mc.gc_client import GcClient, GcUnavailable, NotRegistered, open_gc_client
from darktower.mc.gc_task import GcTask
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret
from darktower.shared.gc_calls import translate
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)

#: Trio-clock guard on every test that does I/O (real clock here).
GUARD_S = 20
#: Calls against a resetting peer: with about a third of them hitting
#: grpclib's closed connection, a regression shows with certainty.
RESET_CALLS = 30


def url(gc: RunningGc) -> str:
    return f"http://127.0.0.1:{gc.endpoints.grpc_port}"


def fast(mc_id: str) -> pb.FastHeartbeatRequest:
    return pb.FastHeartbeatRequest(
        controller_id=mc_id,
        capacity=pb.ControllerCapacity(
            max_meetings=100, current_meetings=2, max_participants=1000, current_participants=9
        ),
        health=pb.HEALTHY,
    )


def comprehensive(mc_id: str) -> pb.ComprehensiveHeartbeatRequest:
    return pb.ComprehensiveHeartbeatRequest(
        controller_id=mc_id,
        capacity=pb.ControllerCapacity(
            max_meetings=100, current_meetings=2, max_participants=1000, current_participants=9
        ),
        health=pb.HEALTHY,
        cpu_usage_percent=12.5,
        memory_usage_percent=40.0,
    )


async def row(pool: asyncpg.Pool, mc_id: str) -> asyncpg.Record:
    record = await run_aio(
        pool.fetchrow,
        "SELECT health_status, current_meetings, current_participants, cpu_usage_percent"
        " FROM meeting_controllers WHERE controller_id = $1",
        mc_id,
    )
    assert record is not None
    return record


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_register_and_heartbeat(gc: RunningGc, keys: DevKeys, db_pool: asyncpg.Pool) -> None:
    with trio.fail_after(GUARD_S):
        async with open_gc_client(url(gc), Secret(keys.mc_token("mc-1"))) as client:
            response = await client.register(mc_registration("mc-1"))
            assert response.accepted
            assert response.fast_heartbeat_interval_ms == 10_000
            assert response.comprehensive_heartbeat_interval_ms == 30_000
            assert (await client.fast_heartbeat(fast("mc-1"))).acknowledged
            assert (await client.comprehensive_heartbeat(comprehensive("mc-1"))).acknowledged
    record = await row(db_pool, "mc-1")
    assert record["health_status"] == "healthy"
    assert (record["current_meetings"], record["current_participants"]) == (2, 9)
    assert record["cpu_usage_percent"] == 12.5


@pytest.mark.parametrize("kind", ["fast", "comprehensive"])
async def test_heartbeat_from_an_unregistered_mc_is_not_registered(
    gc: RunningGc, keys: DevKeys, kind: str
) -> None:
    with trio.fail_after(GUARD_S):
        async with open_gc_client(url(gc), Secret(keys.mc_token("mc-ghost"))) as client:
            heartbeat = (
                client.fast_heartbeat(fast("mc-ghost"))
                if kind == "fast"
                else client.comprehensive_heartbeat(comprehensive("mc-ghost"))
            )
            with pytest.raises(NotRegistered, match="NOT_FOUND"):
                await heartbeat


async def test_notify_meeting_ended_crosses_and_is_mapped(gc: RunningGc, keys: DevKeys) -> None:
    """The report reaches the GC (a meeting this MC does not own is answered
    ``acknowledged=False``), and a refusal maps to :class:`GcUnavailable`."""
    with trio.fail_after(GUARD_S):
        async with open_gc_client(url(gc), Secret(keys.mc_token("mc-1"))) as client:
            await client.register(mc_registration("mc-1"))
            response = await client.notify_meeting_ended(
                pb.NotifyMeetingEndedRequest(
                    meeting_id="00000000-0000-4000-8000-000000000001", region="local"
                )
            )
            assert not response.acknowledged
            with pytest.raises(GcUnavailable) as info:
                await client.notify_meeting_ended(
                    pb.NotifyMeetingEndedRequest(meeting_id="not-a-uuid", region="local")
                )
    assert info.value.code == "INVALID_ARGUMENT"


async def test_refused_token_is_unavailable_and_never_echoed(
    gc: RunningGc, keys: DevKeys, tmp_path: Path
) -> None:
    stranger = DevKeys.create(tmp_path / "stranger")  # a key the GC does not trust
    token = stranger.mc_token("mc-1")
    with trio.fail_after(GUARD_S):
        async with open_gc_client(url(gc), Secret(token)) as client:
            with pytest.raises(GcUnavailable) as caught:
                await client.register(mc_registration("mc-1"))
    assert caught.value.code == "UNAUTHENTICATED"
    assert token not in str(caught.value)
    assert token not in repr(client)


async def test_gc_down_is_unavailable_quickly(aio_loop: None, keys: DevKeys) -> None:
    port = closed_port()
    async with open_gc_client(f"http://127.0.0.1:{port}", Secret(keys.mc_token("mc-1"))) as client:
        for _ in range(3):  # and again: no backoff hidden in the channel
            started = time.monotonic()
            with trio.fail_after(GUARD_S), pytest.raises(GcUnavailable) as caught:
                await client.register(mc_registration("mc-1"))
            assert time.monotonic() - started < 1.0
            assert caught.value.code == "TRANSPORT"
            assert "mc-1" not in str(caught.value)


async def test_silent_gc_hits_the_deadline(aio_loop: None, keys: DevKeys) -> None:
    """A peer that accepts TCP and never answers: the RPC deadline ends it."""

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_gc_client(
            f"http://127.0.0.1:{port}", Secret(keys.mc_token("mc-1")), heartbeat_timeout=0.5
        ) as client:
            started = time.monotonic()
            with trio.fail_after(GUARD_S), pytest.raises(GcUnavailable) as caught:
                await client.fast_heartbeat(fast("mc-1"))
            elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert 0.4 <= elapsed < 2.0


async def test_a_peer_that_accepts_and_resets_is_unavailable_never_a_crash(
    aio_loop: None, keys: DevKeys
) -> None:
    """A balancer with no live GC behind it accepts and resets at once. Many
    of those resets land between grpclib's connect and its request (about a
    third of the calls here), where grpclib 0.4 fails with an
    ``AttributeError`` of its closed connection: an MC once exited on it
    (drill 5, the GCs down behind a front). Every call is ``GcUnavailable``."""

    async def reset(stream: trio.SocketStream) -> None:
        # Linger 0: closing sends RST.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, reset, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_gc_client(
            f"http://127.0.0.1:{port}", Secret(keys.mc_token("mc-1"))
        ) as client:
            with trio.fail_after(GUARD_S):
                for _ in range(RESET_CALLS):
                    with pytest.raises(GcUnavailable) as caught:
                        await client.fast_heartbeat(fast("mc-1"))
                    assert caught.value.code == "TRANSPORT", caught.value
        nursery.cancel_scope.cancel()


def test_only_grpclibs_closed_connection_error_is_transport_trouble() -> None:
    """The mapping the test above exercises by timing, pinned: exactly that
    attribute of grpclib's ``Connection``; any other ``AttributeError`` is a
    bug and propagates."""
    closed = object.__new__(Connection)
    error = translate("FastHeartbeat", AttributeError("x", name="_transport", obj=closed))
    assert isinstance(error, GcUnavailable)
    assert error.code == "TRANSPORT"
    assert translate("FastHeartbeat", AttributeError("x", name="_h2", obj=closed)) is None
    assert translate("FastHeartbeat", AttributeError("x", name="_transport", obj=object())) is None


async def test_same_client_reaches_a_restarted_gc_at_once(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    """The channel reconnects on the next call after the GC comes back: no
    reconnect backoff in the transport (SPEC §7.1)."""
    port = closed_port()
    environ = gc_environ(keys, database_dsn, GC_GRPC_ADDR=f"127.0.0.1:{port}")
    with trio.fail_after(GUARD_S):
        async with open_gc_client(
            f"http://127.0.0.1:{port}", Secret(keys.mc_token("mc-1"))
        ) as client:
            async with running_gc(environ):
                await client.register(mc_registration("mc-1"))
            with pytest.raises(GcUnavailable):
                await client.fast_heartbeat(fast("mc-1"))  # GC down
            async with running_gc(environ):
                started = time.monotonic()
                assert (await client.fast_heartbeat(fast("mc-1"))).acknowledged
                assert time.monotonic() - started < 1.0


class Recorded:
    """The real client, noting when a comprehensive heartbeat was answered."""

    def __init__(self, client: GcClient) -> None:
        self._client = client
        self.comprehensive_answered = trio.Event()

    async def register(self, request: pb.RegisterMCRequest) -> pb.RegisterMCResponse:
        return await self._client.register(request)

    async def fast_heartbeat(self, request: pb.FastHeartbeatRequest) -> pb.HeartbeatResponse:
        return await self._client.fast_heartbeat(request)

    async def comprehensive_heartbeat(
        self, request: pb.ComprehensiveHeartbeatRequest
    ) -> pb.HeartbeatResponse:
        response = await self._client.comprehensive_heartbeat(request)
        self.comprehensive_answered.set()
        return response

    async def notify_meeting_ended(
        self, request: pb.NotifyMeetingEndedRequest
    ) -> pb.NotifyMeetingEndedResponse:
        return await self._client.notify_meeting_ended(request)


async def test_gc_task_registers_and_heartbeats_a_real_gc(
    gc: RunningGc, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    class Load:
        meetings = 4
        participants = 21

    with trio.fail_after(GUARD_S):
        async with open_gc_client(url(gc), Secret(keys.mc_token("mc-1"))) as client:
            recorded = Recorded(client)
            task = GcTask(
                recorded, mc_registration("mc-1"), Load, lambda: pb.HEALTHY, lambda: (5.0, 50.0)
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(task.run)
                await task.wait_registered()
                # The comprehensive heartbeat follows registration at once.
                await recorded.comprehensive_answered.wait()
                nursery.cancel_scope.cancel()
    record = await row(db_pool, "mc-1")
    assert record["health_status"] == "healthy"
    assert (record["current_meetings"], record["current_participants"]) == (4, 21)
