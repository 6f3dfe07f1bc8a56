"""The MC's actor tree (SPEC §7.4): controller → meetings → participants.

All trio-flavoured; no I/O here except the injected ``on_meeting_ended``
callback (the app makes it call the GC's ``NotifyMeetingEnded``).

Shape. Every meeting and participant actor is one trio task reading a bounded
memory-channel mailbox; others hold a *handle* (:class:`MeetingHandle`,
:class:`ParticipantHandle`) that only sends to it. The controller has no
mailbox: its changes are synchronous calls (see its class docs). Each
actor's task lives in its parent's nursery, so cancelling
:meth:`MeetingControllerActor.run` tears the whole tree down, and stopping a
meeting cancels its participants.

Backpressure. Mailboxes are bounded (``mailbox_size``). Handles offer trio's
``op`` / ``op_nowait`` pair: ``op_nowait`` raises :class:`MailboxFull` at once
when the mailbox is full; ``op`` waits for room at most ``send_timeout_s``
(trio clock) and then raises :class:`MailboxFull`. A sender is never blocked
indefinitely by a slow actor, and nothing is silently dropped: the caller
decides (the signalling layer will answer "busy" to the client). Sending to an
actor that has ended raises :class:`ActorGone`.

Stopping does not go through the mailbox: :meth:`MeetingHandle.stop` sets the
reason and cancels the meeting's cancel scope, so a full mailbox can never
delay or lose a stop (or a fencing decision).

Ending. A meeting ends when nobody joined within ``empty_meeting_timeout_s``
(this also releases orphans from a lost assignment race, SPEC §6.3 step 8),
when its last participant leaves, on :meth:`MeetingControllerActor.stop_meeting`,
when fenced out, or when its actor fails. Its ledger slot is released first,
then ``on_meeting_ended(meeting_id, generation, reason)`` is awaited once
(bounded by ``notify_timeout_s``) — also when fenced out (the GC ends only
this MC's own assignment at that generation or older, never the new
owner's), but not when the controller itself is cancelled (shutdown: nothing
may be awaited then, and the GC learns from the MC's registration state).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from darktower.mc.capacity import CapacityLedger, Decision
from darktower.protos import internal_pb2
from darktower.shared.logging import get_logger

log = get_logger("darktower.mc.actors")

#: Default bound of every mailbox.
DEFAULT_MAILBOX_SIZE = 64
#: Default longest wait for room in a mailbox before :class:`MailboxFull`.
DEFAULT_SEND_TIMEOUT_S = 1.0
#: Default bound on one ``on_meeting_ended`` call (the GC RPC deadline is 10 s).
DEFAULT_NOTIFY_TIMEOUT_S = 15.0


class EndReason(enum.StrEnum):
    """Why a meeting actor stopped (passed to ``on_meeting_ended``)."""

    EMPTY_TIMEOUT = "empty_timeout"
    LAST_PARTICIPANT_LEFT = "last_participant_left"
    STOPPED = "stopped"
    FENCED_OUT = "fenced_out"
    FAILED = "failed"
    SHUTDOWN = "shutdown"


class ActorError(Exception):
    """Base of the errors handles raise."""


class MailboxFull(ActorError):
    """The actor's mailbox stayed full: the message was not delivered."""


class ActorGone(ActorError):
    """The actor has ended; nothing will read the message."""


class CapacityRejected(ActorError):
    """:meth:`MeetingControllerActor.start_meeting` found no slot."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.value)
        self.decision = decision


class MeetingStopping(ActorError):
    """The meeting is being stopped; retry once it has ended."""


class ControllerNotRunning(ActorError):
    """The controller's ``run`` has not started yet or has ended."""


#: (meeting id, its generation, end reason): release its state, tell the GC.
OnMeetingEnded = Callable[[str, int, str], Awaitable[None]]
Counter = Callable[[], None]


def _no_count() -> None:
    pass


async def _send(channel: trio.MemorySendChannel[object], message: object, timeout_s: float) -> None:
    try:
        channel.send_nowait(message)
        return
    except trio.WouldBlock:
        pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ActorGone() from exc
    try:
        with trio.fail_after(timeout_s):
            await channel.send(message)
    except trio.TooSlowError as exc:
        raise MailboxFull() from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ActorGone() from exc


def _send_nowait(channel: trio.MemorySendChannel[object], message: object) -> None:
    try:
        channel.send_nowait(message)
    except trio.WouldBlock as exc:
        raise MailboxFull() from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ActorGone() from exc


# -- participants ------------------------------------------------------------


class ParticipantHandle:
    """Send side of one participant actor's mailbox.

    The messages are opaque here; the signalling transport (a later issue)
    defines them.
    """

    __slots__ = ("_send_channel", "_send_timeout_s", "meeting_id", "participant_id")

    def __init__(
        self,
        meeting_id: str,
        participant_id: str,
        send_channel: trio.MemorySendChannel[object],
        send_timeout_s: float,
    ) -> None:
        self.meeting_id = meeting_id
        self.participant_id = participant_id
        self._send_channel = send_channel
        self._send_timeout_s = send_timeout_s

    async def send(self, message: object) -> None:
        """Deliver, waiting at most ``send_timeout_s`` for room (trio-flavoured)."""
        await _send(self._send_channel, message, self._send_timeout_s)

    def send_nowait(self, message: object) -> None:
        _send_nowait(self._send_channel, message)


class ParticipantActor:
    """One participant of a meeting: for now it only drains its mailbox."""

    def __init__(
        self, meeting_id: str, participant_id: str, *, mailbox_size: int, send_timeout_s: float
    ) -> None:
        send_channel, self._receive = trio.open_memory_channel[object](mailbox_size)
        self.handle = ParticipantHandle(meeting_id, participant_id, send_channel, send_timeout_s)
        self.scope = trio.CancelScope()
        self.received = 0

    async def run(self) -> None:
        with self.scope, self._receive:
            async for _message in self._receive:
                self.received += 1


# -- meetings ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Add:
    participant_id: str


@dataclass(frozen=True, slots=True)
class _Remove:
    participant_id: str


class MeetingHandle:
    """What the rest of the MC holds for a hosted meeting."""

    __slots__ = ("_actor",)

    def __init__(self, actor: MeetingActor) -> None:
        self._actor = actor

    @property
    def meeting_id(self) -> str:
        return self._actor.meeting_id

    @property
    def generation(self) -> int:
        return self._actor.generation

    @property
    def mh_assignments(self) -> tuple[internal_pb2.MhAssignment, ...]:
        return self._actor.mh_assignments

    @property
    def ended(self) -> bool:
        return self._actor.ended.is_set()

    @property
    def end_reason(self) -> EndReason | None:
        return self._actor.end_reason

    async def add_participant(self, participant_id: str) -> None:
        """Ask the meeting to add a participant; waits at most
        ``send_timeout_s`` for mailbox room, then raises :class:`MailboxFull`.
        Adding a participant already present is a no-op."""
        await _send(self._actor.send_channel, _Add(participant_id), self._actor.send_timeout_s)

    def add_participant_nowait(self, participant_id: str) -> None:
        _send_nowait(self._actor.send_channel, _Add(participant_id))

    async def remove_participant(self, participant_id: str) -> None:
        """Ask the meeting to remove a participant (unknown ids are ignored)."""
        await _send(self._actor.send_channel, _Remove(participant_id), self._actor.send_timeout_s)

    def remove_participant_nowait(self, participant_id: str) -> None:
        _send_nowait(self._actor.send_channel, _Remove(participant_id))

    def participant(self, participant_id: str) -> ParticipantHandle | None:
        actor = self._actor.participants.get(participant_id)
        return actor.handle if actor is not None else None

    def participant_ids(self) -> list[str]:
        return list(self._actor.participants)

    def stop(self, reason: EndReason = EndReason.STOPPED) -> None:
        """Stop the meeting now, bypassing the mailbox; the first reason wins."""
        self._actor.stop(reason)

    async def wait_ended(self) -> None:
        """Return once the actor has ended and its slot is released."""
        await self._actor.ended.wait()


class MeetingActor:
    """One hosted meeting; supervises its participant actors.

    Keeps the ledger's participant count for its meeting; the controller's
    supervisor releases the meeting's slot when this actor ends.
    """

    def __init__(
        self,
        meeting_id: str,
        generation: int,
        mh_assignments: Sequence[internal_pb2.MhAssignment],
        *,
        ledger: CapacityLedger,
        empty_meeting_timeout_s: float,
        mailbox_size: int,
        send_timeout_s: float,
    ) -> None:
        self.meeting_id = meeting_id
        self.generation = generation
        self.mh_assignments = tuple(mh_assignments)
        self._ledger = ledger
        self._empty_meeting_timeout_s = empty_meeting_timeout_s
        self._mailbox_size = mailbox_size
        self.send_timeout_s = send_timeout_s
        self.send_channel, self._receive = trio.open_memory_channel[object](mailbox_size)
        self.participants: dict[str, ParticipantActor] = {}
        self._ever_joined = False
        self._scope = trio.CancelScope()
        self.end_reason: EndReason | None = None
        self.ended = trio.Event()
        self.handle = MeetingHandle(self)

    def stop(self, reason: EndReason) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the mailbox until the meeting ends; returns normally when it
        was stopped (the reason is in :attr:`end_reason`)."""
        # The empty-meeting clock starts when the actor starts, i.e. when the
        # assignment was accepted.
        deadline = trio.current_time() + self._empty_meeting_timeout_s
        with self._scope, self._receive:
            async with trio.open_nursery() as nursery:
                while True:
                    message: object = None
                    with trio.move_on_at(math.inf if self._ever_joined else deadline) as wait:
                        message = await self._receive.receive()
                    if wait.cancelled_caught:
                        self.stop(EndReason.EMPTY_TIMEOUT)
                        break
                    if isinstance(message, _Add):
                        self._on_add(message.participant_id, nursery)
                    elif isinstance(message, _Remove):
                        self._on_remove(message.participant_id)
                    if self._ever_joined and not self.participants:
                        self.stop(EndReason.LAST_PARTICIPANT_LEFT)
                        break
                nursery.cancel_scope.cancel()

    def _on_add(self, participant_id: str, nursery: trio.Nursery) -> None:
        if participant_id in self.participants:
            return
        actor = ParticipantActor(
            self.meeting_id,
            participant_id,
            mailbox_size=self._mailbox_size,
            send_timeout_s=self.send_timeout_s,
        )
        self._ledger.add_participant(self.meeting_id)
        self.participants[participant_id] = actor
        self._ever_joined = True
        nursery.start_soon(self._supervise_participant, actor)

    def _on_remove(self, participant_id: str) -> None:
        actor = self.participants.pop(participant_id, None)
        if actor is None:
            return
        self._ledger.remove_participant(self.meeting_id)
        actor.scope.cancel()

    async def _supervise_participant(self, actor: ParticipantActor) -> None:
        participant_id = actor.handle.participant_id
        try:
            await actor.run()
        except Exception:
            # A broken participant must not end the meeting for the others.
            log.exception(
                "participant actor failed",
                meeting_id=self.meeting_id,
                participant_id=participant_id,
            )
        if self.participants.get(participant_id) is actor:
            # Ended on its own (crash): forget it as if it had left.
            self._on_remove(participant_id)
            if not self.participants:
                self.stop(EndReason.LAST_PARTICIPANT_LEFT)


# -- the controller ------------------------------------------------------------


class MeetingControllerActor:
    """The root of the actor tree: starts, stops and supervises meetings.

    The meeting registry and the ledger's reserved→hosted transitions have a
    single writer because every change to them is one synchronous step (no
    await inside), which in trio nothing can interleave with. So starting a
    meeting is a direct call, like stopping one, not a round trip through
    a mailbox: on the assignment hot path (SPEC §7.2) that round trip
    serialised nothing more and cost two task switches and an event per
    assignment, so the controller has none. Meeting actors run in its
    nursery, owned by :meth:`run`; ``mailbox_size`` bounds theirs.
    """

    def __init__(
        self,
        ledger: CapacityLedger,
        *,
        on_meeting_ended: OnMeetingEnded,
        empty_meeting_timeout_s: float,
        count_meeting_failed: Counter = _no_count,
        count_fenced_out: Counter = _no_count,
        mailbox_size: int = DEFAULT_MAILBOX_SIZE,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        notify_timeout_s: float = DEFAULT_NOTIFY_TIMEOUT_S,
    ) -> None:
        self.ledger = ledger
        self._on_meeting_ended = on_meeting_ended
        self._empty_meeting_timeout_s = empty_meeting_timeout_s
        self._count_meeting_failed = count_meeting_failed
        self._count_fenced_out = count_fenced_out
        self._mailbox_size = mailbox_size
        self._send_timeout_s = send_timeout_s
        self._notify_timeout_s = notify_timeout_s
        self._meetings: dict[str, MeetingActor] = {}
        self._nursery: trio.Nursery | None = None
        self._all_ended = trio.Event()
        self._all_ended.set()

    # -- lifecycle ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the meeting actors' nursery until cancelled (trio-flavoured;
        use ``nursery.start``).

        The controller has no mailbox of its own (see the class docs): ready
        as soon as the nursery is open, so :meth:`start_meeting` can host.
        Cancellation cancels every meeting and participant actor before this
        returns.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _start(
        self,
        meeting_id: str,
        generation: int,
        mh_assignments: Sequence[internal_pb2.MhAssignment],
        nursery: trio.Nursery,
    ) -> MeetingHandle:
        existing = self._meetings.get(meeting_id)
        if existing is not None and existing.end_reason is None:
            # A repeated assignment that passed the fenced write: a newer
            # generation replaces the MHs, anything else changes nothing.
            if generation > existing.generation:
                existing.generation = generation
                existing.mh_assignments = tuple(mh_assignments)
            return existing.handle
        if existing is not None:
            # Stopped but not yet ended: its participants still count under
            # this meeting id, so a fresh actor must wait until it is gone.
            raise MeetingStopping(meeting_id)
        if not self.ledger.holds(meeting_id):
            decision = self.ledger.try_reserve(meeting_id)
            if not decision.accepted:
                raise CapacityRejected(decision)
        self.ledger.commit(meeting_id)
        actor = MeetingActor(
            meeting_id,
            generation,
            mh_assignments,
            ledger=self.ledger,
            empty_meeting_timeout_s=self._empty_meeting_timeout_s,
            mailbox_size=self._mailbox_size,
            send_timeout_s=self._send_timeout_s,
        )
        self._meetings[meeting_id] = actor
        if self._all_ended.is_set():
            self._all_ended = trio.Event()
        nursery.start_soon(self._supervise_meeting, actor)
        return actor.handle

    async def _supervise_meeting(self, actor: MeetingActor) -> None:
        meeting_id = actor.meeting_id
        try:
            await actor.run()
        except* Exception:
            # Contained: one broken meeting must not take the others down.
            actor.end_reason = EndReason.FAILED
            self._count_meeting_failed()
            log.exception("meeting actor failed", meeting_id=meeting_id)
        finally:
            if actor.end_reason is None:
                actor.end_reason = EndReason.SHUTDOWN
            self._forget(actor)
        reason = actor.end_reason
        # Fenced out too: the GC ends only this MC's own assignment at this
        # generation or older, so the new owner's stands, while a row still
        # naming this MC (the newer assignment lost its record) is ended and
        # joins go elsewhere instead of to a meeting no longer hosted here.
        log.info("meeting_ended", meeting_id=meeting_id, reason=reason.value)
        with trio.move_on_after(self._notify_timeout_s) as scope:
            try:
                await self._on_meeting_ended(meeting_id, actor.generation, reason.value)
            except Exception:
                log.exception("on_meeting_ended failed", meeting_id=meeting_id)
        if scope.cancelled_caught:
            log.warning("on_meeting_ended timed out", meeting_id=meeting_id)

    def _forget(self, actor: MeetingActor) -> None:
        # Release the slot before notifying, so capacity is free at once.
        if self._meetings.get(actor.meeting_id) is actor:
            del self._meetings[actor.meeting_id]
            self.ledger.release(actor.meeting_id)
        actor.ended.set()
        if not self._meetings:
            self._all_ended.set()

    # -- commands -------------------------------------------------------------

    async def start_meeting(
        self,
        meeting_id: str,
        generation: int,
        mh_assignments: Sequence[internal_pb2.MhAssignment],
    ) -> MeetingHandle:
        """Host a meeting (trio-flavoured) and return its handle.

        Call after the fenced write succeeded. Uses the slot reserved by
        :meth:`CapacityLedger.try_reserve` if there is one, else reserves one
        (raising :class:`CapacityRejected` when refused). A meeting already
        hosted returns its existing handle (updated if ``generation`` is
        newer). Raises :class:`ControllerNotRunning` if ``run`` is not
        serving. (Started while the tree is being cancelled, the actor ends
        at once, as every other one.)

        Done in one synchronous step (see the class docs), so it never waits.
        """
        nursery = self._nursery
        if nursery is None:
            raise ControllerNotRunning()
        return self._start(meeting_id, generation, mh_assignments, nursery)

    def meeting(self, meeting_id: str) -> MeetingHandle | None:
        actor = self._meetings.get(meeting_id)
        return actor.handle if actor is not None else None

    def meeting_ids(self) -> list[str]:
        return list(self._meetings)

    def stop_meeting(self, meeting_id: str, reason: EndReason = EndReason.STOPPED) -> bool:
        """Stop a hosted meeting now; ``on_meeting_ended`` follows with
        ``reason``. Returns whether the meeting was hosted. Synchronous: the
        stop cannot be delayed by a full mailbox."""
        actor = self._meetings.get(meeting_id)
        if actor is None:
            return False
        actor.stop(reason)
        return True

    def fenced_out(self, meeting_id: str) -> bool:
        """Another MC owns the meeting (SPEC §7.3): stop it, count it and log
        at error level; ``on_meeting_ended`` follows with ``fenced_out`` and
        the generation it was hosted under. Also frees a slot that was only
        reserved. Returns whether the meeting was held here."""
        self._count_fenced_out()
        log.error("fenced out of meeting", meeting_id=meeting_id)
        if self.stop_meeting(meeting_id, EndReason.FENCED_OUT):
            return True
        return self.ledger.release(meeting_id)

    def drain(self) -> None:
        """Refuse new assignments (``DRAINING``); hosted meetings go on."""
        self.ledger.set_draining()

    async def wait_all_ended(self, timeout_s: float) -> bool:
        """Wait (trio clock) until no meeting is hosted; ``False`` on timeout.

        The SIGTERM drain (SPEC §7.5): ``drain()``, then this, then cancel
        the tree.
        """
        with trio.move_on_after(timeout_s):
            while self._meetings:
                await self._all_ended.wait()
            return True
        return False

    def statistics(self) -> dict[str, int]:
        return {"meetings": len(self._meetings)}
