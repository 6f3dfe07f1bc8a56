"""The Meeting Controller's Prometheus metrics (SPEC §9), one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

ASSIGNMENTS = Counter(
    "mc_assignments",
    "AssignMeetingWithMh answers, by outcome and rejection reason",
    ["outcome", "reason"],
    registry=REGISTRY,
)
FENCED_OUT = Counter(
    "mc_fenced_out",
    "Meetings dropped because Redis holds a newer generation or another owner",
    registry=REGISTRY,
)
MEETING_FAILURES = Counter(
    "mc_meeting_actor_failures",
    "Meeting actors that crashed (contained, the controller kept serving)",
    registry=REGISTRY,
)
GRPC_RPCS = Counter(
    "mc_grpc_server_rpcs",
    "gRPC requests handled, by method and final status",
    ["method", "status"],
    registry=REGISTRY,
)
MEETINGS = Gauge("mc_meetings", "Meetings reserved or hosted here", registry=REGISTRY)
PARTICIPANTS = Gauge("mc_participants", "Participants in meetings hosted here", registry=REGISTRY)
