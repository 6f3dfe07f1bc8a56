"""Validated forms of the registry's gRPC requests (SPEC §6.1), no I/O.

The servicers convert each wire message here first, so repositories only
ever see values that fit the schema.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from darktower.protos import internal_pb2 as pb
from darktower.shared import validation as v

#: Wire health → the text stored in ``health_status``.
HEALTH_NAMES: dict[int, str] = {
    pb.PENDING: "pending",
    pb.HEALTHY: "healthy",
    pb.DEGRADED: "degraded",
    pb.UNHEALTHY: "unhealthy",
    pb.DRAINING: "draining",
}


def health(field: str, value: int) -> str:
    try:
        return HEALTH_NAMES[value]
    except KeyError:
        raise v.InvalidArgument(field, "unknown health status") from None


@dataclass(frozen=True, slots=True)
class McRegistration:
    controller_id: str
    region: str
    grpc_endpoint: str
    webtransport_endpoint: str
    max_meetings: int
    max_participants: int


@dataclass(frozen=True, slots=True)
class McHeartbeat:
    controller_id: str
    current_meetings: int
    current_participants: int
    health: str
    cpu_usage_percent: float | None = None
    memory_usage_percent: float | None = None


@dataclass(frozen=True, slots=True)
class MhRegistration:
    handler_id: str
    region: str
    zone: str
    webtransport_endpoint: str
    grpc_endpoint: str
    max_streams: int


@dataclass(frozen=True, slots=True)
class MhLoadReport:
    handler_id: str
    current_streams: int
    health: str
    cpu_usage_percent: float
    memory_usage_percent: float
    bandwidth_usage_percent: float


def mc_registration(request: pb.RegisterMCRequest) -> McRegistration:
    return McRegistration(
        controller_id=v.node_id("id", request.id),
        region=v.region("region", request.region),
        grpc_endpoint=v.endpoint("grpc_endpoint", request.grpc_endpoint),
        webtransport_endpoint=v.endpoint("webtransport_endpoint", request.webtransport_endpoint),
        max_meetings=v.capacity("max_meetings", request.max_meetings),
        max_participants=v.capacity("max_participants", request.max_participants),
    )


def _capacity_load(
    request: pb.FastHeartbeatRequest | pb.ComprehensiveHeartbeatRequest,
) -> tuple[int, int]:
    if not request.HasField("capacity"):
        raise v.InvalidArgument("capacity", "is required")
    cap = request.capacity
    return (
        v.count("capacity.current_meetings", cap.current_meetings),
        v.count("capacity.current_participants", cap.current_participants),
    )


def fast_heartbeat(request: pb.FastHeartbeatRequest) -> McHeartbeat:
    controller_id = v.node_id("controller_id", request.controller_id)
    meetings, participants = _capacity_load(request)
    return McHeartbeat(
        controller_id=controller_id,
        current_meetings=meetings,
        current_participants=participants,
        health=health("health", request.health),
    )


def comprehensive_heartbeat(request: pb.ComprehensiveHeartbeatRequest) -> McHeartbeat:
    controller_id = v.node_id("controller_id", request.controller_id)
    meetings, participants = _capacity_load(request)
    return McHeartbeat(
        controller_id=controller_id,
        current_meetings=meetings,
        current_participants=participants,
        health=health("health", request.health),
        cpu_usage_percent=v.percent("cpu_usage_percent", request.cpu_usage_percent),
        memory_usage_percent=v.percent("memory_usage_percent", request.memory_usage_percent),
    )


def mh_registration(request: pb.RegisterMHRequest) -> MhRegistration:
    return MhRegistration(
        handler_id=v.node_id("handler_id", request.handler_id),
        region=v.region("region", request.region),
        zone=v.label("zone", request.zone, min_len=0, max_len=50),
        webtransport_endpoint=v.endpoint("webtransport_endpoint", request.webtransport_endpoint),
        grpc_endpoint=v.endpoint("grpc_endpoint", request.grpc_endpoint),
        max_streams=v.capacity("max_streams", request.max_streams),
    )


def mh_load_report(request: pb.MHLoadReportRequest) -> MhLoadReport:
    return MhLoadReport(
        handler_id=v.node_id("handler_id", request.handler_id),
        current_streams=v.count("current_streams", request.current_streams),
        health=health("health", request.health),
        cpu_usage_percent=v.percent("cpu_usage_percent", request.cpu_usage_percent),
        memory_usage_percent=v.percent("memory_usage_percent", request.memory_usage_percent),
        bandwidth_usage_percent=v.percent(
            "bandwidth_usage_percent", request.bandwidth_usage_percent
        ),
    )


#: PostgreSQL ``bigint`` (int8), the type of a stored generation: wire
#: ``uint64`` values beyond it are refused, never clamped.
INT8_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class MeetingEnded:
    meeting_id: uuid.UUID
    region: str
    #: The generation the MC hosted the meeting under; 0 when it did not say
    #: (a sender without the field), which the GC accepts unfenced.
    generation: int


def meeting_ended(request: pb.NotifyMeetingEndedRequest) -> MeetingEnded:
    """0 is accepted for ``generation``: it is what a sender without the
    field (proto3 default; SPEC §3 has no such field) puts on the wire, and
    refusing it would leave every meeting such an MC ends assigned to it for
    as long as it is live. No stored generation is 0 (the schema's CHECK)."""
    meeting_id = v.uuid_value("meeting_id", request.meeting_id)
    region = v.region("region", request.region)
    if not 0 <= request.generation <= INT8_MAX:
        raise v.InvalidArgument("generation", f"must be between 0 and {INT8_MAX}")
    return MeetingEnded(meeting_id=meeting_id, region=region, generation=request.generation)
