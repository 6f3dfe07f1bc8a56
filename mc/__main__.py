"""``python -m darktower.mc`` / ``dt-mc``: run one Meeting Controller."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import trio

from darktower.mc.app import run_mc
from darktower.mc.config import VARIABLES, McConfig
from darktower.mc.repositories.meeting_state import RedisUnavailable
from darktower.shared.logging import get_logger
from darktower.shared.service_main import Problem, service_main

log = get_logger("darktower.mc")


async def serve_until_signalled(config: McConfig) -> None:
    """Run the MC. The first SIGTERM/SIGINT starts the drain (bounded by
    MC_DRAIN_TIMEOUT_S); a second one cancels at once. Exit status 0."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, signals, stop, nursery.cancel_scope)
            await run_mc(config, stop=stop)
            nursery.cancel_scope.cancel()
    log.info("mc_stopped")


async def _on_signals(
    signals: AsyncIterator[int], stop: trio.Event, scope: trio.CancelScope
) -> None:
    async for signum in signals:
        log.info("mc_stopping", signal=signal.Signals(signum).name, draining=not stop.is_set())
        if stop.is_set():
            scope.cancel()
            return
        stop.set()


def _explain(exc: BaseException) -> Problem | None:
    if isinstance(exc, RedisUnavailable):
        return Problem.runtime("Redis (REDIS_URL) is unreachable")
    return None


def main(argv: list[str] | None = None) -> int:
    return service_main(
        "dt-mc",
        VARIABLES,
        McConfig.from_env,
        lambda config: config.log_level,
        serve_until_signalled,
        _explain,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
