"""``dt bench mixed``: the whole join path under a steady, mixed load.

Where ``dt bench join`` isolates one GC, this scenario runs the system the
way it is deployed, in one process tree on loopback (the join bench's stack,
:func:`.join.running_stack`):

1. ``--gcs`` (2) GC processes on one fresh bench database, ``--mcs`` (3) MC
   processes registered with the GCs in turn (Redis fencing), and two
   simulated MHs (``dt mh-sim``, :mod:`darktower.cli.mh_sim`);
2. before the load, through the API of both GCs: ``--meetings`` meetings
   created and joined once (the re-joins' meetings), and one fresh meeting
   for each first join the run will send;
3. **the load**: one load-generator process sends joins open-loop at
   ``--rate`` joins/s for ``--duration`` (60 s) after ``--warmup``. Requests
   alternate between the GCs; a share ``--first-share`` of them are first
   joins (the GC picks MHs and an MC, calls it over gRPC, records the
   assignment), the rest re-joins (the assignment is found), interleaved
   evenly (:func:`.join_loadgen.mixed_schedule`). Latency is measured from
   each join's intended send time, so a server that falls behind is charged
   for it;
4. reported: the achieved rate beside the offered one, P50/P95/P99 (all
   joins, per kind, per GC), failed joins by status, how the assignments
   recorded during the load spread over the MCs (and which GC recorded
   them), and the CPU of each group of processes over the measured window;
5. cleanup as the join bench: every process stopped, the meetings' Redis
   keys deleted, the database dropped.

The stack's settings are the join bench's (meetings never end during the
run; heartbeats every second). No issue sets a target for this scenario;
the figures show whether the pieces hold together under a realistic mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from darktower.cli.bench import database
from darktower.cli.bench.join import _LIBRARIES as _JOIN_LIBRARIES
from darktower.cli.bench.join import (
    JoinOptions,
    JoinRun,
    Measurement,
    Server,
    Stack,
    create_meetings,
    gc_id,
    prepared_run,
    run_job,
    running_stack,
)
from darktower.cli.bench.join_loadgen import FIRST_JOIN, RE_JOIN, mixed_first_joins
from darktower.cli.bench.procs import (
    BenchError,
    Child,
    GroupSample,
    group_sample,
    group_usage,
    library_versions,
    machine_facts,
    pids_cpu,
    postgres_cpu,
    progress,
)
from darktower.cli.bench.report import Presentation, SystemRow, run_and_report

KIND_LABELS = {FIRST_JOIN: "first joins", RE_JOIN: "re-joins"}
#: The CPU groups of the measured window, in the order the report shows them.
CPU_GROUPS = {
    "gc": "GCs",
    "mc": "MCs",
    "mh": "simulated MHs",
    "loadgen": "load generator",
    "postgres": "PostgreSQL",
    "redis": "Redis",
}


@dataclass(frozen=True, slots=True)
class MixedOptions:
    """Everything ``dt bench mixed`` can be told (defaults = the issue's)."""

    duration_s: float = 60.0
    warmup_s: float = 5.0
    rate: int = 100
    first_share: float = 0.2
    gcs: int = 2
    mcs: int = 3
    meetings: int = 200
    max_connections: int = 256
    database_url: str | None = None
    redis_url: str | None = None
    json_path: Path | None = None
    request_timeout_s: float = 5.0

    def join_options(self) -> JoinOptions:
        """The stack's settings, in the join bench's terms."""
        return JoinOptions(
            mcs=self.mcs,
            meetings=self.meetings,
            max_connections=self.max_connections,
            database_url=self.database_url,
            redis_url=self.redis_url,
            request_timeout_s=self.request_timeout_s,
        )


# --------------------------------------------------------------------------
# Pure rules (unit-tested)


def spread(counts: dict[str, int]) -> float | None:
    """Most over fewest assignments per MC (1.0 = perfectly even); None when
    an MC got none or there is nothing to compare."""
    values = list(counts.values())
    if len(values) < 2 or min(values) <= 0:
        return None
    return max(values) / min(values)


def split(count: int, parts: int) -> list[int]:
    """``count`` as ``parts`` near-equal whole numbers (the larger first)."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------
# The run


def _create_over(run: JoinRun, gcs: list[Server], count: int, *, join: bool) -> list[str]:
    """``count`` meetings created through the GCs in turn (each a share)."""
    codes: list[str] = []
    for server, share in zip(gcs, split(count, len(gcs)), strict=True):
        if share:
            codes += create_meetings(run, server, share, join=join)
    return codes


def _cpu_groups(run: JoinRun, stack: Stack) -> dict[str, Callable[[], float]]:
    return {
        "gc": pids_cpu(server.child.proc.pid for server in stack.gcs),
        "mc": pids_cpu(mc.proc.pid for mc in stack.mcs),
        "mh": pids_cpu([stack.mhs.proc.pid]),
        "postgres": postgres_cpu,
        # 0 when the server is not on this machine (or not visible from here).
        "redis": pids_cpu([run.redis_pid] if run.redis_pid is not None else []),
    }


def _load(
    run: JoinRun, stack: Stack, options: MixedOptions, pool: list[str], first_codes: list[str]
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """The measured run: one open-loop generator over every GC."""
    gcs = stack.gcs
    config = replace(
        run.job_config("mixed", gcs[0].port),
        also_ports=[server.port for server in gcs[1:]],
        codes=pool,
        first_codes=first_codes,
        first_share=options.first_share,
        rate=float(options.rate),
        warmup_s=options.warmup_s,
        duration_s=options.duration_s,
    )
    groups = _cpu_groups(run, stack)
    samples: dict[str, GroupSample] = {}

    def on_window(event: str, generator: Child) -> None:
        samples[event] = group_sample({**groups, "loadgen": pids_cpu([generator.proc.pid])})

    progress(
        f"mixed load: {options.rate}/s over {len(gcs)} GCs for {options.warmup_s:g} + "
        f"{options.duration_s:g} s ({options.first_share:.0%} first joins)"
    )
    budget = options.warmup_s + options.duration_s + options.request_timeout_s
    result, _ = run_job(run, "mixed", config, budget, on_window=on_window)
    for process in (*(server.child for server in gcs), *stack.mcs, stack.mhs):
        if not process.alive():
            raise BenchError(f"{process.name} died under load\n{process.log_tail()}")
    cpu: dict[str, float | None] = {}
    if "measure_start" in samples and "measure_end" in samples:
        cpu = group_usage(
            samples["measure_start"],
            samples["measure_end"],
            int(result.get("calls", 0)),
            server="gc",
        )
    return result, cpu


def measure(options: MixedOptions) -> Measurement:
    """Run the scenario (every process, file, Redis key and database it made
    is gone when this returns or raises)."""
    machine = machine_facts()
    machine["libraries"] = library_versions(_JOIN_LIBRARIES)  # the same stack
    cleanup: dict[str, Any] = {}
    first_count = mixed_first_joins(
        options.rate, options.warmup_s, options.duration_s, options.first_share
    )
    with (
        prepared_run(options.join_options(), machine, cleanup) as run,
        running_stack(run, gcs=options.gcs) as stack,
    ):
        progress(f"re-join meetings: creating and joining {options.meetings}")
        pool = _create_over(run, stack.gcs, options.meetings, join=True)
        progress(f"first-join meetings: creating {first_count}")
        first_codes = _create_over(run, stack.gcs, first_count, join=False)
        since = database.clock(run.dsn)
        result, cpu = _load(run, stack, options, pool, first_codes)
        assignments = database.assignments_since(run.dsn, since)
        progress("stopping the stack")
    return _measurement(options, run, machine, result, cpu, assignments, cleanup)


def _measurement(
    options: MixedOptions,
    run: JoinRun,
    machine: dict[str, Any],
    result: dict[str, Any],
    cpu: dict[str, float | None],
    assignments: dict[str, dict[str, int]],
    cleanup: dict[str, Any],
) -> Measurement:
    by_class = result.pop("by_class", {})
    label = f"all joins, {options.rate}/s offered over {options.gcs} GCs"
    rows = [SystemRow("mixed", label, result, cpu)]
    for kind in (FIRST_JOIN, RE_JOIN):
        if kind in by_class:
            rows.append(SystemRow(f"mixed_{kind}", KIND_LABELS[kind], by_class[kind], {}))
    for index in range(options.gcs):
        figures = by_class.get(f"server_{index}")
        if figures is not None:
            name = f"via GC {index + 1} ({gc_id(index)})"
            rows.append(SystemRow(f"mixed_gc_{index + 1}", name, figures, {}))
    by_mc = assignments["by_mc"]
    figures = {
        "benchmark": "mixed",
        "machine": machine,
        "settings": _settings(options),
        "systems": {
            row.key: {"label": row.label, **row.result, "cpu": dict(row.cpu)} for row in rows
        },
        "offered_rate": options.rate,
        "achieved_rate": result.get("throughput"),
        "errors_by_status": dict(result.get("errors", {})),
        "assignments_during_load": {
            "by_mc": by_mc,
            "by_gc": assignments["by_gc"],
            "total": sum(by_mc.values()),
            "max_to_min": spread(by_mc),
        },
        "cpu": cpu,
        "meeting_creation": run.creation,
        "cleanup": cleanup,
        "targets": [],
    }
    return Measurement(rows, [], figures)


def _settings(options: MixedOptions) -> dict[str, object]:
    return {
        "rate": options.rate,
        "first_share": options.first_share,
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "gcs": options.gcs,
        "mcs": options.mcs,
        "mhs": 2,
        "rejoin_meetings": options.meetings,
        "max_conns": options.max_connections,
    }


def _ms(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "n/a"


def extra_lines(figures: dict[str, Any]) -> list[str]:
    """The lines under the table (also what the markdown report restates)."""
    settings = figures["settings"]
    errors = figures["errors_by_status"]
    spread_figures = figures["assignments_during_load"]
    total = spread_figures["total"]
    redis = figures["machine"].get("redis", {})
    lines = [
        f"redis      {redis.get('version', '?')} at {redis.get('where', '?')} (the MCs' fencing)",
        "",
        f"offered {figures['offered_rate']} joins/s over {settings['gcs']} GCs "
        f"({settings['first_share']:.0%} first joins), achieved "
        f"{figures['achieved_rate'] or 0:,.1f} joins/s; latency from each join's intended "
        "send time",
        "failed joins by status: "
        + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) if errors else "none"),
        f"assignments recorded during the load (warm-up included): {total}",
    ]
    for mc_id, count in spread_figures["by_mc"].items():
        share = f"{count / total:.0%}" if total else "-"
        lines.append(f"  {mc_id:<24}{count:>8}  {share:>5}")
    max_to_min = spread_figures["max_to_min"]
    lines.append(
        "  most / fewest per MC = "
        + (_ms(max_to_min) if max_to_min is not None else "n/a (an MC got none)")
    )
    lines.append(
        "  recorded by: " + ", ".join(f"{gc} {n}" for gc, n in spread_figures["by_gc"].items())
    )
    cpu = figures["cpu"]
    if cpu:
        lines.append(
            "CPU over the window (% of one core): "
            + ", ".join(f"{name} {_ms(cpu.get(f'{key}_pct'))}" for key, name in CPU_GROUPS.items())
            + f"; all cores {_ms(cpu.get('machine_pct'))}%"
        )
    return lines


#: How ``dt bench mixed`` prints its figures.
PRESENTATION = Presentation("mixed", extra_lines, unit="join")


def run_mixed(options: MixedOptions) -> int:
    """The ``dt bench mixed`` handler (see :func:`report.run_and_report`)."""
    return run_and_report(lambda: measure(options), PRESENTATION, json_path=options.json_path)
