"""The one place where trio-flavoured and asyncio-flavoured code meet.

grpclib and asyncpg are asyncio libraries; everything else in the services is
trio. trio-asyncio runs an asyncio loop inside the trio run, and crossing
between the two worlds has a cost, so the rule is: a hot-path operation
crosses at most once. In practice:

* gRPC handlers (asyncio-flavoured) call repositories (asyncio-flavoured,
  asyncpg) directly: a heartbeat crosses zero times.
* trio-flavoured code (health checkers, HTTP handlers, startup) runs one whole
  asyncio-flavoured operation with :func:`run_aio` - one crossing, however many
  statements the operation issues.
* asyncio-flavoured code that needs a trio resource (coredis, actors) runs one
  whole trio-flavoured operation with :func:`run_trio`.

Two things here make the asyncio side affordable on trio-asyncio. Measured
under ``dt bench assign``, they took the MC's CPU per accepted assignment
from about 0.95 ms to about 0.5-0.7 ms, and its Redis claims from about 2 to
about 28 per pipeline:

* **One trio round runs every ready asyncio callback**, as asyncio's own loop
  does in one iteration. trio-asyncio's loop runs *one* callback per trip
  through the trio scheduler (each ``call_soon`` costs a scheduler round: a
  cancel scope, a channel receive, an ``epoll`` poll), so a gRPC call, which
  is half a dozen callbacks, cost half a dozen rounds - about 14 µs per
  callback against about 4 µs batched - and, as a side effect, work reached
  the trio side one item per round, which kept group-committing batchers
  (the MC's Redis writes) at one or two items per batch. See
  :class:`_BatchingTrioEventLoop`.
* **:func:`run_trio` starts its trio task directly** instead of queueing it
  through the loop (``trio_as_aio`` costs a callback round plus a second
  round waiting for the task to start): about 25 µs per crossing instead of
  about 60, with the same semantics.

Both reach into trio-asyncio's internals (its loop's callback queue, timer
heap and nursery, and ``AsyncHandle``); :func:`asyncio_loop` checks that they
are what this module expects and otherwise keeps trio-asyncio's stock
behaviour (slower, still correct). ``tests/test_seam.py`` fails if the
installed trio-asyncio no longer gets the fast path.

Nothing outside this module imports trio_asyncio.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library
from trio_asyncio._handles import AsyncHandle

from darktower.shared.logging import get_logger

log = get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

__all__ = ["asyncio_loop", "run_aio", "run_trio"]

#: Most callbacks one trio round runs beyond the first, so that a flood of
#: asyncio work cannot hold trio tasks off for long (asyncio's own loop has
#: no such bound). Far above what a busy MC or GC queues per round.
MAX_CALLBACKS_PER_ROUND = 256
#: Cancelled timers tolerated on the heap before it is pruned (when they are
#: also half of it): each prune is paid for by as many cancellations.
_PRUNE_MIN_CANCELLED = 100


class _BatchingTrioEventLoop(trio_asyncio.TrioEventLoop):  # type: ignore[misc]
    """trio-asyncio's loop, running in one trio round every callback that is
    ready when the round begins - asyncio's own rule for a loop iteration: a
    callback scheduled by one of them waits for the next round, after trio
    has polled for I/O and run its tasks.

    Only ``_main_loop_one`` (one trip of the loop's task through the trio
    scheduler) changes. It does what trio-asyncio's does - take a due timer,
    else wait for a queued callback (bounded by the next timer), and run it:
    a timer handle goes onto the timer heap, an ``AsyncHandle`` starts its
    trio task and the round waits until it has started, a cancelled handle is
    skipped, any other runs with sniffio saying "asyncio" - and then does the
    same for the callbacks that were already queued behind the first one, in
    order, ending the round early only after starting a trio task (as the
    stock loop does after each). The stop request (a callback raising
    ``TrioAsyncioExit``) propagates from wherever it runs, as before.

    Cancelled timers are also dropped from the timer heap once they are half
    of it, as asyncio's loop does (trio-asyncio keeps each until it would
    have fired): every gRPC call leaves two (its deadline and the request
    read timeout), each holding its task and frames for seconds.
    """

    #: Timer handles cancelled since the heap was last pruned - an upper
    #: bound: Python calls the hook for every cancel, also of timers still
    #: queued or already fired, so pruning is at worst early, never late (a
    #: class default, so that a stock loop turned into this class needs no
    #: set-up).
    _cancelled_timers = 0

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        self._cancelled_timers += 1

    async def _main_loop_one(self, no_wait: bool = False) -> None:
        timers: list[asyncio.TimerHandle] = self._timers
        receive: trio.MemoryReceiveChannel[asyncio.Handle] = self._q_recv
        if self._cancelled_timers > _PRUNE_MIN_CANCELLED and 2 * self._cancelled_timers > len(
            timers
        ):
            timers[:] = [timer for timer in timers if not timer.cancelled()]
            heapq.heapify(timers)
            self._cancelled_timers = 0
        handle: asyncio.Handle | None = None
        queued = False
        timeout = math.inf
        if timers:
            timeout = timers[0].when() - self.time()
            if timeout <= 0:
                handle = heapq.heappop(timers)
        if handle is not None and not no_wait:
            # A round that starts from a due timer does not wait on the queue,
            # so it would not yield to trio at all: yield first, or due timers
            # would chain rounds onto the previous one (and the bound per
            # round would not hold) without trio ever polling for I/O.
            await trio.lowlevel.cancel_shielded_checkpoint()
            await self._run_round(handle, queued=False)
            return
        if handle is None:
            queued = True
            if no_wait:
                handle = receive.receive_nowait()  # WouldBlock ends the shutdown drain
            else:
                with trio.move_on_after(timeout):
                    handle = await receive.receive()
                if handle is None:
                    return  # a timer is due: the next round runs it
        await self._run_round(handle, queued=queued)

    async def _run_round(self, handle: asyncio.Handle, *, queued: bool) -> None:
        """Run ``handle`` and then the callbacks queued when it began (at
        most :data:`MAX_CALLBACKS_PER_ROUND` of them), each received only
        after the previous one has run, so a stop or an exception leaves the
        rest in the queue."""
        timers: list[asyncio.TimerHandle] = self._timers
        receive: trio.MemoryReceiveChannel[asyncio.Handle] = self._q_recv
        ready = min(receive.statistics().current_buffer_used, MAX_CALLBACKS_PER_ROUND)
        while True:
            if queued and isinstance(handle, asyncio.TimerHandle):
                if not handle.cancelled():
                    heapq.heappush(timers, handle)
            elif isinstance(handle, AsyncHandle):
                handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
                await handle._started.wait()
                return
            elif not handle._cancelled:
                previous, sniffio_library.name = sniffio_library.name, "asyncio"
                try:
                    handle._run()
                finally:
                    sniffio_library.name = previous
            if ready == 0:
                return
            ready -= 1
            try:
                handle = receive.receive_nowait()
            except trio.WouldBlock:
                return
            queued = True


def _batching_supported(loop: object) -> bool:
    """Whether ``loop`` is trio-asyncio's stock loop with the internals
    :class:`_BatchingTrioEventLoop` and :func:`run_trio` rely on."""
    return (
        type(loop) is trio_asyncio.TrioEventLoop
        and isinstance(getattr(loop, "_q_recv", None), trio.MemoryReceiveChannel)
        and isinstance(getattr(loop, "_timers", None), list)
        and isinstance(getattr(loop, "_nursery", None), trio.Nursery)
        and callable(getattr(loop, "_main_loop_one", None))
        and all(hasattr(AsyncHandle, name) for name in ("_run", "_started", "_context"))
    )


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log what the asyncio loop reports, and nothing more.

    trio-asyncio's default handler re-raises these reports into the trio
    nursery - which would let one malformed HTTP/2 frame (an exception inside
    a grpclib protocol callback) take the whole service down. Only the type
    and the loop's message are logged: the context may hold request data.
    """
    exc = context.get("exception")
    log.error(
        "asyncio_loop_error",
        message=str(context.get("message", "")),
        error=type(exc).__name__ if exc is not None else "",
    )


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Trio-flavoured: run an asyncio loop for the duration of the block.

    Everything asyncio-flavoured (grpclib servers and channels, asyncpg pools)
    must be created and closed inside this block; it is the outermost resource
    of a service, the way hypercorn nests its resources.
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_loop_error)
        if _batching_supported(loop):
            # The running main loop looks ``_main_loop_one`` up on every
            # turn, so it takes the batching one from its next turn on; the
            # subclass adds no state, so the object is valid as either class.
            loop.__class__ = _BatchingTrioEventLoop
        else:
            log.warning("asyncio_loop_batching_unavailable", trio_asyncio=trio_asyncio.__version__)
        yield


async def run_aio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Trio-flavoured: await one asyncio-flavoured operation (one crossing).

    Cancellation of the calling trio scope cancels the asyncio task, and an
    exception raised by it propagates unchanged.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    return result


async def run_trio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Asyncio-flavoured: await one trio-flavoured operation (one crossing).

    The operation runs as a trio task in the loop's own nursery (the one
    ``trio_as_aio`` uses), started at once. Semantics are ``trio_as_aio``'s:
    its result or exception is this call's; cancelling the awaiting asyncio
    task cancels the trio task, and the caller sees ``CancelledError`` only
    once the trio task has finished (its cleanup has run).
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, _BatchingTrioEventLoop) or loop._nursery is None:
        result: T = await trio_asyncio.trio_as_aio(fn)(*args, **kwargs)
        return result
    call = functools.partial(fn, **kwargs) if kwargs else fn
    future: asyncio.Future[T] = loop.create_future()
    # What trio-asyncio's ``trio_as_future`` queues for its main loop,
    # started here instead: no queue round, no wait for the start.
    handle = AsyncHandle(call, args, loop, result_future=future)
    loop._nursery.start_soon(handle._run, name=fn)
    return await future
