"""The assignment flow of a join (SPEC §6.3), asyncio-flavoured.

A join crosses the trio/asyncio seam once: the HTTP handler hands
:meth:`JoinService.join` to ``run_aio`` and everything below - the lookups,
the MC call, the record statement - runs on the asyncio side, where asyncpg
and grpclib live.

Why a lease. SPEC §6.3 lets concurrent first joins each call an MC and race
at the record statement, the losers leaving orphan meetings on their MCs. With
fencing (SPEC §7.3) that is worse than a leak: an orphan holding a *newer*
generation than the recorded winner takes the meeting's Redis keys over and
fences the winner out. So one join per meeting and region holds a lease
(``meeting_assignment_leases``) while it draws generations and calls MCs;
concurrent joins of that meeting wait for its result instead of calling MCs
of their own. Every generation of a meeting is drawn by the lease holder, so
the recorded assignment always carries the newest one. The record statement
still refuses to replace a live assignment and requires the lease, so even a
holder whose lease expired mid-flight (a stalled GC) cannot win against a
newer holder; its MC's meeting has the older generation and is fenced out or
ends as empty (``MC_EMPTY_MEETING_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from dataclasses import dataclass

import asyncpg

from darktower.gc.join_errors import GuestsNotAllowed, MeetingNotFound, ServiceUnavailable
from darktower.gc.mc_client import McClient
from darktower.gc.metrics import ASSIGNMENT_RETRIES, MC_RPCS
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers, meetings
from darktower.gc.repositories.assignments import ActiveAssignment
from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meetings import MeetingRow
from darktower.gc.selection import choose_controller, choose_media_handlers
from darktower.protos import internal_pb2 as pb
from darktower.shared.logging import get_logger

log = get_logger(__name__)

#: SPEC §6.3 step 6: at most three MCs are asked per join.
MAX_ATTEMPTS = 3
#: How often a join waiting for another join's lease looks for its result.
LEASE_POLL_INTERVAL_S = 0.02


@dataclass(frozen=True, slots=True)
class JoinResult:
    meeting: MeetingRow
    assignment: ActiveAssignment
    #: True when this join made the assignment (a first join), False when it
    #: found one (a re-join, or another join's result).
    assigned: bool = False


class JoinService:
    """Joins for one region, on behalf of one GC (``gc_id``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        mc_client: McClient,
        *,
        gc_id: str,
        region: str,
        stale_after_s: float,
        lease_ttl_s: float,
        rng: random.Random | None = None,
        poll_interval_s: float = LEASE_POLL_INTERVAL_S,
    ) -> None:
        self._pool = pool
        self._mc_client = mc_client
        self._gc_id = gc_id
        self._region = region
        self._stale_after_s = stale_after_s
        self._lease_ttl_s = lease_ttl_s
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._poll_interval_s = poll_interval_s

    async def join(self, code: str, org_id: uuid.UUID | None) -> JoinResult:
        """The meeting ``code`` of ``org_id`` (``None``: a guest, who may
        join any org's meeting that admits guests) and its assignment here."""
        lookup = await meetings.find_for_join(
            self._pool,
            code=code,
            org_id=org_id,
            region=self._region,
            stale_after_s=self._stale_after_s,
        )
        if lookup is None:
            raise MeetingNotFound("meeting not found")
        meeting = lookup.meeting
        if org_id is None and not meeting.allow_guests:
            raise GuestsNotAllowed("this meeting does not admit guests")
        if lookup.assignment is not None and lookup.assignment.mc_live:
            return JoinResult(meeting, lookup.assignment, assigned=False)
        return await self._assign(meeting)

    async def _assign(self, meeting: MeetingRow) -> JoinResult:
        holder = uuid.uuid4()
        while True:
            acquired = await assignments.acquire_lease(
                self._pool,
                meeting_id=meeting.meeting_id,
                region=self._region,
                holder=holder,
                gc_id=self._gc_id,
                ttl_s=self._lease_ttl_s,
            )
            if acquired:
                try:
                    return await self._assign_holding_lease(meeting, holder)
                finally:
                    # Bounded and best effort: after a win the record statement
                    # already deleted the lease; after a failure this lets the
                    # waiting joins try at once instead of at the lease's expiry.
                    await self._release_lease(meeting, holder)
            # Another join holds the lease: its result is ours.
            await asyncio.sleep(self._poll_interval_s)
            existing = await assignments.find_active(
                self._pool,
                meeting_id=meeting.meeting_id,
                region=self._region,
                stale_after_s=self._stale_after_s,
            )
            if existing is not None and existing.mc_live:
                return JoinResult(meeting, existing, assigned=False)

    async def _release_lease(self, meeting: MeetingRow, holder: uuid.UUID) -> None:
        try:
            await asyncio.wait_for(
                assignments.release_lease(
                    self._pool, meeting_id=meeting.meeting_id, region=self._region, holder=holder
                ),
                timeout=2.0,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the lease expires by itself
            log.warning("lease_release_failed", meeting_id=str(meeting.meeting_id), error=str(exc))

    async def _assign_holding_lease(self, meeting: MeetingRow, holder: uuid.UUID) -> JoinResult:
        # Another holder may have recorded between our lookup and our lease.
        existing = await assignments.find_active(
            self._pool,
            meeting_id=meeting.meeting_id,
            region=self._region,
            stale_after_s=self._stale_after_s,
        )
        if existing is not None and existing.mc_live:
            return JoinResult(meeting, existing, assigned=False)
        mh_candidates = await media_handlers.assignment_candidates(
            self._pool, region=self._region, stale_after_s=self._stale_after_s
        )
        chosen_mhs = choose_media_handlers(mh_candidates)
        if chosen_mhs is None:
            raise ServiceUnavailable(
                "no_media_handler", "no media handler is available", retry_after_s=5
            )
        primary, backup = chosen_mhs
        excluded: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            generation, candidates = await meeting_controllers.assignment_candidates(
                self._pool,
                region=self._region,
                stale_after_s=self._stale_after_s,
                exclude=excluded,
            )
            controller = choose_controller(candidates, self._rng)
            if controller is None:
                if attempt == 0:
                    raise ServiceUnavailable(
                        "no_controller", "no meeting controller is available", retry_after_s=5
                    )
                break
            if attempt > 0:
                ASSIGNMENT_RETRIES.inc()
            outcome = await self._mc_client.assign(
                controller_id=controller.controller_id,
                endpoint=controller.grpc_endpoint,
                request=self._request(meeting, generation, primary, backup),
            )
            MC_RPCS.labels(outcome.status, outcome.reason).inc()
            if not outcome.accepted:
                log.info(
                    "mc_assignment_refused",
                    meeting_id=str(meeting.meeting_id),
                    controller_id=controller.controller_id,
                    status=outcome.status,
                    reason=outcome.reason,
                    attempt=attempt + 1,
                )
                excluded.append(controller.controller_id)
                continue
            recorded = await assignments.record(
                self._pool,
                meeting_id=meeting.meeting_id,
                region=self._region,
                controller_id=controller.controller_id,
                generation=generation,
                gc_id=self._gc_id,
                primary_mh_id=primary.handler_id,
                backup_mh_id=backup.handler_id if backup is not None else None,
                holder=holder,
                stale_after_s=self._stale_after_s,
            )
            if recorded.won and recorded.assignment is not None:
                log.info(
                    "meeting_assigned",
                    meeting_id=str(meeting.meeting_id),
                    controller_id=controller.controller_id,
                    generation=generation,
                    attempt=attempt + 1,
                )
                return JoinResult(meeting, recorded.assignment, assigned=True)
            # Our lease expired and another holder took over: its assignment
            # (newer generation) stands; the meeting our MC accepted is
            # fenced out there or ends as empty.
            log.warning(
                "assignment_race_lost",
                meeting_id=str(meeting.meeting_id),
                controller_id=controller.controller_id,
                generation=generation,
            )
            if recorded.assignment is not None and recorded.assignment.mc_live:
                return JoinResult(meeting, recorded.assignment, assigned=False)
            raise ServiceUnavailable("busy", "the meeting is being assigned; retry")
        raise ServiceUnavailable(
            "assignment_failed", "no meeting controller accepted the meeting", retry_after_s=2
        )

    def _request(
        self,
        meeting: MeetingRow,
        generation: int,
        primary: MhCandidate,
        backup: MhCandidate | None,
    ) -> pb.AssignMeetingWithMhRequest:
        mhs = [
            pb.MhAssignment(
                mh_id=primary.handler_id,
                webtransport_endpoint=primary.webtransport_endpoint,
                role=pb.MH_ROLE_PRIMARY,
            )
        ]
        if backup is not None:
            mhs.append(
                pb.MhAssignment(
                    mh_id=backup.handler_id,
                    webtransport_endpoint=backup.webtransport_endpoint,
                    role=pb.MH_ROLE_BACKUP,
                )
            )
        return pb.AssignMeetingWithMhRequest(
            meeting_id=str(meeting.meeting_id),
            mh_assignments=mhs,
            requesting_gc_id=self._gc_id,
            generation=generation,
        )
