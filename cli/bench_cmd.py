"""``dt bench ...``: the benchmarks of SPEC §10.

Each benchmark is one subcommand registered by a small function here, so
adding ``all`` is one more ``_add_*`` call; the work itself
lives in :mod:`darktower.cli.bench`. Options shared by every benchmark
(duration, JSON output) are declared once in :func:`_common_options`, the
load shape (workers, connections) in :func:`_load_options`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from darktower.cli.args import positive_int
from darktower.cli.bench.assign import AssignOptions, run_assign
from darktower.cli.bench.heartbeats import HeartbeatOptions, run_heartbeats
from darktower.cli.bench.join import JoinOptions, run_join

if TYPE_CHECKING:  # subscriptable for type checkers only
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _database_url(text: str) -> str:
    if not text.startswith(("postgres://", "postgresql://")):
        raise argparse.ArgumentTypeError("must be a postgresql:// URL")
    return text


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError("must be a redis://, rediss:// or unix:// URL")
    return text


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _step(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 < value <= 10:
        raise argparse.ArgumentTypeError("must be above 1 and at most 10")
    return value


def _database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        type=_database_url,
        default=None,
        help="PostgreSQL server DSN; the bench creates and drops its own database there "
        "(default: $DATABASE_URL, else an embedded server)",
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="measured seconds (10)",
    )
    parser.add_argument(
        "--warmup", type=_seconds, default=2.0, metavar="S", help="discarded seconds first (2)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON"
    )


def _database_from(args: argparse.Namespace) -> str | None:
    url: str | None = args.database_url or os.environ.get("DATABASE_URL") or None
    return url


def _run_heartbeats(args: argparse.Namespace) -> int:
    return run_heartbeats(
        HeartbeatOptions(
            duration_s=args.duration,
            warmup_s=args.warmup,
            concurrency=args.concurrency,
            channels=args.channels,
            mcs=args.mcs,
            database_url=_database_from(args),
            json_path=args.json,
            pool_size=args.pool_size,
            trio_floor=not args.no_trio_floor,
            health_mcs=args.health_mcs,
            health_runs=args.health_runs,
        )
    )


def _load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency", type=positive_int, default=64, metavar="C", help="workers (64)"
    )
    parser.add_argument(
        "--channels", type=positive_int, default=4, metavar="K", help="HTTP/2 connections (4)"
    )


def _add_heartbeats(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "heartbeats",
        help="one GC process's FastHeartbeat throughput and latency, against the floor",
        description=(
            "Start a GC, register --mcs MCs through it, drive FastHeartbeat closed-loop from a "
            "separate load-generator process over real gRPC, then do the same against the floor "
            "(a bare grpclib server running the same UPDATE through asyncpg), and time the "
            "health checker's statement over --health-mcs MCs. Prints heartbeats/s, "
            "P50/P95/P99, the GC/floor ratio and the targets; exit 0 even when a target is "
            "missed."
        ),
    )
    _database_option(parser)
    _common_options(parser)
    _load_options(parser)
    parser.add_argument(
        "--mcs", type=positive_int, default=1000, metavar="N", help="registered MCs (1000)"
    )
    parser.add_argument(
        "--pool-size",
        type=positive_int,
        default=10,
        metavar="N",
        help="PostgreSQL pool of the GC and the floor (10, the GC's default)",
    )
    parser.add_argument(
        "--health-mcs",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="fleet size for the health-check statement (10000)",
    )
    parser.add_argument(
        "--health-runs",
        type=positive_int,
        default=20,
        metavar="N",
        help="timed runs of the health-check statement (20)",
    )
    parser.add_argument(
        "--no-trio-floor",
        action="store_true",
        help="skip the second floor (the bare server under trio-asyncio)",
    )
    parser.set_defaults(func=_run_heartbeats)


def _run_assign(args: argparse.Namespace) -> int:
    return run_assign(
        AssignOptions(
            duration_s=args.duration,
            warmup_s=args.warmup,
            concurrency=args.concurrency,
            channels=args.channels,
            redis_url=args.redis_url or os.environ.get("REDIS_URL") or None,
            json_path=args.json,
        )
    )


def _add_assign(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "assign",
        help="one MC process's AssignMeetingWithMh accept throughput, against the floor",
        description=(
            "Start an MC (no GC: assignments do not need one), drive AssignMeetingWithMh "
            "closed-loop from a separate load-generator process over real gRPC (GC service "
            "token, a new meeting with two MH assignments per call, fenced Redis claim), then "
            "do the same against the floor (a bare grpclib server running the MC's fencing "
            "script with one coredis EVALSHA). Prints accepts/s, P50/P95/P99, the MC/floor "
            "ratio and the targets; exit 0 even when a target is missed. The MC writes its "
            "keys unprefixed: on a shared Redis give the bench its own logical database "
            "(e.g. redis://127.0.0.1:6379/15). Only the bench's own keys are deleted at the "
            "end; nothing is flushed."
        ),
    )
    parser.add_argument(
        "--redis-url",
        type=_redis_url,
        default=None,
        help="Redis server (default: $REDIS_URL, else an embedded server)",
    )
    _common_options(parser)
    _load_options(parser)
    parser.set_defaults(func=_run_assign)


def _run_join(args: argparse.Namespace) -> int:
    return run_join(
        JoinOptions(
            rates=args.rates,
            duration_s=args.duration,
            warmup_s=args.warmup,
            search=not args.no_search,
            step=args.step,
            max_rate=args.max_rate,
            concurrency=args.concurrency,
            mcs=args.mcs,
            meetings=args.meetings,
            max_connections=args.max_connections,
            database_url=_database_from(args),
            redis_url=args.redis_url or os.environ.get("REDIS_URL") or None,
            json_path=args.json,
        )
    )


def _add_join(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "join",
        help="one GC process's join latency at fixed rates (open loop), against the floor",
        description=(
            "Start a GC, simulated MHs and --mcs MCs (real processes, real gRPC, Redis "
            "fencing); drive re-joins (existing assignment, --meetings meetings) and first "
            "joins (new assignment, fresh meetings created through the API) open-loop at each "
            "rate from a separate load-generator process, latency measured from each join's "
            "intended send time; step the rate up by --step until P99 exceeds 100 ms; saturate "
            "re-joins closed-loop; then do the same against the floor (the same HTTP stack, "
            "hypercorn on trio + Starlette, answering a constant join response). Prints "
            "P50/P95/P99 per "
            "rate, the highest rate with P99 <= 100 ms, the re-join/floor throughput ratio and "
            "the targets; exit 0 even when a target is missed. Only the bench's own Redis keys "
            "are deleted at the end; nothing is flushed."
        ),
    )
    _database_option(parser)
    parser.add_argument(
        "--redis-url",
        type=_redis_url,
        default=None,
        help="Redis server for the MCs (default: $REDIS_URL, else an embedded server)",
    )
    _common_options(parser)
    parser.add_argument(
        "--rates",
        type=_rates,
        default=(50, 100, 200),
        metavar="R,R,...",
        help="joins/s measured for first joins and re-joins, and for the floor (50,100,200)",
    )
    parser.add_argument(
        "--no-search",
        action="store_true",
        help="do not step the rate up beyond --rates for the highest rate with P99 <= 100 ms",
    )
    parser.add_argument(
        "--step", type=_step, default=1.25, metavar="F", help="search: next rate = rate x F (1.25)"
    )
    parser.add_argument(
        "--max-rate",
        type=positive_int,
        default=2000,
        metavar="R",
        help="search: highest rate tried (2000)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=32,
        metavar="C",
        help="connections of the saturation runs (32)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=256,
        metavar="N",
        help="open loop: most connections at once; later joins wait (and are charged) (256)",
    )
    parser.add_argument(
        "--meetings",
        type=positive_int,
        default=200,
        metavar="N",
        help="meetings the re-joins cycle over (created and joined once first) (200)",
    )
    parser.add_argument("--mcs", type=positive_int, default=2, metavar="N", help="MCs (2)")
    parser.set_defaults(func=_run_join)


def add_parser(subparsers: SubParsers) -> None:
    """Register ``dt bench`` and its benchmarks."""
    bench = subparsers.add_parser("bench", help="benchmarks (SPEC §10)")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_heartbeats(sub)
    _add_assign(sub)
    _add_join(sub)
