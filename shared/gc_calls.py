"""Calls to the Global Controller's gRPC services from the nodes that report
to it (an MC, a simulated MH): one place for the channel, the bounds of a
call and the meaning of its failures, so every client of the GC behaves the
same when the GC is slow, gone or has forgotten the caller.

Every failure leaves :meth:`GcChannel.call` as one of two exceptions,
translated in one place (:func:`translate`):

=====================================================  =====================
grpclib ``GRPCError`` with ``NOT_FOUND``                :class:`NotRegistered`
any other ``GRPCError`` status                          :class:`GcUnavailable`
``StreamTerminatedError``, ``ProtocolError``            :class:`GcUnavailable`
``OSError`` (refused, reset, unreachable), timeouts     :class:`GcUnavailable`
grpclib's closed ``Connection`` (lost before the call)  :class:`GcUnavailable`
=====================================================  =====================

Nothing above this module catches grpclib exceptions by name. Messages name
the RPC and the status, never the token.

Transport behaviour (grpclib 0.4, verified in ``grpclib/client.py``): a
``Channel`` has no reconnect backoff of its own - when its connection is lost
it connects again, synchronously, on the next RPC (``Channel.__connect__``),
and a failed connect just raises. So a GC that comes back is reached by the
very next call. grpclib has no connect timeout either; :meth:`GcChannel.call`
bounds the connect itself before each RPC, then the RPC by what is left of
its deadline (which grpclib also sends to the server as ``grpc-timeout``).

A connection lost between being made and carrying the request - a peer that
accepts and at once resets, as a load balancer with no live GC behind it
does - is not caught by grpclib 0.4: ``send_request`` opens its stream on the
``Connection`` without checking that it is still open, and a closed one has
dropped its transport, so the call fails with ``AttributeError: 'Connection'
object has no attribute '_transport'``. Exactly that error (that attribute,
of that class) is transport trouble here; any other ``AttributeError`` is a
bug and propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import trio
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import Connection

from darktower.shared.config import Secret
from darktower.shared.seam import run_aio

__all__ = [
    "GcChannel",
    "GcError",
    "GcUnavailable",
    "NotRegistered",
    "gc_host_port",
    "is_closed_connection",
    "open_gc_channel",
    "translate",
]

#: Bounded cleanup: closing a channel only drops its connection.
_CLOSE_TIMEOUT_S = 2.0
#: Server status messages are short; keep logs bounded regardless.
_MAX_DETAIL = 200

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class GcError(Exception):
    """Base of the failures a call to the GC reports; ``str()`` names the RPC
    and the status, never a token."""


class NotRegistered(GcError):
    """The GC does not know the caller (``NOT_FOUND``): register again."""


class GcUnavailable(GcError):
    """The GC could not be reached or refused the call for another reason.

    ``code`` is the gRPC status name (``"UNAVAILABLE"``, ``"UNAUTHENTICATED"``,
    ...) or ``"TRANSPORT"`` / ``"DEADLINE_EXCEEDED"`` for failures below gRPC.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def translate(rpc: str, exc: BaseException) -> GcError | None:
    """The one exception map: the :class:`GcError` for a library exception,
    or ``None`` when ``exc`` is not GC trouble (it then propagates unchanged -
    cancellation and bugs in particular)."""
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
    if is_closed_connection(exc):
        return GcUnavailable(f"{rpc}: connection lost", code="TRANSPORT")
    return None


def is_closed_connection(exc: BaseException) -> bool:
    """grpclib's stream opened on a ``Connection`` that was closed meanwhile
    (see the module docstring): transport trouble, for every grpclib client
    of this code base (the GC's MC client too), not a bug."""
    return (
        isinstance(exc, AttributeError)
        and exc.name == "_transport"
        and isinstance(exc.obj, Connection)
    )


def gc_host_port(url: str) -> tuple[str, int, bool]:
    """``http(s)://host[:port]`` → host, port, TLS; :class:`ValueError` otherwise."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the GC URL has a malformed port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the GC URL must be http://host:port or https://host:port")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError("the GC URL takes no path, query or fragment")
    tls = parts.scheme == "https"
    return parts.hostname, port or (443 if tls else 80), tls


class GcChannel:
    """One grpclib channel to a GC (made by :func:`open_gc_channel`) and the
    bounded call every client of the GC makes through it."""

    def __init__(self, channel: Channel, *, connect_timeout: float) -> None:
        self.channel = channel
        self._connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"GcChannel({self.channel!r})"

    async def call(
        self,
        rpc: str,
        method: UnaryUnaryMethod[Req, Resp],
        request: Req,
        *,
        deadline_s: float,
        token: Secret,
    ) -> Resp:
        """Trio-flavoured: one RPC of a stub on :attr:`channel`, one seam
        crossing; ``token`` is sent as ``authorization: Bearer``."""
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
                self.channel.__connect__(), timeout=min(self._connect_timeout, deadline_s)
            )
            remaining = deadline_s - (loop.time() - started)
            if remaining <= 0:
                raise TimeoutError
            return await method(request, timeout=remaining, metadata=metadata)
        except Exception as exc:
            translated = translate(rpc, exc)
            if translated is None:
                raise
            raise translated from None


@asynccontextmanager
async def open_gc_channel(url: str, *, connect_timeout: float) -> AsyncIterator[GcChannel]:
    """Trio-flavoured: a :class:`GcChannel` to the GC at ``url``
    (``http://host:port``; ``https`` uses TLS with the default context).

    Call inside :func:`darktower.shared.seam.asyncio_loop`: the channel is
    created and closed on the asyncio side. It connects lazily, on the first
    RPC (and again after a lost connection), so opening never fails because
    the GC is down.
    """
    host, port, tls = gc_host_port(url)

    async def create() -> Channel:
        return Channel(host, port, ssl=True if tls else None)

    channel = await run_aio(create)
    try:
        yield GcChannel(channel, connect_timeout=connect_timeout)
    finally:

        async def close() -> None:
            channel.close()

        with trio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await run_aio(close)
