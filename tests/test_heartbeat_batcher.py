"""Group commit of heartbeats: the batcher's contract, and the batch
statement against real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest

from darktower.gc.heartbeat_batcher import HeartbeatBatcher
from darktower.gc.registry_requests import McHeartbeat, McRegistration
from darktower.gc.repositories import meeting_controllers
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.seam import run_aio


def heartbeat(
    controller_id: str,
    meetings: int = 0,
    *,
    cpu_usage_percent: float | None = None,
    memory_usage_percent: float | None = None,
) -> McHeartbeat:
    return McHeartbeat(
        controller_id, meetings, meetings * 10, "healthy", cpu_usage_percent, memory_usage_percent
    )


class RecordingStore:
    """A stand-in for the batch statement that records each batch and lets
    the test decide when the statement completes."""

    def __init__(self, registered: set[str]) -> None:
        self.registered = registered
        self.batches: list[list[McHeartbeat]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None

    async def write_batch(self, heartbeats: Sequence[McHeartbeat]) -> dict[str, int]:
        self.batches.append(list(heartbeats))
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return {
            hb.controller_id: 1000 + len(self.batches)
            for hb in heartbeats
            if hb.controller_id in self.registered
        }


async def test_concurrent_writes_coalesce_into_one_batch_per_flight(aio_loop: None) -> None:
    async def scenario() -> tuple[list[int | None], list[list[str]]]:
        store = RecordingStore({"mc-a", "mc-b", "mc-c"})
        batcher = HeartbeatBatcher(store.write_batch)
        first = asyncio.ensure_future(batcher.write(heartbeat("mc-a")))
        await store.started.wait()  # batch 1 = [mc-a] is in flight
        rest = [
            asyncio.ensure_future(batcher.write(heartbeat(mc)))
            for mc in ("mc-c", "mc-b", "mc-unknown", "mc-b")
        ]
        await asyncio.sleep(0)
        store.release.set()
        results = await asyncio.gather(first, *rest)
        return results, [[hb.controller_id for hb in batch] for batch in store.batches]

    results, batches = await run_aio(scenario)
    # Everything that queued behind the first statement went out as one,
    # sorted and de-duplicated (consistent row-lock order).
    assert batches == [["mc-a"], ["mc-b", "mc-c", "mc-unknown"]]
    assert results == [1001, 1002, 1002, None, 1002]


async def test_last_heartbeat_of_an_id_wins_within_a_batch(aio_loop: None) -> None:
    async def scenario() -> list[int]:
        store = RecordingStore({"mc-a"})
        batcher = HeartbeatBatcher(store.write_batch)
        blocker = asyncio.ensure_future(batcher.write(heartbeat("mc-z")))
        await store.started.wait()
        writes = [asyncio.ensure_future(batcher.write(heartbeat("mc-a", n))) for n in (1, 2, 3)]
        await asyncio.sleep(0)
        store.release.set()
        await asyncio.gather(blocker, *writes)
        return [hb.current_meetings for hb in store.batches[1]]

    assert await run_aio(scenario) == [3]


async def test_a_failed_statement_fails_its_batch_only(aio_loop: None) -> None:
    async def scenario() -> tuple[list[BaseException | int | None], int | None]:
        store = RecordingStore({"mc-a", "mc-b"})
        store.fail_with = DatabaseUnavailable("ConnectionResetError")
        store.release.set()
        batcher = HeartbeatBatcher(store.write_batch)
        outcomes = await asyncio.gather(
            batcher.write(heartbeat("mc-a")),
            batcher.write(heartbeat("mc-b")),
            return_exceptions=True,
        )
        store.fail_with = None
        return list(outcomes), await batcher.write(heartbeat("mc-a"))

    outcomes, after = await run_aio(scenario)
    assert all(isinstance(outcome, DatabaseUnavailable) for outcome in outcomes)
    assert after is not None  # the batcher recovered for the next heartbeat


async def test_a_cancelled_caller_does_not_cancel_the_others(aio_loop: None) -> None:
    loop_errors: list[dict[str, object]] = []

    async def scenario() -> list[list[str]]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        store = RecordingStore({"mc-a", "mc-b"})
        batcher = HeartbeatBatcher(store.write_batch)
        impatient = asyncio.ensure_future(batcher.write(heartbeat("mc-a")))
        patient = asyncio.ensure_future(batcher.write(heartbeat("mc-b")))
        await store.started.wait()  # both are in the statement in flight
        impatient.cancel()  # e.g. its RPC deadline expired
        await asyncio.sleep(0)
        store.fail_with = DatabaseUnavailable("x")  # an outcome nobody retrieves for mc-a
        store.release.set()
        with pytest.raises(DatabaseUnavailable):
            await patient
        assert impatient.cancelled()
        await asyncio.sleep(0)
        return [[hb.controller_id for hb in batch] for batch in store.batches]

    # The statement itself ran to completion for the one still waiting.
    assert await run_aio(scenario) == [["mc-a", "mc-b"]]
    assert loop_errors == []


async def test_a_heartbeat_whose_caller_gave_up_while_queued_is_not_written(
    aio_loop: None,
) -> None:
    async def scenario() -> list[list[str]]:
        store = RecordingStore({"mc-a", "mc-b", "mc-z"})
        batcher = HeartbeatBatcher(store.write_batch)
        blocker = asyncio.ensure_future(batcher.write(heartbeat("mc-z")))
        await store.started.wait()
        gave_up = asyncio.ensure_future(batcher.write(heartbeat("mc-a")))
        waiting = asyncio.ensure_future(batcher.write(heartbeat("mc-b")))
        await asyncio.sleep(0)
        gave_up.cancel()
        store.release.set()
        await asyncio.gather(blocker, waiting)
        return [[hb.controller_id for hb in batch] for batch in store.batches]

    # A late write could overwrite a newer report sent through another GC.
    assert await run_aio(scenario) == [["mc-z"], ["mc-b"]]


async def test_a_full_backlog_is_refused_at_once(aio_loop: None) -> None:
    async def scenario() -> tuple[type[BaseException], int]:
        store = RecordingStore({"mc-a"})
        batcher = HeartbeatBatcher(store.write_batch, max_queued=2)
        in_flight = asyncio.ensure_future(batcher.write(heartbeat("mc-a")))
        await store.started.wait()
        queued = [in_flight]
        queued += [asyncio.ensure_future(batcher.write(heartbeat(f"mc-{n}"))) for n in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(DatabaseUnavailable) as refused:
            await batcher.write(heartbeat("mc-late"))
        backlog = batcher.statistics().queued
        store.release.set()
        await asyncio.gather(*queued)
        return refused.type, backlog

    refused, backlog = await run_aio(scenario)
    assert refused is DatabaseUnavailable
    assert backlog == 2  # waiting behind the statement in flight: the limit


async def _register(pool: asyncpg.Pool, *ids: str) -> None:
    for controller_id in ids:
        await meeting_controllers.register(
            pool,
            McRegistration(controller_id, "local", "http://mc:1", "https://mc:2", 10, 100),
        )


async def test_batch_statement_writes_every_row_and_keeps_cpu_for_fast_heartbeats(
    db_pool: asyncpg.Pool,
) -> None:
    await run_aio(_register, db_pool, "mc-1", "mc-2", "mc-3")
    first = [
        heartbeat("mc-1", 1, cpu_usage_percent=11.0, memory_usage_percent=21.0),
        heartbeat("mc-2", 2, cpu_usage_percent=12.0, memory_usage_percent=22.0),
    ]
    written = await run_aio(meeting_controllers.heartbeat_batch, db_pool, first)
    assert set(written) == {"mc-1", "mc-2"}

    second = [
        heartbeat("mc-1", 5),
        heartbeat("mc-2", 6, cpu_usage_percent=50.0, memory_usage_percent=60.0),
        heartbeat("mc-nope", 7),
    ]
    written = await run_aio(meeting_controllers.heartbeat_batch, db_pool, second)
    assert set(written) == {"mc-1", "mc-2"}  # unknown ids are simply absent

    rows = {row.controller_id: row for row in await run_aio(meeting_controllers.list_all, db_pool)}
    assert (rows["mc-1"].current_meetings, rows["mc-1"].current_participants) == (5, 50)
    assert (rows["mc-1"].cpu_usage_percent, rows["mc-1"].memory_usage_percent) == (11.0, 21.0)
    assert (rows["mc-2"].cpu_usage_percent, rows["mc-2"].memory_usage_percent) == (50.0, 60.0)
    assert rows["mc-1"].health_status == rows["mc-2"].health_status == "healthy"
    assert rows["mc-3"].health_status == "pending"  # untouched by either batch


async def test_many_concurrent_heartbeats_through_the_batcher_hit_the_database(
    db_pool: asyncpg.Pool,
) -> None:
    ids = [f"mc-{n:03d}" for n in range(200)]
    await run_aio(_register, db_pool, *ids)

    async def hammer() -> tuple[list[int | None], int]:
        batches: list[int] = []

        async def write_batch(heartbeats: Sequence[McHeartbeat]) -> dict[str, int]:
            batches.append(len(heartbeats))
            return await meeting_controllers.heartbeat_batch(db_pool, heartbeats)

        batcher = HeartbeatBatcher(write_batch)
        results = await asyncio.gather(
            *(batcher.write(heartbeat(mc, n)) for n, mc in enumerate(ids))
        )
        return results, len(batches)

    results, statements = await run_aio(hammer)
    with pytest.raises(ValueError, match="distinct"):
        await run_aio(meeting_controllers.heartbeat_batch, db_pool, [heartbeat(ids[0])] * 2)
    assert all(result is not None for result in results)
    assert statements < len(ids) / 10  # coalesced, not one statement each
    rows = await run_aio(meeting_controllers.list_all, db_pool)
    assert {row.controller_id: row.current_meetings for row in rows} == {
        mc: n for n, mc in enumerate(ids)
    }
    assert {row.health_status for row in rows} == {"healthy"}
