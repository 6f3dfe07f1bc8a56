"""The MC actor tree (SPEC §7.4, §7.5) under an autojump MockClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from darktower.mc.actors import (
    ActorGone,
    CapacityRejected,
    ControllerNotRunning,
    EndReason,
    MailboxFull,
    MeetingActor,
    MeetingControllerActor,
    ParticipantHandle,
)
from darktower.mc.capacity import CapacityLedger, Decision, LoadSnapshot
from darktower.protos import internal_pb2

EMPTY_TIMEOUT_S = 30.0
MHS = [internal_pb2.MhAssignment(mh_id="mh-1", role=internal_pb2.MH_ROLE_PRIMARY)]


@dataclass
class Recorder:
    ended: list[tuple[str, str, float]] = field(default_factory=list)
    #: (meeting, generation) of each report, in the order of ``ended``.
    generations: list[tuple[str, int]] = field(default_factory=list)
    failed: int = 0
    fenced: int = 0

    async def on_meeting_ended(self, meeting_id: str, generation: int, reason: str) -> None:
        self.ended.append((meeting_id, reason, trio.current_time()))
        self.generations.append((meeting_id, generation))

    def count_failed(self) -> None:
        self.failed += 1

    def count_fenced(self) -> None:
        self.fenced += 1


@asynccontextmanager
async def running_controller(
    *, max_meetings: int = 10, max_participants: int = 1000, mailbox_size: int = 8
) -> AsyncIterator[tuple[MeetingControllerActor, Recorder]]:
    recorder = Recorder()
    controller = MeetingControllerActor(
        CapacityLedger(max_meetings, max_participants),
        on_meeting_ended=recorder.on_meeting_ended,
        empty_meeting_timeout_s=EMPTY_TIMEOUT_S,
        count_meeting_failed=recorder.count_failed,
        count_fenced_out=recorder.count_fenced,
        mailbox_size=mailbox_size,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        yield controller, recorder
        nursery.cancel_scope.cancel()


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_start_meeting_is_counted_and_idempotent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_controller() as (controller, _):
        handle = await controller.start_meeting("m1", 1, MHS)
        assert handle.meeting_id == "m1"
        assert handle.generation == 1
        assert handle.mh_assignments == tuple(MHS)
        assert controller.ledger.snapshot() == LoadSnapshot(1, 0, 10, 1000)
        assert controller.ledger.is_hosted("m1")

        # A GC retry: same handle, no second slot.
        assert await controller.start_meeting("m1", 1, []) is handle
        assert handle.mh_assignments == tuple(MHS)
        # A newer generation updates the MHs.
        assert await controller.start_meeting("m1", 2, []) is handle
        assert handle.generation == 2
        assert handle.mh_assignments == ()
        assert controller.ledger.snapshot().meetings == 1
        assert controller.meeting_ids() == ["m1"]
        assert controller.meeting("m1") is handle


async def test_start_meeting_uses_a_reserved_slot(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller(max_meetings=1) as (controller, _):
        assert controller.ledger.try_reserve("m1") is Decision.ACCEPTED
        await controller.start_meeting("m1", 1, MHS)
        assert controller.ledger.statistics() == {"reserved": 0, "hosted": 1, "participants": 0}
        with pytest.raises(CapacityRejected) as info:
            await controller.start_meeting("m2", 1, MHS)
        assert info.value.decision is Decision.AT_CAPACITY


async def test_participants_add_and_remove(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller() as (controller, recorder):
        handle = await controller.start_meeting("m1", 1, MHS)
        await handle.add_participant("p1")
        handle.add_participant_nowait("p2")
        handle.add_participant_nowait("p2")  # duplicate: no-op
        await trio.testing.wait_all_tasks_blocked()
        assert controller.ledger.snapshot().participants == 2
        assert sorted(handle.participant_ids()) == ["p1", "p2"]

        participant = handle.participant("p1")
        assert participant is not None
        await participant.send("hello")

        await handle.remove_participant("p1")
        handle.remove_participant_nowait("unknown")
        await trio.testing.wait_all_tasks_blocked()
        assert controller.ledger.snapshot() == LoadSnapshot(1, 1, 10, 1000)
        assert handle.participant("p1") is None
        assert not handle.ended
        assert recorder.ended == []


async def test_empty_meeting_times_out_at_exact_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_controller() as (controller, recorder):
        start = trio.current_time()
        handle = await controller.start_meeting("m1", 1, MHS)
        await handle.wait_ended()
        assert trio.current_time() == start + EMPTY_TIMEOUT_S
        assert handle.end_reason is EndReason.EMPTY_TIMEOUT
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.ended == [("m1", "empty_timeout", start + EMPTY_TIMEOUT_S)]
        assert controller.ledger.snapshot().meetings == 0
        assert controller.meeting_ids() == []
        # Nothing more happens later.
        await trio.sleep(10 * EMPTY_TIMEOUT_S)
        assert len(recorder.ended) == 1
        with pytest.raises(ActorGone):
            handle.add_participant_nowait("late")


async def test_last_participant_leaving_ends_the_meeting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_controller() as (controller, recorder):
        start = trio.current_time()
        handle = await controller.start_meeting("m1", 1, MHS)
        await trio.sleep(EMPTY_TIMEOUT_S - 1)
        await handle.add_participant("p1")
        await handle.add_participant("p2")
        # Joined before the bound: no empty timeout.
        await trio.sleep(5 * EMPTY_TIMEOUT_S)
        assert not handle.ended
        await handle.remove_participant("p1")
        await trio.testing.wait_all_tasks_blocked()
        assert not handle.ended
        left_at = trio.current_time()
        await handle.remove_participant("p2")
        await handle.wait_ended()
        assert trio.current_time() == left_at
        assert left_at == start + 6 * EMPTY_TIMEOUT_S - 1
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.ended == [("m1", "last_participant_left", left_at)]
        assert controller.ledger.snapshot() == LoadSnapshot(0, 0, 10, 1000)


async def test_failing_meeting_actor_is_contained(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_on_add = MeetingActor._on_add

    def on_add(self: MeetingActor, participant_id: str, nursery: trio.Nursery) -> None:
        if participant_id == "boom":
            raise RuntimeError("bug in a meeting actor")
        real_on_add(self, participant_id, nursery)

    monkeypatch.setattr(MeetingActor, "_on_add", on_add)
    async with running_controller() as (controller, recorder):
        bad = await controller.start_meeting("bad", 1, MHS)
        good = await controller.start_meeting("good", 1, MHS)
        await good.add_participant("p1")
        await bad.add_participant("p1")
        await bad.add_participant("boom")
        await bad.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert bad.end_reason is EndReason.FAILED
        assert recorder.failed == 1
        assert [(m, r) for m, r, _ in recorder.ended] == [("bad", "failed")]
        # Its slot and participant are released; the other meeting goes on.
        assert controller.ledger.snapshot() == LoadSnapshot(1, 1, 10, 1000)
        await good.add_participant("p2")
        third = await controller.start_meeting("third", 1, MHS)
        await trio.testing.wait_all_tasks_blocked()
        assert controller.ledger.snapshot() == LoadSnapshot(2, 2, 10, 1000)
        assert not good.ended
        assert not third.ended


async def test_mailbox_bound_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller(mailbox_size=2) as (controller, _):
        handle = await controller.start_meeting("m1", 1, MHS)
        await trio.testing.wait_all_tasks_blocked()
        # The actor is blocked in receive(), so the first message goes to it
        # directly; no checkpoint between the sends, so it cannot drain the
        # two that fill the mailbox.
        handle.add_participant_nowait("p1")
        handle.add_participant_nowait("p2")
        handle.add_participant_nowait("p3")
        with pytest.raises(MailboxFull):
            handle.add_participant_nowait("p4")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(handle.participant_ids()) == ["p1", "p2", "p3"]
        assert controller.ledger.snapshot().participants == 3

    # The bounded wait: nobody reads this mailbox.
    send_channel, receive_channel = trio.open_memory_channel[object](1)
    with receive_channel:
        participant = ParticipantHandle("m1", "p1", send_channel, send_timeout_s=1.5)
        await participant.send("one")
        start = trio.current_time()
        with pytest.raises(MailboxFull):
            await participant.send("two")
        assert trio.current_time() == start + 1.5
        with pytest.raises(MailboxFull):
            participant.send_nowait("three")
    with pytest.raises(ActorGone):
        participant.send_nowait("four")
    with pytest.raises(ActorGone):
        await participant.send("five")


async def test_fenced_out_stops_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller() as (controller, recorder):
        handle = await controller.start_meeting("m1", 1, MHS)
        await handle.add_participant("p1")
        await trio.testing.wait_all_tasks_blocked()
        assert controller.fenced_out("m1") is True
        await handle.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert handle.end_reason is EndReason.FENCED_OUT
        assert recorder.fenced == 1
        # The GC is told, with the generation: it ends only our own row at
        # that generation or older, so another MC's stands.
        assert [(m, reason) for m, reason, _ in recorder.ended] == [("m1", "fenced_out")]
        assert recorder.generations == [("m1", 1)]
        assert controller.ledger.snapshot() == LoadSnapshot(0, 0, 10, 1000)

        # Fenced out during the first claim: only a reserved slot to free.
        assert controller.ledger.try_reserve("m2") is Decision.ACCEPTED
        assert controller.fenced_out("m2") is True
        assert recorder.fenced == 2
        assert controller.ledger.snapshot().meetings == 0
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorder.ended) == 1  # no actor, nothing hosted to report
        assert controller.fenced_out("never") is False


async def test_stop_meeting_reports_its_reason(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller() as (controller, recorder):
        handle = await controller.start_meeting("m1", 1, MHS)
        await handle.add_participant("p1")
        assert controller.stop_meeting("m1", EndReason.STOPPED) is True
        assert controller.stop_meeting("unknown") is False
        await handle.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert [(m, r) for m, r, _ in recorder.ended] == [("m1", "stopped")]
        assert controller.ledger.snapshot().participants == 0


async def test_an_ended_meeting_reports_the_newest_generation_it_was_assigned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What the MC tells the GC (``NotifyMeetingEnded.generation``): the
    generation it hosted the meeting under, including a newer one of a
    repeated assignment - never an older one."""
    async with running_controller() as (controller, recorder):
        first = await controller.start_meeting("m1", 3, MHS)
        assert await controller.start_meeting("m1", 7, MHS) is first
        assert await controller.start_meeting("m1", 5, MHS) is first  # older: ignored
        second = await controller.start_meeting("m2", 4, MHS)
        for handle in (first, second):
            assert controller.stop_meeting(handle.meeting_id)
            await handle.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(recorder.generations) == [("m1", 7), ("m2", 4)]


async def test_drain_and_wait_all_ended(autojump_clock: trio.testing.MockClock) -> None:
    async with running_controller() as (controller, _):
        busy = await controller.start_meeting("busy", 1, MHS)
        await busy.add_participant("p1")
        idle = await controller.start_meeting("idle", 1, MHS)
        controller.drain()
        assert controller.ledger.try_reserve("new") is Decision.DRAINING
        with pytest.raises(CapacityRejected) as info:
            await controller.start_meeting("new", 1, MHS)
        assert info.value.decision is Decision.DRAINING

        start = trio.current_time()
        # The busy meeting outlives the drain period.
        assert await controller.wait_all_ended(2 * EMPTY_TIMEOUT_S) is False
        assert trio.current_time() == start + 2 * EMPTY_TIMEOUT_S
        assert idle.ended
        assert not busy.ended

        async def leave_later() -> None:
            await trio.sleep(7)
            await busy.remove_participant("p1")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_later)
            before = trio.current_time()
            assert await controller.wait_all_ended(60) is True
            assert trio.current_time() == before + 7


async def test_controller_not_running() -> None:
    controller = MeetingControllerActor(
        CapacityLedger(1, 100),
        on_meeting_ended=Recorder().on_meeting_ended,
        empty_meeting_timeout_s=EMPTY_TIMEOUT_S,
    )
    with pytest.raises(ControllerNotRunning):
        await controller.start_meeting("m1", 1, MHS)


async def test_cancelling_the_controller_tears_down_the_tree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks_before = count_tasks()
    recorder = Recorder()
    controller = MeetingControllerActor(
        CapacityLedger(10, 1000),
        on_meeting_ended=recorder.on_meeting_ended,
        empty_meeting_timeout_s=EMPTY_TIMEOUT_S,
    )
    handles = []
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        for i in range(3):
            handle = await controller.start_meeting(f"m{i}", 1, MHS)
            for j in range(4):
                await handle.add_participant(f"p{j}")
            handles.append(handle)
        await trio.testing.wait_all_tasks_blocked()
        # controller + 3 meetings + 12 participants.
        assert count_tasks() == tasks_before + 1 + 3 + 12
        assert controller.ledger.snapshot() == LoadSnapshot(3, 12, 10, 1000)
        nursery.cancel_scope.cancel()

    assert count_tasks() == tasks_before
    assert all(h.ended and h.end_reason is EndReason.SHUTDOWN for h in handles)
    assert controller.ledger.snapshot() == LoadSnapshot(0, 0, 10, 1000)
    assert recorder.ended == []
    with pytest.raises(ControllerNotRunning):
        await controller.start_meeting("late", 1, MHS)


async def test_on_meeting_ended_failures_are_bounded_and_contained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[str, float]] = []

    async def flaky(meeting_id: str, generation: int, reason: str) -> None:
        calls.append((meeting_id, trio.current_time()))
        if meeting_id == "raises":
            raise ConnectionError("GC unreachable")
        await trio.sleep_forever()

    controller = MeetingControllerActor(
        CapacityLedger(10, 1000),
        on_meeting_ended=flaky,
        empty_meeting_timeout_s=EMPTY_TIMEOUT_S,
        notify_timeout_s=4.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        start = trio.current_time()
        await controller.start_meeting("raises", 1, MHS)
        await controller.start_meeting("hangs", 1, MHS)
        assert await controller.wait_all_ended(EMPTY_TIMEOUT_S + 1) is True
        assert trio.current_time() == start + EMPTY_TIMEOUT_S
        # Slots are free before the GC has been told.
        assert controller.ledger.snapshot().meetings == 0
        await trio.sleep(4.0)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(calls) == [
            ("hangs", start + EMPTY_TIMEOUT_S),
            ("raises", start + EMPTY_TIMEOUT_S),
        ]
        # The hanging notification was abandoned at the bound: only the
        # controller task is left.
        assert len(nursery.child_tasks) == 1
        assert controller.statistics() == {"meetings": 0}
        await controller.start_meeting("next", 2, MHS)
        nursery.cancel_scope.cancel()
