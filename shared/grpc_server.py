"""A grpclib server as a trio-flavoured component, with auth and graceful drain.

grpclib is asyncio-flavoured; this module is the only place that starts and
stops a grpclib ``Server``. Around the services it adds, via grpclib's event
hooks (the extension points grpclib intends, see ``grpclib/events.py``):

* authentication of every RPC in the ``RecvRequest`` hook: a method missing
  from the policy is refused (default deny), the bearer token is validated
  for the method's audience and scope, and the verified claims are handed to
  the handler through :func:`current_claims` (the hook runs in the handler's
  own task, so a context variable carries them);
* one translation boundary for errors: :class:`InvalidArgument` becomes
  ``INVALID_ARGUMENT`` (naming the field), :class:`DatabaseUnavailable`
  ``UNAVAILABLE`` and any unexpected exception becomes a bare ``INTERNAL``
  (logged with its traceback here, never sent to the client);
* RPC outcome metrics by method and status in ``SendTrailingMetadata``;
* graceful drain: ``Server.close()`` cancels in-flight RPCs (grpclib #148), so
  on shutdown we stop listening, refuse new RPCs with ``UNAVAILABLE``, wait
  for in-flight ones up to a deadline, and only then close.
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from google.protobuf.message import DecodeError
from grpclib._typing import IServerMethodFunc
from grpclib.const import Status
from grpclib.events import RecvRequest, SendTrailingMetadata, listen
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from prometheus_client import Counter

from darktower.shared.config import HostPort, ListenError
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.logging import get_logger
from darktower.shared.seam import run_aio
from darktower.shared.tokens import (
    AuthError,
    Claims,
    PermissionDenied,
    TokenValidator,
    bearer_token,
)
from darktower.shared.validation import InvalidArgument

log = get_logger(__name__)

_claims: contextvars.ContextVar[Claims] = contextvars.ContextVar("grpc_claims")
_method: contextvars.ContextVar[str] = contextvars.ContextVar("grpc_method", default="?")


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a method's caller must present (SPEC §4 table)."""

    audience: str
    scope: str


#: Largest request message a server accepts. grpclib itself buffers whatever
#: length a client announces (up to 4 GiB); our messages are a few hundred
#: bytes, so anything near this is hostile or broken.
MAX_REQUEST_BYTES = 64 * 1024
#: How long a client may take to deliver its (small) request message.
REQUEST_READ_TIMEOUT_S = 5.0

RequestT = TypeVar("RequestT")
ReplyT = TypeVar("ReplyT")


async def recv_request(stream: Stream[RequestT, ReplyT]) -> RequestT:
    """The single request message of a unary RPC, bounded and decoded.

    Replaces ``stream.recv_message()``, which would buffer any announced
    length and turn an undecodable body into INTERNAL with a traceback. Here
    an oversized message is refused from its 5-byte prefix, before its body
    is read, and malformed input is INVALID_ARGUMENT (SPEC §3). It reads
    grpclib's wire framing through the stream's private attributes - pinned
    by the grpclib version range and covered by tests.
    """
    try:
        async with asyncio.timeout(REQUEST_READ_TIMEOUT_S):
            return await _recv_request(stream)
    except TimeoutError:
        # A client that announces a body and never sends it must not hold a
        # handler (and the drain) for as long as it likes.
        raise GRPCError(Status.DEADLINE_EXCEEDED, "request: not received in time") from None


async def _recv_request(stream: Stream[RequestT, ReplyT]) -> RequestT:
    h2_stream = stream._stream
    try:
        prefix = await h2_stream.recv_data(5)
    except AssertionError:  # grpclib's way of saying the stream ended early
        raise GRPCError(Status.INVALID_ARGUMENT, "request: message is truncated") from None
    if len(prefix) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: message is required")
    compressed, length = struct.unpack(">?I", prefix)
    if compressed:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: compression is not supported")
    if length > MAX_REQUEST_BYTES:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED, f"request: larger than {MAX_REQUEST_BYTES} bytes"
        )
    try:
        body = await h2_stream.recv_data(length)
    except AssertionError:
        body = b""
    if len(body) != length:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: message is truncated")
    request_type = stream._recv_type
    try:
        request: RequestT = request_type.FromString(body)  # type: ignore[attr-defined]
    except DecodeError:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"request: not a valid {request_type.__name__}"
        ) from None
    return request


def current_claims() -> Claims:
    """The verified claims of the RPC being handled (asyncio-flavoured code
    running inside a handler)."""
    return _claims.get()


def require_subject(expected: str) -> None:
    """Refuse the RPC unless the token's ``sub`` is ``expected``: a node may
    only act as itself (SPEC §4)."""
    if current_claims().sub != expected:
        raise GRPCError(Status.PERMISSION_DENIED, "token subject does not match the request")


@dataclass(frozen=True, slots=True)
class GrpcServerStatistics:
    """What :meth:`GrpcServer.statistics` reports (for metrics and tests)."""

    #: RPCs past authentication whose handler is running now.
    in_flight: int
    #: The most that were ever in flight at once (since construction).
    peak_in_flight: int
    #: Whether shutdown has begun (new RPCs are refused).
    draining: bool


class GrpcServer:
    """Trio-flavoured lifecycle of one grpclib server hosting ``services``.

    ``rpc_counter`` is a Counter labelled ``method, status``.
    """

    def __init__(
        self,
        services: Collection[Any],
        *,
        validator: TokenValidator,
        policy: Mapping[str, Requirement],
        rpc_counter: Counter,
        drain_timeout_s: float = 5.0,
    ) -> None:
        self._services = services
        self._validator = validator
        self._policy = dict(policy)
        self._rpc_counter = rpc_counter
        self._drain_timeout_s = drain_timeout_s
        self._in_flight = 0
        self._peak_in_flight = 0
        self._idle: asyncio.Event | None = None
        self._draining = False
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def statistics(self) -> GrpcServerStatistics:
        return GrpcServerStatistics(self._in_flight, self._peak_in_flight, self._draining)

    async def run(
        self, bind: HostPort, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``started`` with the bound port once the
        socket listens. Cancellation drains in-flight RPCs (bounded)."""
        try:
            server = await run_aio(self._start, bind)
        except OSError as exc:
            raise ListenError(f"cannot listen on {bind} ({exc.strerror or exc})") from None
        try:
            task_status.started(_bound_port(server))
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(self._drain_timeout_s + 2, shield=True):
                await run_aio(self._drain_and_close, server)

    async def _start(self, bind: HostPort) -> Server:
        # Constructed on the asyncio side: grpclib binds to the running loop.
        server = Server(list(self._services))
        # Remember each connection's protocol: after the drain they are closed
        # by us (grpclib's close() only cancels handlers; from Python 3.12 on,
        # asyncio's Server.wait_closed() waits for every client to hang up).
        make_protocol = server._protocol_factory

        def tracking_protocol_factory() -> H2Protocol:
            protocol = make_protocol()
            self._protocols.add(protocol)
            return protocol

        server._protocol_factory = tracking_protocol_factory  # type: ignore[method-assign]
        listen(server, RecvRequest, self._on_recv_request)
        listen(server, SendTrailingMetadata, self._on_send_trailing_metadata)
        self._idle = asyncio.Event()
        self._idle.set()
        await server.start(bind.host, bind.port, reuse_address=True)
        return server

    async def _drain_and_close(self, server: Server) -> None:
        self._draining = True
        # grpclib has no public "stop accepting": close the listening sockets.
        listener: asyncio.AbstractServer | None = getattr(server, "_server", None)
        if listener is not None:
            listener.close()
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self._drain_timeout_s)
        except TimeoutError:
            log.warning("grpc_drain_timeout", in_flight=self._in_flight)
        server.close()
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        except TimeoutError:
            log.warning("grpc_close_timeout")

    async def _on_recv_request(self, event: RecvRequest) -> None:
        _method.set(event.method_name)
        if self._draining:
            raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
        requirement = self._policy.get(event.method_name)
        if requirement is None:
            raise GRPCError(Status.PERMISSION_DENIED, "method not allowed")
        try:
            header = event.metadata.get("authorization")
            token = bearer_token(header if isinstance(header, str) else None)
            claims = await self._validator.validate_asyncio(
                token, audience=requirement.audience, scope=requirement.scope
            )
        except PermissionDenied as exc:
            raise GRPCError(Status.PERMISSION_DENIED, exc.public_message) from None
        except AuthError as exc:
            raise GRPCError(Status.UNAUTHENTICATED, exc.public_message) from None
        if self._draining:  # the drain began while the token was validated
            raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
        _claims.set(claims)
        # No await between here and the handler's first line, where it counts
        # itself in flight: a drain cannot slip in between.
        event.method_func = self._guarded(event.method_func)

    def _guarded(self, method_func: IServerMethodFunc) -> IServerMethodFunc:
        async def guarded(stream: Stream[Any, Any]) -> None:
            assert self._idle is not None
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            self._idle.clear()
            try:
                await method_func(stream)
            except (GRPCError, TimeoutError, StreamTerminatedError, ProtocolError):
                raise  # grpclib turns these into the right status itself
            except InvalidArgument as exc:
                raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
            except DatabaseUnavailable:
                raise GRPCError(Status.UNAVAILABLE, "database unavailable") from None
            except Exception:
                log.exception("grpc_handler_failed", method=_method.get())
                raise GRPCError(Status.INTERNAL, "internal error") from None
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return guarded

    async def _on_send_trailing_metadata(self, event: SendTrailingMetadata) -> None:
        self._rpc_counter.labels(_method.get(), event.status.name).inc()


def _bound_port(server: Server) -> int:
    listener: asyncio.Server | None = getattr(server, "_server", None)
    assert listener is not None
    sockets = listener.sockets
    port: int = sockets[0].getsockname()[1]
    return port
