"""The Global Controller's Prometheus metrics (SPEC §9), one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from darktower.shared.metrics import LATENCY_BUCKETS

REGISTRY = CollectorRegistry(auto_describe=True)

DB_QUERY_SECONDS = Histogram(
    "gc_db_query_seconds",
    "PostgreSQL statement latency by query",
    ["query"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
HEARTBEATS = Counter(
    "gc_heartbeats",
    "Heartbeats and load reports received, by kind and result",
    ["kind", "result"],
    registry=REGISTRY,
)
REGISTRATIONS = Counter(
    "gc_registrations",
    "Registrations received, by node kind",
    ["kind"],
    registry=REGISTRY,
)
NODES_BY_HEALTH = Gauge(
    "gc_registered_nodes",
    "Registered meeting controllers and media handlers by health (as of the last sweep)",
    ["kind", "health"],
    registry=REGISTRY,
)
MARKED_UNHEALTHY = Counter(
    "gc_nodes_marked_unhealthy",
    "Nodes the health checker marked unhealthy for stale heartbeats",
    ["kind"],
    registry=REGISTRY,
)
HEALTH_SWEEPS = Counter(
    "gc_health_sweeps",
    "Health checker runs by outcome (swept, grace, failed)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
GRPC_RPCS = Counter(
    "gc_grpc_server_rpcs",
    "gRPC requests handled, by method and final status",
    ["method", "status"],
    registry=REGISTRY,
)
JOIN_SECONDS = Histogram(
    "gc_join_seconds",
    "Join latency at the HTTP API (auth to response), by outcome",
    ["result"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOINS = Counter(
    "gc_joins",
    "Joins by result (reused, assigned, not_found, forbidden, invalid, unauthorized, "
    "rate_limited, no_media_handler, no_controller, assignment_failed, busy, "
    "database_unavailable)",
    ["kind", "result"],
    registry=REGISTRY,
)
MEETINGS_CREATED = Counter(
    "gc_meetings_created",
    "Meetings created through the API",
    registry=REGISTRY,
)
MC_RPCS = Counter(
    "gc_mc_rpcs",
    "AssignMeetingWithMh calls to MCs, by status (ok, rejected, or the gRPC status) "
    "and rejection reason",
    ["status", "reason"],
    registry=REGISTRY,
)
ASSIGNMENT_RETRIES = Counter(
    "gc_assignment_retries",
    "Assignment attempts after the first one (another MC tried after a rejection or failure)",
    registry=REGISTRY,
)
MEETING_ENDED_NOTIFICATIONS = Counter(
    "gc_meeting_ended_notifications",
    "NotifyMeetingEnded calls by result (ended, not_owner, stale_generation)",
    ["result"],
    registry=REGISTRY,
)
CLEANUP_ROWS = Counter(
    "gc_cleanup_rows",
    "Assignments the cleanup task touched, by action (deleted, ended)",
    ["action"],
    registry=REGISTRY,
)
