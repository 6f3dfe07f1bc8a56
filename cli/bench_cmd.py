"""``dt bench ...``: the benchmarks of SPEC §10.

Each benchmark is one subcommand registered by a small function here; the
work itself lives in :mod:`darktower.cli.bench`. ``all`` runs every one of
them with the same options their own commands take (``--join-*``,
``--mixed-*``, ... where a name would clash) and writes ``BENCHMARKS.md``.
Options shared by every benchmark (duration, JSON output) are declared once
in :func:`_common_options`, the load shape (workers, connections) in
:func:`_load_options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from darktower.cli.args import positive_int
from darktower.cli.bench.all import BENCHES, DEFAULT_OUTPUT, AllOptions, redact_argv, run_all
from darktower.cli.bench.assign import AssignOptions, run_assign
from darktower.cli.bench.heartbeats import HeartbeatOptions, run_heartbeats
from darktower.cli.bench.join import JoinOptions, run_join
from darktower.cli.bench.mixed import MixedOptions, run_mixed

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


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _bench_names(text: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = names - set(BENCHES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}"
        )
    return names


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


def _redis_option(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument(
        "--redis-url",
        type=_redis_url,
        default=None,
        help=f"Redis server{what} (default: $REDIS_URL, else an embedded server)",
    )


def _redis_from(args: argparse.Namespace) -> str | None:
    url: str | None = args.redis_url or os.environ.get("REDIS_URL") or None
    return url


def _mixed_options(args: argparse.Namespace, prefix: str = "") -> MixedOptions:
    """The scenario's options from ``dt bench mixed`` (or, ``prefix``
    ``mixed_``, from ``dt bench all``)."""
    given = {
        name.removeprefix(prefix): value
        for name, value in vars(args).items()
        if name.startswith(prefix)
    }
    return MixedOptions(
        duration_s=given["duration"],
        warmup_s=given["warmup"],
        rate=given["rate"],
        first_share=given["first_share"],
        gcs=given["gcs"],
        mcs=given["mcs"],
        meetings=given["meetings"],
        database_url=_database_from(args),
        redis_url=_redis_from(args),
        json_path=None if prefix else args.json,
    )


def _run_mixed(args: argparse.Namespace) -> int:
    return run_mixed(_mixed_options(args))


def _mixed_shape(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The scenario's options (``prefix`` for ``dt bench all``)."""
    flag = "--" + prefix.replace("_", "-")
    parser.add_argument(
        f"{flag}rate", type=positive_int, default=100, metavar="R", help="joins/s offered (100)"
    )
    parser.add_argument(
        f"{flag}first-share",
        type=_share,
        default=0.2,
        metavar="F",
        help="share of the joins that are first joins, the rest re-joins (0.2)",
    )
    parser.add_argument(f"{flag}gcs", type=positive_int, default=2, metavar="N", help="GCs (2)")
    parser.add_argument(f"{flag}mcs", type=positive_int, default=3, metavar="N", help="MCs (3)")
    parser.add_argument(
        f"{flag}meetings",
        type=positive_int,
        default=200,
        metavar="N",
        help="meetings the re-joins cycle over (200)",
    )


def _add_mixed(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "mixed",
        help="the system under a steady mix of first joins and re-joins over 2 GCs (open loop)",
        description=(
            "Start --gcs GCs on one database, --mcs MCs and two simulated MHs (real processes, "
            "real gRPC, Redis fencing); create meetings through both GCs; then send joins "
            "open-loop at --rate for --duration, alternating between the GCs, a --first-share "
            "of them first joins and the rest re-joins. Prints the achieved rate, P50/P95/P99 "
            "from each join's intended send time (all, per kind, per GC), failed joins by "
            "status, the spread of the new assignments over the MCs and the CPU of each group "
            "of processes. Only the bench's own Redis keys are deleted at the end."
        ),
    )
    _database_option(parser)
    _redis_option(parser, " for the MCs")
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="measured seconds (60)",
    )
    parser.add_argument(
        "--warmup", type=_seconds, default=5.0, metavar="S", help="discarded seconds first (5)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON"
    )
    _mixed_shape(parser)
    parser.set_defaults(func=_run_mixed)


def _run_all(args: argparse.Namespace) -> int:
    database_url, redis_url = _database_from(args), _redis_from(args)
    duration, warmup = args.duration, args.warmup
    concurrency: int | None = args.concurrency
    heartbeats = HeartbeatOptions(
        duration_s=duration,
        warmup_s=warmup,
        mcs=args.heartbeat_mcs,
        health_mcs=args.health_mcs,
        health_runs=args.health_runs,
        database_url=database_url,
    )
    assign = AssignOptions(duration_s=duration, warmup_s=warmup, redis_url=redis_url)
    join = JoinOptions(
        rates=args.join_rates,
        duration_s=duration,
        warmup_s=warmup,
        search=not args.no_search,
        max_rate=args.join_max_rate,
        mcs=args.join_mcs,
        meetings=args.join_meetings,
        database_url=database_url,
        redis_url=redis_url,
    )
    if concurrency is not None:
        heartbeats = replace(heartbeats, concurrency=concurrency)
        assign = replace(assign, concurrency=concurrency)
        join = replace(join, concurrency=concurrency)
    mixed = _mixed_options(args, prefix="mixed_")
    return run_all(
        AllOptions(
            heartbeats=heartbeats,
            join=join,
            assign=assign,
            mixed=mixed,
            output=args.output,
            json_path=args.json,
            skip=args.skip,
            command=redact_argv(sys.argv[1:]),
        )
    )


def _add_all(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "all",
        help="every benchmark, then BENCHMARKS.md with the machine, the figures and the targets",
        description=(
            "Run dt bench heartbeats, join, assign and mixed one after the other (each as its "
            "own command runs it), print each report, then write --output: the machine (cores, "
            "memory, CPU, Python, PostgreSQL and Redis versions, load average at the start), "
            "every figure, and each issue's target beside its result (PASS/MISS). With no "
            "PostgreSQL/Redis given, one embedded server of each serves the whole run. Exit 0 "
            "when every benchmark ran (missed targets included), 1 when one could not (the "
            "report is written all the same). On a shared Redis give the run a logical "
            "database of its own (e.g. redis://127.0.0.1:6379/15)."
        ),
    )
    _database_option(parser)
    _redis_option(parser)
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="PATH",
        help=f"the markdown report ({DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write every figure as JSON"
    )
    parser.add_argument(
        "--skip",
        type=_bench_names,
        default=frozenset(),
        metavar="NAME,...",
        help=f"benchmarks not to run ({', '.join(BENCHES)})",
    )
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="measured seconds of each phase of heartbeats, join and assign (10)",
    )
    parser.add_argument(
        "--warmup",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="discarded seconds before each of those phases (2)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="C",
        help="closed-loop workers of heartbeats, assign and the join saturation "
        "(default: each bench's own, 64/64/32)",
    )
    parser.add_argument(
        "--heartbeat-mcs",
        type=positive_int,
        default=1000,
        metavar="N",
        help="heartbeats: MCs (1000)",
    )
    parser.add_argument(
        "--health-mcs",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="heartbeats: fleet of the health-check statement (10000)",
    )
    parser.add_argument(
        "--health-runs",
        type=positive_int,
        default=20,
        metavar="N",
        help="heartbeats: timed runs of the health-check statement (20)",
    )
    parser.add_argument(
        "--join-rates",
        type=_rates,
        default=(50, 100, 200),
        metavar="R,R,...",
        help="join: joins/s measured (50,100,200)",
    )
    parser.add_argument(
        "--no-search",
        action="store_true",
        help="join: do not step the rate up for the highest rate with P99 <= 100 ms",
    )
    parser.add_argument(
        "--join-max-rate",
        type=positive_int,
        default=2000,
        metavar="R",
        help="join: highest rate the search tries (2000)",
    )
    parser.add_argument(
        "--join-mcs", type=positive_int, default=2, metavar="N", help="join: MCs (2)"
    )
    parser.add_argument(
        "--join-meetings",
        type=positive_int,
        default=200,
        metavar="N",
        help="join: meetings the re-joins cycle over (200)",
    )
    parser.add_argument(
        "--mixed-duration",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="mixed: measured seconds (60)",
    )
    parser.add_argument(
        "--mixed-warmup",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="mixed: discarded seconds first (5)",
    )
    _mixed_shape(parser, prefix="mixed_")
    parser.set_defaults(func=_run_all)


def add_parser(subparsers: SubParsers) -> None:
    """Register ``dt bench`` and its benchmarks."""
    bench = subparsers.add_parser("bench", help="benchmarks (SPEC §10)")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_heartbeats(sub)
    _add_assign(sub)
    _add_join(sub)
    _add_mixed(sub)
    _add_all(sub)
