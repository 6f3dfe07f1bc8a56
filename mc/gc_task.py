"""The MC's GC task (SPEC §7.1): registration, then heartbeats, forever.

One task owns the GC client and does everything the MC says to the GC on a
schedule - the Rust MC's review found that separate registration and
heartbeat tasks with their own shutdown signals drift apart; here there is
one trio task, stopped the trio way (cancel its scope), nothing else.

Guarantees:

* **Never exits on GC trouble.** Registration is retried forever with
  :class:`~darktower.mc.backoff.Backoff` (1 s, 2 s, 4 s ... capped at 30 s,
  equal jitter: see that module for the bounds). Heartbeat failures are
  logged and retried at the next tick. Only cancellation (or a bug - an
  exception that is not a :class:`~darktower.mc.gc_client.GcError`) ends
  :meth:`GcTask.run`.
* **started() at once.** :meth:`GcTask.run` reports started before the first
  registration attempt: the MC's startup (and the meetings it may already
  host) must not wait for a GC that may be down for hours. Readiness is a
  separate question, answered by :attr:`GcTask.registered` and
  :meth:`GcTask.wait_registered`.
* **Heartbeat schedule.** Right after every (re-)registration a
  comprehensive heartbeat is sent, so the GC sees the MC healthy (and
  assignable) without waiting an interval. Then there are two deadlines, at
  the intervals the GC returned: *comprehensive* every
  ``comprehensive_heartbeat_interval_ms``; *fast* ``fast_heartbeat_interval_ms``
  after the previous heartbeat of either kind. When both are due, only the
  comprehensive one is sent - it carries everything the fast one does. With
  the defaults (10 s / 30 s) an MC registered at ``t`` sends comprehensive at
  ``t, t+30, t+60, ...`` and fast at ``t+10, t+20, t+40, t+50, ...``: over
  10 minutes 21 comprehensive and 40 fast.
* **Failures.** A failed fast heartbeat is retried at the next tick; a failed
  comprehensive one stays due, so the next tick sends comprehensive.
  ``NOT_FOUND`` (:class:`~darktower.mc.gc_client.NotRegistered`) clears
  :attr:`GcTask.registered` and goes back to registration (first attempt at
  once, then backoff), after which heartbeats resume.
* **No burst replay.** Ticks missed while a call was in flight (a stall)
  are skipped, not replayed: the next fast heartbeat is a full interval after
  the stalled call returned; a comprehensive one that fell due meanwhile is
  sent once, right away, and its schedule restarts from then (tokio's
  ``MissedTickBehavior::Delay``). At most one catch-up call, never a burst.
* **Bounded calls.** Each call is bounded here too (the RPC deadline plus a
  second of slack), whatever the client does: heartbeats 5 s, registration
  10 s. The client's own deadline normally fires first and gives the better
  error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from darktower.mc.backoff import Backoff, Rng
from darktower.mc.gc_client import (
    HEARTBEAT_TIMEOUT_S,
    REGISTRATION_TIMEOUT_S,
    GcClient,
    GcError,
    GcUnavailable,
    NotRegistered,
)
from darktower.protos import internal_pb2 as pb
from darktower.shared.logging import get_logger

__all__ = [
    "DEFAULT_COMPREHENSIVE_INTERVAL_S",
    "DEFAULT_FAST_INTERVAL_S",
    "GcTask",
    "GcTaskMetrics",
    "GcTaskStatistics",
    "LoadSnapshot",
]

log = get_logger(__name__)

T = TypeVar("T")

#: Used when the GC's response leaves an interval at 0 (SPEC §6.1 defaults).
DEFAULT_FAST_INTERVAL_S = 10.0
DEFAULT_COMPREHENSIVE_INTERVAL_S = 30.0
#: Added to the RPC deadline for this module's own bound on a call.
_CALL_SLACK_S = 1.0


class LoadSnapshot(Protocol):
    """Meetings and participants hosted, read at one instant (SPEC §7.4)."""

    @property
    def meetings(self) -> int: ...

    @property
    def participants(self) -> int: ...


class GcTaskMetrics:
    """The GC task's Prometheus metrics, on the registry the caller owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registered = Gauge(
            "mc_gc_registered", "1 while the GC knows this MC (registered)", registry=registry
        )
        self.registrations = Counter(
            "mc_gc_registrations",
            "Registration attempts with the GC, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.heartbeats = Counter(
            "mc_gc_heartbeats",
            "Heartbeats sent to the GC, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class GcTaskStatistics:
    """Counters since the task was created (for tests and diagnostics).
    Heartbeat counts are of answered heartbeats; failures of either kind
    (including ``NOT_FOUND``) are counted together."""

    registered: bool
    registration_attempts: int
    registrations: int
    fast_heartbeats: int
    comprehensive_heartbeats: int
    heartbeat_failures: int
    fast_interval_s: float
    comprehensive_interval_s: float


def _interval_s(ms: int, default_s: float) -> float:
    return ms / 1000 if ms > 0 else default_s


def _next_due(started: float, interval: float, now: float) -> float:
    """The deadline ``interval`` after ``started`` - or, if that already
    passed while the call was in flight, ``interval`` after ``now``: missed
    ticks are skipped, never replayed."""
    due = started + interval
    return due if due >= now else now + interval


class GcTask:
    """Registers this MC with the GC and heartbeats; see the module docstring.

    ``load`` gives the current meetings/participants (one atomic snapshot),
    ``health`` the :class:`HealthStatus` value to report (``DRAINING`` while
    draining), ``system_usage`` CPU and memory percentages for comprehensive
    heartbeats. They are called at each heartbeat, synchronously.
    """

    def __init__(
        self,
        client: GcClient,
        registration: pb.RegisterMCRequest,
        load: Callable[[], LoadSnapshot],
        health: Callable[[], int],
        system_usage: Callable[[], tuple[float, float]],
        *,
        rng: Rng | None = None,
        backoff: Backoff | None = None,
        metrics: GcTaskMetrics | None = None,
    ) -> None:
        self._client = client
        self._registration = registration
        self._load = load
        self._health = health
        self._system_usage = system_usage
        self._rng: Rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._backoff = backoff if backoff is not None else Backoff()
        self._metrics = metrics
        self._registered = False
        self._registered_event = trio.Event()
        self._fast_interval = DEFAULT_FAST_INTERVAL_S
        self._comprehensive_interval = DEFAULT_COMPREHENSIVE_INTERVAL_S
        self._registration_attempts = 0
        self._registrations = 0
        self._fast_sent = 0
        self._comprehensive_sent = 0
        self._heartbeat_failures = 0

    # ------------------------------------------------------------------ state

    @property
    def registered(self) -> bool:
        """Whether the GC knows this MC: true from a successful registration
        until a heartbeat is answered ``NOT_FOUND`` (transient heartbeat
        failures do not clear it - the GC still has the row)."""
        return self._registered

    async def wait_registered(self) -> None:
        """Trio-flavoured: return once :attr:`registered` is true."""
        # The event is replaced only after it was set, so a waiter here (on
        # an unset event) is never orphaned.
        if not self._registered:
            await self._registered_event.wait()

    def statistics(self) -> GcTaskStatistics:
        return GcTaskStatistics(
            registered=self._registered,
            registration_attempts=self._registration_attempts,
            registrations=self._registrations,
            fast_heartbeats=self._fast_sent,
            comprehensive_heartbeats=self._comprehensive_sent,
            heartbeat_failures=self._heartbeat_failures,
            fast_interval_s=self._fast_interval,
            comprehensive_interval_s=self._comprehensive_interval,
        )

    def _set_registered(self, registered: bool) -> None:
        self._registered = registered
        if registered:
            self._registered_event.set()
        elif self._registered_event.is_set():
            self._registered_event = trio.Event()
        if self._metrics is not None:
            self._metrics.registered.set(1 if registered else 0)

    # ------------------------------------------------------------------- run

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Trio-flavoured: run until cancelled (started at once)."""
        task_status.started()
        while True:
            await self._register()
            await self._heartbeat_until_not_registered()

    async def _bounded(self, rpc: str, deadline_s: float, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` bounded by ``deadline_s`` plus slack, a timeout reported as
        :class:`GcUnavailable` like the client's own."""
        with trio.move_on_after(deadline_s + _CALL_SLACK_S):
            return await call()
        raise GcUnavailable(f"{rpc}: no answer in time", code="DEADLINE_EXCEEDED")

    async def _register(self) -> None:
        """Register, retrying with backoff until the GC accepts."""
        attempt = 0
        while True:
            self._registration_attempts += 1
            try:
                response = await self._bounded(
                    "RegisterMC",
                    REGISTRATION_TIMEOUT_S,
                    lambda: self._client.register(self._registration),
                )
            except GcError as exc:
                outcome, error = "failed", str(exc)
            else:
                if response.accepted:
                    break
                outcome, error = "refused", response.message[:200]
            if self._metrics is not None:
                self._metrics.registrations.labels(outcome).inc()
            delay = self._backoff.delay(attempt, self._rng)
            log.warning(
                "gc_registration_failed",
                outcome=outcome,
                error=error,
                attempt=attempt + 1,
                retry_in_s=round(delay, 3),
            )
            attempt += 1
            await trio.sleep(delay)

        self._fast_interval = _interval_s(
            response.fast_heartbeat_interval_ms, DEFAULT_FAST_INTERVAL_S
        )
        self._comprehensive_interval = _interval_s(
            response.comprehensive_heartbeat_interval_ms, DEFAULT_COMPREHENSIVE_INTERVAL_S
        )
        self._registrations += 1
        if self._metrics is not None:
            self._metrics.registrations.labels("ok").inc()
        self._set_registered(True)
        log.info(
            "gc_registered",
            mc_id=self._registration.id,
            attempts=attempt + 1,
            fast_interval_s=self._fast_interval,
            comprehensive_interval_s=self._comprehensive_interval,
        )

    async def _heartbeat_until_not_registered(self) -> None:
        """Heartbeat on the schedule of the module docstring; return when the
        GC answers ``NOT_FOUND``."""
        now = trio.current_time()
        next_fast = now  # unused before the first (comprehensive) heartbeat
        next_comprehensive = now
        while True:
            await trio.sleep_until(min(next_fast, next_comprehensive))
            started = trio.current_time()
            comprehensive = started >= next_comprehensive
            kind = "comprehensive" if comprehensive else "fast"
            try:
                if comprehensive:
                    await self._send_comprehensive()
                else:
                    await self._send_fast()
            except NotRegistered as exc:
                self._count_heartbeat(kind, "not_registered")
                self._set_registered(False)
                log.warning("gc_heartbeat_not_registered", kind=kind, error=str(exc))
                return
            except GcError as exc:
                self._count_heartbeat(kind, "failed")
                log.warning("gc_heartbeat_failed", kind=kind, error=str(exc))
                ok = False
            else:
                self._count_heartbeat(kind, "ok")
                ok = True
            now = trio.current_time()
            next_fast = _next_due(started, self._fast_interval, now)
            if comprehensive:
                # A failed comprehensive heartbeat stays due: the next tick.
                next_comprehensive = (
                    _next_due(started, self._comprehensive_interval, now) if ok else next_fast
                )

    def _count_heartbeat(self, kind: str, outcome: str) -> None:
        if outcome == "ok":
            if kind == "fast":
                self._fast_sent += 1
            else:
                self._comprehensive_sent += 1
        else:
            self._heartbeat_failures += 1
        if self._metrics is not None:
            self._metrics.heartbeats.labels(kind, outcome).inc()

    def _capacity(self) -> pb.ControllerCapacity:
        load = self._load()
        return pb.ControllerCapacity(
            max_meetings=self._registration.max_meetings,
            current_meetings=load.meetings,
            max_participants=self._registration.max_participants,
            current_participants=load.participants,
        )

    async def report_now(self) -> bool:
        """Trio-flavoured: send a fast heartbeat at once, outside the schedule
        (the drain uses it so the GC stops placing meetings here right away,
        not at the next tick). Whether the GC acknowledged it; never raises
        for GC trouble, and does nothing while unregistered."""
        if not self._registered:
            return False
        try:
            await self._send_fast()
        except GcError as exc:
            log.warning("report_now_failed", error=str(exc))
            return False
        return True

    async def _send_fast(self) -> None:
        request = pb.FastHeartbeatRequest(
            controller_id=self._registration.id,
            capacity=self._capacity(),
            health=pb.HealthStatus.ValueType(self._health()),
        )
        await self._bounded(
            "FastHeartbeat", HEARTBEAT_TIMEOUT_S, lambda: self._client.fast_heartbeat(request)
        )

    async def _send_comprehensive(self) -> None:
        cpu, memory = self._system_usage()
        request = pb.ComprehensiveHeartbeatRequest(
            controller_id=self._registration.id,
            capacity=self._capacity(),
            health=pb.HealthStatus.ValueType(self._health()),
            cpu_usage_percent=_finite(cpu),
            memory_usage_percent=_finite(memory),
        )
        await self._bounded(
            "ComprehensiveHeartbeat",
            HEARTBEAT_TIMEOUT_S,
            lambda: self._client.comprehensive_heartbeat(request),
        )


def _finite(percent: float) -> float:
    """A percentage the GC will accept (NaN from a failed probe → 0)."""
    return min(100.0, max(0.0, percent)) if math.isfinite(percent) else 0.0
