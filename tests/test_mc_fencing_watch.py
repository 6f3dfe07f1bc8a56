"""A hosted meeting taken over elsewhere is dropped on the next fenced
write (SPEC §7.3) - real Redis, real actors; a round over many meetings shares
the store's pipelines; Redis trouble drops nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import pytest
import trio
import trio.testing

from darktower.mc.actors import ControllerNotRunning, MeetingControllerActor
from darktower.mc.assignment import Assigner, Assignment
from darktower.mc.capacity import CapacityLedger
from darktower.mc.fencing_watch import _CHUNK_TIMEOUT_S, FencingWatch
from darktower.mc.metrics import FENCED_OUT, REGISTRY
from darktower.mc.repositories.meeting_state import (
    ClaimItem,
    ClaimResult,
    FenceResult,
    MeetingStateError,
    MeetingStateStore,
    RedisUnavailable,
    WriteItem,
    WriteOutcome,
    WriteResult,
)

MC_ID = "mc-a"


@dataclass
class Core:
    ledger: CapacityLedger
    store: MeetingStateStore
    controller: MeetingControllerActor
    assigner: Assigner
    watch: FencingWatch


@asynccontextmanager
async def mc_core(
    redis_url: str, key_prefix: str, *, max_meetings: int = 100
) -> AsyncIterator[Core]:
    async def on_meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        pass

    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with client, trio.open_nursery() as nursery:
        ledger = CapacityLedger(max_meetings, 10_000_000)
        store = MeetingStateStore(client, key_prefix=key_prefix)
        await nursery.start(store.run)
        controller = MeetingControllerActor(
            ledger,
            on_meeting_ended=on_meeting_ended,
            empty_meeting_timeout_s=300,
            count_fenced_out=FENCED_OUT.inc,
        )
        await nursery.start(controller.run)
        assigner = Assigner(mc_id=MC_ID, ledger=ledger, store=store, controller=controller)
        watch = FencingWatch(mc_id=MC_ID, store=store, controller=controller)
        yield Core(ledger, store, controller, assigner, watch)
        nursery.cancel_scope.cancel()


def fenced_out_total() -> float:
    return REGISTRY.get_sample_value("mc_fenced_out_total") or 0.0


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    """The fields of every ``event`` line the watch logged."""
    return [
        dict(getattr(record, "fields", {}))
        for record in caplog.records
        if record.name == "darktower.mc.fencing_watch" and record.getMessage() == event
    ]


async def test_a_meeting_taken_over_elsewhere_is_dropped_on_the_next_write(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        for meeting_id in ("m-moved", "m-kept"):
            outcome = await core.assigner.assign(Assignment(meeting_id, 1, "gc-1", ()))
            assert outcome.accepted
        assert await core.watch.check_all() == []  # both still ours

        # The GC moved one meeting to another MC under generation 2.
        taken = await core.store.claim("m-moved", 2, "mc-b", [])
        assert taken.ok
        before = fenced_out_total()
        assert await core.watch.check_all() == ["m-moved"]
        assert fenced_out_total() == before + 1
        await trio.testing.wait_all_tasks_blocked()
        assert core.controller.meeting_ids() == ["m-kept"]
        assert core.ledger.snapshot().meetings == 1
        assert (await core.store.read("m-moved")).owner == "mc-b"  # never overwritten
        assert await core.watch.check_all() == []  # not retried


async def test_redis_down_drops_nothing_and_logs_once_a_round(
    redis_server_url: str, redis_key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    caplog.set_level(logging.WARNING, logger="darktower.mc.fencing_watch")
    meetings = [f"m-{i:02}" for i in range(30)]
    async with mc_core(redis_server_url, redis_key_prefix) as core, trio.open_nursery() as nursery:
        for meeting_id in meetings:
            assert (await core.assigner.assign(Assignment(meeting_id, 1, "gc-1", ()))).accepted
        before = fenced_out_total()
        # The same keys through a Redis that hangs up on every connection.
        listeners = await nursery.start(trio.serve_tcp, hang_up, 0)
        port = listeners[0].socket.getsockname()[1]
        client: coredis.Redis[Any] = coredis.Redis(host="127.0.0.1", port=port)
        store = MeetingStateStore(client, key_prefix=redis_key_prefix)
        async with client, store.running():
            watch = FencingWatch(mc_id=MC_ID, store=store, controller=core.controller, chunk_size=8)
            for _ in range(2):
                assert await watch.check_all() == []
            with pytest.raises(RedisUnavailable):  # what the watch met
                await store.write("m-1", 1, MC_ID, {"k": "v"})
        assert sorted(core.controller.meeting_ids()) == meetings
        assert fenced_out_total() == before
        # One line a round, not one a meeting: the first chunk failed, the
        # other 22 meetings wait for the next round.
        summary = {"meetings": 8, "unchecked": 22, "hosted": 30, "error": "RedisUnavailable"}
        assert logged(caplog, "fenced_write_failed") == [summary, summary]
        nursery.cancel_scope.cancel()


async def test_a_late_older_assignment_never_stops_our_newer_meeting(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        assert (await core.assigner.assign(Assignment("m-1", 2, "gc-1", ()))).accepted
        stale = await core.assigner.assign(Assignment("m-1", 1, "gc-2", ()))
        assert not stale.accepted
        await trio.testing.wait_all_tasks_blocked()
        assert core.controller.meeting_ids() == ["m-1"]
        assert (await core.store.read("m-1")).generation == 2
        assert await core.watch.check_all() == []


async def test_our_own_newer_claim_landing_first_is_not_a_fence_out(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        assert (await core.assigner.assign(Assignment("m-1", 1, "gc-1", ()))).accepted
        # This MC's claim at generation 2 is in Redis; its actor is not
        # updated yet (the race between a takeover and the watch).
        assert (await core.store.claim("m-1", 2, MC_ID, [])).ok
        assert await core.watch.check_all() == []
        assert core.controller.meeting_ids() == ["m-1"]


async def test_keys_lost_by_redis_are_claimed_again_not_dropped(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        assert (await core.assigner.assign(Assignment("m-1", 3, "gc-1", ()))).accepted
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        async with client:
            await client.delete(core.store.keys("m-1"))
        assert (await core.store.read("m-1")).owner is None
        assert await core.watch.check_all() == []
        assert core.controller.meeting_ids() == ["m-1"]
        state = await core.store.read("m-1")
        assert (state.generation, state.owner) == (3, MC_ID)


class FailingStore(MeetingStateStore):
    """The real store, whose writes of the meetings in ``failing`` meet a
    Redis error reply (OOM, MISCONF) instead of being sent."""

    def __init__(self, *args: Any, failing: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = failing
        self.written: list[str] = []

    async def write_many(
        self, mc_id: str, writes: Sequence[WriteItem]
    ) -> list[WriteResult | MeetingStateError]:
        self.written += [meeting_id for meeting_id, _, _ in writes]
        sent = [w for w in writes if w[0] not in self.failing]
        results = iter(await super().write_many(mc_id, sent))
        return [
            MeetingStateError("ResponseError") if w[0] in self.failing else next(results)
            for w in writes
        ]


async def test_a_redis_error_reply_neither_drops_nor_crashes(
    redis_server_url: str, redis_key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="darktower.mc.fencing_watch")
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        for meeting_id in ("m-1", "m-moved", "m-3", "m-4"):
            assert (await core.assigner.assign(Assignment(meeting_id, 1, "gc-1", ()))).accepted
        assert (await core.store.claim("m-moved", 2, "mc-b", [])).ok
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        store = FailingStore(client, key_prefix=redis_key_prefix, failing={"m-1"})
        async with client, store.running():
            watch = FencingWatch(mc_id=MC_ID, store=store, controller=core.controller, chunk_size=2)
            # The failed write's chunk still acts on the refusal Redis gave
            # (m-moved), then the round stops: the next chunk waits.
            assert await watch.check_all() == ["m-moved"]
            assert store.written == ["m-1", "m-moved"]
            await trio.testing.wait_all_tasks_blocked()
            assert core.controller.meeting_ids() == ["m-1", "m-3", "m-4"]
            # The refusal keeps its own line; the failure is the round's.
            assert [f["meeting_id"] for f in logged(caplog, "fenced_out")] == ["m-moved"]
            assert logged(caplog, "fenced_write_failed") == [
                {"meetings": 1, "unchecked": 2, "hosted": 4, "error": "MeetingStateError"}
            ]

            store.failing = set()
            assert await watch.check_all() == []
            assert store.written == ["m-1", "m-moved", "m-1", "m-3", "m-4"]
            assert len(logged(caplog, "fenced_write_failed")) == 1  # a clean round is quiet
        for meeting_id in ("m-1", "m-3", "m-4"):
            assert b"seen_at" in (await core.store.read(meeting_id)).state


async def test_a_round_over_many_meetings_shares_pipelines(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    meetings = [f"m-{i}" for i in range(300)]
    moved = meetings[10:300:60]  # 5, across every chunk
    lost = meetings[0:5]  # in the first chunk
    async with mc_core(redis_server_url, redis_key_prefix, max_meetings=1000) as core:
        async with trio.open_nursery() as nursery:
            for meeting_id in meetings:
                nursery.start_soon(core.assigner.assign, Assignment(meeting_id, 3, "gc-1", ()))
        assert sorted(core.controller.meeting_ids()) == sorted(meetings)
        for meeting_id in moved:
            assert (await core.store.claim(meeting_id, 4, "mc-b", [])).ok
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        async with client:
            for meeting_id in lost:
                await client.delete(core.store.keys(meeting_id))
        before = core.store.statistics()

        assert sorted(await core.watch.check_all()) == sorted(moved)

        after = core.store.statistics()
        # Chunks of 128 (128 + 128 + 44 writes), one pipeline each, and one
        # more for the first chunk's reclaims.
        assert after.operations - before.operations == len(meetings) + len(lost)
        assert after.batches - before.batches == 4
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(core.controller.meeting_ids()) == sorted(set(meetings) - set(moved))
        for meeting_id in lost:
            state = await core.store.read(meeting_id)
            assert (state.generation, state.owner) == (3, MC_ID)
        for meeting_id in moved:
            assert (await core.store.read(meeting_id)).owner == "mc-b"
        state = await core.store.read(meetings[-1])
        assert b"seen_at" in state.state


async def test_a_slot_is_given_back_when_no_actor_takes_it(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async def on_meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        pass

    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
    async with client:
        ledger = CapacityLedger(1, 10_000)
        controller = MeetingControllerActor(  # never started
            ledger, on_meeting_ended=on_meeting_ended, empty_meeting_timeout_s=300
        )
        store = MeetingStateStore(client, key_prefix=redis_key_prefix)
        assigner = Assigner(mc_id=MC_ID, ledger=ledger, store=store, controller=controller)
        async with store.running():
            with pytest.raises(ControllerNotRunning):
                await assigner.assign(Assignment("m-1", 1, "gc-1", ()))
        assert ledger.snapshot().meetings == 0


class LostKeysStore(MeetingStateStore):
    """No Redis: every write answers NOT_CLAIMED (Redis lost the keys), and
    the reclaims never answer."""

    def __init__(self) -> None:
        super().__init__(coredis.Redis(host="127.0.0.1", port=1))
        self.reclaiming = trio.Event()

    async def write_many(
        self, mc_id: str, writes: Sequence[WriteItem]
    ) -> list[WriteResult | MeetingStateError]:
        return [FenceResult(WriteOutcome.NOT_CLAIMED, None, None) for _ in writes]

    async def claim_many(
        self, mc_id: str, claims: Sequence[ClaimItem]
    ) -> list[ClaimResult | MeetingStateError]:
        self.reclaiming.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_reclaim_that_never_answers_drops_nothing(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="darktower.mc.fencing_watch")

    async def on_meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        pass

    ledger = CapacityLedger(10, 10_000)
    controller = MeetingControllerActor(
        ledger, on_meeting_ended=on_meeting_ended, empty_meeting_timeout_s=3600
    )
    store = LostKeysStore()
    watch = FencingWatch(mc_id=MC_ID, store=store, controller=controller)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await controller.start_meeting("m-1", 1, ())
        before = fenced_out_total()
        started = trio.current_time()
        # The writes answered NOT_CLAIMED, the reclaims were cut off by the
        # watch's bound: a NOT_CLAIMED without its reclaim is no refusal.
        assert await watch.check_all() == []
        assert store.reclaiming.is_set()
        assert trio.current_time() - started == pytest.approx(_CHUNK_TIMEOUT_S)
        assert controller.meeting_ids() == ["m-1"]
        assert fenced_out_total() == before
        assert logged(caplog, "fenced_write_failed") == [
            {"meetings": 1, "unchecked": 0, "hosted": 1, "error": "TooSlowError"}
        ]
        nursery.cancel_scope.cancel()
