"""``python -m darktower.gc`` / ``dt-gc``: run one Global Controller."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import trio

from darktower.gc.app import run_gc
from darktower.gc.config import VARIABLES, GcConfig
from darktower.shared.config import ConfigError, environ, fail, first_error, help_text
from darktower.shared.db import DatabaseRefused, DatabaseUnavailable
from darktower.shared.jwks import JwksError
from darktower.shared.logging import configure_logging, get_logger

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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(help_text("dt-gc", list(VARIABLES)))
        return 0
    if args:
        fail(f"unexpected argument {args[0]!r} (configuration is by environment; see --help)")
    try:
        config = GcConfig.from_env(environ())
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
    except* DatabaseUnavailable:
        problem = "error: PostgreSQL (DATABASE_URL) is unreachable"
    except* DatabaseRefused as group:
        problem = f"configuration error: DATABASE_URL: connection refused ({first_error(group)})"
    if problem:
        print(problem, file=sys.stderr)
        return 2 if problem.startswith("configuration") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
