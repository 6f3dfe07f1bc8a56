"""``python -m darktower.gc`` / ``dt-gc``: run one Global Controller."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import trio

from darktower.gc.app import run_gc
from darktower.gc.config import VARIABLES, GcConfig
from darktower.shared.db import DatabaseRefused, DatabaseUnavailable
from darktower.shared.logging import get_logger
from darktower.shared.service_main import Problem, service_main

log = get_logger("darktower.gc")


async def serve_until_signalled(config: GcConfig) -> None:
    """Run the GC; SIGTERM/SIGINT cancel it, which drains gRPC and closes the
    pool within bounded time (exit status 0)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            # Watch signals before starting: SIGTERM during start-up (e.g.
            # while waiting for PostgreSQL) must stop the GC just the same.
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            await nursery.start(run_gc, config)
    log.info("gc_stopped")


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("gc_stopping", signal=signal.Signals(signum).name)
        scope.cancel()
        return


def _explain(exc: BaseException) -> Problem | None:
    if isinstance(exc, DatabaseUnavailable):
        return Problem.runtime("PostgreSQL (DATABASE_URL) is unreachable")
    if isinstance(exc, DatabaseRefused):
        return Problem.config(f"DATABASE_URL: connection refused ({exc})")
    return None


def main(argv: list[str] | None = None) -> int:
    return service_main(
        "dt-gc",
        VARIABLES,
        GcConfig.from_env,
        lambda config: config.log_level,
        serve_until_signalled,
        _explain,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
