"""Accepting meeting assignments (SPEC §7.2), trio-flavoured.

One assignment is: check-and-reserve a slot (atomic, no await), the fenced
claim in Redis under the GC's generation, then the meeting actor. The claim is
what makes a repeated or stale assignment safe: the same generation and owner
succeeds idempotently without a second slot, a newer generation takes over,
and a refused claim (``FENCED_OUT``/``SPLIT_BRAIN``) is answered
``accepted=false`` with its slot released - an MC never trusts its memory over
Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from darktower.mc.actors import CapacityRejected, MeetingControllerActor, MeetingStopping
from darktower.mc.capacity import CapacityLedger, Decision
from darktower.mc.metrics import ASSIGNMENTS
from darktower.mc.repositories.meeting_state import MeetingStateStore
from darktower.protos import internal_pb2 as pb
from darktower.shared.logging import get_logger
from darktower.shared.validation import InvalidArgument, endpoint, node_id

log = get_logger(__name__)

#: The accepted-assignments counter, resolved once (``labels`` takes a lock
#: and a dict lookup per call; this runs once per accept).
_ACCEPTED = ASSIGNMENTS.labels("accepted", "")

#: A GC sends a primary and a backup; anything beyond a handful is hostile.
MAX_MH_ASSIGNMENTS = 8
_MEETING_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"{", "}"}


@dataclass(frozen=True, slots=True)
class Assignment:
    meeting_id: str
    generation: int
    requesting_gc_id: str
    mh_assignments: tuple[pb.MhAssignment, ...]

    def mh_payload(self) -> list[dict[str, object]]:
        return mh_payload(self.mh_assignments)


def mh_payload(mh_assignments: Iterable[pb.MhAssignment]) -> list[dict[str, object]]:
    """What a fenced claim stores for a meeting's media handlers."""
    return [
        {"mh_id": mh.mh_id, "webtransport_endpoint": mh.webtransport_endpoint, "role": mh.role}
        for mh in mh_assignments
    ]


def parse_assignment(request: pb.AssignMeetingWithMhRequest) -> Assignment:
    """Validate every field (INVALID_ARGUMENT names the first bad one)."""
    meeting_id = request.meeting_id
    if not 1 <= len(meeting_id) <= 255 or not set(meeting_id) <= _MEETING_ID_CHARS:
        raise InvalidArgument("meeting_id", "must be 1-255 printable characters without braces")
    if request.generation < 1:
        raise InvalidArgument("generation", "must be at least 1")
    if len(request.mh_assignments) > MAX_MH_ASSIGNMENTS:
        raise InvalidArgument("mh_assignments", f"at most {MAX_MH_ASSIGNMENTS}")
    for mh in request.mh_assignments:
        node_id("mh_assignments.mh_id", mh.mh_id)
        endpoint("mh_assignments.webtransport_endpoint", mh.webtransport_endpoint)
        if mh.role not in (pb.MH_ROLE_PRIMARY, pb.MH_ROLE_BACKUP):
            raise InvalidArgument("mh_assignments.role", "must be PRIMARY or BACKUP")
    roles = [mh.role for mh in request.mh_assignments]
    if roles.count(pb.MH_ROLE_PRIMARY) != 1 or roles.count(pb.MH_ROLE_BACKUP) > 1:
        raise InvalidArgument("mh_assignments", "need exactly one PRIMARY and at most one BACKUP")
    if len({mh.mh_id for mh in request.mh_assignments}) != len(roles):
        raise InvalidArgument("mh_assignments.mh_id", "must be distinct")
    return Assignment(
        meeting_id=meeting_id,
        generation=request.generation,
        requesting_gc_id=node_id("requesting_gc_id", request.requesting_gc_id),
        mh_assignments=tuple(request.mh_assignments),
    )


@dataclass(frozen=True, slots=True)
class AssignOutcome:
    accepted: bool
    rejection_reason: pb.RejectionReason.ValueType = pb.REJECTION_REASON_UNSPECIFIED


class Assigner:
    """Decides and carries out assignments for one MC."""

    def __init__(
        self,
        *,
        mc_id: str,
        ledger: CapacityLedger,
        store: MeetingStateStore,
        controller: MeetingControllerActor,
    ) -> None:
        self._mc_id = mc_id
        self._ledger = ledger
        self._store = store
        self._controller = controller

    async def assign(self, assignment: Assignment) -> AssignOutcome:
        """Trio-flavoured. Raises :class:`RedisUnavailable` when the fenced
        claim cannot be made (the slot is released first)."""
        meeting_id = assignment.meeting_id
        decision = self._ledger.try_reserve(meeting_id)
        if not decision.accepted:
            return self._rejected(assignment, decision.value, decision.rejection_reason)
        try:
            claim = await self._store.claim(
                meeting_id, assignment.generation, self._mc_id, assignment.mh_payload()
            )
        except BaseException:
            if decision is Decision.ACCEPTED:
                self._ledger.release(meeting_id)
            raise
        if not claim.ok:
            # A newer generation or another owner holds the meeting: never
            # retried. What this MC runs for it is stale only if the fence is
            # held by another MC - a late, older assignment of a meeting this
            # MC already owns at a newer generation must not stop it.
            if decision is Decision.ACCEPTED:
                self._ledger.release(meeting_id)
            elif claim.owner != self._mc_id:
                self._controller.fenced_out(meeting_id)
            log.error(
                "assignment_fenced",
                meeting_id=meeting_id,
                generation=assignment.generation,
                outcome=claim.outcome.value,
                stored_generation=claim.generation,
            )
            return self._rejected(assignment, claim.outcome.value.lower(), None)
        try:
            await self._controller.start_meeting(
                meeting_id, assignment.generation, assignment.mh_assignments
            )
        except CapacityRejected as rejected:
            return self._rejected(
                assignment, rejected.decision.value, rejected.decision.rejection_reason
            )
        except MeetingStopping:
            return self._rejected(assignment, "stopping", None)
        except BaseException:
            # No actor took the reserved slot (controller gone, mailbox full,
            # cancelled): give it back, or it is lost for good.
            if decision is Decision.ACCEPTED and self._controller.meeting(meeting_id) is None:
                self._ledger.release(meeting_id)
            raise
        _ACCEPTED.inc()
        log.info(
            "meeting_assigned",
            meeting_id=meeting_id,
            generation=assignment.generation,
            gc_id=assignment.requesting_gc_id,
            claim=claim.outcome.value,
        )
        return AssignOutcome(accepted=True)

    def _rejected(
        self,
        assignment: Assignment,
        why: str,
        reason: pb.RejectionReason.ValueType | None,
    ) -> AssignOutcome:
        ASSIGNMENTS.labels("rejected", why).inc()
        log.info("meeting_rejected", meeting_id=assignment.meeting_id, reason=why)
        return AssignOutcome(False, pb.REJECTION_REASON_UNSPECIFIED if reason is None else reason)
