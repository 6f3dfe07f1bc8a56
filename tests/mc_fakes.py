"""Fake Meeting Controllers for GC tests: real grpclib servers, no mocks.

A :class:`FakeMc` is a real ``MeetingControllerService`` on ``127.0.0.1``
(port 0 unless told) that answers ``AssignMeetingWithMh`` the way its
:attr:`FakeMc.behaviour` says, and records what it received. It runs on the
trio-asyncio loop of the test (request the ``aio_loop`` fixture)::

    async with fake_mc(ACCEPT, expected_token=token) as mc:
        outcome = await run_aio(client.assign, controller_id="mc-1",
                                endpoint=mc.endpoint, request=request)
        mc.behaviour = Reject(pb.REJECTION_REASON_DRAINING)
        ...
    assert mc.requests[0].generation == 7

Behaviours (set :attr:`FakeMc.behaviour` at any time; it applies to calls
arriving afterwards):

* :data:`ACCEPT` / :class:`Accept` - ``accepted = true``;
* :class:`Reject` ``(reason)`` - ``accepted = false`` with that reason;
* :data:`STALL` / :class:`Stall` - never answers by itself. Like every
  grpclib server (the real MC's too) the fake enforces the ``grpc-timeout``
  it received, floored to the millisecond, so a stalled call ends with the
  fake's ``DEADLINE_EXCEEDED`` or the client's own deadline, whichever fires
  first - both just before the client's deadline. For a peer that truly
  never answers use :func:`silent_endpoint`;
* :class:`Fail` ``(status, message)`` - ends the call with that gRPC status;
* :class:`Delay` ``(seconds, then)`` - waits on the loop clock (trio's, so a
  ``MockClock`` drives it), then behaves like ``then``;
* :class:`Gate` ``(opened, then)`` - waits until the test sets the
  ``asyncio.Event`` ``opened``, then behaves like ``then``;
* :data:`DISCONNECT` / :class:`Disconnect` - drops the TCP connection
  mid-call (a transport failure at the client);
* :class:`Script` ``(*steps)`` - call *n* gets step *n*; the last step
  repeats once the script is used up;
* :class:`Oversize` ``(size)`` - ``accepted = true``, encoded in exactly
  ``size`` bytes (padded with an unknown field, which every protobuf parser
  skips): a well-formed reply that is merely large;
* :class:`HugePrefix` ``(length)`` - announces a reply of ``length`` bytes in
  the gRPC prefix, sends a few bytes of it, then stalls: only a client that
  judges the prefix ends the call before its deadline.

Also here: endpoints that misbehave below gRPC (:func:`refused_endpoint`,
:func:`silent_endpoint`, :func:`unanswered_endpoint`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

__all__ = [
    "ACCEPT",
    "DISCONNECT",
    "STALL",
    "Accept",
    "Behaviour",
    "Delay",
    "Disconnect",
    "Fail",
    "FakeMc",
    "HugePrefix",
    "Oversize",
    "Reject",
    "Script",
    "Stall",
    "fake_mc",
    "oversize_reply",
    "refused_endpoint",
    "silent_endpoint",
    "unanswered_endpoint",
]


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    reason: pb.RejectionReason.ValueType = pb.REJECTION_REASON_AT_CAPACITY


@dataclass(frozen=True, slots=True)
class Stall:
    pass


@dataclass(frozen=True, slots=True)
class Fail:
    status: Status = Status.UNAVAILABLE
    message: str = "fake MC failure"


@dataclass(frozen=True, slots=True)
class Delay:
    seconds: float
    then: Behaviour


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


@dataclass(frozen=True, slots=True)
class Gate:
    """Wait until the test sets ``opened`` (``.set()`` from trio-flavoured
    code is fine: same thread), then behave like ``then``."""

    opened: asyncio.Event
    then: Behaviour


class Script:
    """One step per call, in order; the last step repeats."""

    __slots__ = ("steps", "used")

    def __init__(self, *steps: Behaviour) -> None:
        if not steps:
            raise ValueError("a script needs at least one step")
        self.steps = steps
        #: How many calls the script has answered so far.
        self.used = 0

    def __repr__(self) -> str:
        return f"Script{self.steps!r}"

    def next_step(self) -> Behaviour:
        step = self.steps[min(self.used, len(self.steps) - 1)]
        self.used += 1
        return step


@dataclass(frozen=True, slots=True)
class Oversize:
    size: int


@dataclass(frozen=True, slots=True)
class HugePrefix:
    length: int = 2**32 - 1


Behaviour = (
    Accept | Reject | Stall | Fail | Delay | Gate | Disconnect | Script | Oversize | HugePrefix
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def oversize_reply(size: int) -> pb.AssignMeetingWithMhResponse:
    """``accepted = true``, padded with unknown field 1000 (bytes) so that it
    encodes to exactly ``size`` bytes."""
    reply = pb.AssignMeetingWithMhResponse(accepted=True)
    base = len(reply.SerializeToString())
    tag = _varint((1000 << 3) | 2)  # field 1000, wire type "length-delimited"
    for payload in range(size - base - len(tag), 0, -1):
        if base + len(tag) + len(_varint(payload)) + payload == size:
            reply.MergeFromString(tag + _varint(payload) + b"x" * payload)
            assert len(reply.SerializeToString()) == size
            return reply
    raise ValueError(f"cannot pad a reply to {size} bytes")


ACCEPT = Accept()
STALL = Stall()
DISCONNECT = Disconnect()

#: Bounded cleanup of a fake (it only closes loopback sockets).
_CLOSE_TIMEOUT_S = 5.0


class _Service(internal_grpc.MeetingControllerServiceBase):
    def __init__(self, fake: FakeMc) -> None:
        self._fake = fake

    async def AssignMeetingWithMh(
        self, stream: Stream[pb.AssignMeetingWithMhRequest, pb.AssignMeetingWithMhResponse]
    ) -> None:
        await self._fake._handle(stream)


class FakeMc:
    """A running fake MC (made by :func:`fake_mc`). Attributes are read and
    written from trio-flavoured test code directly (same thread, and the
    handlers never hold them across an await)."""

    def __init__(self, behaviour: Behaviour, *, expected_token: str | None) -> None:
        #: What the next calls get; settable.
        self.behaviour: Behaviour = behaviour
        #: When set, a call whose ``authorization`` is not ``Bearer <this>``
        #: fails with ``UNAUTHENTICATED`` (it is still recorded).
        self.expected_token = expected_token
        #: Every request received, in order.
        self.requests: list[pb.AssignMeetingWithMhRequest] = []
        #: The ``authorization`` metadata of each request (``None`` if absent).
        self.authorizations: list[str | None] = []
        #: The deadline each request arrived with (``grpc-timeout``, in
        #: seconds as the fake read it on receipt; ``None`` if absent).
        self.timeouts: list[float | None] = []
        #: TCP connections accepted so far.
        self.connections = 0
        #: TCP connections open now.
        self.open_connections = 0
        self.port = 0
        self._server: Server | None = None
        self._protocols: list[H2Protocol] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    @property
    def endpoint(self) -> str:
        """The gRPC endpoint, as an MC registers it."""
        return f"http://127.0.0.1:{self.port}"

    async def wait_for_requests(self, count: int) -> None:
        """Trio-flavoured: return once ``count`` requests have arrived."""
        await run_aio(self._wait_until, lambda: len(self.requests) >= count)

    async def wait_for_open_connections(self, count: int) -> None:
        """Trio-flavoured: return once exactly ``count`` connections are open
        (e.g. 0 after the client dropped its channel)."""
        await run_aio(self._wait_until, lambda: self.open_connections == count)

    async def close(self) -> None:
        """Trio-flavoured: stop listening, end calls in progress and drop
        every connection (an MC going away). Idempotent."""
        if self._server is not None:
            with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await run_aio(self._close)

    # --- asyncio side -------------------------------------------------------------------------

    async def _start(self, port: int) -> None:
        server = Server([_Service(self)])
        make_protocol = server._protocol_factory

        def counting_protocol_factory() -> H2Protocol:
            protocol = make_protocol()
            self.connections += 1
            self.open_connections += 1
            self._protocols.append(protocol)
            self._changed()
            connection_lost = protocol.connection_lost

            def counting_connection_lost(exc: BaseException | None) -> None:
                connection_lost(exc)
                self.open_connections -= 1
                self._changed()

            protocol.connection_lost = counting_connection_lost  # type: ignore[method-assign]
            return protocol

        server._protocol_factory = counting_protocol_factory  # type: ignore[method-assign]
        await server.start("127.0.0.1", port, reuse_address=True)
        listener: asyncio.Server | None = getattr(server, "_server", None)
        assert listener is not None
        self.port = listener.sockets[0].getsockname()[1]
        self._server = server

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for protocol in self._protocols:
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()
        await server.wait_closed()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, waiter))
        try:
            await waiter
        finally:
            self._waiters = [(p, w) for p, w in self._waiters if w is not waiter]

    def _changed(self) -> None:
        for predicate, waiter in self._waiters:
            if not waiter.done() and predicate():
                waiter.set_result(None)

    async def _handle(
        self, stream: Stream[pb.AssignMeetingWithMhRequest, pb.AssignMeetingWithMhResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        header = stream.metadata.get("authorization") if stream.metadata is not None else None
        self.requests.append(request)
        self.authorizations.append(header if isinstance(header, str) else None)
        self.timeouts.append(stream.deadline.time_remaining() if stream.deadline else None)
        self._changed()
        if self.expected_token is not None and header != f"Bearer {self.expected_token}":
            raise GRPCError(Status.UNAUTHENTICATED, "fake MC: wrong token")
        await self._act(self.behaviour, stream)

    async def _act(
        self,
        behaviour: Behaviour,
        stream: Stream[pb.AssignMeetingWithMhRequest, pb.AssignMeetingWithMhResponse],
    ) -> None:
        match behaviour:
            case Script():
                await self._act(behaviour.next_step(), stream)
            case Accept():
                await stream.send_message(pb.AssignMeetingWithMhResponse(accepted=True))
            case Reject(reason=reason):
                await stream.send_message(
                    pb.AssignMeetingWithMhResponse(accepted=False, rejection_reason=reason)
                )
            case Stall():
                await asyncio.Event().wait()
            case Fail(status=status, message=message):
                raise GRPCError(status, message)
            case Delay(seconds=seconds, then=then):
                await asyncio.sleep(seconds)
                await self._act(then, stream)
            case Gate(opened=opened, then=then):
                await opened.wait()
                await self._act(then, stream)
            case Disconnect():
                # The client sees its connection lost mid-call; grpclib then
                # cancels this handler.
                stream._stream.connection.close()
                await asyncio.Event().wait()
            case Oversize(size=size):
                await stream.send_message(oversize_reply(size))
            case HugePrefix(length=length):
                # Below grpclib's framing: a prefix that promises ``length``
                # bytes, a token of them, and nothing more.
                await stream.send_initial_metadata()
                await stream._stream.send_data(struct.pack(">?I", False, length) + b"\x08\x01")
                await asyncio.Event().wait()


@asynccontextmanager
async def fake_mc(
    behaviour: Behaviour = ACCEPT, *, expected_token: str | None = None, port: int = 0
) -> AsyncIterator[FakeMc]:
    """Trio-flavoured: a :class:`FakeMc` serving for the duration of the block
    (inside the ``aio_loop`` fixture). ``port`` reuses a known port, e.g. to
    bring an MC back where it was."""
    fake = FakeMc(behaviour, expected_token=expected_token)
    await run_aio(fake._start, port)
    try:
        yield fake
    finally:
        await fake.close()


@contextmanager
def refused_endpoint() -> Iterator[str]:
    """An endpoint where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # held, never listening: nobody else gets the port
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts TCP connections (the kernel completes the
    handshake) and never says a word of HTTP/2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def unanswered_endpoint() -> Iterator[str]:
    """An endpoint where connecting never completes: a listener whose accept
    queue (backlog 0 → one connection) is full, so Linux drops further SYNs
    and the connect hangs (for minutes of SYN retries)."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        filler.settimeout(5)
        filler.connect(address)
        yield f"http://127.0.0.1:{address[1]}"
