"""``python -m darktower.mc`` / ``dt-mc``: run one Meeting Controller."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import trio

from darktower.mc.app import run_mc
from darktower.mc.config import VARIABLES, McConfig
from darktower.mc.repositories.meeting_state import RedisUnavailable
from darktower.shared.config import ConfigError, environ, fail, first_error, help_text
from darktower.shared.jwks import JwksError
from darktower.shared.logging import configure_logging, get_logger

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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(help_text("dt-mc", list(VARIABLES)))
        return 0
    if args:
        fail(f"unexpected argument {args[0]!r} (configuration is by environment; see --help)")
    try:
        config = McConfig.from_env(environ())
    except ConfigError as exc:
        fail(str(exc))
    configure_logging(config.log_level)
    problem = ""
    try:
        trio.run(serve_until_signalled, config)
    except* JwksError as group:
        problem = f"configuration error: AUTH_JWKS: {first_error(group)}"
    except* ConfigError as group:
        problem = f"configuration error: {first_error(group)}"
    except* RedisUnavailable:
        problem = "error: Redis (REDIS_URL) is unreachable"
    if problem:
        print(problem, file=sys.stderr)
        return 2 if problem.startswith("configuration") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
