"""The MC's assignment decision and slot ledger (SPEC §7.2): pure, no I/O."""

from __future__ import annotations

import pytest
import trio

from darktower.mc.capacity import (
    ESTIMATED_PARTICIPANTS_PER_MEETING,
    CapacityLedger,
    Decision,
    LoadSnapshot,
    decide,
)
from darktower.protos import internal_pb2

MAX_M = 10
MAX_P = 100


@pytest.mark.parametrize(
    ("draining", "healthy", "meetings", "participants", "expected"),
    [
        pytest.param(False, True, 0, 0, Decision.ACCEPTED, id="empty"),
        pytest.param(False, True, MAX_M - 1, 0, Decision.ACCEPTED, id="meetings-max-1"),
        pytest.param(False, True, MAX_M, 0, Decision.AT_CAPACITY, id="meetings-at-max"),
        pytest.param(False, True, MAX_M + 1, 0, Decision.AT_CAPACITY, id="meetings-over-max"),
        pytest.param(False, True, 0, MAX_P - 10, Decision.ACCEPTED, id="participants+10==max"),
        pytest.param(False, True, 0, MAX_P - 9, Decision.AT_CAPACITY, id="participants+10>max"),
        pytest.param(False, True, 0, MAX_P, Decision.AT_CAPACITY, id="participants-at-max"),
        pytest.param(False, False, 0, 0, Decision.UNHEALTHY, id="unhealthy"),
        pytest.param(True, True, 0, 0, Decision.DRAINING, id="draining"),
        # Order: draining before unhealthy before capacity.
        pytest.param(True, False, MAX_M, MAX_P, Decision.DRAINING, id="draining-wins"),
        pytest.param(False, False, MAX_M, MAX_P, Decision.UNHEALTHY, id="unhealthy-before-cap"),
    ],
)
def test_decision_table(
    draining: bool, healthy: bool, meetings: int, participants: int, expected: Decision
) -> None:
    assert ESTIMATED_PARTICIPANTS_PER_MEETING == 10
    got = decide(
        draining=draining,
        healthy=healthy,
        current_meetings=meetings,
        max_meetings=MAX_M,
        current_participants=participants,
        max_participants=MAX_P,
    )
    assert got is expected


@pytest.mark.parametrize(
    ("decision", "accepted", "reason"),
    [
        (Decision.ACCEPTED, True, internal_pb2.REJECTION_REASON_UNSPECIFIED),
        (Decision.ALREADY_HELD, True, internal_pb2.REJECTION_REASON_UNSPECIFIED),
        (Decision.DRAINING, False, internal_pb2.REJECTION_REASON_DRAINING),
        (Decision.UNHEALTHY, False, internal_pb2.REJECTION_REASON_UNHEALTHY),
        (Decision.AT_CAPACITY, False, internal_pb2.REJECTION_REASON_AT_CAPACITY),
    ],
)
def test_decision_maps_to_wire_reason(decision: Decision, accepted: bool, reason: int) -> None:
    assert decision.accepted is accepted
    assert decision.rejection_reason == reason


def test_ledger_follows_decision_order() -> None:
    ledger = CapacityLedger(max_meetings=1, max_participants=100)
    ledger.set_health(False)
    assert ledger.try_reserve("m") is Decision.UNHEALTHY
    ledger.set_draining()
    assert ledger.try_reserve("m") is Decision.DRAINING
    assert ledger.snapshot().meetings == 0


def test_ledger_participant_boundary() -> None:
    ledger = CapacityLedger(max_meetings=5, max_participants=20)
    assert ledger.try_reserve("a") is Decision.ACCEPTED
    for _ in range(10):
        ledger.add_participant("a")
    # 10 + 10 == 20: still fits.
    assert ledger.try_reserve("b") is Decision.ACCEPTED
    ledger.add_participant("b")
    # 11 + 10 > 20.
    assert ledger.try_reserve("c") is Decision.AT_CAPACITY
    ledger.remove_participant("b")
    assert ledger.try_reserve("c") is Decision.ACCEPTED


async def test_100_concurrent_reservations_against_capacity_10() -> None:
    ledger = CapacityLedger(max_meetings=10, max_participants=10_000)
    results: dict[str, Decision] = {}

    async def assign(meeting_id: str) -> None:
        await trio.lowlevel.checkpoint()
        results[meeting_id] = ledger.try_reserve(meeting_id)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(assign, f"m{i}")

    accepted = [m for m, d in results.items() if d is Decision.ACCEPTED]
    assert len(results) == 100
    assert len(accepted) == 10
    assert all(d in (Decision.ACCEPTED, Decision.AT_CAPACITY) for d in results.values())
    assert ledger.snapshot().meetings == 10


def test_re_reserve_of_held_meeting_takes_no_second_slot() -> None:
    ledger = CapacityLedger(max_meetings=1, max_participants=100)
    assert ledger.try_reserve("m") is Decision.ACCEPTED
    assert ledger.try_reserve("m") is Decision.ALREADY_HELD
    ledger.commit("m")
    assert ledger.is_hosted("m")
    assert ledger.try_reserve("m") is Decision.ALREADY_HELD
    assert ledger.snapshot().meetings == 1
    # Full for anything else.
    assert ledger.try_reserve("other") is Decision.AT_CAPACITY


def test_release_frees_the_slot_and_its_participants() -> None:
    ledger = CapacityLedger(max_meetings=1, max_participants=100)
    assert ledger.try_reserve("m") is Decision.ACCEPTED
    ledger.confirm("m")
    ledger.add_participant("m")
    ledger.add_participant("m")
    assert ledger.release("m") is True
    assert ledger.release("m") is False
    assert ledger.snapshot() == LoadSnapshot(0, 0, 1, 100)
    assert ledger.try_reserve("other") is Decision.ACCEPTED


def test_release_of_a_reserved_slot() -> None:
    ledger = CapacityLedger(max_meetings=1, max_participants=100)
    assert ledger.try_reserve("m") is Decision.ACCEPTED
    assert ledger.statistics() == {"reserved": 1, "hosted": 0, "participants": 0}
    assert ledger.release("m") is True
    assert ledger.statistics() == {"reserved": 0, "hosted": 0, "participants": 0}


def test_participant_errors() -> None:
    ledger = CapacityLedger(max_meetings=1, max_participants=100)
    with pytest.raises(KeyError):
        ledger.add_participant("nope")
    ledger.try_reserve("m")
    with pytest.raises(KeyError):
        ledger.remove_participant("m")
    with pytest.raises(KeyError):
        ledger.commit("nope")
    with pytest.raises(ValueError, match="non-negative"):
        CapacityLedger(max_meetings=-1, max_participants=0)


async def test_snapshot_is_consistent_under_concurrent_churn() -> None:
    """Writers change meetings and participants together; every snapshot
    taken between checkpoints shows a consistent pair."""
    ledger = CapacityLedger(max_meetings=1000, max_participants=1_000_000)
    seen: list[LoadSnapshot] = []

    async def churn(i: int) -> None:
        for round_ in range(20):
            meeting_id = f"m{i}-{round_}"
            assert ledger.try_reserve(meeting_id) is Decision.ACCEPTED
            ledger.commit(meeting_id)
            for _ in range(3):
                ledger.add_participant(meeting_id)
            await trio.lowlevel.checkpoint()
            ledger.release(meeting_id)
            await trio.lowlevel.checkpoint()

    async def watch() -> None:
        for _ in range(200):
            seen.append(ledger.snapshot())
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(churn, i)
        nursery.start_soon(watch)

    assert seen
    # Each held meeting carries exactly 3 participants at every checkpoint.
    assert all(s.participants == 3 * s.meetings for s in seen)
    assert any(s.meetings > 0 for s in seen)
    assert ledger.snapshot() == LoadSnapshot(0, 0, 1000, 1_000_000)
