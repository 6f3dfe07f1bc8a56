"""The registry's gRPC services (SPEC §6.1): asyncio-flavoured grpclib handlers.

A heartbeat never crosses into trio: the handler validates, checks the caller
is the node it speaks for, and hands the update to the heartbeat batcher,
which writes concurrent heartbeats in one statement
(:mod:`darktower.gc.heartbeat_batcher`). Authentication happened before the
handler ran (:mod:`darktower.shared.grpc_server`).
"""

from __future__ import annotations

from functools import partial

import asyncpg
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from prometheus_client import Counter

from darktower.gc import registry_requests as req
from darktower.gc.heartbeat_batcher import HeartbeatBatcher
from darktower.gc.metrics import HEARTBEATS, MEETING_ENDED_NOTIFICATIONS, REGISTRATIONS
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers
from darktower.gc.repositories.assignments import EndOutcome
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.grpc_server import (
    RequestT,
    Requirement,
    current_claims,
    recv_request,
    require_subject,
)
from darktower.shared.logging import get_logger

log = get_logger(__name__)

_GC_SERVICE = "/dark_tower.internal.GlobalControllerService/"
_MH_SERVICE = "/dark_tower.internal.MediaHandlerRegistryService/"

#: Who may call what (SPEC §4): MCs and MHs present service tokens for the GC.
POLICY: dict[str, Requirement] = {
    _GC_SERVICE + "RegisterMC": Requirement("gc", "mc.register"),
    _GC_SERVICE + "FastHeartbeat": Requirement("gc", "mc.register"),
    _GC_SERVICE + "ComprehensiveHeartbeat": Requirement("gc", "mc.register"),
    _GC_SERVICE + "NotifyMeetingEnded": Requirement("gc", "mc.register"),
    _MH_SERVICE + "RegisterMH": Requirement("gc", "mh.register"),
    _MH_SERVICE + "SendLoadReport": Requirement("gc", "mh.register"),
}

_FAST_OK = HEARTBEATS.labels("fast", "ok")
_FAST_NOT_FOUND = HEARTBEATS.labels("fast", "not_found")
_COMPREHENSIVE_OK = HEARTBEATS.labels("comprehensive", "ok")
_COMPREHENSIVE_NOT_FOUND = HEARTBEATS.labels("comprehensive", "not_found")
_LOAD_OK = HEARTBEATS.labels("mh_load_report", "ok")
_LOAD_NOT_FOUND = HEARTBEATS.labels("mh_load_report", "not_found")


class GlobalControllerService(internal_grpc.GlobalControllerServiceBase):
    """MC → GC: registration and heartbeats."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        fast_heartbeat_ms: int,
        comprehensive_heartbeat_ms: int,
    ) -> None:
        self._pool = pool
        self._heartbeats = HeartbeatBatcher(partial(meeting_controllers.heartbeat_batch, pool))
        self._fast_heartbeat_ms = fast_heartbeat_ms
        self._comprehensive_heartbeat_ms = comprehensive_heartbeat_ms

    async def RegisterMC(self, stream: Stream[pb.RegisterMCRequest, pb.RegisterMCResponse]) -> None:
        reg = req.mc_registration(await recv_request(stream))
        require_subject(reg.controller_id)
        await meeting_controllers.register(self._pool, reg)
        REGISTRATIONS.labels("mc").inc()
        log.info(
            "mc_registered",
            controller_id=reg.controller_id,
            region=reg.region,
            grpc_endpoint=reg.grpc_endpoint,
            max_meetings=reg.max_meetings,
        )
        await stream.send_message(
            pb.RegisterMCResponse(
                accepted=True,
                message="registered",
                fast_heartbeat_interval_ms=self._fast_heartbeat_ms,
                comprehensive_heartbeat_interval_ms=self._comprehensive_heartbeat_ms,
            )
        )

    async def FastHeartbeat(
        self, stream: Stream[pb.FastHeartbeatRequest, pb.HeartbeatResponse]
    ) -> None:
        hb = req.fast_heartbeat(await recv_request(stream))
        await self._heartbeat(stream, hb, _FAST_OK, _FAST_NOT_FOUND)

    async def ComprehensiveHeartbeat(
        self, stream: Stream[pb.ComprehensiveHeartbeatRequest, pb.HeartbeatResponse]
    ) -> None:
        hb = req.comprehensive_heartbeat(await recv_request(stream))
        await self._heartbeat(stream, hb, _COMPREHENSIVE_OK, _COMPREHENSIVE_NOT_FOUND)

    async def _heartbeat(
        self,
        stream: Stream[RequestT, pb.HeartbeatResponse],
        hb: req.McHeartbeat,
        ok: Counter,
        not_found: Counter,
    ) -> None:
        require_subject(hb.controller_id)
        timestamp_ms = await self._heartbeats.write(hb)
        if timestamp_ms is None:
            not_found.inc()
            raise GRPCError(Status.NOT_FOUND, "controller is not registered")
        ok.inc()
        await stream.send_message(pb.HeartbeatResponse(acknowledged=True, timestamp=timestamp_ms))

    async def NotifyMeetingEnded(
        self, stream: Stream[pb.NotifyMeetingEndedRequest, pb.NotifyMeetingEndedResponse]
    ) -> None:
        """Soft-delete the caller's assignment of the meeting (SPEC §6.4).

        Only the owning MC ends a meeting: an MC that lost an assignment race,
        or was replaced after an outage, reports the end of a meeting it no
        longer owns, and that must not end the owner's. Nor does a late
        report of an earlier assignment (an older generation) end a later
        one of the same MC. Such a report is acknowledged as ``False`` - not
        an error, the MC did nothing wrong."""
        ended = req.meeting_ended(await recv_request(stream))
        controller_id = current_claims().sub
        if ended.generation == 0:
            # Accepted, but worth seeing: every MC of this project sends one.
            log.warning(
                "meeting_ended_without_generation",
                meeting_id=str(ended.meeting_id),
                controller_id=controller_id,
            )
        outcome = await assignments.end_by_owner(
            self._pool,
            meeting_id=ended.meeting_id,
            region=ended.region,
            controller_id=controller_id,
            generation=ended.generation,
        )
        MEETING_ENDED_NOTIFICATIONS.labels(outcome.value).inc()
        log.info(
            "meeting_ended",
            meeting_id=str(ended.meeting_id),
            controller_id=controller_id,
            generation=ended.generation,
            result=outcome.value,
        )
        await stream.send_message(
            pb.NotifyMeetingEndedResponse(acknowledged=outcome is EndOutcome.ENDED)
        )


class MediaHandlerRegistryService(internal_grpc.MediaHandlerRegistryServiceBase):
    """MH → GC: registration and load reports."""

    def __init__(self, pool: asyncpg.Pool, *, load_report_ms: int) -> None:
        self._pool = pool
        self._load_report_ms = load_report_ms

    async def RegisterMH(self, stream: Stream[pb.RegisterMHRequest, pb.RegisterMHResponse]) -> None:
        reg = req.mh_registration(await recv_request(stream))
        require_subject(reg.handler_id)
        await media_handlers.register(self._pool, reg)
        REGISTRATIONS.labels("mh").inc()
        log.info("mh_registered", handler_id=reg.handler_id, region=reg.region, zone=reg.zone)
        await stream.send_message(
            pb.RegisterMHResponse(
                accepted=True, message="registered", load_report_interval_ms=self._load_report_ms
            )
        )

    async def SendLoadReport(
        self, stream: Stream[pb.MHLoadReportRequest, pb.MHLoadReportResponse]
    ) -> None:
        report = req.mh_load_report(await recv_request(stream))
        require_subject(report.handler_id)
        timestamp_ms = await media_handlers.load_report(self._pool, report)
        if timestamp_ms is None:
            _LOAD_NOT_FOUND.inc()
            raise GRPCError(Status.NOT_FOUND, "media handler is not registered")
        _LOAD_OK.inc()
        await stream.send_message(
            pb.MHLoadReportResponse(acknowledged=True, timestamp=timestamp_ms)
        )
