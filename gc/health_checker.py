"""Background health checkers (SPEC §6.2), trio-flavoured.

Every ``interval`` one statement marks nodes whose last heartbeat (database
clock) is older than ``stale_after`` unhealthy. The danger is the checker's
own blindness: after the GC was down, paused (SIGSTOP, a long GC pause) or
cut off from the database for longer than ``stale_after``, *every* node looks
stale - not because nodes died, but because nobody could hear them (their
heartbeats failed against the same outage). A live node's heartbeat is at
most one fast interval (``grace``) old when it can be heard, so after a blind
gap of ``g`` it may look ``g + grace`` old: marking is only safe when that is
below ``stale_after``, less the delivery allowance below (one tick). So
whenever the time since the checker last reached the database reaches
``stale_after - grace - interval`` (but never less than 1.5 ticks) -
including at start, when it cannot know how long it was away - it first
grants a grace, in which every live node heartbeats at least once, and only
pings the database meanwhile.

The grace lasts ``grace`` *plus one tick* (``interval``), counted from the
tick that reached the database again. Within ``grace`` every live node
*sends* a heartbeat, but the last of them may be sent at the very end of it
(a node whose previous attempt failed just before the recovery), and it
still has to cross the network, wait for the GC's heartbeat batcher
(:mod:`darktower.gc.heartbeat_batcher`) and be written. A sweep at exactly
``grace`` - where the first sweep would fall whenever ``interval`` divides
``grace`` - races that write: lost, the node is marked unhealthy, its
meetings are moved and it is fenced out of them. With the extra tick the
first sweep (the first tick at or after ``grace + interval``) comes at least
one ``interval`` after the nominal end, whatever the two intervals are: room
for a heartbeat's delivery of the order steady state allows (the
configuration keeps 1.5 ticks between the report interval and the
threshold). The cost: a node that died during the gap is marked one tick
later, and the join path's allowance below lasts one tick longer.
Steady-state detection (threshold + one tick) is unchanged: no grace is
granted while the checker keeps reaching the database.

The join path has the same blindness: a meeting whose MC looks stale only
because nobody could hear it would be moved to whichever MC happened to
heartbeat first after the outage (and its MC fenced out of it). So the
checker also answers :meth:`HealthChecker.liveness_threshold_s` for anyone
judging liveness meanwhile: from the moment a blind gap of ``g`` is seen
until the grace that follows it is over (its extra tick included: until the
first sweep may run), a node counts as live up to ``stale_after + g`` old.

The checker's own gap is measured on trio's clock (it is about this process,
and MockClock drives it in tests); node staleness stays on the database clock.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import trio

from darktower.gc.metrics import HEALTH_SWEEPS, MARKED_UNHEALTHY, NODES_BY_HEALTH
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.logging import get_logger

log = get_logger(__name__)

Outcome = Literal["swept", "grace", "failed"]


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one tick did, published for tests and observability."""

    at: float
    outcome: Outcome
    marked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeStore:
    """The three trio-flavoured operations the checker needs for one node
    kind (each one crossing into asyncio)."""

    kind: str
    mark_stale: Callable[[float], Awaitable[list[str]]]
    count_by_health: Callable[[], Awaitable[dict[str, int]]]
    ping: Callable[[], Awaitable[None]]


class HealthChecker:
    """Marks stale nodes of one kind unhealthy, with outage/pause grace."""

    def __init__(
        self,
        store: NodeStore,
        *,
        interval_s: float,
        stale_after_s: float,
        grace_s: float,
        on_result: Callable[[SweepResult], None] | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s
        self._grace_s = grace_s
        #: How long a grace lasts: one report interval, plus one tick for
        #: the last heartbeat sent in it to land (see the module docstring).
        self._grace_span_s = grace_s + interval_s
        # A gap just short of this gets no grace: a live node may then look
        # gap + grace + its heartbeat's delivery old, so the same one-tick
        # delivery allowance as the grace's comes off the threshold.
        self._blind_after_s = max(stale_after_s - self._grace_span_s, 1.5 * interval_s)
        self._on_result = on_result
        self._last_contact = -math.inf
        self._grace_until = -math.inf
        #: The blind gap the current (or last) grace was granted for; 0 at
        #: start, where the gap is unknown.
        self._grace_gap_s = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled. Missed ticks are not replayed: after a pause
        the next tick simply runs once."""
        task_status.started()
        while True:
            result = await self.tick()
            if self._on_result is not None:
                self._on_result(result)
            await trio.sleep(self._interval_s)

    async def tick(self) -> SweepResult:
        now = trio.current_time()
        # Blind long enough for live nodes to look stale (or just started):
        # they get one heartbeat interval, and a tick for the last heartbeat
        # to land, to be heard first. The grace starts only once the database
        # answers again - nodes cannot be heard before that - so a grace is
        # never spent (even partly) inside an outage.
        blind = now - self._last_contact >= self._blind_after_s
        try:
            if blind or now < self._grace_until:
                await self._store.ping()
                if blind:
                    self._grace_until = now + self._grace_span_s
                    gap = now - self._last_contact
                    self._grace_gap_s = gap if math.isfinite(gap) else 0.0
                    log.info(
                        "health_check_grace", kind=self._store.kind, grace_span_s=self._grace_span_s
                    )
                result = SweepResult(now, "grace")
            else:
                marked = await self._store.mark_stale(self._stale_after_s)
                result = SweepResult(now, "swept", tuple(marked))
        except DatabaseUnavailable as exc:
            log.warning("health_check_failed", kind=self._store.kind, error=str(exc))
            HEALTH_SWEEPS.labels(self._store.kind, "failed").inc()
            return SweepResult(now, "failed")
        self._last_contact = now
        HEALTH_SWEEPS.labels(self._store.kind, result.outcome).inc()
        if result.marked:
            MARKED_UNHEALTHY.labels(self._store.kind).inc(len(result.marked))
            log.warning(
                "nodes_marked_unhealthy",
                kind=self._store.kind,
                count=len(result.marked),
                ids=",".join(result.marked),
            )
        if result.outcome == "swept":
            await self._publish_counts()
        return result

    def liveness_threshold_s(self) -> float:
        """The heartbeat age past which a node of this kind may be judged
        gone right now, by the join path as by the sweep (see the module
        docstring): ``stale_after`` plus the blind gap this GC is recovering
        from - one still open (the database unreachable, or back but not yet
        ticked), or the one its current grace (``grace`` and the extra tick,
        up to the first sweep) was granted for. At start the
        gap is unknown and the threshold is ``stale_after``: a node of a
        fleet that nobody heard for long is not presumed alive."""
        now = trio.current_time()
        gap = now - self._last_contact
        if math.isfinite(gap) and gap >= self._blind_after_s:
            return self._stale_after_s + gap
        if now < self._grace_until:
            return self._stale_after_s + self._grace_gap_s
        return self._stale_after_s

    async def _publish_counts(self) -> None:
        """Refresh the nodes-by-health gauge; a failure here only leaves the
        gauge stale - it must not hide the marking that already happened."""
        try:
            counts = await self._store.count_by_health()
        except DatabaseUnavailable:
            return
        for health in ("pending", "healthy", "degraded", "unhealthy", "draining"):
            NODES_BY_HEALTH.labels(self._store.kind, health).set(counts.get(health, 0))
