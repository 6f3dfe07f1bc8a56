"""``dt bench all``: every benchmark in one run, and ``BENCHMARKS.md``.

The benches run one after the other, in issue order - ``heartbeats``
(issue 2), ``join`` (3), ``assign`` (4), then the mixed scenario (5) - each
exactly as its own command would run it (its ``measure``, its options), so
the figures of ``dt bench all`` and of ``dt bench <name>`` are the same
measurement. Each prints its usual report as it ends; at the end the report
(:func:`.markdown.render_markdown`, a pure function of the results) is
written to ``--output`` (``BENCHMARKS.md``) and, with ``--json``, every
figure as one JSON document.

With no PostgreSQL or Redis given, one embedded server of each is started
for the whole run (instead of one per bench) and stopped at the end.

A bench that cannot run (a process failing to start, say) does not lose the
others: its section says why, its targets read ``not run``, and the command
exits 1 once the report is written. Ctrl-C (or SIGTERM) stops the bench
running, cleans up and writes nothing, so an interrupted run never replaces
a complete report.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from darktower.cli.args import redacted_url
from darktower.cli.bench import assign, heartbeats, join, mixed
from darktower.cli.bench.assign import AssignOptions
from darktower.cli.bench.heartbeats import HeartbeatOptions
from darktower.cli.bench.join import JoinOptions
from darktower.cli.bench.markdown import BenchOutcome, SuiteReport, render_markdown
from darktower.cli.bench.mixed import MixedOptions
from darktower.cli.bench.procs import BenchError, machine_facts, progress, sigterm_as_interrupt
from darktower.cli.bench.report import Measured, Presentation, write_json
from darktower.shared.devstack import EmbeddedServerError, embedded_postgres, embedded_redis

#: In the order they run.
BENCHES = ("heartbeats", "join", "assign", "mixed")
DEFAULT_OUTPUT = Path("BENCHMARKS.md")


@dataclass(frozen=True, slots=True)
class AllOptions:
    """Each bench's own options, where the report goes, what to skip."""

    heartbeats: HeartbeatOptions = field(default_factory=HeartbeatOptions)
    join: JoinOptions = field(default_factory=JoinOptions)
    assign: AssignOptions = field(default_factory=AssignOptions)
    mixed: MixedOptions = field(default_factory=MixedOptions)
    output: Path = DEFAULT_OUTPUT
    json_path: Path | None = None
    skip: frozenset[str] = frozenset()
    #: The command line, as the report shows it (credentials removed).
    command: str = "dt bench all"


@dataclass(frozen=True, slots=True)
class _Bench:
    """How to run one bench and show its figures."""

    name: str
    measure: Callable[[], Measured]
    presentation: Presentation


def _benches(options: AllOptions) -> list[_Bench]:
    return [
        _Bench(
            "heartbeats",
            lambda: heartbeats.measure(options.heartbeats),
            heartbeats.PRESENTATION,
        ),
        _Bench("join", lambda: join.measure(options.join), join.PRESENTATION),
        _Bench("assign", lambda: assign.measure(options.assign), assign.PRESENTATION),
        _Bench("mixed", lambda: mixed.measure(options.mixed), mixed.PRESENTATION),
    ]


def redact_argv(argv: Sequence[str]) -> str:
    """``dt`` and its arguments as one shell line, any URL's password removed
    (a DSN given on the command line must not end up in a committed file)."""
    shown = []
    for arg in argv:
        prefix, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if "://" in value:
            value = redacted_url(value)
        shown.append(f"{prefix}{sep}{value}")
    return shlex.join(["dt", *shown])


@contextlib.contextmanager
def _shared_servers(options: AllOptions) -> Iterator[AllOptions]:
    """The options with a PostgreSQL and a Redis for every bench: the ones
    given, else one embedded server of each for the whole run."""
    with contextlib.ExitStack() as stack:
        to_run = set(BENCHES) - options.skip
        database_url = options.join.database_url
        if database_url is None and to_run & {"heartbeats", "join", "mixed"}:
            progress("postgres: starting an embedded server for the whole run")
            database_url = stack.enter_context(embedded_postgres())
        redis_url = options.join.redis_url
        if redis_url is None and to_run & {"join", "assign", "mixed"}:
            progress("redis: starting an embedded server for the whole run")
            redis_url = stack.enter_context(embedded_redis())
        yield replace(
            options,
            heartbeats=replace(options.heartbeats, database_url=database_url),
            join=replace(options.join, database_url=database_url, redis_url=redis_url),
            assign=replace(options.assign, redis_url=redis_url),
            mixed=replace(options.mixed, database_url=database_url, redis_url=redis_url),
        )


def _run_one(bench: _Bench) -> BenchOutcome:
    """One bench, its text report printed; an error it could not run past
    becomes the outcome (KeyboardInterrupt goes through)."""
    progress(f"=== dt bench {bench.name} ===")
    unit, backend = bench.presentation.unit, bench.presentation.backend
    started = time.monotonic()
    try:
        measured = bench.measure()
    except (BenchError, EmbeddedServerError, OSError, asyncpg.PostgresError) as exc:
        # OSError and PostgresError: a server given on the command line is
        # unreachable or refuses the bench (the single commands let these
        # through; here the other benches still run).
        seconds = time.monotonic() - started
        progress(f"dt bench {bench.name} could not run: {exc}")
        return BenchOutcome(bench.name, seconds, error=str(exc), unit=unit, backend=backend)
    seconds = time.monotonic() - started
    print(bench.presentation.text(measured), end="\n\n", flush=True)
    return BenchOutcome(bench.name, seconds, measured=measured, unit=unit, backend=backend)


def measure_all(options: AllOptions) -> SuiteReport:
    """Run every bench not skipped (each cleans up after itself)."""
    started_at = datetime.now(UTC)
    started = time.monotonic()
    machine = machine_facts()
    outcomes: list[BenchOutcome] = []
    with _shared_servers(options) as shared:
        for bench in _benches(shared):
            if bench.name in options.skip:
                outcomes.append(
                    BenchOutcome(
                        bench.name,
                        0.0,
                        error="skipped (--skip)",
                        unit=bench.presentation.unit,
                        backend=bench.presentation.backend,
                    )
                )
                continue
            outcomes.append(_run_one(bench))
    return SuiteReport(
        started_at=started_at.strftime("%Y-%m-%d %H:%M UTC"),
        command=options.command,
        machine=machine,
        outcomes=outcomes,
        seconds=time.monotonic() - started,
    )


def figures(report: SuiteReport) -> dict[str, Any]:
    """Every figure of the run as one JSON document."""
    return {
        "started_at": report.started_at,
        "command": report.command,
        "seconds": report.seconds,
        "machine": dict(report.machine),
        "benchmarks": {
            outcome.name: (
                {**outcome.measured.figures, "seconds": outcome.seconds}
                if outcome.measured is not None
                else {"error": outcome.error, "seconds": outcome.seconds}
            )
            for outcome in report.outcomes
        },
    }


def _write(path: Path, text: str) -> None:
    """Replace ``path`` at once (a reader never sees half a report)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def run_all(options: AllOptions) -> int:
    """The ``dt bench all`` handler: 0 when every bench ran (missed targets
    included: it is a measurement), 1 when one could not (the report is
    written all the same), 130 on interrupt (nothing written)."""
    try:
        with sigterm_as_interrupt():
            report = measure_all(options)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped, no report written", file=sys.stderr)
        return 130
    except EmbeddedServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _write(options.output, render_markdown(report))
    print(f"report written to {options.output}")
    if options.json_path is not None:
        write_json(options.json_path, figures(report))
        print(f"figures written to {options.json_path}")
    failed = [o.name for o in report.outcomes if o.measured is None and o.name not in options.skip]
    if failed:
        print(f"could not run: {', '.join(failed)} (see the report)", file=sys.stderr)
        return 1
    return 0
