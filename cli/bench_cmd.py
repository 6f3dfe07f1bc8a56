"""``dt bench ...``: the benchmarks of SPEC §10.

Each benchmark is one subcommand registered by a small function here; the
work itself lives in :mod:`darktower.cli.bench`. ``all`` runs every one of
them with the same options their own commands take (``--join-*``,
``--mixed-*``, ... where a name would clash) and writes ``BENCHMARKS.md``.
Every option group is declared once, by one helper: the timing
(:func:`_timing_options`), JSON output, the stores, the load shape
(:func:`_load_options`) and each benchmark's own shape
(:func:`_heartbeat_shape`, :func:`_join_shape`, :func:`_mixed_shape`). The
helpers take a ``prefix`` (``join_``) so that ``all`` declares the same
options under its own names, and :func:`_given` reads them back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darktower.cli.args import positive_int
from darktower.cli.bench.all import BENCHES, DEFAULT_OUTPUT, AllOptions, redact_argv, run_all
from darktower.cli.bench.assign import AssignOptions, run_assign
from darktower.cli.bench.heartbeats import HeartbeatOptions, run_heartbeats
from darktower.cli.bench.join import JoinOptions, run_join
from darktower.cli.bench.mixed import MixedOptions, run_mixed

if TYPE_CHECKING:  # subscriptable for type checkers only
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _seconds(text: str) -> float:
    value = _number(text)
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
    value = _number(text)
    if not 1 < value <= 10:
        raise argparse.ArgumentTypeError("must be above 1 and at most 10")
    return value


def _share(text: str) -> float:
    value = _number(text)
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


# --------------------------------------------------------------------------
# Option groups: each declared once, for a benchmark's own command and (with
# a prefix and a label) for ``dt bench all``.


def _flag(prefix: str, name: str) -> str:
    """``--<prefix><name>`` with ``prefix`` given as a dest (``join_``)."""
    return "--" + (prefix + name).replace("_", "-")


def _label(prefix: str) -> str:
    """The help text's prefix under ``dt bench all``: ``join: ``."""
    return prefix.removesuffix("_").replace("_", " ") + ": " if prefix else ""


def _value(
    parser: argparse.ArgumentParser,
    prefix: str,
    name: str,
    parse: Callable[[str], Any],
    default: object,
    metavar: str,
    help: str,
    *,
    shown: str | None = None,
) -> None:
    """Option ``--<prefix><name>`` taking one value; its help is ``help``
    under the group's label, with the default (or ``shown``) after it."""
    if shown is None:
        shown = f"{default:g}" if isinstance(default, float) else str(default)
    parser.add_argument(
        _flag(prefix, name),
        type=parse,
        default=default,
        metavar=metavar,
        help=f"{_label(prefix)}{help} ({shown})",
    )


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """``args`` with ``prefix`` taken off its names (``join_rates`` → ``rates``)."""
    return {
        name.removeprefix(prefix): value
        for name, value in vars(args).items()
        if name.startswith(prefix)
    }


def _database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        type=_database_url,
        default=None,
        help="PostgreSQL server DSN; the bench creates and drops its own database there "
        "(default: $DATABASE_URL, else an embedded server)",
    )


def _redis_option(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument(
        "--redis-url",
        type=_redis_url,
        default=None,
        help=f"Redis server{what} (default: $REDIS_URL, else an embedded server)",
    )


def _database_from(args: argparse.Namespace) -> str | None:
    url: str | None = args.database_url or os.environ.get("DATABASE_URL") or None
    return url


def _redis_from(args: argparse.Namespace) -> str | None:
    url: str | None = args.redis_url or os.environ.get("REDIS_URL") or None
    return url


def _timing_options(
    parser: argparse.ArgumentParser,
    *,
    duration: float = 10.0,
    warmup: float = 2.0,
    prefix: str = "",
    phases: str = "",
) -> None:
    """``--duration`` and ``--warmup``; ``phases`` names what they apply
    to, each, when that is several benchmarks."""
    measured = f"measured seconds{f' of each phase of {phases}' if phases else ''}"
    discarded = f"discarded seconds {'before each phase' if phases else 'first'}"
    _value(parser, prefix, "duration", _positive_seconds, duration, "S", measured)
    _value(parser, prefix, "warmup", _seconds, warmup, "S", discarded)


def _json_option(parser: argparse.ArgumentParser, what: str = "the figures") -> None:
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help=f"also write {what} as JSON"
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    """What every single benchmark takes: its timing and JSON output."""
    _timing_options(parser)
    _json_option(parser)


def _load_options(parser: argparse.ArgumentParser) -> None:
    _value(parser, "", "concurrency", positive_int, 64, "C", "workers")
    _value(parser, "", "channels", positive_int, 4, "K", "HTTP/2 connections")


# -- heartbeats ---------------------------------------------------------------


def _heartbeat_shape(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The fleets of ``dt bench heartbeats`` (``prefix`` ``heartbeat_`` for
    ``dt bench all``; only ``--mcs`` takes it, the ``--health-*`` names are
    already the bench's own)."""
    _value(parser, prefix, "mcs", positive_int, 1000, "N", "registered MCs")
    label = _label(prefix)
    fleet, runs = "fleet size for the health-check statement", "timed runs of that statement"
    _value(parser, "", "health_mcs", positive_int, 10_000, "N", label + fleet)
    _value(parser, "", "health_runs", positive_int, 20, "N", label + runs)


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
    _heartbeat_shape(parser)
    pool = "PostgreSQL pool of the GC and the floor"
    _value(parser, "", "pool_size", positive_int, 10, "N", pool, shown="10, the GC's default")
    parser.add_argument(
        "--no-trio-floor",
        action="store_true",
        help="skip the second floor (the bare server under trio-asyncio)",
    )
    parser.set_defaults(func=_run_heartbeats)


# -- assign -------------------------------------------------------------------


def _run_assign(args: argparse.Namespace) -> int:
    return run_assign(
        AssignOptions(
            duration_s=args.duration,
            warmup_s=args.warmup,
            concurrency=args.concurrency,
            channels=args.channels,
            redis_url=_redis_from(args),
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
    _redis_option(parser)
    _common_options(parser)
    _load_options(parser)
    parser.set_defaults(func=_run_assign)


# -- join ---------------------------------------------------------------------


def _join_shape(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The rates and fleet of ``dt bench join`` (``prefix`` ``join_`` for
    ``dt bench all``; ``--no-search`` keeps its name there)."""
    label = _label(prefix)
    rates = "joins/s measured for first joins and re-joins, and for the floor"
    _value(parser, prefix, "rates", _rates, (50, 100, 200), "R,R,...", rates, shown="50,100,200")
    parser.add_argument(
        "--no-search",
        action="store_true",
        help=f"{label}do not step the rate up beyond {_flag(prefix, 'rates')} for the highest "
        "rate with P99 <= 100 ms",
    )
    _value(parser, prefix, "max_rate", positive_int, 2000, "R", "highest rate the search tries")
    pool = "meetings the re-joins cycle over (created and joined once first)"
    _value(parser, prefix, "meetings", positive_int, 200, "N", pool)
    _value(parser, prefix, "mcs", positive_int, 2, "N", "MCs")


def _join_options(args: argparse.Namespace, prefix: str = "") -> JoinOptions:
    """What :func:`_join_shape` and the shared options declared (``prefix``
    ``join_`` from ``dt bench all``)."""
    given = _given(args, prefix)
    return JoinOptions(
        rates=given["rates"],
        duration_s=args.duration,
        warmup_s=args.warmup,
        search=not args.no_search,
        max_rate=given["max_rate"],
        mcs=given["mcs"],
        meetings=given["meetings"],
        database_url=_database_from(args),
        redis_url=_redis_from(args),
    )


def _run_join(args: argparse.Namespace) -> int:
    return run_join(
        replace(
            _join_options(args),
            step=args.step,
            concurrency=args.concurrency,
            max_connections=args.max_connections,
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
    _redis_option(parser, " for the MCs")
    _common_options(parser)
    _join_shape(parser)
    _value(parser, "", "step", _step, 1.25, "F", "search: next rate = rate x F")
    _value(parser, "", "concurrency", positive_int, 32, "C", "connections of the saturation runs")
    most = "open loop: most connections at once; later joins wait (and are charged)"
    _value(parser, "", "max_connections", positive_int, 256, "N", most)
    parser.set_defaults(func=_run_join)


# -- mixed --------------------------------------------------------------------


def _mixed_options(args: argparse.Namespace, prefix: str = "") -> MixedOptions:
    """The scenario's options from ``dt bench mixed`` (or, ``prefix``
    ``mixed_``, from ``dt bench all``)."""
    given = _given(args, prefix)
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
    """The scenario's timing, rate and fleet (``prefix`` ``mixed_`` for
    ``dt bench all``)."""
    _timing_options(parser, duration=60.0, warmup=5.0, prefix=prefix)
    _value(parser, prefix, "rate", positive_int, 100, "R", "joins/s offered")
    share = "share of the joins that are first joins, the rest re-joins"
    _value(parser, prefix, "first_share", _share, 0.2, "F", share)
    _value(parser, prefix, "gcs", positive_int, 2, "N", "GCs")
    _value(parser, prefix, "mcs", positive_int, 3, "N", "MCs")
    _value(parser, prefix, "meetings", positive_int, 200, "N", "meetings the re-joins cycle over")


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
    _json_option(parser)
    _mixed_shape(parser)
    parser.set_defaults(func=_run_mixed)


# -- all ----------------------------------------------------------------------


def _run_all(args: argparse.Namespace) -> int:
    database_url = _database_from(args)
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
    assign = AssignOptions(duration_s=duration, warmup_s=warmup, redis_url=_redis_from(args))
    join = _join_options(args, prefix="join_")
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
    _json_option(parser, "every figure")
    parser.add_argument(
        "--skip",
        type=_bench_names,
        default=frozenset(),
        metavar="NAME,...",
        help=f"benchmarks not to run ({', '.join(BENCHES)})",
    )
    _timing_options(parser, phases="heartbeats, join and assign")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="C",
        help="closed-loop workers of heartbeats, assign and the join saturation "
        "(default: each bench's own, 64/64/32)",
    )
    _heartbeat_shape(parser, prefix="heartbeat_")
    _join_shape(parser, prefix="join_")
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
