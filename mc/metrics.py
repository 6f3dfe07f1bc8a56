"""The Meeting Controller's Prometheus metrics (SPEC §9), one registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from darktower.mc.repositories.meeting_state import MeetingStateStoreStatistics

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


class _MeetingStateCollector(Collector):
    """The meeting state store's own counters, read at scrape time (nothing
    is added to the store's hot path). Operations per batch is how well the
    group commit coalesces; script reloads say how often Redis lost its
    script cache. Zero until :attr:`source` is set (by the app, once the
    store exists)."""

    def __init__(self) -> None:
        self.source: Callable[[], MeetingStateStoreStatistics] = MeetingStateStoreStatistics

    def collect(self) -> Iterator[Metric]:
        statistics = self.source()
        yield CounterMetricFamily(
            "mc_redis_batches",
            "Pipelines of fenced Redis operations sent (group commit)",
            value=statistics.batches,
        )
        yield CounterMetricFamily(
            "mc_redis_batched_operations",
            "Fenced Redis operations sent in those pipelines",
            value=statistics.operations,
        )
        yield CounterMetricFamily(
            "mc_redis_script_reloads",
            "Fencing script reloads after a NOSCRIPT reply",
            value=statistics.noscript_reloads,
        )


MEETING_STATE = _MeetingStateCollector()
REGISTRY.register(MEETING_STATE)
