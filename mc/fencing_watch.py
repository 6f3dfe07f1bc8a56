"""Keeping hosted meetings honest against Redis (SPEC §7.3), trio-flavoured.

An MC that was paused or partitioned may still host a meeting the GC has
since given to another MC under a newer generation. It finds out on its next
fenced write: every ``interval_s`` the watch writes each hosted meeting's
state (``seen_at``) through the fencing script; a refusal by another MC's
newer claim (``FENCED_OUT``, ``SPLIT_BRAIN``) stops that meeting here, is
counted and logged at error level, and the write is never retried. Keys lost
by Redis (``NOT_CLAIMED``) are claimed again at the meeting's generation.
Redis being down or failing is logged and retried at the next tick - nothing
is dropped on the strength of an outage.
"""

from __future__ import annotations

import time

import trio

from darktower.mc.actors import MeetingControllerActor
from darktower.mc.assignment import mh_payload
from darktower.mc.repositories.meeting_state import (
    MeetingStateError,
    MeetingStateStore,
    WriteOutcome,
)
from darktower.shared.logging import get_logger

log = get_logger(__name__)

DEFAULT_INTERVAL_S = 5.0
#: Bound on one fenced write (a half-open connection must not stall the watch).
_WRITE_TIMEOUT_S = 5.0


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
            generation = handle.generation
            try:
                with trio.fail_after(_WRITE_TIMEOUT_S):
                    result = await self._store.write(
                        meeting_id, generation, self._mc_id, {"seen_at": f"{time.time():.3f}"}
                    )
                    if result.outcome is WriteOutcome.NOT_CLAIMED:
                        # Redis lost the meeting's keys (restart without
                        # persistence, failover, eviction): claim again at
                        # our generation - the fence still refuses it if
                        # anything newer exists. Never a reason to drop.
                        log.warning("fence_reclaimed", meeting_id=meeting_id, generation=generation)
                        reclaim = await self._store.claim(
                            meeting_id,
                            generation,
                            self._mc_id,
                            mh_payload(handle.mh_assignments),
                        )
                        if reclaim.ok:
                            continue
                        result = reclaim  # type: ignore[assignment]
            except (MeetingStateError, trio.TooSlowError) as exc:
                # Redis trouble is never a reason to drop a meeting (or to
                # stop the MC): the rest waits for the next tick.
                log.warning("fenced_write_failed", meeting_id=meeting_id, error=type(exc).__name__)
                return dropped
            if result.owner == self._mc_id or handle.generation != generation:
                # Our own newer claim landed meanwhile: nothing is stale.
                continue
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
