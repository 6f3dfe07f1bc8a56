"""A hosted meeting taken over elsewhere is dropped on the next fenced
write (SPEC §7.3) - real Redis, real actors."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from darktower.mc.fencing_watch import FencingWatch
from darktower.mc.metrics import FENCED_OUT, REGISTRY
from darktower.mc.repositories.meeting_state import (
    MeetingStateError,
    MeetingStateStore,
    RedisUnavailable,
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
async def mc_core(redis_url: str, key_prefix: str) -> AsyncIterator[Core]:
    async def on_meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        pass

    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with client, trio.open_nursery() as nursery:
        ledger = CapacityLedger(100, 10_000)
        store = MeetingStateStore(client, key_prefix=key_prefix)
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


class UnreachableStore(MeetingStateStore):
    """The real store whose every write meets a Redis outage."""

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        raise RedisUnavailable("ConnectionError")


async def test_redis_down_drops_nothing(redis_server_url: str, redis_key_prefix: str) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        assert (await core.assigner.assign(Assignment("m-1", 1, "gc-1", ()))).accepted
        before = fenced_out_total()
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        watch = FencingWatch(
            mc_id=MC_ID,
            store=UnreachableStore(client, key_prefix=redis_key_prefix),
            controller=core.controller,
        )
        assert await watch.check_all() == []
        assert core.controller.meeting_ids() == ["m-1"]
        assert fenced_out_total() == before


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
    """The real store whose writes meet a Redis error reply (OOM, MISCONF)."""

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        raise MeetingStateError("ResponseError")


async def test_a_redis_error_reply_neither_drops_nor_crashes(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async with mc_core(redis_server_url, redis_key_prefix) as core:
        assert (await core.assigner.assign(Assignment("m-1", 1, "gc-1", ()))).accepted
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
        watch = FencingWatch(
            mc_id=MC_ID,
            store=FailingStore(client, key_prefix=redis_key_prefix),
            controller=core.controller,
        )
        assert await watch.check_all() == []
        assert core.controller.meeting_ids() == ["m-1"]


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
        with pytest.raises(ControllerNotRunning):
            await assigner.assign(Assignment("m-1", 1, "gc-1", ()))
        assert ledger.snapshot().meetings == 0
