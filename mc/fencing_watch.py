"""Keeping hosted meetings honest against Redis (SPEC §7.3), trio-flavoured.

An MC that was paused or partitioned may still host a meeting the GC has
since given to another MC under a newer generation. It finds out on its next
fenced write: every ``interval_s`` the watch writes each hosted meeting's
state (``seen_at``) through the fencing script; a refusal (``FENCED_OUT``,
``SPLIT_BRAIN``, or ``NOT_CLAIMED`` after the meeting was taken over and
released) stops that meeting here, is counted and logged at error level, and
the write is never retried. Redis being down is logged and retried at the
next tick - nothing is dropped on the strength of an outage.
"""

from __future__ import annotations

import time

import trio

from darktower.mc.actors import MeetingControllerActor
from darktower.mc.repositories.meeting_state import MeetingStateStore, RedisUnavailable
from darktower.shared.logging import get_logger

log = get_logger(__name__)

DEFAULT_INTERVAL_S = 5.0


class FencingWatch:
    def __init__(
        self,
        *,
        mc_id: str,
        store: MeetingStateStore,
        controller: MeetingControllerActor,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._mc_id = mc_id
        self._store = store
        self._controller = controller
        self._interval_s = interval_s

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._interval_s)
            await self.check_all()

    async def check_all(self) -> list[str]:
        """One round over the hosted meetings; the ids dropped as fenced out."""
        dropped: list[str] = []
        for meeting_id in self._controller.meeting_ids():
            handle = self._controller.meeting(meeting_id)
            if handle is None:  # ended since the list was taken
                continue
            try:
                result = await self._store.write(
                    meeting_id, handle.generation, self._mc_id, {"seen_at": f"{time.time():.3f}"}
                )
            except RedisUnavailable as exc:
                log.warning("fenced_write_failed", meeting_id=meeting_id, error=str(exc))
                return dropped  # the rest waits for the next tick
            if not result.ok:
                log.error(
                    "fenced_out",
                    meeting_id=meeting_id,
                    generation=handle.generation,
                    outcome=result.outcome.value,
                    stored_generation=result.generation,
                )
                self._controller.fenced_out(meeting_id)
                dropped.append(meeting_id)
        return dropped
