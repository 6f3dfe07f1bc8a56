"""Group commit for heartbeats (asyncio-flavoured).

A GC receives a steady stream of tiny, independent UPDATEs - one per MC per
heartbeat interval. Each one costs a database round trip, and on this stack a
round trip is mostly fixed cost (socket calls and event-loop callbacks routed
through trio-asyncio), not SQL. So concurrent heartbeats are coalesced: while
one batch statement is in flight, new heartbeats queue; when it completes,
everything queued goes out as the next single statement. At low load a batch
is one heartbeat and nothing waits; under load batches grow by themselves and
the per-heartbeat cost falls. No timer, so no added latency.

One batch is in flight at a time, and each batch is sorted and de-duplicated
by controller id, so the row locks a batch takes come in a consistent order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from darktower.gc.registry_requests import McHeartbeat
from darktower.shared.db import DatabaseUnavailable

#: Upper bound on one statement's size (arrays of this many elements).
MAX_BATCH = 500

WriteBatch = Callable[[Sequence[McHeartbeat]], Awaitable[dict[str, int]]]


@dataclass(slots=True)
class _Waiter:
    heartbeat: McHeartbeat
    result: asyncio.Future[int | None]


class HeartbeatBatcher:
    """Coalesces concurrent :meth:`write` calls into batch statements.

    ``write_batch`` records heartbeats (last one wins for a repeated id) and
    returns ``{controller_id: database_time_ms}`` for the ids that exist.
    """

    def __init__(self, write_batch: WriteBatch, *, max_batch: int = MAX_BATCH) -> None:
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._queue: list[_Waiter] = []
        self._flushing: asyncio.Task[None] | None = None

    async def write(self, heartbeat: McHeartbeat) -> int | None:
        """Record one heartbeat: the database time in ms, or ``None`` when the
        MC is not registered. Raises what the batch statement raised (e.g.
        :class:`~darktower.shared.db.DatabaseUnavailable`)."""
        waiter = _Waiter(heartbeat, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if self._flushing is None:
            # A task of its own, not the caller's: a caller whose RPC is
            # cancelled must not cancel the statement the others wait on.
            # It is short-lived (every statement has a timeout) and drains
            # the queue, so it never outlives the requests it serves.
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        try:
            # shield: if this caller is cancelled, only its wait ends.
            return await asyncio.shield(waiter.result)
        except asyncio.CancelledError:
            waiter.result.add_done_callback(_consume_outcome)
            raise

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._write(batch)
        finally:
            self._flushing = None

    async def _write(self, batch: list[_Waiter]) -> None:
        latest: dict[str, McHeartbeat] = {}
        for waiter in batch:
            latest[waiter.heartbeat.controller_id] = waiter.heartbeat
        ordered = [latest[controller_id] for controller_id in sorted(latest)]
        try:
            written = await self._write_batch(ordered)
        except asyncio.CancelledError:
            # Only at loop shutdown: the waiters' requests cannot be served.
            self._fail(batch, DatabaseUnavailable("shutting down"))
            raise
        except Exception as exc:
            self._fail(batch, exc)
            return
        for waiter in batch:
            if not waiter.result.done():
                waiter.result.set_result(written.get(waiter.heartbeat.controller_id))

    @staticmethod
    def _fail(batch: list[_Waiter], exc: Exception) -> None:
        for waiter in batch:
            if not waiter.result.done():
                waiter.result.set_exception(exc)


def _consume_outcome(future: asyncio.Future[int | None]) -> None:
    """Mark the outcome of an abandoned wait as seen, so asyncio does not
    report an exception nobody was left to retrieve."""
    if not future.cancelled():
        future.exception()
