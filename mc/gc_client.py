"""The MC's client of the Global Controller (MC → GC gRPC, SPEC §3, §7.1).

:class:`GcClient` is the trio-flavoured interface the GC task uses (tests use
a fake that implements it); :class:`GrpcGcClient` is the real one over
grpclib. The channel, the bounds of a call (5 s connect; 5 s for heartbeats
and meeting-ended reports, 10 s for registration) and the two exceptions
every failure becomes (:class:`NotRegistered`, :class:`GcUnavailable`) are
:mod:`darktower.shared.gc_calls`, shared with the simulated MHs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

from grpclib.client import UnaryUnaryMethod

from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret
from darktower.shared.gc_calls import (
    GcChannel,
    GcError,
    GcUnavailable,
    NotRegistered,
    open_gc_channel,
)

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

Req = TypeVar("Req")
Resp = TypeVar("Resp")


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


class GrpcGcClient:
    """:class:`GcClient` over a :class:`GcChannel` (made by :func:`open_gc_client`).

    ``token`` is the MC service token, or a callable returning the current
    one (so a rotated token is picked up on the next call); it is sent as
    ``authorization: Bearer <token>`` and never appears in errors or ``repr``.
    """

    def __init__(
        self,
        channel: GcChannel,
        token: Secret | Callable[[], Secret],
        *,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
        registration_timeout: float = REGISTRATION_TIMEOUT_S,
    ) -> None:
        self._channel = channel
        self._stub = internal_grpc.GlobalControllerServiceStub(channel.channel)
        self._token = token
        self._heartbeat_timeout = heartbeat_timeout
        self._registration_timeout = registration_timeout

    def __repr__(self) -> str:
        return f"GrpcGcClient({self._channel!r})"

    async def _call(
        self, rpc: str, method: UnaryUnaryMethod[Req, Resp], request: Req, deadline_s: float
    ) -> Resp:
        token = self._token() if callable(self._token) else self._token
        return await self._channel.call(rpc, method, request, deadline_s=deadline_s, token=token)

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

    Call inside :func:`darktower.shared.seam.asyncio_loop`. It connects
    lazily, on the first RPC, so opening never fails because the GC is down.
    """
    async with open_gc_channel(url, connect_timeout=connect_timeout) as channel:
        yield GrpcGcClient(
            channel,
            token,
            heartbeat_timeout=heartbeat_timeout,
            registration_timeout=registration_timeout,
        )
