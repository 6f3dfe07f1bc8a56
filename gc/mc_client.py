"""The GC's client of the Meeting Controllers (GC → MC gRPC, SPEC §3, §6.3).

Asyncio-flavoured: the join flow calls :meth:`McClient.assign` from its own
asyncio-flavoured code, so a join crosses the trio/asyncio seam once for the
whole flow, not once per MC call.

Channels. SPEC §6.3 wants one HTTP/2 connection per MC, reused, and dropped
when the MC's endpoint changes or it stops being healthy. So there is one
grpclib ``Channel`` per controller id: replaced when the controller shows up
with another endpoint, dropped after a transport failure (the next call starts
afresh) and dropped by :meth:`McClient.retain` when the controller is no
longer live. A dropped channel still carrying RPCs of concurrent joins is
closed only when the last of them finishes - closing it at once would abort
calls that may already have been accepted by the MC.

Time bounds (SPEC §6.3: connect 5 s, RPC 10 s). grpclib has no connect
timeout and connects inside the first call, bounded only by the call's
deadline; so we connect first, bounded by the connect timeout (a no-op on a
channel that is already connected), then make the call with what is left of
the RPC deadline - passed to grpclib, which also sends it to the MC as
``grpc-timeout`` so the MC can stop working on a call nobody waits for, and
enforced again around the call on the loop's clock. All of these are asyncio
timers, which inside trio-asyncio run on trio's clock (so tests drive them
with a ``MockClock``).

Failures never leave this module as exceptions: :meth:`McClient.assign`
returns an :class:`AssignOutcome`, and the join flow decides (exclude the MC,
try another). Library exceptions are translated in one place
(:func:`_failure`):

===========================================  ========================  ========
what happened                                ``status``                channel
===========================================  ========================  ========
MC answered ``accepted``                     ``ok``                    kept
MC answered with a rejection                 ``rejected``              kept
MC answered with gRPC status X               ``x`` (lowercase)         kept
RPC deadline passed                          ``deadline_exceeded``     dropped
connect refused/reset/timed out, TLS error,  ``unavailable``           dropped
connection lost (also grpclib's closed
``Connection``, see below), HTTP/2
protocol error, malformed endpoint
reply over :data:`MAX_REPLY_BYTES`           ``resource_exhausted``    dropped
anything else (e.g. an undecodable answer)   ``unknown``               dropped
===========================================  ========================  ========

A connection reset between being made and carrying the request (an MC
that accepts and at once resets, as one going down may) is not caught by
grpclib 0.4: the call fails with ``AttributeError: 'Connection' object has no
attribute '_transport'``. That exact error is transport trouble, recognised
by the same predicate as the nodes' GC client
(:func:`darktower.shared.gc_calls.is_closed_connection`); any other
``AttributeError`` stays ``unknown``.

A deadline drops the channel too: from here a stalled MC and a black-holed
connection look the same, and a dead connection that is never dropped would
fail every later call to that MC.

Reply size. grpclib's client has no receive limit (no
``max_receive_message_length``; its ``Configuration`` only sets keep-alive and
HTTP/2 window sizes): it reads whatever length the 5-byte gRPC prefix
announces, up to 4 GiB, acknowledging the data as it buffers it, so flow
control does not bound it either. An MC - broken, or compromised - could make
every join that asks it hold that much. So the reply is read here
(:func:`_recv_reply`, the client-side twin of
:func:`darktower.shared.grpc_server.recv_request`): a length over
:data:`MAX_REPLY_BYTES` is refused from the prefix, before any of the body is
read, the stream is reset and the channel dropped (the MC may still be
pushing the rest). What an MC can push before the prefix is looked at is
bounded by the HTTP/2 stream window, set to its minimum (64 KiB). This reads
grpclib's framing through private attributes of its client ``Stream``:
pinned by the grpclib version range and covered by tests.

The service token is sent as ``authorization: Bearer <token>`` on every call;
it never appears in logs, outcomes or ``repr``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret
from darktower.shared.gc_calls import is_closed_connection
from darktower.shared.logging import get_logger

__all__ = ["CONNECT_TIMEOUT_S", "MAX_REPLY_BYTES", "RPC_TIMEOUT_S", "AssignOutcome", "McClient"]

log = get_logger(__name__)

#: SPEC §6.3: the deadline of an ``AssignMeetingWithMh`` call, connect included.
RPC_TIMEOUT_S = 10.0
#: SPEC §6.3: how long establishing the connection to an MC may take.
CONNECT_TIMEOUT_S = 5.0
#: Largest ``AssignMeetingWithMhResponse`` accepted (encoded, without the
#: 5-byte gRPC prefix). The real one is a few bytes.
MAX_REPLY_BYTES: Final = 64 * 1024

#: The smallest HTTP/2 stream window (RFC 9113: 2^16 - 1): what an MC can
#: push on one call before the client has read anything. A legitimate reply
#: is far smaller; a reply up to :data:`MAX_REPLY_BYTES` still arrives, the
#: window being reopened as it is read.
_CHANNEL_CONFIG: Final = Configuration(http2_stream_window_size=2**16 - 1)

_REASONS: dict[int, str] = {
    pb.REJECTION_REASON_UNSPECIFIED: "unspecified",
    pb.REJECTION_REASON_AT_CAPACITY: "at_capacity",
    pb.REJECTION_REASON_DRAINING: "draining",
    pb.REJECTION_REASON_UNHEALTHY: "unhealthy",
}


@dataclass(frozen=True, slots=True)
class AssignOutcome:
    """What became of one ``AssignMeetingWithMh`` call.

    ``status`` is ``"ok"``, ``"rejected"``, or the lowercase name of the gRPC
    status that ended the call (``"unavailable"``, ``"deadline_exceeded"``,
    ``"permission_denied"``, ...); ``reason`` is the MC's rejection reason
    (``"at_capacity"``, ``"draining"``, ``"unhealthy"``, ``"unspecified"``)
    when ``status`` is ``"rejected"``, else ``""``. Both are safe for logs
    and metric labels.
    """

    accepted: bool
    reason: str
    status: str


_ACCEPTED = AssignOutcome(accepted=True, reason="", status="ok")
_UNAVAILABLE = AssignOutcome(accepted=False, reason="", status="unavailable")
_DEADLINE_EXCEEDED = AssignOutcome(accepted=False, reason="", status="deadline_exceeded")
_UNKNOWN = AssignOutcome(accepted=False, reason="", status="unknown")
_REPLY_TOO_LARGE = AssignOutcome(accepted=False, reason="", status="resource_exhausted")


class _InvalidEndpoint(ValueError):
    pass


class _ReplyTooLarge(Exception):
    """The MC announced a reply over :data:`MAX_REPLY_BYTES`."""


class _MalformedReply(Exception):
    """The MC's reply is not one well-framed, uncompressed message."""


def _host_port(endpoint: str) -> tuple[str, int, bool]:
    """``http(s)://host[:port]`` → host, port, TLS (registration only checks
    the scheme, so anything else is refused here)."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        raise _InvalidEndpoint from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _InvalidEndpoint
    tls = parts.scheme == "https"
    return parts.hostname, port or (443 if tls else 80), tls


class _Entry:
    """One controller's channel, and how many calls are using it."""

    __slots__ = ("channel", "endpoint", "in_flight", "retired", "stub")

    def __init__(self, endpoint: str, channel: Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.stub = internal_grpc.MeetingControllerServiceStub(channel)
        self.in_flight = 0
        self.retired = False


def _failure(exc: Exception, *, connecting: bool) -> AssignOutcome:
    """The one exception map of this module: the outcome for a library
    exception raised while connecting to or calling an MC."""
    if isinstance(exc, GRPCError):
        return AssignOutcome(accepted=False, reason="", status=exc.status.name.lower())
    if isinstance(exc, _ReplyTooLarge):
        return _REPLY_TOO_LARGE
    if isinstance(exc, TimeoutError):
        return _UNAVAILABLE if connecting else _DEADLINE_EXCEEDED
    if isinstance(exc, OSError | StreamTerminatedError | ProtocolError | _InvalidEndpoint):
        return _UNAVAILABLE
    if is_closed_connection(exc):  # reset before the request: see the module docstring
        return _UNAVAILABLE
    return _UNKNOWN


class McClient:
    """Asyncio-flavoured ``AssignMeetingWithMh`` caller with one cached channel
    per controller. Create, use and :meth:`close` it on the asyncio loop.

    ``service_token`` is the GC service token (SPEC §4: ``aud`` mc, ``scope``
    mc.assign). ``rpc_timeout_s`` bounds a whole call, connecting included;
    ``connect_timeout_s`` bounds establishing the connection.
    """

    def __init__(
        self,
        service_token: str | Secret,
        *,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._token = service_token if isinstance(service_token, Secret) else Secret(service_token)
        self._rpc_timeout_s = rpc_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._entries: dict[str, _Entry] = {}
        #: Dropped channels that still carry calls; closed by the last one.
        self._retired: set[_Entry] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"McClient(channels={len(self._entries)})"

    def channel_count(self) -> int:
        """How many controllers have a cached channel (tests, metrics)."""
        return len(self._entries)

    async def assign(
        self, *, controller_id: str, endpoint: str, request: pb.AssignMeetingWithMhRequest
    ) -> AssignOutcome:
        """Asyncio-flavoured: offer the meeting in ``request`` to the MC
        ``controller_id`` at ``endpoint`` (its registered gRPC endpoint).

        Returns within the RPC timeout, and never raises for MC trouble
        (only cancellation of the caller propagates).
        """
        if self._closed:
            return _UNAVAILABLE
        try:
            entry = self._entry(controller_id, endpoint)
        except _InvalidEndpoint as exc:
            log.warning("mc_endpoint_invalid", controller_id=controller_id)
            return _failure(exc, connecting=True)
        entry.in_flight += 1
        try:
            outcome, transport_failed = await self._call(entry, request)
            if transport_failed:
                self._retire(controller_id, entry)
        finally:
            entry.in_flight -= 1
            # After close(), a call that was connecting may have reconnected
            # the closed channel: close it again rather than leak it.
            if self._closed or (entry.retired and entry.in_flight == 0):
                self._close_entry(entry)
        if outcome.status == "unknown":
            log.warning("mc_assign_unexpected_answer", controller_id=controller_id)
        return outcome

    async def _call(
        self, entry: _Entry, request: pb.AssignMeetingWithMhRequest
    ) -> tuple[AssignOutcome, bool]:
        """The outcome of one call, and whether the channel must be dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._rpc_timeout_s
        # A connect timeout not shorter than the RPC's is just the RPC deadline.
        connect_s = min(self._connect_timeout_s, self._rpc_timeout_s)
        connecting = self._connect_timeout_s < self._rpc_timeout_s  # a timeout now: connect
        try:
            # One timer for both phases: the connect bound, then moved to
            # the RPC deadline (a no-op connect on a connected channel).
            async with asyncio.timeout_at(loop.time() + connect_s) as bound:
                await entry.channel.__connect__()
                connecting = False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                bound.reschedule(deadline)
                metadata = {"authorization": f"Bearer {self._token.reveal()}"}
                async with entry.stub.AssignMeetingWithMh.open(
                    timeout=remaining, metadata=metadata
                ) as stream:
                    await stream.send_message(request, end=True)
                    reply = await _recv_reply(stream)
            # Leaving the block read the trailers: a non-OK status has been
            # raised by now, so a missing message here is the MC's error.
            if reply is None:
                raise _MalformedReply
        except GRPCError as exc:
            return _failure(exc, connecting=False), False
        except Exception as exc:  # translated, never raised: see the module docstring
            return _failure(exc, connecting=connecting), True
        if reply.accepted:
            return _ACCEPTED, False
        reason = _REASONS.get(reply.rejection_reason, "unspecified")
        return AssignOutcome(accepted=False, reason=reason, status="rejected"), False

    def _entry(self, controller_id: str, endpoint: str) -> _Entry:
        entry = self._entries.get(controller_id)
        if entry is not None:
            if entry.endpoint == endpoint:
                return entry
            self._retire(controller_id, entry)
        host, port, tls = _host_port(endpoint)
        channel = Channel(host, port, ssl=True if tls else None, config=_CHANNEL_CONFIG)
        entry = _Entry(endpoint, channel)
        self._entries[controller_id] = entry
        return entry

    def retain(self, live: Mapping[str, str]) -> None:
        """Drop the channels of controllers not in ``live`` (controller id →
        gRPC endpoint of the live MCs), or whose endpoint differs there.

        Calls in progress on a dropped channel finish first.
        """
        for controller_id, entry in list(self._entries.items()):
            if live.get(controller_id) != entry.endpoint:
                self._retire(controller_id, entry)

    def close(self) -> None:
        """Close every channel, including those still carrying calls (they
        end as ``unavailable``); later calls return ``unavailable``. Call it
        on the asyncio loop (closing a channel closes its transport)."""
        self._closed = True
        for entry in [*self._entries.values(), *self._retired]:
            entry.channel.close()
        self._entries.clear()
        self._retired.clear()

    def _retire(self, controller_id: str, entry: _Entry) -> None:
        if self._entries.get(controller_id) is entry:
            del self._entries[controller_id]
        if entry.retired:
            return
        entry.retired = True
        if entry.in_flight == 0:
            entry.channel.close()
        else:
            self._retired.add(entry)

    def _close_entry(self, entry: _Entry) -> None:
        self._retired.discard(entry)
        entry.channel.close()


_Reply = pb.AssignMeetingWithMhResponse


async def _recv_reply(stream: ClientStream[pb.AssignMeetingWithMhRequest, _Reply]) -> _Reply | None:
    """The reply message of a unary call, refused from its 5-byte prefix when
    over :data:`MAX_REPLY_BYTES`; ``None`` when the MC sent none (its status,
    read when the call's block is left, says why).

    Replaces ``stream.recv_message()``, which buffers any announced length.
    Like grpclib's own reads, it runs inside the stream's wrapper, so a lost
    connection or grpclib's deadline wakes it.
    """
    await stream.recv_initial_metadata()  # a trailers-only error raises here
    h2_stream = stream._stream
    with stream._wrapper:
        try:
            prefix = await h2_stream.recv_data(5)
        except AssertionError:  # grpclib's way of saying the stream ended early
            raise _MalformedReply from None
        if not prefix:
            return None
        compressed, length = struct.unpack(">?I", prefix)
        if compressed:  # we never offer compression
            raise _MalformedReply
        if length > MAX_REPLY_BYTES:
            raise _ReplyTooLarge
        try:
            body = await h2_stream.recv_data(length)
        except AssertionError:
            raise _MalformedReply from None
    # An undecodable body raises protobuf's DecodeError: ``unknown``.
    return _Reply.FromString(body)
