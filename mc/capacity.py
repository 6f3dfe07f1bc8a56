"""The MC's assignment decision and slot accounting (SPEC §7.2, §7.4).

No I/O and no ``await`` anywhere in this module. That is the whole point: in
trio a task is only switched out at an ``await``, so every method of
:class:`CapacityLedger` runs to completion without interleaving. The check
and the reservation of a slot are therefore one atomic step (two concurrent
assignments cannot both take the last slot), and :meth:`CapacityLedger.snapshot`
reads meetings and participants from the same instant for heartbeats.

The ledger is the single metrics object of SPEC §7.4: the actor tree
(:mod:`darktower.mc.actors`) updates it as meetings and participants come and
go; the gRPC handler and the GC task only read or reserve.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from darktower.protos import internal_pb2

#: Participants a newly accepted meeting is assumed to bring (SPEC §7.2): an
#: assignment is refused unless this many more would still fit.
ESTIMATED_PARTICIPANTS_PER_MEETING = 10


class Decision(enum.Enum):
    """Outcome of an assignment check.

    ``ACCEPTED`` and ``ALREADY_HELD`` both mean "go ahead with the fenced
    write"; only ``ACCEPTED`` took a new slot, so only it must be released if
    the write is refused.
    """

    ACCEPTED = "accepted"
    #: The meeting is already reserved or hosted here: no second slot taken.
    ALREADY_HELD = "already_held"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    AT_CAPACITY = "at_capacity"

    @property
    def accepted(self) -> bool:
        """Whether the caller may proceed with the assignment."""
        return self in (Decision.ACCEPTED, Decision.ALREADY_HELD)

    @property
    def rejection_reason(self) -> internal_pb2.RejectionReason.ValueType:
        """The wire value for ``AssignMeetingWithMhResponse.rejection_reason``
        (``REJECTION_REASON_UNSPECIFIED`` when accepted)."""
        return _REJECTION_REASONS[self]


_REJECTION_REASONS: dict[Decision, internal_pb2.RejectionReason.ValueType] = {
    Decision.ACCEPTED: internal_pb2.REJECTION_REASON_UNSPECIFIED,
    Decision.ALREADY_HELD: internal_pb2.REJECTION_REASON_UNSPECIFIED,
    Decision.DRAINING: internal_pb2.REJECTION_REASON_DRAINING,
    Decision.UNHEALTHY: internal_pb2.REJECTION_REASON_UNHEALTHY,
    Decision.AT_CAPACITY: internal_pb2.REJECTION_REASON_AT_CAPACITY,
}


def decide(
    *,
    draining: bool,
    healthy: bool,
    current_meetings: int,
    max_meetings: int,
    current_participants: int,
    max_participants: int,
) -> Decision:
    """The SPEC §7.2 decision for a *new* meeting, in the specified order.

    Pure: the order matters to the GC (``DRAINING`` tells it to stop trying
    this MC at all, ``AT_CAPACITY`` only for now), so it is tested as a table.
    """
    if draining:
        return Decision.DRAINING
    if not healthy:
        return Decision.UNHEALTHY
    if current_meetings >= max_meetings:
        return Decision.AT_CAPACITY
    if current_participants + ESTIMATED_PARTICIPANTS_PER_MEETING > max_participants:
        return Decision.AT_CAPACITY
    return Decision.ACCEPTED


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Load at one instant, as reported in heartbeats."""

    meetings: int
    participants: int
    max_meetings: int
    max_participants: int


class CapacityLedger:
    """Meeting slots and participant counts of one MC.

    A meeting id is *reserved* from :meth:`try_reserve` until :meth:`commit`
    (its actor is running) and *hosted* after; both count as a meeting, so a
    slot is held for the whole duration of the fenced Redis write. Every
    method is synchronous and therefore atomic under trio.
    """

    __slots__ = (
        "_draining",
        "_healthy",
        "_hosted",
        "_participants",
        "_participants_total",
        "_reserved",
        "max_meetings",
        "max_participants",
    )

    def __init__(self, max_meetings: int, max_participants: int) -> None:
        if max_meetings < 0 or max_participants < 0:
            raise ValueError("capacity limits must be non-negative")
        self.max_meetings = max_meetings
        self.max_participants = max_participants
        self._reserved: set[str] = set()
        self._hosted: set[str] = set()
        # Participants per held meeting, so releasing a meeting also gives
        # back its participants and the total can never drift.
        self._participants: dict[str, int] = {}
        self._participants_total = 0
        self._draining = False
        self._healthy = True

    # -- health and drain -------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def healthy(self) -> bool:
        return self._healthy

    def set_draining(self) -> None:
        """Refuse every new assignment from now on (SPEC §7.5); one-way."""
        self._draining = True

    def set_health(self, healthy: bool) -> None:
        self._healthy = healthy

    # -- meetings ---------------------------------------------------------

    def holds(self, meeting_id: str) -> bool:
        """Whether the meeting is reserved or hosted here."""
        return meeting_id in self._participants

    def is_hosted(self, meeting_id: str) -> bool:
        return meeting_id in self._hosted

    def try_reserve(self, meeting_id: str) -> Decision:
        """Decide on an assignment and, if it is accepted, take its slot.

        A meeting already held returns ``ALREADY_HELD`` (after the draining
        and health gates, which apply to every assignment) without taking a
        second slot: the caller still goes through the fenced write, so a GC
        retry never double-counts and Redis, not memory, has the last word.
        """
        if self._draining:
            return Decision.DRAINING
        if not self._healthy:
            return Decision.UNHEALTHY
        if meeting_id in self._participants:
            return Decision.ALREADY_HELD
        decision = decide(
            draining=False,
            healthy=True,
            current_meetings=len(self._participants),
            max_meetings=self.max_meetings,
            current_participants=self._participants_total,
            max_participants=self.max_participants,
        )
        if decision is Decision.ACCEPTED:
            self._reserved.add(meeting_id)
            self._participants[meeting_id] = 0
        return decision

    def commit(self, meeting_id: str) -> None:
        """Mark a reserved meeting as hosted (its actor is running)."""
        if meeting_id not in self._participants:
            raise KeyError(f"meeting {meeting_id!r} holds no slot")
        self._reserved.discard(meeting_id)
        self._hosted.add(meeting_id)

    confirm = commit

    def release(self, meeting_id: str) -> bool:
        """Free a meeting's slot and its participants; idempotent.

        Returns whether the meeting held a slot.
        """
        count = self._participants.pop(meeting_id, None)
        if count is None:
            return False
        self._participants_total -= count
        self._reserved.discard(meeting_id)
        self._hosted.discard(meeting_id)
        return True

    # -- participants -----------------------------------------------------

    def add_participant(self, meeting_id: str) -> None:
        """Count one more participant of a held meeting.

        Participants are not refused here: ``max_participants`` shapes which
        meetings this MC accepts (the +10 estimate), not who may join a
        meeting it already hosts.
        """
        if meeting_id not in self._participants:
            raise KeyError(f"meeting {meeting_id!r} holds no slot")
        self._participants[meeting_id] += 1
        self._participants_total += 1

    def remove_participant(self, meeting_id: str) -> None:
        count = self._participants.get(meeting_id)
        if not count:
            raise KeyError(f"meeting {meeting_id!r} has no participant to remove")
        self._participants[meeting_id] = count - 1
        self._participants_total -= 1

    def participants_of(self, meeting_id: str) -> int:
        return self._participants.get(meeting_id, 0)

    # -- reading ----------------------------------------------------------

    def snapshot(self) -> LoadSnapshot:
        """Meetings (reserved + hosted) and participants from the same instant."""
        return LoadSnapshot(
            meetings=len(self._participants),
            participants=self._participants_total,
            max_meetings=self.max_meetings,
            max_participants=self.max_participants,
        )

    def statistics(self) -> dict[str, int]:
        """Reserved and hosted meetings separately, for debugging and metrics."""
        return {
            "reserved": len(self._reserved),
            "hosted": len(self._hosted),
            "participants": self._participants_total,
        }
