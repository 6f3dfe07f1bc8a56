"""The one place where trio-flavoured and asyncio-flavoured code meet.

grpclib and asyncpg are asyncio libraries; everything else in the services is
trio. trio-asyncio runs an asyncio loop inside the trio run, and crossing
between the two worlds costs about 0.1 ms each way, so the rule is: a hot-path
operation crosses at most once. In practice:

* gRPC handlers (asyncio-flavoured) call repositories (asyncio-flavoured,
  asyncpg) directly: a heartbeat crosses zero times.
* trio-flavoured code (health checkers, HTTP handlers, startup) runs one whole
  asyncio-flavoured operation with :func:`run_aio` - one crossing, however many
  statements the operation issues.
* asyncio-flavoured code that needs a trio resource (coredis, actors) runs one
  whole trio-flavoured operation with :func:`run_trio`.

Nothing outside this module imports trio_asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio_asyncio

from darktower.shared.logging import get_logger

log = get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

__all__ = ["asyncio_loop", "run_aio", "run_trio"]


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
        yield


async def run_aio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Trio-flavoured: await one asyncio-flavoured operation (one crossing).

    Cancellation of the calling trio scope cancels the asyncio task, and an
    exception raised by it propagates unchanged.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    return result


async def run_trio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Asyncio-flavoured: await one trio-flavoured operation (one crossing)."""
    result: T = await trio_asyncio.trio_as_aio(fn)(*args, **kwargs)
    return result
