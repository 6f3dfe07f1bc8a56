"""Group commit for heartbeats (asyncio-flavoured).

A GC receives a steady stream of tiny, independent UPDATEs - one per MC per
heartbeat interval. Each one costs a database round trip, and on this stack a
round trip is mostly fixed cost (socket calls and event-loop callbacks routed
through trio-asyncio), not SQL. So concurrent heartbeats are coalesced: while
one batch statement is in flight, new heartbeats queue; when it completes,
everything queued goes out as the next single statement. At low load a batch
is one heartbeat and nothing waits; under load batches grow by themselves and
the per-heartbeat cost falls. No timer, so no added latency.

A caller that gives up (its RPC deadline passed) takes its heartbeat out of
the queue: a report nobody is waiting for must not be written later, over a
newer one the MC may have sent through another GC. The queue is bounded, so a
database that cannot keep up turns into fast UNAVAILABLE answers (the MC
retries at its next tick) rather than a growing backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from darktower.gc.registry_requests import McHeartbeat
from darktower.shared.db import DatabaseUnavailable

#: Upper bound on one statement's size (arrays of this many elements).
MAX_BATCH = 500
#: Heartbeats that may wait behind the statement in flight.
MAX_QUEUED = 4 * MAX_BATCH

WriteBatch = Callable[[Sequence[McHeartbeat]], Awaitable[dict[str, int]]]


@dataclass(slots=True)
class _Waiter:
    heartbeat: McHeartbeat
    result: asyncio.Future[int | None]


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    queued: int
    statements: int
    heartbeats_written: int
    largest_batch: int


class HeartbeatBatcher:
    """Coalesces concurrent :meth:`write` calls into batch statements.

    ``write_batch`` records distinct heartbeats and returns
    ``{controller_id: database_time_ms}`` for the ids that exist.
    """

    def __init__(
        self,
        write_batch: WriteBatch,
        *,
        max_batch: int = MAX_BATCH,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._queue: deque[_Waiter] = deque()
        self._flushing: asyncio.Task[None] | None = None
        self._statements = 0
        self._written = 0
        self._largest = 0

    def statistics(self) -> BatcherStatistics:
        return BatcherStatistics(len(self._queue), self._statements, self._written, self._largest)

    async def write(self, heartbeat: McHeartbeat) -> int | None:
        """Record one heartbeat: the database time in ms, or ``None`` when the
        MC is not registered. Raises what the batch statement raised (e.g.
        :class:`~darktower.shared.db.DatabaseUnavailable`), or
        :class:`DatabaseUnavailable` at once when the backlog is full."""
        if len(self._queue) >= self._max_queued:
            raise DatabaseUnavailable("heartbeat backlog full")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(heartbeat, loop.create_future())
        self._queue.append(waiter)
        if self._flushing is None or self._flushing.done():
            # A task of its own, not the caller's: a caller whose RPC is
            # cancelled must not cancel the statement the others wait on.
            # It is short-lived (every statement has a timeout) and drains
            # the queue, so it never outlives the requests it serves.
            self._flushing = loop.create_task(self._flush())
        # Cancelling this caller cancels its own future only, which drops its
        # heartbeat from the queue (see _next_batch).
        return await waiter.result

    async def _flush(self) -> None:
        try:
            while batch := self._next_batch():
                await self._write(batch)
        finally:
            self._flushing = None

    def _next_batch(self) -> list[_Waiter]:
        batch: list[_Waiter] = []
        while self._queue and len(batch) < self._max_batch:
            waiter = self._queue.popleft()
            if not waiter.result.done():  # its caller gave up: not written
                batch.append(waiter)
        return batch

    async def _write(self, batch: list[_Waiter]) -> None:
        latest: dict[str, McHeartbeat] = {}
        for waiter in batch:  # queue order: the last report of an id wins
            latest[waiter.heartbeat.controller_id] = waiter.heartbeat
        heartbeats = [latest[controller_id] for controller_id in sorted(latest)]
        try:
            written = await self._write_batch(heartbeats)
        except asyncio.CancelledError:
            # Only at loop shutdown: the waiters' requests cannot be served.
            self._settle(batch, DatabaseUnavailable("shutting down"))
            raise
        except Exception as exc:
            self._settle(batch, exc)
            return
        self._statements += 1
        self._written += len(heartbeats)
        self._largest = max(self._largest, len(heartbeats))
        for waiter in batch:
            if not waiter.result.done():
                waiter.result.set_result(written.get(waiter.heartbeat.controller_id))

    @staticmethod
    def _settle(batch: list[_Waiter], exc: Exception) -> None:
        for waiter in batch:
            if not waiter.result.done():
                waiter.result.set_exception(exc)
