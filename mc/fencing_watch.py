"""Keeping hosted meetings honest against Redis (SPEC §7.3), trio-flavoured.

An MC that was paused or partitioned may still host a meeting the GC has
since given to another MC under a newer generation. It finds out on its next
fenced write: every ``interval_s`` the watch writes each hosted meeting's
state (``seen_at``) through the fencing script; a refusal by another MC's
newer claim (``FENCED_OUT``, ``SPLIT_BRAIN``) stops that meeting here, is
counted and logged at error level, and the write is never retried. Keys lost
by Redis (``NOT_CLAIMED``) are claimed again at the meeting's generation.
Redis being down or failing is logged and retried at the next tick - nothing
is dropped on the strength of an outage. A failed round logs one summary line
(how many meetings went unanswered, and why), not one per meeting: an outage
would otherwise write a line per hosted meeting per round, burying the
per-meeting outcomes (fenced out, reclaimed) that do get their own line.

Cost. A round writes every hosted meeting, so it goes in chunks of
``chunk_size`` meetings handed to the store together
(:meth:`~darktower.mc.repositories.meeting_state.MeetingStateStore.write_many`):
each chunk rides one or two of the store's pipelines, about 50-60 µs of CPU
per meeting (measured over 5,000) instead of a lone ``EVALSHA``'s 375 µs. One chunk at a time, so
the round never has more than ``chunk_size`` operations queued ahead of an
assignment's claim.
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from darktower.mc.actors import MeetingControllerActor, MeetingHandle
from darktower.mc.assignment import mh_payload
from darktower.mc.repositories.meeting_state import (
    ClaimItem,
    ClaimResult,
    FenceResult,
    MeetingStateError,
    MeetingStateStore,
    WriteOutcome,
    WriteResult,
)
from darktower.shared.logging import get_logger

log = get_logger(__name__)

DEFAULT_INTERVAL_S = 5.0
#: Meetings written together (one or two of the store's pipelines).
DEFAULT_CHUNK_SIZE = 128
#: Bound on one chunk's writes and reclaims, behind the store's own bound
#: per batch: a stalled Redis must not stall the watch.
_CHUNK_TIMEOUT_S = 15.0

_Outcome = WriteResult | ClaimResult | MeetingStateError


class FencingWatch:
    def __init__(
        self,
        *,
        mc_id: str,
        store: MeetingStateStore,
        controller: MeetingControllerActor,
        interval_s: float = DEFAULT_INTERVAL_S,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self._mc_id = mc_id
        self._store = store
        self._controller = controller
        self._interval_s = interval_s
        self._chunk_size = chunk_size

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._interval_s)
            await self.check_all()

    async def check_all(self) -> list[str]:
        """One round over the hosted meetings; the ids dropped as fenced out.

        On Redis trouble the round stops after the chunk that met it (the
        rest waits for the next tick); the refusals that chunk did receive
        are still acted on - each is Redis's own answer for its meeting.
        """
        dropped: list[str] = []
        errors: Counter[str] = Counter()
        meeting_ids = self._controller.meeting_ids()
        for start in range(0, len(meeting_ids), self._chunk_size):
            end = start + self._chunk_size
            handles = [
                handle
                for handle in map(self._controller.meeting, meeting_ids[start:end])
                if handle is not None  # None: ended since the list was taken
            ]
            await self._check_chunk(handles, dropped, errors)
            if errors:
                # Redis trouble is never a reason to drop a meeting (or to
                # stop the MC): say so once for the round.
                log.warning(
                    "fenced_write_failed",
                    meetings=errors.total(),
                    unchecked=max(len(meeting_ids) - end, 0),
                    hosted=len(meeting_ids),
                    error=",".join(sorted(errors)),
                )
                break
        return dropped

    async def _check_chunk(
        self, handles: list[MeetingHandle], dropped: list[str], errors: Counter[str]
    ) -> None:
        """Write (and if need be reclaim) ``handles``' meetings; act on the
        answers. Counts in ``errors``, by error kind, the meetings Redis did
        not answer."""
        # The generation each write is made under: the actor's may change
        # (our own newer claim) while the write is on the way.
        generations = [handle.generation for handle in handles]
        outcomes: list[_Outcome] = []
        with trio.move_on_after(_CHUNK_TIMEOUT_S) as bound:
            seen_at = {"seen_at": f"{time.time():.3f}"}
            outcomes = list(
                await self._store.write_many(
                    self._mc_id,
                    [(h.meeting_id, g, seen_at) for h, g in zip(handles, generations, strict=True)],
                )
            )
            await self._reclaim(handles, generations, outcomes)
        if bound.cancelled_caught:
            # Half an answer (writes without their reclaims) is no answer: a
            # NOT_CLAIMED left in it would look like a refusal.
            errors["TooSlowError"] += len(handles)
            return
        for handle, generation, outcome in zip(handles, generations, outcomes, strict=True):
            meeting_id = handle.meeting_id
            if isinstance(outcome, MeetingStateError):
                errors[type(outcome).__name__] += 1
                continue
            if outcome.owner == self._mc_id or handle.generation != generation:
                # Ours (written, or reclaimed), or our own newer claim landed
                # meanwhile: nothing is stale.
                continue
            if not outcome.ok:
                log.error(
                    "fenced_out",
                    meeting_id=meeting_id,
                    generation=handle.generation,
                    outcome=outcome.outcome.value,
                    stored_generation=outcome.generation,
                )
                self._controller.fenced_out(meeting_id)
                dropped.append(meeting_id)

    async def _reclaim(
        self, handles: list[MeetingHandle], generations: list[int], outcomes: list[_Outcome]
    ) -> None:
        """Claim again, at their generation, the meetings whose keys Redis
        lost (restart without persistence, failover, eviction): ``NOT_CLAIMED``.
        The fence still refuses a claim if anything newer exists. Never a
        reason to drop. Replaces those outcomes with the claims'."""
        lost = [
            i
            for i, outcome in enumerate(outcomes)
            if isinstance(outcome, FenceResult) and outcome.outcome is WriteOutcome.NOT_CLAIMED
        ]
        if not lost:
            return
        claims: list[ClaimItem] = []
        for i in lost:
            handle = handles[i]
            log.warning("fence_reclaimed", meeting_id=handle.meeting_id, generation=generations[i])
            claims.append((handle.meeting_id, generations[i], mh_payload(handle.mh_assignments)))
        reclaimed = await self._store.claim_many(self._mc_id, claims)
        for i, outcome in zip(lost, reclaimed, strict=True):
            outcomes[i] = outcome
