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
