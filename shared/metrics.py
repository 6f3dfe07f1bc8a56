"""Prometheus metrics plumbing shared by both services.

Each service owns one :class:`prometheus_client.CollectorRegistry` (never
prometheus_client's process-global default), so the GC's ``/metrics`` shows
only GC metrics even when an MC runs in the same process (tests). Several GCs
in one process share the GC registry: tests compare increments.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

P = ParamSpec("P")
T = TypeVar("T")

#: Buckets for sub-second operations (DB statements, RPCs), in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of one registry (for ``GET /metrics``)."""
    return generate_latest(registry)


def timed(
    histogram: Histogram, label: str
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function to observe its duration under ``label``
    (whether it returns or raises): the DB-query latency of SPEC §9."""
    child = histogram.labels(label)

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                child.observe(time.perf_counter() - start)

        return wrapper

    return decorate
