"""The fencing script (SPEC §7.3) behaviourally against real Redis, through
:class:`MeetingStateStore` (its batcher running): every rule, the NOSCRIPT
reload, and concurrent claims of one meeting. The batcher itself is tested in
``test_mc_meeting_state_batcher.py``."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest
import trio

from darktower.mc.repositories.meeting_state import (
    FENCING_SHA,
    ClaimOutcome,
    ClaimResult,
    MeetingStateStore,
    RedisUnavailable,
    ReleaseOutcome,
    WriteOutcome,
)
from darktower.shared.validation import InvalidArgument

MH = [{"mh_id": "mh-1", "webtransport_endpoint": "https://mh-1:4433", "role": 1}]
MH2 = [{"mh_id": "mh-2", "webtransport_endpoint": "https://mh-2:4433", "role": 1}]

#: Trio-clock guard on every test (the harness adds a wall-clock one).
IO_TIMEOUT_S = 20


@pytest.fixture
async def client(redis_server_url: str) -> AsyncIterator[coredis.Redis[Any]]:
    # Created inside the trio run: coredis binds to the flavour it is used from.
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
    async with redis:
        yield redis


@pytest.fixture
async def store(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> AsyncIterator[MeetingStateStore]:
    async with MeetingStateStore(client, key_prefix=redis_key_prefix).running() as running:
        yield running


async def test_keys_are_prefixed_and_share_the_meetings_hash_tag(
    store: MeetingStateStore, redis_key_prefix: str
) -> None:
    keys = store.keys("m-1")
    assert keys == tuple(
        f"{redis_key_prefix}meeting:{{m-1}}:{name}" for name in ("gen", "owner", "mh", "state")
    )


async def test_first_claim_stores_generation_owner_and_assignments(
    store: MeetingStateStore,
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        result = await store.claim("m-1", 3, "mc-a", MH)
        assert result.outcome is ClaimOutcome.CLAIMED
        assert result.ok
        assert (result.generation, result.owner) == (3, "mc-a")
        assert (result.previous_generation, result.previous_owner) == (None, None)
        state = await store.read("m-1")
        assert (state.generation, state.owner) == (3, "mc-a")
        assert state.mh_assignments_json() == MH


async def test_same_owner_and_generation_is_an_idempotent_repeat(
    store: MeetingStateStore,
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 3, "mc-a", MH)
        before = await store.read("m-1")
        result = await store.claim("m-1", 3, "mc-a", MH)
        assert result.outcome is ClaimOutcome.ALREADY_OWNED
        assert result.ok
        assert (result.generation, result.owner) == (3, "mc-a")
        assert await store.read("m-1") == before


async def test_newer_generation_by_another_mc_takes_over(store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 3, "mc-a", MH)
        await store.write("m-1", 3, "mc-a", {"participants": "7"})
        result = await store.claim("m-1", 4, "mc-b", MH2)
        assert result.outcome is ClaimOutcome.TOOK_OVER
        assert (result.generation, result.owner) == (4, "mc-b")
        assert (result.previous_generation, result.previous_owner) == (3, "mc-a")
        state = await store.read("m-1")
        assert (state.generation, state.owner) == (4, "mc-b")
        assert state.mh_assignments_json() == MH2
        assert state.state == {}  # the old owner's state went with its generation
        # The same MC given a newer generation updates (SPEC §7.2).
        again = await store.claim("m-1", 9, "mc-b", MH)
        assert again.outcome is ClaimOutcome.TOOK_OVER
        assert (again.previous_generation, again.previous_owner) == (4, "mc-b")


async def test_older_generation_is_fenced_out_and_changes_nothing(
    store: MeetingStateStore,
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 5, "mc-a", MH)
        before = await store.read("m-1")
        for mc_id in ("mc-a", "mc-b"):
            result = await store.claim("m-1", 4, mc_id, MH2)
            assert result.outcome is ClaimOutcome.FENCED_OUT
            assert not result.ok
            # The result names the stored state that refused the writer.
            assert (result.generation, result.owner) == (5, "mc-a")
        assert await store.read("m-1") == before


async def test_same_generation_other_mc_is_split_brain(store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 5, "mc-a", MH)
        before = await store.read("m-1")
        result = await store.claim("m-1", 5, "mc-b", MH2)
        assert result.outcome is ClaimOutcome.SPLIT_BRAIN
        assert not result.ok
        assert (result.generation, result.owner) == (5, "mc-a")
        assert await store.read("m-1") == before


async def test_generations_compare_exactly_up_to_uint64_max(store: MeetingStateStore) -> None:
    # Lua numbers are doubles: 2**64-2 and 2**64-1 would compare equal.
    top = 2**64 - 1
    with trio.fail_after(IO_TIMEOUT_S):
        assert (await store.claim("m-1", top, "mc-a", MH)).outcome is ClaimOutcome.CLAIMED
        low = await store.claim("m-1", top - 1, "mc-b", MH)
        assert low.outcome is ClaimOutcome.FENCED_OUT
        assert low.generation == top
        # Shorter decimal strings are smaller, whatever their first digit.
        assert (await store.claim("m-2", 9, "mc-a", MH)).outcome is ClaimOutcome.CLAIMED
        assert (await store.claim("m-2", 10, "mc-b", MH)).outcome is ClaimOutcome.TOOK_OVER
        assert (await store.claim("m-2", 9, "mc-a", MH)).outcome is ClaimOutcome.FENCED_OUT


async def test_script_flush_then_a_call_reloads_via_noscript(
    client: coredis.Redis[Any], store: MeetingStateStore
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.load_scripts()
        assert await client.script_exists([FENCING_SHA]) == (True,)
        await store.claim("m-1", 1, "mc-a", MH)
        before = store.statistics()
        assert before.noscript_reloads == 0  # loaded eagerly: the claim found it

        await client.script_flush(coredis.PureToken.SYNC)
        assert await client.script_exists([FENCING_SHA]) == (False,)

        result = await store.claim("m-1", 2, "mc-b", MH2)
        assert result.outcome is ClaimOutcome.TOOK_OVER
        after = store.statistics()
        assert after.noscript_reloads == before.noscript_reloads + 1
        assert after.script_loads == before.script_loads + 1
        assert await client.script_exists([FENCING_SHA]) == (True,)

        # Loaded again: the next call goes straight through.
        await store.claim("m-1", 2, "mc-b", MH2)
        final = store.statistics()
        assert (final.script_loads, final.noscript_reloads) == (
            after.script_loads,
            after.noscript_reloads,
        )


async def test_first_call_without_load_scripts_loads_lazily(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> None:
    store = MeetingStateStore(client, key_prefix=redis_key_prefix)
    with trio.fail_after(IO_TIMEOUT_S):
        await client.script_flush(coredis.PureToken.SYNC)
        async with store.running():
            assert (await store.claim("m-1", 1, "mc-a", MH)).outcome is ClaimOutcome.CLAIMED
        assert store.statistics().script_loads == 1


async def test_release_semantics(client: coredis.Redis[Any], store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 5, "mc-a", MH)
        await store.write("m-1", 5, "mc-a", {"participants": "2"})
        before = await store.read("m-1")

        older = await store.release("m-1", 4, "mc-a")
        assert older.outcome is ReleaseOutcome.FENCED_OUT
        other = await store.release("m-1", 5, "mc-b")
        assert other.outcome is ReleaseOutcome.SPLIT_BRAIN
        assert (other.generation, other.owner) == (5, "mc-a")
        assert await store.read("m-1") == before

        released = await store.release("m-1", 5, "mc-a")
        assert released.outcome is ReleaseOutcome.RELEASED
        assert (released.generation, released.owner) == (5, None)
        assert (released.previous_generation, released.previous_owner) == (5, "mc-a")
        state = await store.read("m-1")
        assert (state.generation, state.owner, state.mh_assignments, state.state) == (
            5,
            None,
            None,
            {},
        )
        # The generation stays as a tombstone, and expires.
        gen_key = store.keys("m-1")[0]
        assert 0 < await client.pttl(gen_key) <= 24 * 3600 * 1000

        # Idempotent for the releaser; the spent generation cannot be claimed
        # again (a late GC retry must not resurrect the meeting), a newer one can.
        again = await store.release("m-1", 5, "mc-a")
        assert again.outcome is ReleaseOutcome.RELEASED
        for mc_id in ("mc-a", "mc-b"):
            late = await store.claim("m-1", 5, mc_id, MH)
            assert late.outcome is ClaimOutcome.FENCED_OUT
            assert (late.generation, late.owner) == (5, None)
        newer = await store.claim("m-1", 6, "mc-b", MH2)
        assert newer.outcome is ClaimOutcome.TOOK_OVER
        assert (newer.previous_generation, newer.previous_owner) == (5, None)
        assert await client.pttl(gen_key) == -1  # a live claim does not expire


async def test_release_tombstone_can_be_kept_forever(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> None:
    store = MeetingStateStore(client, key_prefix=redis_key_prefix, tombstone_ttl_s=0)
    with trio.fail_after(IO_TIMEOUT_S):
        async with store.running():
            await store.claim("m-1", 1, "mc-a", MH)
            await store.release("m-1", 1, "mc-a")
        assert await client.pttl(store.keys("m-1")[0]) == -1


async def test_fenced_state_writes(store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        unclaimed = await store.write("m-1", 1, "mc-a", {"k": "v"})
        assert unclaimed.outcome is WriteOutcome.NOT_CLAIMED
        assert not unclaimed.ok
        await store.claim("m-1", 2, "mc-a", MH)
        assert (await store.write("m-1", 3, "mc-a", {"k": "v"})).outcome is (
            WriteOutcome.NOT_CLAIMED
        )
        written = await store.write("m-1", 2, "mc-a", {"k": "v", "b": b"\x00\xff"})
        assert written.outcome is WriteOutcome.WRITTEN
        assert (await store.read("m-1")).state == {b"k": b"v", b"b": b"\x00\xff"}
        assert (await store.write("m-1", 2, "mc-b", {"k": "x"})).outcome is (
            WriteOutcome.SPLIT_BRAIN
        )
        await store.claim("m-1", 3, "mc-b", MH2)
        # The first MC's next write is fenced out (it must drop the meeting).
        assert (await store.write("m-1", 2, "mc-a", {"k": "x"})).outcome is (
            WriteOutcome.FENCED_OUT
        )
        assert (await store.claim("m-1", 2, "mc-a", MH)).outcome is ClaimOutcome.FENCED_OUT
        assert (await store.read("m-1")).state == {}


async def test_meetings_are_independent(store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.claim("m-1", 7, "mc-a", MH)
        # A lower generation by another MC is no conflict on another meeting.
        assert (await store.claim("m-2", 1, "mc-b", MH2)).outcome is ClaimOutcome.CLAIMED
        assert (await store.claim("m-3", 7, "mc-b", MH2)).outcome is ClaimOutcome.CLAIMED
        assert (await store.release("m-2", 1, "mc-b")).outcome is ReleaseOutcome.RELEASED
        m1 = await store.read("m-1")
        assert (m1.generation, m1.owner, m1.mh_assignments_json()) == (7, "mc-a", MH)
        m3 = await store.read("m-3")
        assert (m3.generation, m3.owner) == (7, "mc-b")
        nothing = await store.read("m-4")
        assert (nothing.generation, nothing.owner, nothing.mh_assignments) == (None, None, None)


async def test_key_prefixes_are_independent(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> None:
    one = MeetingStateStore(client, key_prefix=redis_key_prefix + "one:")
    two = MeetingStateStore(client, key_prefix=redis_key_prefix + "two:")
    with trio.fail_after(IO_TIMEOUT_S):
        async with one.running(), two.running():
            await one.claim("m-1", 5, "mc-a", MH)
            assert (await two.claim("m-1", 1, "mc-b", MH)).outcome is ClaimOutcome.CLAIMED


async def test_concurrent_claims_of_one_meeting_follow_the_rule(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    rng = random.Random(20261123)
    mc_ids = ["mc-a", "mc-b", "mc-c"]
    claims = [(rng.randint(1, 12), rng.choice(mc_ids)) for _ in range(50)]
    results: list[tuple[int, str, ClaimResult]] = []

    async def claim(store: MeetingStateStore, generation: int, mc_id: str) -> None:
        result = await store.claim("m-1", generation, mc_id, [{"mh_id": f"{mc_id}-{generation}"}])
        results.append((generation, mc_id, result))

    with trio.fail_after(IO_TIMEOUT_S):
        async with contextlib.AsyncExitStack() as stack:
            # One client (own connections) per MC, as with real MC processes.
            stores: dict[str, MeetingStateStore] = {}
            for mc_id in mc_ids:
                redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
                await stack.enter_async_context(redis)
                stores[mc_id] = MeetingStateStore(redis, key_prefix=redis_key_prefix)
                await stack.enter_async_context(stores[mc_id].running())
            async with trio.open_nursery() as nursery:
                for generation, mc_id in claims:
                    nursery.start_soon(claim, stores[mc_id], generation, mc_id)
            state = await stores["mc-a"].read("m-1")

    assert len(results) == len(claims)
    top = max(generation for generation, _ in claims)
    assert state.generation == top
    assert state.mh_assignments_json() == [{"mh_id": f"{state.owner}-{top}"}]

    # Every refusal is justified by the stored state it reports.
    for generation, mc_id, result in results:
        if result.outcome is ClaimOutcome.FENCED_OUT:
            assert result.generation is not None
            assert result.generation > generation
        elif result.outcome is ClaimOutcome.SPLIT_BRAIN:
            assert (result.generation, result.owner != mc_id) == (generation, True)
        else:
            assert (result.generation, result.owner) == (generation, mc_id)

    # The successes form one chain of writes with non-decreasing generations:
    # one owner per generation, entered by exactly one CLAIMED/TOOK_OVER from
    # the previous link, then only idempotent repeats.
    successes = [(g, m, r) for g, m, r in results if r.ok]
    generations = sorted({g for g, _, _ in successes})
    assert generations[-1] == top
    previous: tuple[int | None, str | None] = (None, None)
    for generation in generations:
        group = [(m, r) for g, m, r in successes if g == generation]
        owners = {m for m, _ in group}
        assert len(owners) == 1, f"two owners of generation {generation}: {owners}"
        owner = owners.pop()
        entries = [r for _, r in group if r.outcome is not ClaimOutcome.ALREADY_OWNED]
        assert len(entries) == 1
        expected = ClaimOutcome.CLAIMED if previous == (None, None) else ClaimOutcome.TOOK_OVER
        assert entries[0].outcome is expected
        assert (entries[0].previous_generation, entries[0].previous_owner) == previous
        for _, r in group:
            if r.outcome is ClaimOutcome.ALREADY_OWNED:
                assert (r.previous_generation, r.previous_owner) == (generation, owner)
        previous = (generation, owner)
    assert previous == (top, state.owner)

    # And exactly the claims consistent with the final owner of the top
    # generation succeeded there: everyone else at the top is split-brained.
    for generation, mc_id, result in results:
        if generation == top:
            assert result.ok == (mc_id == state.owner)
            if mc_id != state.owner:
                assert result.outcome is ClaimOutcome.SPLIT_BRAIN


@pytest.mark.parametrize(
    ("meeting_id", "generation", "mc_id", "field"),
    [
        ("", 1, "mc-a", "meeting_id"),
        ("m{1}", 1, "mc-a", "meeting_id"),
        ("m 1", 1, "mc-a", "meeting_id"),
        ("m" * 256, 1, "mc-a", "meeting_id"),
        ("m-1", 0, "mc-a", "generation"),
        ("m-1", -1, "mc-a", "generation"),
        ("m-1", 2**64, "mc-a", "generation"),
        ("m-1", True, "mc-a", "generation"),
        ("m-1", 1, "", "mc_id"),
        ("m-1", 1, "mc a", "mc_id"),
    ],
)
async def test_invalid_input_is_refused_before_touching_redis(
    meeting_id: str, generation: int, mc_id: str, field: str
) -> None:
    # A client that was never entered and points nowhere: any I/O would fail
    # with something other than InvalidArgument.
    store = MeetingStateStore(coredis.Redis(host="127.0.0.1", port=1))
    async with store.running():
        with pytest.raises(InvalidArgument) as claim_error:
            await store.claim(meeting_id, generation, mc_id, MH)
        assert claim_error.value.field == field
        with pytest.raises(InvalidArgument):
            await store.release(meeting_id, generation, mc_id)
        with pytest.raises(InvalidArgument):
            await store.write(meeting_id, generation, mc_id, {"k": "v"})
        # Many at once: one bad item refuses the whole call, nothing is sent.
        with pytest.raises(InvalidArgument):
            await store.claim_many(mc_id, [("m-ok", 1, MH), (meeting_id, generation, MH)])
        with pytest.raises(InvalidArgument):
            await store.write_many(mc_id, [("m-ok", 1, {"k": "v"}), (meeting_id, generation, {})])
    assert store.statistics().operations == 0


async def test_empty_state_write_is_refused(store: MeetingStateStore) -> None:
    with pytest.raises(InvalidArgument):
        await store.write("m-1", 1, "mc-a", {})


async def test_lost_connection_raises_redis_unavailable() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, hang_up, 0)
            port = listeners[0].socket.getsockname()[1]
            redis: coredis.Redis[Any] = coredis.Redis(host="127.0.0.1", port=port)
            store = MeetingStateStore(redis)
            async with redis, store.running():
                with pytest.raises(RedisUnavailable):
                    await store.claim("m-1", 1, "mc-a", MH)
                with pytest.raises(RedisUnavailable):
                    await store.read("m-1")
                with pytest.raises(RedisUnavailable):
                    await store.load_scripts()
            nursery.cancel_scope.cancel()
