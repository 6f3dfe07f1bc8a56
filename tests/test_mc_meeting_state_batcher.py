"""The meeting state store's group commit (``MeetingStateStore.run``) against
real Redis: concurrent fenced operations share pipelines and each caller gets
exactly its own answer; NOSCRIPT inside a batch, Redis going away, a batch
without answer, cancelled callers and a stopping batcher each touch only what
they must.

Faults are made by :class:`RedisProxy`, a TCP proxy in front of the real
Redis that a test can make hang up, hold a chunk, or rewrite the script SHA
of chosen ``EVALSHA`` commands (a NOSCRIPT for exactly those, without
flushing the shared server's script cache).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import coredis
import pytest
import trio
import trio.testing

from darktower.mc.repositories.meeting_state import (
    FENCING_SHA,
    ClaimOutcome,
    ClaimResult,
    FenceResult,
    MeetingStateError,
    MeetingStateStore,
    RedisUnavailable,
    ReleaseOutcome,
    StoreNotRunning,
    WriteOutcome,
)

#: Trio-clock guard on the tests that use the real clock.
IO_TIMEOUT_S = 20
SHA = FENCING_SHA.encode()
#: Same length as the real SHA, so the rewritten command stays valid RESP.
BOGUS_SHA = b"0" * 40
#: What a Redis 7.0 answers to coredis's ``HELLO 3`` (RESP3 map).
HELLO_REPLY = (
    b"%4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n"
    b"$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:1\r\n"
)


# --------------------------------------------------------------------------
# A breakable path to the real Redis

#: Sees each chunk the client sends; forwards it (or not) through the link.
#: ``False`` hangs up the connection.
Hook = Callable[[bytes, "Link"], Awaitable[bool]]


class Link:
    """One client connection through the proxy."""

    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream

    async def forward(self, data: bytes) -> None:
        await self.upstream.send_all(data)


class RedisProxy:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.hook: Hook | None = None
        self.refusing = False
        self._links: set[trio.CancelScope] = set()

    def cut_all(self) -> None:
        """Hang up every open connection."""
        for scope in self._links:
            scope.cancel()

    async def handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._links.add(scope)
            try:
                upstream = await trio.open_tcp_stream(self.host, self.port)
                async with client, upstream, trio.open_nursery() as nursery:
                    link = Link(client, upstream)
                    nursery.start_soon(self._up, link, nursery.cancel_scope)
                    nursery.start_soon(self._down, link, nursery.cancel_scope)
            finally:
                self._links.discard(scope)

    async def _up(self, link: Link, done: trio.CancelScope) -> None:
        try:
            while chunk := await link.client.receive_some(1 << 20):
                hook = self.hook
                if hook is None:
                    await link.forward(chunk)
                elif not await hook(chunk, link):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def _down(self, link: Link, done: trio.CancelScope) -> None:
        try:
            while chunk := await link.upstream.receive_some(1 << 20):
                await link.client.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


@dataclass
class Proxied:
    proxy: RedisProxy
    store: MeetingStateStore
    client: coredis.Redis[Any]


@asynccontextmanager
async def proxied_store(
    redis_url: str, key_prefix: str, *, max_connections: int | None = None, **store_options: Any
) -> AsyncIterator[Proxied]:
    """A running store whose client goes through a :class:`RedisProxy`,
    with its connection made (one claim) and the script loaded."""
    url = urlsplit(redis_url)
    db = int(url.path.strip("/") or 0)
    proxy = RedisProxy(url.hostname or "127.0.0.1", url.port or 6379)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, proxy.handle, 0)
        port = listeners[0].socket.getsockname()[1]
        client: coredis.Redis[Any] = coredis.Redis(
            host="127.0.0.1", port=port, db=db, max_connections=max_connections
        )
        store = MeetingStateStore(client, key_prefix=key_prefix, **store_options)
        async with client, store.running():
            await store.load_scripts()
            assert (await store.claim("warm-up", 1, "mc-a", b"")).ok
            yield Proxied(proxy, store, client)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def client(redis_server_url: str) -> AsyncIterator[coredis.Redis[Any]]:
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_server_url)
    async with redis:
        yield redis


@pytest.fixture
async def store(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> AsyncIterator[MeetingStateStore]:
    async with MeetingStateStore(client, key_prefix=redis_key_prefix).running() as running:
        yield running


# --------------------------------------------------------------------------
# Coalescing, and every caller's own answer


async def test_500_concurrent_operations_share_pipelines_and_get_their_own_answers(
    store: MeetingStateStore,
) -> None:
    n = 500
    with trio.fail_after(IO_TIMEOUT_S):
        # The state the operations meet (i = task number): by kind i % 5,
        # nothing; another MC's newer claim; mc-a's own claim (twice); another
        # MC's claim at the same generation.
        setup: dict[str, list[tuple[str, int, bytes]]] = {"mc-a": [], "mc-b": [], "mc-c": []}
        for i in range(n):
            kind = i % 5
            if kind == 1:
                setup["mc-b"].append((f"m-{i}", i + 1000, b""))
            elif kind in (2, 3):
                setup["mc-a"].append((f"m-{i}", i + 1, b""))
            elif kind == 4:
                setup["mc-c"].append((f"m-{i}", i + 1, b""))
        for mc_id, claims in setup.items():
            for outcome in await store.claim_many(mc_id, claims):
                assert isinstance(outcome, FenceResult)
                assert outcome.ok
        before = store.statistics()
        wrong: list[str] = []

        async def one(i: int) -> None:
            meeting_id, generation = f"m-{i}", i + 1
            kind = i % 5
            result: FenceResult[Any]
            if kind == 0:
                result = await store.claim(meeting_id, generation, "mc-a", [{"mh_id": f"mh-{i}"}])
                expected: tuple[object, ...] = (ClaimOutcome.CLAIMED, generation, "mc-a")
            elif kind == 1:
                result = await store.claim(meeting_id, generation, "mc-a", [{"mh_id": f"mh-{i}"}])
                expected = (ClaimOutcome.FENCED_OUT, i + 1000, "mc-b")
            elif kind == 2:
                result = await store.write(meeting_id, generation, "mc-a", {"v": f"v-{i}"})
                expected = (WriteOutcome.WRITTEN, generation, "mc-a")
            elif kind == 3:
                result = await store.release(meeting_id, generation, "mc-a")
                expected = (ReleaseOutcome.RELEASED, generation, None)
            else:
                result = await store.claim(meeting_id, generation, "mc-a", b"")
                expected = (ClaimOutcome.SPLIT_BRAIN, generation, "mc-c")
            if (result.outcome, result.generation, result.owner) != expected:
                wrong.append(f"{i}: {result} != {expected}")

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        after = store.statistics()

        assert wrong == []
        assert after.operations - before.operations == n
        # Coalesced: a handful of pipelines, none above the bound.
        assert after.batches - before.batches <= n // 8
        assert after.largest_batch <= 128
        # Each wrote its own data.
        for i in range(0, n, 5):
            assert (await store.read(f"m-{i}")).mh_assignments_json() == [{"mh_id": f"mh-{i}"}]
        for i in range(2, n, 5):
            assert (await store.read(f"m-{i}")).state == {b"v": f"v-{i}".encode()}


async def test_batches_never_exceed_max_batch(
    client: coredis.Redis[Any], redis_key_prefix: str
) -> None:
    store = MeetingStateStore(client, key_prefix=redis_key_prefix, max_batch=8)
    with trio.fail_after(IO_TIMEOUT_S):
        async with store.running():
            results = await store.claim_many("mc-a", [(f"m-{i}", 1, b"") for i in range(100)])
    assert all(isinstance(r, FenceResult) and r.outcome is ClaimOutcome.CLAIMED for r in results)
    statistics = store.statistics()
    assert statistics.largest_batch == 8
    assert statistics.batches == 13  # 12 x 8 + 4
    assert statistics.operations == 100


async def test_an_idle_pipe_sends_a_lone_operation_at_once(store: MeetingStateStore) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        for i in range(3):
            assert (await store.claim(f"m-{i}", 1, "mc-a", b"")).ok
    statistics = store.statistics()
    assert (statistics.batches, statistics.operations, statistics.largest_batch) == (3, 3, 1)


# --------------------------------------------------------------------------
# NOSCRIPT


def rewrite_sha(*, skip_first: bool, times: int = 1) -> Hook:
    """A hook that gives the next ``times`` chunks with ``EVALSHA`` a
    SHA Redis does not know - all their commands, or all but the first."""
    remaining = times

    async def hook(chunk: bytes, link: Link) -> bool:
        nonlocal remaining
        if remaining and SHA in chunk:
            remaining -= 1
            keep = chunk.index(SHA) + len(SHA) if skip_first else 0
            chunk = chunk[:keep] + chunk[keep:].replace(SHA, BOGUS_SHA)
        await link.forward(chunk)
        return True

    return hook


async def test_noscript_in_the_middle_of_a_batch_retries_only_the_refused_operations(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            store = proxied.store
            before = store.statistics()
            proxied.proxy.hook = rewrite_sha(skip_first=True)
            results = await store.claim_many("mc-a", [(f"m-{i}", 7, b"") for i in range(10)])
            after = store.statistics()
    # The first was applied at once, the nine others after the reload - each
    # exactly once (a claim applied twice would answer ALREADY_OWNED).
    assert [r.outcome if isinstance(r, FenceResult) else r for r in results] == [
        ClaimOutcome.CLAIMED
    ] * 10
    assert after.noscript_reloads - before.noscript_reloads == 1
    assert after.script_loads - before.script_loads == 1
    assert after.noscript_retried - before.noscript_retried == 9
    assert (after.batches - before.batches, after.operations - before.operations) == (1, 10)


async def test_noscript_again_on_the_retry_is_an_error_not_a_loop(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            store = proxied.store
            before = store.statistics()
            proxied.proxy.hook = rewrite_sha(skip_first=False, times=2)
            results = await store.claim_many("mc-a", [("m-1", 1, b""), ("m-2", 1, b"")])
            for result in results:
                assert isinstance(result, MeetingStateError)
                assert not isinstance(result, RedisUnavailable)
                assert isinstance(result.__cause__, coredis.exceptions.NoScriptError)
            after = store.statistics()
            assert after.noscript_reloads - before.noscript_reloads == 1
            assert after.noscript_retried - before.noscript_retried == 2
            # Never applied; the next batch works.
            assert (await store.claim("m-1", 1, "mc-a", b"")).outcome is ClaimOutcome.CLAIMED


async def test_script_flush_under_concurrent_load_reloads_once_per_batch(
    client: coredis.Redis[Any], store: MeetingStateStore
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        await store.load_scripts()
        await client.script_flush(coredis.PureToken.SYNC)
        before = store.statistics()
        results: list[ClaimResult] = []

        async def claim(i: int) -> None:
            results.append(await store.claim(f"m-{i}", 1, "mc-a", b""))

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(claim, i)
        after = store.statistics()
    assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * 200
    # The first batch met the flushed cache and reloaded once for all its
    # operations; the batches after it found the script.
    assert after.noscript_reloads - before.noscript_reloads == 1
    assert after.script_loads - before.script_loads == 1
    assert 1 < after.noscript_retried - before.noscript_retried < 200
    assert after.batches - before.batches >= 2


# --------------------------------------------------------------------------
# Redis trouble


async def test_a_connection_lost_mid_batch_fails_that_batch_only(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    async def hang_up_on_evalsha(chunk: bytes, link: Link) -> bool:
        if SHA in chunk:
            proxied.proxy.hook = None  # once
            return False
        await link.forward(chunk)
        return True

    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            store = proxied.store
            before = store.statistics()
            proxied.proxy.hook = hang_up_on_evalsha
            errors: list[BaseException] = []

            async def claim(i: int) -> None:
                try:
                    await store.claim(f"m-{i}", 1, "mc-a", b"")
                except RedisUnavailable as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(claim, i)
            assert len(errors) == 20
            assert len({id(e) for e in errors}) == 20  # one exception object each
            assert store.statistics().batches - before.batches == 1

            # The next batch goes out on a new connection.
            assert (await store.claim("m-1", 1, "mc-a", b"")).outcome is ClaimOutcome.CLAIMED
            # The failed claims never reached Redis.
            assert (await store.read("m-2")).generation is None


async def test_connections_lost_mid_batch_do_not_use_up_the_pool(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    """A pool of two connections survives many more losses: each lost
    connection's slot comes back (a connection held out of the pool while
    it died would take its slot with it, and the store would then wait for
    a connection forever)."""

    async def hang_up_on_evalsha(chunk: bytes, link: Link) -> bool:
        if SHA in chunk:
            proxied.proxy.hook = None  # once
            return False
        await link.forward(chunk)
        return True

    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(
            redis_server_url, redis_key_prefix, max_connections=2, batch_timeout_s=2
        ) as proxied:
            store = proxied.store
            for i in range(6):
                proxied.proxy.hook = hang_up_on_evalsha
                with pytest.raises(RedisUnavailable):
                    await store.claim(f"m-{i}", 1, "mc-a", b"")
                assert (await store.claim(f"m-{i}", 1, "mc-a", b"")).ok


async def test_redis_refusing_connections_fails_operations_until_it_is_back(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            store = proxied.store
            proxied.proxy.refusing = True
            proxied.proxy.cut_all()
            results = await store.claim_many("mc-a", [(f"m-{i}", 1, b"") for i in range(5)])
            assert all(isinstance(r, RedisUnavailable) for r in results)
            assert len({id(r) for r in results}) == 5  # one exception object each
            with pytest.raises(RedisUnavailable):
                await store.write("warm-up", 1, "mc-a", {"k": "v"})

            proxied.proxy.refusing = False
            results = await store.claim_many("mc-a", [(f"m-{i}", 1, b"") for i in range(5)])
            assert all(
                isinstance(r, FenceResult) and r.outcome is ClaimOutcome.CLAIMED for r in results
            )


async def test_a_batch_without_answer_fails_after_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Redis that completes the handshake, then reads but never answers
    (a half-open connection, a hung server): the store's own bound is all
    that ends the wait."""

    async def black_hole(stream: trio.SocketStream) -> None:
        assert b"HELLO" in await stream.receive_some()
        await stream.send_all(HELLO_REPLY)
        while await stream.receive_some():
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, black_hole, 0)
        port = listeners[0].socket.getsockname()[1]
        client: coredis.Redis[Any] = coredis.Redis(host="127.0.0.1", port=port)
        store = MeetingStateStore(client, batch_timeout_s=3)
        async with client, store.running():
            started = trio.current_time()
            errors: list[BaseException] = []

            async def claim(i: int) -> None:
                try:
                    await store.claim(f"m-{i}", 1, "mc-a", b"")
                except RedisUnavailable as exc:
                    errors.append(exc)

            async with trio.open_nursery() as callers:
                for i in range(3):
                    callers.start_soon(claim, i)
            assert len(errors) == 3
            assert len({id(e) for e in errors}) == 3  # one exception object each
            assert "within 3 s" in str(errors[0])
            assert trio.current_time() - started == pytest.approx(3)
            assert store.statistics().batches == 1

            # The batcher goes on: the next batch gets its own bound.
            with pytest.raises(RedisUnavailable):
                await store.write("m-1", 1, "mc-a", {"k": "v"})
            assert trio.current_time() - started == pytest.approx(6)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Cancelled callers, and the batcher's life


def hold_next_evalsha(held: trio.Event, release: trio.Event) -> Hook:
    """A hook that holds the next chunk with ``EVALSHA`` until ``release``."""
    armed = True

    async def hook(chunk: bytes, link: Link) -> bool:
        nonlocal armed
        if armed and SHA in chunk:
            armed = False
            held.set()
            await release.wait()
        await link.forward(chunk)
        return True

    return hook


async def test_a_cancelled_caller_hurts_nobody(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            store = proxied.store
            held, release = trio.Event(), trio.Event()
            proxied.proxy.hook = hold_next_evalsha(held, release)
            before = store.statistics()
            answers: dict[str, ClaimResult] = {}
            scopes: dict[str, trio.CancelScope] = {}

            async def claim(meeting_id: str) -> None:
                with trio.CancelScope() as scope:
                    scopes[meeting_id] = scope
                    answers[meeting_id] = await store.claim(meeting_id, 1, "mc-a", b"")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(claim, "m-in-flight")
                await held.wait()  # its batch is on the way to Redis
                for meeting_id in ("m-a", "m-queued", "m-c"):
                    nursery.start_soon(claim, meeting_id)
                await trio.testing.wait_all_tasks_blocked()
                # Both give up: one whose operation is on the wire, one
                # whose operation is still queued.
                scopes["m-in-flight"].cancel()
                scopes["m-queued"].cancel()
                await trio.testing.wait_all_tasks_blocked()
                release.set()

            assert sorted(answers) == ["m-a", "m-c"]
            assert all(a.outcome is ClaimOutcome.CLAIMED for a in answers.values())
            # The operation already sent was applied; the queued one was
            # never sent.
            assert (await store.read("m-in-flight")).owner == "mc-a"
            assert (await store.read("m-queued")).generation is None
            after = store.statistics()
            assert (after.batches - before.batches, after.operations - before.operations) == (2, 3)
            # And the batcher goes on.
            assert (await store.claim("m-queued", 1, "mc-a", b"")).ok


async def test_operations_fail_fast_without_a_running_batcher(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        async with proxied_store(redis_server_url, redis_key_prefix) as proxied:
            held, release = trio.Event(), trio.Event()
            proxied.proxy.hook = hold_next_evalsha(held, release)
            outcomes: dict[str, BaseException | ClaimResult] = {}
            # A second store on the same client, its batcher stopped while a
            # batch is on the wire and another operation is queued.
            own = MeetingStateStore(proxied.client, key_prefix=redis_key_prefix)

            async def claim(meeting_id: str) -> None:
                try:
                    outcomes[meeting_id] = await own.claim(meeting_id, 1, "mc-b", b"")
                except MeetingStateError as exc:
                    outcomes[meeting_id] = exc

            async with trio.open_nursery() as callers, trio.open_nursery() as batcher:
                await batcher.start(own.run)
                with pytest.raises(RuntimeError):
                    await own.run()  # one batcher per store
                callers.start_soon(claim, "m-on-the-wire")
                await held.wait()
                callers.start_soon(claim, "m-queued")
                await trio.testing.wait_all_tasks_blocked()
                batcher.cancel_scope.cancel()
            release.set()
            assert sorted(outcomes) == ["m-on-the-wire", "m-queued"]
            assert all(isinstance(e, StoreNotRunning) for e in outcomes.values())
            with pytest.raises(StoreNotRunning):
                await own.claim("m-later", 1, "mc-b", b"")
            never_started = MeetingStateStore(proxied.client, key_prefix=redis_key_prefix)
            with pytest.raises(StoreNotRunning):
                await never_started.release("m-later", 1, "mc-b")
            # The proxied store's own batcher was never affected.
            assert (await proxied.store.claim("m-queued", 1, "mc-a", b"")).ok


async def test_many_at_once_answers_in_order_with_per_item_errors(
    store: MeetingStateStore,
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        assert (await store.claim("m-2", 5, "mc-b", b"")).ok
        claims = await store.claim_many(
            "mc-a", [("m-1", 1, [{"mh_id": "x"}]), ("m-2", 1, b""), ("m-3", 2, b"p")]
        )
        assert [c.outcome if isinstance(c, FenceResult) else c for c in claims] == [
            ClaimOutcome.CLAIMED,
            ClaimOutcome.FENCED_OUT,
            ClaimOutcome.CLAIMED,
        ]
        writes = await store.write_many(
            "mc-a", [("m-3", 2, {"a": "1"}), ("m-4", 1, {"a": "2"}), ("m-1", 1, {"a": "3"})]
        )
        assert [w.outcome if isinstance(w, FenceResult) else w for w in writes] == [
            WriteOutcome.WRITTEN,
            WriteOutcome.NOT_CLAIMED,
            WriteOutcome.WRITTEN,
        ]
        assert await store.claim_many("mc-a", []) == []
        m1 = await store.read("m-1")
        assert (json.loads(m1.mh_assignments or b""), m1.state) == ([{"mh_id": "x"}], {b"a": b"3"})
