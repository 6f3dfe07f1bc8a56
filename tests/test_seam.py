"""The trio <-> asyncio seam (:mod:`darktower.shared.seam`).

The seam replaces two pieces of trio-asyncio's machinery for speed: its
loop runs every ready asyncio callback in one trio round (trio-asyncio's runs
one per round), and :func:`run_trio` starts its trio task directly instead
of queueing it through the loop. These tests pin what callers rely on: the
installed trio-asyncio really gets the fast path, callbacks keep asyncio's
order and a bound per round, timers keep firing on trio's clock (and
cancelled ones leave the heap), and ``run_trio`` keeps ``trio_as_aio``'s
results, errors, context and cancellation semantics.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter

import pytest
import trio
import trio.testing

from darktower.shared import seam
from darktower.shared.seam import MAX_CALLBACKS_PER_ROUND, asyncio_loop, run_aio, run_trio

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class _StepCounter(trio.abc.Instrument):
    """Numbers the trio task steps (one step: a task runs until it yields)."""

    def __init__(self) -> None:
        self.step = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.step += 1


async def _callbacks_per_turn(loop: asyncio.AbstractEventLoop, count: int) -> list[int]:
    """Queue ``count`` callbacks at once and let them run; how many ran in
    each step of the loop's trio task that ran any (checking that they all
    ran, in order)."""
    steps = _StepCounter()
    ran: list[tuple[int, int]] = []

    def record(i: int) -> None:
        ran.append((i, steps.step))

    for i in range(count):
        loop.call_soon(record, i)
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(10):
            while len(ran) < count:
                await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert [i for i, _ in ran] == list(range(count))
    return list(Counter(step for _, step in ran).values())


async def test_the_installed_trio_asyncio_gets_the_fast_path(aio_loop: None) -> None:
    loop = await run_aio(_running_loop)
    assert isinstance(loop, seam._BatchingTrioEventLoop)


async def test_callbacks_ready_together_run_in_one_round(aio_loop: None) -> None:
    loop = await run_aio(_running_loop)
    # trio-asyncio's own loop takes 50 turns (and trio rounds) for them.
    assert await _callbacks_per_turn(loop, 50) == [50]


async def test_one_round_runs_a_bounded_number_of_callbacks(aio_loop: None) -> None:
    loop = await run_aio(_running_loop)
    count = 3 * MAX_CALLBACKS_PER_ROUND
    per_turn = await _callbacks_per_turn(loop, count)
    assert max(per_turn) == MAX_CALLBACKS_PER_ROUND + 1
    assert sum(per_turn) == count


async def test_a_callback_scheduled_by_a_callback_runs_after_those_queued_before(
    aio_loop: None,
) -> None:
    loop = await run_aio(_running_loop)
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        loop.call_soon(ran.append, "scheduled by first")

    loop.call_soon(first)
    loop.call_soon(ran.append, "second")
    with trio.fail_after(5):
        while len(ran) < 3:
            await trio.lowlevel.checkpoint()
    assert ran == ["first", "second", "scheduled by first"]


async def test_due_timers_do_not_lift_the_bound_per_round(
    aio_loop: None, autojump_clock: trio.testing.MockClock
) -> None:
    """A round that starts from a due timer must still end by yielding to
    trio: otherwise every due timer chains another round in the same trio
    step, and a backlog runs without trio ever polling for I/O."""
    loop = await run_aio(_running_loop)
    due_at = loop.time() + 5
    for _ in range(20):
        loop.call_at(due_at, lambda: None)
    await run_aio(asyncio.sleep, 0)  # queued behind them: they are on the heap now
    autojump_clock.jump(10)
    count = 3 * MAX_CALLBACKS_PER_ROUND
    per_turn = await _callbacks_per_turn(loop, count)
    assert max(per_turn) <= MAX_CALLBACKS_PER_ROUND + 1
    assert sum(per_turn) == count


async def test_a_callback_scheduled_by_a_callback_waits_for_trio(aio_loop: None) -> None:
    """Not only after those queued before it: in a later trio step, after
    trio has had its turn."""
    loop = await run_aio(_running_loop)
    steps = _StepCounter()
    ran: dict[str, int] = {}

    def first() -> None:
        ran["first"] = steps.step
        loop.call_soon(lambda: ran.setdefault("scheduled by first", steps.step))

    trio.lowlevel.add_instrument(steps)
    try:
        loop.call_soon(first)
        loop.call_soon(lambda: ran.setdefault("second", steps.step))
        with trio.fail_after(5):
            while len(ran) < 3:
                await trio.lowlevel.checkpoint()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert ran["first"] == ran["second"] < ran["scheduled by first"]


async def test_a_stop_mid_round_loses_no_callback() -> None:
    """Callbacks queued behind a stop stay queued and run in the drain, in
    order: a round receives each only after the previous one ran."""
    ran: list[int] = []
    async with asyncio_loop():
        loop = await run_aio(_running_loop)
        assert isinstance(loop, seam._BatchingTrioEventLoop)
        for i in range(3):
            loop.call_soon(ran.append, i)
        loop.stop()
        for i in range(3, 6):
            loop.call_soon(ran.append, i)
        with trio.fail_after(5):
            await loop.wait_stopped()
        assert ran == [0, 1, 2]
    assert ran == [0, 1, 2, 3, 4, 5]


async def test_timers_fire_on_trio_clock(
    aio_loop: None, autojump_clock: trio.testing.MockClock
) -> None:
    loop = await run_aio(_running_loop)
    fired: list[float] = []
    loop.call_later(20, lambda: fired.append(trio.current_time()))
    cancelled = loop.call_later(10, lambda: fired.append(-1.0))
    cancelled.cancel()
    start = trio.current_time()
    await run_aio(asyncio.sleep, 30)
    assert trio.current_time() - start == 30
    assert fired == [start + 20]


async def test_cancelled_timers_leave_the_heap(
    aio_loop: None, autojump_clock: trio.testing.MockClock
) -> None:
    loop = await run_aio(_running_loop)
    assert isinstance(loop, seam._BatchingTrioEventLoop)
    fired: list[int] = []
    handles = [loop.call_later(100, fired.append, i) for i in range(1000)]
    await run_aio(asyncio.sleep, 0)  # queued behind them: they are on the heap now
    assert len(loop._timers) == 1000
    for handle in handles[:900]:
        handle.cancel()
    await run_aio(asyncio.sleep, 0)  # the loop's next turn prunes
    assert len(loop._timers) == 100  # what the pruning is for
    await trio.sleep(200)
    # Timers due at the same time run in no particular order (as in asyncio).
    assert sorted(fired) == list(range(900, 1000))


async def _add(a: int, *, b: int) -> int:
    await trio.lowlevel.checkpoint()
    return a + b


async def test_run_trio_returns_the_result(aio_loop: None) -> None:
    async def caller() -> int:
        return await run_trio(_add, 1, b=2)

    assert await run_aio(caller) == 3


async def test_run_trio_raises_the_error_unchanged(aio_loop: None) -> None:
    error = LookupError("no such meeting")

    async def fails() -> None:
        await trio.lowlevel.checkpoint()
        raise error

    async def caller() -> None:
        await run_trio(fails)

    with pytest.raises(LookupError) as raised:
        await run_aio(caller)
    assert raised.value is error


async def test_run_trio_runs_in_the_callers_context(aio_loop: None) -> None:
    async def read() -> str:
        await trio.lowlevel.checkpoint()
        return _request_id.get("unset")

    async def caller() -> str:
        _request_id.set("req-7")
        return await run_trio(read)

    assert await run_aio(caller) == "req-7"


async def test_cancelling_the_caller_cancels_the_trio_task_and_waits_for_it(
    aio_loop: None,
) -> None:
    """The caller sees CancelledError only once the trio task has finished
    its cleanup (``trio_as_aio``'s semantics: a slot released in a handler's
    ``except`` is released before the RPC ends)."""
    started = trio.Event()
    events: list[str] = []

    async def holds() -> None:
        try:
            started.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            events.append("trio task cancelled")
            raise

    async def caller() -> None:
        task = asyncio.ensure_future(run_trio(holds))
        await run_trio(started.wait)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            events.append("caller saw CancelledError")

    with trio.fail_after(5):
        await run_aio(caller)
    assert events == ["trio task cancelled", "caller saw CancelledError"]


async def test_without_the_fast_path_the_stock_loop_still_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(seam, "_batching_supported", lambda loop: False)
    async with asyncio_loop():
        loop = await run_aio(_running_loop)
        assert not isinstance(loop, seam._BatchingTrioEventLoop)

        async def caller() -> int:
            return await run_trio(_add, 2, b=3)

        assert await run_aio(caller) == 5
        assert await _callbacks_per_turn(loop, 5) == [1, 1, 1, 1, 1]
