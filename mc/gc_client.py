"""The MC's client of the Global Controller (MC → GC gRPC, SPEC §3, §7.1).

:class:`GcClient` is the trio-flavoured interface the GC task uses (tests use
a fake that implements it); :class:`GrpcGcClient` is the real one over
grpclib. Every call crosses the trio/asyncio seam exactly once
(:func:`darktower.shared.seam.run_aio`), and every failure leaves this module
as one of two exceptions, translated in one place (:func:`_translate`):

=====================================================  =====================
grpclib ``GRPCError`` with ``NOT_FOUND``                :class:`NotRegistered`
any other ``GRPCError`` status                          :class:`GcUnavailable`
``StreamTerminatedError``, ``ProtocolError``            :class:`GcUnavailable`
``OSError`` (refused, reset, unreachable), timeouts     :class:`GcUnavailable`
=====================================================  =====================

Nothing above this module catches grpclib exceptions by name. Messages name
the RPC and the status, never the token.

Transport behaviour (grpclib 0.4, verified in ``grpclib/client.py``): a
``Channel`` has no reconnect backoff of its own - when its connection is lost
it connects again, synchronously, on the next RPC (``Channel.__connect__``),
and a failed connect just raises. So a GC that comes back is reached by the
very next heartbeat. grpclib has no connect timeout either; we bound the
connect ourselves (5 s) before each RPC, and each RPC by its deadline (5 s for
heartbeats and meeting-ended reports, 10 s for registration), which grpclib
also sends to the server as ``grpc-timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import trio
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret
from darktower.shared.seam import run_aio

__all__ = [
    "CONNECT_TIMEOUT_S",
    "HEARTBEAT_TIMEOUT_S",
    "REGISTRATION_TIMEOUT_S",
    "GcClient",
    "GcError",
    "GcUnavailable",
    "GrpcGcClient",
    "NotRegistered",
    "open_gc_client",
]

CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 5.0
REGISTRATION_TIMEOUT_S = 10.0
#: Bounded cleanup: closing a channel only drops its connection.
_CLOSE_TIMEOUT_S = 2.0
#: Server status messages are short; keep logs bounded regardless.
_MAX_DETAIL = 200

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class GcError(Exception):
    """Base of the failures a :class:`GcClient` reports."""


class NotRegistered(GcError):
    """The GC does not know this MC (``NOT_FOUND``): register again."""


class GcUnavailable(GcError):
    """The GC could not be reached or refused the call for another reason.

    ``code`` is the gRPC status name (``"UNAVAILABLE"``, ``"UNAUTHENTICATED"``,
    ...) or ``"TRANSPORT"`` / ``"DEADLINE_EXCEEDED"`` for failures below gRPC.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class GcClient(Protocol):
    """Trio-flavoured MC → GC operations. Each raises :class:`NotRegistered`
    or :class:`GcUnavailable` on failure, and nothing else for GC trouble."""

    async def register(self, request: pb.RegisterMCRequest) -> pb.RegisterMCResponse: ...

    async def fast_heartbeat(self, request: pb.FastHeartbeatRequest) -> pb.HeartbeatResponse: ...

    async def comprehensive_heartbeat(
        self, request: pb.ComprehensiveHeartbeatRequest
    ) -> pb.HeartbeatResponse: ...

    async def notify_meeting_ended(
        self, request: pb.NotifyMeetingEndedRequest
    ) -> pb.NotifyMeetingEndedResponse: ...


def _translate(rpc: str, exc: BaseException) -> GcError | None:
    """The one exception map of this module: the :class:`GcError` for a
    library exception, or ``None`` when ``exc`` is not GC trouble (it then
    propagates unchanged - cancellation in particular)."""
    if isinstance(exc, GRPCError):
        detail = f"{rpc}: {exc.status.name}"
        if exc.message:
            detail += f" ({exc.message[:_MAX_DETAIL]})"
        if exc.status is Status.NOT_FOUND:
            return NotRegistered(detail)
        return GcUnavailable(detail, code=exc.status.name)
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is this on 3.11+
        return GcUnavailable(f"{rpc}: deadline exceeded", code="DEADLINE_EXCEEDED")
    if isinstance(exc, StreamTerminatedError | ProtocolError):
        return GcUnavailable(f"{rpc}: {type(exc).__name__}", code="TRANSPORT")
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return GcUnavailable(f"{rpc}: connection failed ({reason})", code="TRANSPORT")
    return None


class GrpcGcClient:
    """:class:`GcClient` over a grpclib channel (made by :func:`open_gc_client`).

    ``token`` is the MC service token, or a callable returning the current
    one (so a rotated token is picked up on the next call); it is sent as
    ``authorization: Bearer <token>`` and never appears in errors or ``repr``.
    """

    def __init__(
        self,
        channel: Channel,
        token: Secret | Callable[[], Secret],
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
        registration_timeout: float = REGISTRATION_TIMEOUT_S,
    ) -> None:
        self._channel = channel
        self._stub = internal_grpc.GlobalControllerServiceStub(channel)
        self._token = token
        self._connect_timeout = connect_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._registration_timeout = registration_timeout

    def __repr__(self) -> str:
        return f"GrpcGcClient({self._channel!r})"

    async def register(self, request: pb.RegisterMCRequest) -> pb.RegisterMCResponse:
        return await self._call(
            "RegisterMC", self._stub.RegisterMC, request, self._registration_timeout
        )

    async def fast_heartbeat(self, request: pb.FastHeartbeatRequest) -> pb.HeartbeatResponse:
        return await self._call(
            "FastHeartbeat", self._stub.FastHeartbeat, request, self._heartbeat_timeout
        )

    async def comprehensive_heartbeat(
        self, request: pb.ComprehensiveHeartbeatRequest
    ) -> pb.HeartbeatResponse:
        return await self._call(
            "ComprehensiveHeartbeat",
            self._stub.ComprehensiveHeartbeat,
            request,
            self._heartbeat_timeout,
        )

    async def notify_meeting_ended(
        self, request: pb.NotifyMeetingEndedRequest
    ) -> pb.NotifyMeetingEndedResponse:
        return await self._call(
            "NotifyMeetingEnded", self._stub.NotifyMeetingEnded, request, self._heartbeat_timeout
        )

    async def _call(
        self, rpc: str, method: UnaryUnaryMethod[Req, Resp], request: Req, deadline_s: float
    ) -> Resp:
        """Trio-flavoured: one RPC, one seam crossing."""
        token = self._token() if callable(self._token) else self._token
        metadata = {"authorization": f"Bearer {token.reveal()}"}
        return await run_aio(self._call_aio, rpc, method, request, deadline_s, metadata)

    async def _call_aio(
        self,
        rpc: str,
        method: UnaryUnaryMethod[Req, Resp],
        request: Req,
        deadline_s: float,
        metadata: dict[str, str],
    ) -> Resp:
        """Asyncio-flavoured: connect (bounded), then the RPC with what is
        left of its deadline; library exceptions translated here."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # grpclib would connect inside the call, unbounded except by the
            # deadline; connecting first bounds it separately (a no-op when
            # the channel is already connected).
            await asyncio.wait_for(
                self._channel.__connect__(), timeout=min(self._connect_timeout, deadline_s)
            )
            remaining = deadline_s - (loop.time() - started)
            if remaining <= 0:
                raise TimeoutError
            return await method(request, timeout=remaining, metadata=metadata)
        except Exception as exc:
            translated = _translate(rpc, exc)
            if translated is None:
                raise
            raise translated from None


def _host_port(url: str) -> tuple[str, int, bool]:
    """``http(s)://host[:port]`` → host, port, TLS."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("GC URL must be http://host:port or https://host:port")
    tls = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if tls else 80), tls


@asynccontextmanager
async def open_gc_client(
    url: str,
    token: Secret | Callable[[], Secret],
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
    registration_timeout: float = REGISTRATION_TIMEOUT_S,
) -> AsyncIterator[GrpcGcClient]:
    """Trio-flavoured: a :class:`GrpcGcClient` for the GC at ``url``
    (``http://host:port``; ``https`` uses TLS with the default context).

    Call inside :func:`darktower.shared.seam.asyncio_loop`: the channel is
    created and closed on the asyncio side. It connects lazily, on the first
    RPC, so opening never fails because the GC is down.
    """
    host, port, tls = _host_port(url)

    async def create() -> Channel:
        return Channel(host, port, ssl=True if tls else None)

    channel = await run_aio(create)
    try:
        yield GrpcGcClient(
            channel,
            token,
            connect_timeout=connect_timeout,
            heartbeat_timeout=heartbeat_timeout,
            registration_timeout=registration_timeout,
        )
    finally:

        async def close() -> None:
            channel.close()

        with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await run_aio(close)
