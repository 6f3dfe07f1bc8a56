"""Graceful drain of :class:`darktower.shared.grpc_server.GrpcServer` over
real gRPC on loopback.

When the scope running the server is cancelled, the server stops listening,
refuses new RPCs on the connections it already has with UNAVAILABLE, lets
the RPCs in flight finish, and only then closes - waiting for them at most
``drain_timeout_s``.

To hold an RPC in flight for exactly as long as a test needs, the server
hosts a small test-only grpclib service (:class:`DrainService`, a fake at a
network edge we own, only for controlling timing) whose ``Hold`` handler
waits on an asyncio event the test sets. The server, its authentication and
the grpclib client are the real ones.

When an RPC outlasts the drain timeout, ``grpclib.server.Server.close()``
cancels its handler but sends the client nothing, so the server closes the
remaining connections itself: the straggler learns at once that the
connection is gone (``StreamTerminatedError``) instead of waiting for its
own deadline - or for ever, without one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from gc_harness import DevKeys, grpc_channel, metadata
from google.protobuf.wrappers_pb2 import StringValue
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from prometheus_client import CollectorRegistry, Counter

from darktower.shared import tokens
from darktower.shared.config import HostPort
from darktower.shared.grpc_server import GrpcServer, Requirement
from darktower.shared.jwks import KeyStore
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

HOLD = "/dt.test.Drain/Hold"
ECHO = "/dt.test.Drain/Echo"
SCOPE = "test.drain"
POLICY = {HOLD: Requirement("gc", SCOPE), ECHO: Requirement("gc", SCOPE)}

#: Bound on whatever should happen at once (a hang is a failure, not a wait).
PROMPTLY_S = 5.0
#: A short drain for the test of a straggler, and the bound the rest of the
#: shutdown must keep after it (``_drain_and_close`` allows 1 s for closing).
SHORT_DRAIN_S = 0.5
CLOSE_WITHIN_S = 1.5
#: The straggler's own deadline, clearly later than the server's shutdown
#: may take: grpclib sends it to the server too, which cancels the handler
#: then by itself - a deadline within the bound would end an unbounded drain
#: and hide it.
CLIENT_DEADLINE_S = SHORT_DRAIN_S + CLOSE_WITHIN_S + 0.5


class DrainService:
    """``Hold`` answers with its request once :meth:`release` is called;
    ``Echo`` answers at once. Counts ``Hold`` handlers cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0
        self._entered = asyncio.Event()
        self._released = asyncio.Event()

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            HOLD: Handler(self._hold, Cardinality.UNARY_UNARY, StringValue, StringValue),
            ECHO: Handler(self._echo, Cardinality.UNARY_UNARY, StringValue, StringValue),
        }

    async def _hold(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self._entered.set()
        try:
            await self._released.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await stream.send_message(StringValue(value=request.value))

    async def _echo(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(StringValue(value=request.value))

    async def wait_held(self) -> None:
        """Until a ``Hold`` handler is running (trio-flavoured, bounded)."""
        with trio.fail_after(PROMPTLY_S):
            await run_aio(self._entered.wait)

    async def release(self) -> None:
        async def release() -> None:
            self._released.set()

        await run_aio(release)


@dataclass
class PendingCall:
    """An RPC running in the background; its reply or error once done."""

    done: trio.Event
    reply: str | None = None
    error: BaseException | None = None
    elapsed_s: float = 0.0

    async def result(self) -> str:
        """The reply; re-raises the call's error (waits, bounded)."""
        with trio.fail_after(PROMPTLY_S + CLIENT_DEADLINE_S):
            await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


@dataclass
class Serving:
    """A :class:`GrpcServer` hosting a :class:`DrainService`, running in the
    test's nursery, and a client connection to it."""

    server: GrpcServer
    service: DrainService
    rpcs: CollectorRegistry
    port: int
    channel: Channel
    token: str
    nursery: trio.Nursery
    scope: trio.CancelScope
    stopped: trio.Event
    #: ``time.monotonic()`` when ``run`` returned (appended by its task).
    stopped_at: list[float]
    shutdown_began: float = 0.0

    def start_call(
        self, path: str, value: str, *, channel: Channel | None = None, deadline_s: float = 0.0
    ) -> PendingCall:
        """Call ``path`` in the background (on the shared connection unless
        ``channel`` is given; with a grpclib deadline if ``deadline_s``)."""
        pending = PendingCall(trio.Event())

        async def run() -> None:
            began = time.monotonic()
            try:
                pending.reply = await call(
                    channel or self.channel, path, value, self.token, deadline_s=deadline_s
                )
            except Exception as exc:
                pending.error = exc
            finally:
                pending.elapsed_s = time.monotonic() - began
                pending.done.set()

        self.nursery.start_soon(run)
        return pending

    async def begin_shutdown(self) -> None:
        """Cancel the server; return once its drain has begun (every trio
        task, the asyncio loop's among them, is blocked again)."""
        self.shutdown_began = time.monotonic()
        self.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert self.server.statistics().draining

    async def wait_stopped(self, within_s: float = PROMPTLY_S) -> float:
        """Until ``run`` has returned (bounded); seconds since shutdown began."""
        with trio.fail_after(within_s):
            await self.stopped.wait()
        return self.stopped_at[0] - self.shutdown_began

    def rpcs_counted(self, method: str, status: Status) -> float:
        value = self.rpcs.get_sample_value("rpcs_total", {"method": method, "status": status.name})
        return value or 0.0


async def call(channel: Channel, path: str, value: str, token: str, *, deadline_s: float) -> str:
    method: UnaryUnaryMethod[StringValue, StringValue] = UnaryUnaryMethod(
        channel, path, StringValue, StringValue
    )
    reply = await run_aio(
        method, StringValue(value=value), timeout=deadline_s or None, metadata=metadata(token)
    )
    return reply.value


@pytest.fixture
def token(keys: DevKeys) -> str:
    return tokens.mint_token(
        keys.private_key, kid=keys.kid, sub="drain-test", audience="gc", scopes=[SCOPE], ttl_s=600
    )


@asynccontextmanager
async def serving(
    keys: DevKeys, token: str, *, drain_timeout_s: float = PROMPTLY_S
) -> AsyncIterator[Serving]:
    """A :class:`GrpcServer` with a :class:`DrainService` on a free loopback
    port (call inside ``aio_loop``)."""
    service = DrainService()
    registry = CollectorRegistry()
    server = GrpcServer(
        [service],
        validator=tokens.TokenValidator(KeyStore([str(keys.jwks_path)])),
        policy=POLICY,
        rpc_counter=Counter("rpcs", "RPCs", ["method", "status"], registry=registry),
        drain_timeout_s=drain_timeout_s,
    )
    scope = trio.CancelScope()
    stopped = trio.Event()
    stopped_at: list[float] = []

    async def run(*, task_status: trio.TaskStatus[int]) -> None:
        try:
            with scope:
                await server.run(HostPort("127.0.0.1", 0), task_status=task_status)
        finally:
            stopped_at.append(time.monotonic())
            stopped.set()

    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(run)
        async with grpc_channel(port) as channel:
            running = Serving(
                server, service, registry, port, channel, token, nursery, scope, stopped, stopped_at
            )
            try:
                yield running
            finally:
                running.scope.cancel()
                with trio.move_on_after(PROMPTLY_S, shield=True):
                    await running.service.release()
                    await stopped.wait()


async def hold_one(running: Serving, *, deadline_s: float = 0.0) -> PendingCall:
    """A ``Hold`` RPC in flight on the shared connection, its handler running."""
    held = running.start_call(HOLD, "held", deadline_s=deadline_s)
    await running.service.wait_held()
    assert running.server.statistics().in_flight == 1
    return held


async def release_and_stop(running: Serving, held: PendingCall) -> None:
    """Let the held RPC finish: it gets its reply, then the server stops."""
    await running.service.release()
    assert await held.result() == "held"
    await running.wait_stopped()


# --- an orderly drain --------------------------------------------------------------------------


async def test_an_rpc_in_flight_when_shutdown_begins_completes(
    aio_loop: None, keys: DevKeys, token: str
) -> None:
    async with serving(keys, token) as running:
        held = await hold_one(running)
        await running.begin_shutdown()
        # The server waits for it: nothing else is running, yet it is not done.
        assert not running.stopped.is_set()

        await release_and_stop(running, held)
        assert running.service.cancelled == 0
        assert running.rpcs_counted(HOLD, Status.OK) == 1


async def test_a_new_rpc_on_an_existing_connection_is_refused_during_the_drain(
    aio_loop: None, keys: DevKeys, token: str
) -> None:
    async with serving(keys, token) as running:
        assert await running.start_call(ECHO, "before").result() == "before"
        held = await hold_one(running)
        await running.begin_shutdown()

        with pytest.raises(GRPCError) as info:
            await running.start_call(ECHO, "during").result()
        assert (info.value.status, info.value.message) == (
            Status.UNAVAILABLE,
            "server is shutting down",
        )
        assert running.rpcs_counted(ECHO, Status.UNAVAILABLE) == 1
        # The refusal did not disturb the RPC in flight.
        await release_and_stop(running, held)


async def test_the_listening_socket_is_closed_during_the_drain(
    aio_loop: None, keys: DevKeys, token: str
) -> None:
    async with serving(keys, token) as running:
        async with grpc_channel(running.port) as fresh:
            assert await running.start_call(ECHO, "before", channel=fresh).result() == "before"
        held = await hold_one(running)
        await running.begin_shutdown()

        async with grpc_channel(running.port) as fresh:
            with pytest.raises(ConnectionRefusedError):
                await running.start_call(ECHO, "during", channel=fresh).result()
        with trio.socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            await sock.connect(("127.0.0.1", running.port))

        await release_and_stop(running, held)


async def test_a_drain_with_nothing_in_flight_does_not_wait(
    aio_loop: None, keys: DevKeys, token: str
) -> None:
    """With the default drain timeout (5 s), an idle server closes at once."""
    async with serving(keys, token, drain_timeout_s=PROMPTLY_S) as running:
        assert await running.start_call(ECHO, "served").result() == "served"
        await running.begin_shutdown()
        assert await running.wait_stopped() < 1.0


# --- a straggler -------------------------------------------------------------------------------


async def test_shutdown_is_bounded_when_an_rpc_outlasts_the_drain_timeout(
    aio_loop: None, keys: DevKeys, token: str
) -> None:
    """The server waits the drain timeout for the straggler, then cancels it,
    closes its connection and stops within a bound; the straggler's client
    learns at once, long before its own deadline."""
    async with serving(keys, token, drain_timeout_s=SHORT_DRAIN_S) as running:
        held = await hold_one(running, deadline_s=CLIENT_DEADLINE_S)
        await running.begin_shutdown()
        took = await running.wait_stopped(within_s=SHORT_DRAIN_S + CLOSE_WITHIN_S)
        # It did wait for the straggler, and only as long as it was told to.
        assert SHORT_DRAIN_S - 0.05 <= took < SHORT_DRAIN_S + CLOSE_WITHIN_S
        assert running.service.cancelled == 1
        assert running.rpcs_counted(HOLD, Status.OK) == 0

        with pytest.raises(StreamTerminatedError):
            await held.result()
        assert held.elapsed_s < CLIENT_DEADLINE_S - 0.5
