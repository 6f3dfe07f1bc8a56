"""The assignment cleanup task (SPEC §6.4), trio-flavoured.

Each tick hard-deletes assignments ended longer ago than the retention, ends
the assignments of meetings nobody joined for ``inactive_after_s`` whose MC is
no longer live (a live MC ends its own empty meetings and reports them; ending
a meeting under a live MC's participants would split it), and drops expired
assignment leases. Work is done in bounded batches, and a tick stops after
``max_batches`` of each kind, so one tick never holds locks on a large share of
the table or runs for long: a backlog drains over several ticks. A database
outage is logged and the next tick tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import trio

from darktower.gc.metrics import CLEANUP_ROWS
from darktower.gc.repositories import assignments
from darktower.shared.db import DatabaseRefused, DatabaseUnavailable
from darktower.shared.logging import get_logger
from darktower.shared.seam import run_aio

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CleanupResult:
    deleted: int
    ended: int
    leases_dropped: int


class AssignmentCleanup:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval_s: float,
        retention_s: float,
        inactive_after_s: float,
        stale_after_s: float,
        batch_size: int = 1000,
        max_batches: int = 10,
    ) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._retention_s = retention_s
        self._inactive_after_s = inactive_after_s
        self._stale_after_s = stale_after_s
        self._batch_size = batch_size
        self._max_batches = max_batches

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick until cancelled; missed ticks are not replayed."""
        task_status.started()
        while True:
            await trio.sleep(self._interval_s)
            try:
                await self.tick()
            except DatabaseUnavailable as exc:
                log.warning("cleanup_failed", error=str(exc))
            except DatabaseRefused as exc:  # e.g. the schema was dropped: keep serving
                log.error("cleanup_failed", error=str(exc))

    async def _drain(self, batch_step: Callable[..., Awaitable[int]], **kwargs: float) -> int:
        """Run ``batch_step`` until it does less than a full batch, at most
        ``max_batches`` times; the rows it touched."""
        total = 0
        for _ in range(self._max_batches):
            n = await run_aio(batch_step, self._pool, batch=self._batch_size, **kwargs)
            total += n
            if n < self._batch_size:
                break
        return total

    async def tick(self) -> CleanupResult:
        deleted = await self._drain(assignments.delete_ended_before, older_than_s=self._retention_s)
        ended = await self._drain(
            assignments.end_inactive,
            inactive_s=self._inactive_after_s,
            stale_after_s=self._stale_after_s,
        )
        leases = await run_aio(assignments.delete_expired_leases, self._pool)
        CLEANUP_ROWS.labels("deleted").inc(deleted)
        CLEANUP_ROWS.labels("ended").inc(ended)
        if deleted or ended or leases:
            log.info("cleanup_done", deleted=deleted, ended=ended, leases_dropped=leases)
        return CleanupResult(deleted, ended, leases)
