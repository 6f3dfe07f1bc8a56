"""``BENCHMARKS.md``: the figures of a ``dt bench all`` run as markdown.

:func:`render_markdown` is a pure function of the collected results (the
benches' own :class:`.report.Measured` objects, the machine's facts and the
run's times): no I/O and no clock, so the report's layout is unit-tested
without running anything, and a run that failed half-way still renders what
it measured. The figures are read from the same JSON-shaped ``figures`` the
benches write with ``--json``: one source for both.

Verdicts: ``PASS``/``MISS`` for a target with a bar (from the issues, as
the benches define them), ``reported`` for what an issue asks to be
measured without a bar (the latencies at each rate, the highest rate with
P99 <= 100 ms, the mixed scenario), ``not run`` for a bench that was
skipped or could not run (its error is shown in its section).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from darktower.cli.bench.report import POSTGRES, Backend, Measured, SystemRow, Target

#: The issue each benchmark's targets come from.
ISSUES = {"heartbeats": 2, "join": 3, "assign": 4, "mixed": 5}
TITLES = {
    "heartbeats": "Heartbeats",
    "join": "Join",
    "assign": "Assign",
    "mixed": "Mixed scenario",
}
#: Above this, a bench's section warns that the machine was not idle.
BUSY_WARNING_PCT = 10.0

OK = "PASS"
MISS = "MISS"
REPORTED = "reported"
NOT_RUN = "not run"


@dataclass(frozen=True, slots=True)
class BenchOutcome:
    """One benchmark of the run: what it measured, or why it did not."""

    name: str
    #: Wall-clock seconds it took (setup and cleanup included).
    seconds: float
    measured: Measured | None = None
    #: Why nothing was measured (an error, or ``skipped``).
    error: str | None = None
    #: One call, as the tables name it (``hb``, ``join``, ``accept``).
    unit: str = "call"
    backend: Backend = POSTGRES

    @property
    def issue(self) -> int:
        return ISSUES.get(self.name, 0)

    @property
    def title(self) -> str:
        return TITLES.get(self.name, self.name)


@dataclass(frozen=True, slots=True)
class SuiteReport:
    """Everything the report says: when and how it was run, the machine as
    it was at the start, and each bench's outcome in the order they ran."""

    #: When the run started, as the reader should see it (UTC).
    started_at: str
    #: The command line that produced it.
    command: str
    #: :func:`.procs.machine_facts` taken at the start of the run.
    machine: Mapping[str, Any]
    outcomes: Sequence[BenchOutcome]
    #: Wall-clock seconds of the whole run.
    seconds: float


# --------------------------------------------------------------------------
# Formatting


def _cell(text: object) -> str:
    """A table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A markdown table; ``align`` has one letter per column (``l``/``r``),
    left when missing."""
    marks = [
        "---:" if (align[i] if i < len(align) else "l") == "r" else "---"
        for i in range(len(header))
    ]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _num(value: object, fmt: str = ",.2f") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, fmt)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _relation(target: Target) -> str:
    return "≥" if target.at_least else "≤"


def _quantity(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "x":
        # Three decimals: 0.596 must not read as the 0.6 it missed.
        return f"{value:.3f}x"
    if unit == "/s":
        return f"{value:,.1f}/s"
    return f"{value:,.2f} {unit}"


def _bound(target: Target) -> str:
    if target.unit == "x":
        return f"{target.bound:g}x"
    if target.unit == "/s":
        return f"{target.bound:,g}/s"
    return f"{target.bound:g} {target.unit}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _latency(result: Mapping[str, Any], key: str) -> object:
    return dict(result.get("latency_ms", {})).get(key)


def _errors(result: Mapping[str, Any]) -> int:
    return sum(int(n) for n in dict(result.get("errors", {})).values())


# --------------------------------------------------------------------------
# Machine


def _machine_section(report: SuiteReport) -> list[str]:
    machine = report.machine
    figures = [o.measured.figures for o in report.outcomes if o.measured is not None]
    # The stores' facts are taken by the benches (they connect to them).
    postgres = next(
        (f["machine"]["postgresql"] for f in figures if "postgresql" in f["machine"]), None
    )
    redis = next((f["machine"]["redis"] for f in figures if "redis" in f["machine"]), None)
    libraries: dict[str, str] = {}
    for f in figures:
        libraries.update(f["machine"].get("libraries", {}))
    load = machine.get("load_average")
    rows: list[tuple[str, str]] = [
        ("CPU", f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores"),
        ("Memory", f"{machine.get('memory_gib', '?')} GiB"),
        (
            "Python",
            f"{machine.get('implementation', '?')} {machine.get('python', '?')} "
            f"({machine.get('platform', '?')})",
        ),
        ("PostgreSQL", _store(postgres, ("fsync", "synchronous_commit", "shared_buffers"))),
        ("Redis", _store(redis, ("appendonly", "appendfsync", "save"))),
        (
            "Load average at start",
            " / ".join(_num(v) for v in load) + " (1, 5, 15 min)" if load else "unknown",
        ),
        ("CPU busy in the second before start", f"{_num(machine.get('busy_before_pct'), '.0f')} %"),
    ]
    if libraries:
        rows.append(("Libraries", ", ".join(f"{k} {v}" for k, v in sorted(libraries.items()))))
    out = ["## Machine", "", *_table(("", ""), rows)]
    busy = machine.get("busy_before_pct")
    if isinstance(busy, int | float) and busy > BUSY_WARNING_PCT:
        out += ["", f"**Warning:** the machine was {busy:.0f} % busy when the run started."]
    return out


def _store(facts: Mapping[str, Any] | None, keys: Sequence[str]) -> str:
    if facts is None:
        return "not used (no bench using it ran)"
    settings = dict(facts.get("settings", {}))
    shown = ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)
    return f"{facts.get('version', '?')} at {facts.get('where', '?')}" + (
        f" ({shown})" if shown else ""
    )


# --------------------------------------------------------------------------
# Targets


def _target_rows(outcome: BenchOutcome) -> list[tuple[object, ...]]:
    issue, title = outcome.issue, outcome.title
    if outcome.measured is None:
        why = _first_line(outcome.error or "")
        return [(issue, title, "every target of this benchmark", why, NOT_RUN)]
    rows: list[tuple[object, ...]] = [
        (
            issue,
            title,
            f"{target.name} {_relation(target)} {_bound(target)}",
            _quantity(target.value, target.unit),
            OK if target.passed else MISS,
        )
        for target in outcome.measured.targets
    ]
    figures = outcome.measured.figures
    if outcome.name == "join":
        rows += _join_reported(figures)
    elif outcome.name == "mixed":
        settings = figures["settings"]
        rows.append(
            (
                issue,
                title,
                f"mixed joins over {settings.get('gcs')} GCs, {settings.get('mcs')} MCs, "
                f"{settings.get('mhs')} MHs (no bar)",
                f"{_num(figures.get('achieved_rate'), ',.1f')} of {figures.get('offered_rate')} "
                f"joins/s, P99 {_num(_latency(figures['systems']['mixed'], 'p99'))} ms, "
                f"{sum(figures.get('errors_by_status', {}).values())} failed",
                REPORTED,
            )
        )
    return rows


def _join_reported(figures: Mapping[str, Any]) -> list[tuple[object, ...]]:
    systems = figures["systems"]
    rates = [int(r) for r in str(figures["settings"]["rates"]).split(",") if r]
    measured = all(f"{kind}@{r}" in systems for r in rates for kind in ("first_join", "re_join"))
    highest = figures.get("highest_rate_p99_le_100ms", {})
    return [
        (
            3,
            TITLES["join"],
            f"P50/P95/P99 at {', '.join(map(str, rates))} joins/s, first joins and re-joins",
            "see the Join section" if measured else "not all measured",
            REPORTED if measured else MISS,
        ),
        (
            3,
            TITLES["join"],
            "highest rate with P99 ≤ 100 ms",
            f"first joins {_rate(highest.get('first_join'))}, "
            f"re-joins {_rate(highest.get('re_join'))}",
            REPORTED,
        ),
    ]


def _rate(value: object) -> str:
    return f"{value}/s" if isinstance(value, int) else "below the lowest rate tried"


def _targets_section(report: SuiteReport) -> list[str]:
    rows = [row for outcome in report.outcomes for row in _target_rows(outcome)]
    counts = {v: sum(1 for row in rows if row[-1] == v) for v in (OK, MISS, NOT_RUN)}
    summary = f"{counts[OK]} passed, {counts[MISS]} missed" + (
        f", {counts[NOT_RUN]} benchmark(s) not run" if counts[NOT_RUN] else ""
    )
    return [
        "## Targets",
        "",
        f"Each issue's target beside this run's result: {summary}.",
        "",
        *_table(("Issue", "Benchmark", "Target", "Result", "Verdict"), rows, "rlllr"),
    ]


# --------------------------------------------------------------------------
# Per benchmark


def _systems_table(outcome: BenchOutcome, rows: Sequence[SystemRow]) -> list[str]:
    unit, backend = outcome.unit, outcome.backend
    header = (
        "System",
        f"{unit}/s",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "errors",
        f"server µs/{unit}",
        "server CPU %",
        "load gen. CPU %",
        f"{backend.name} CPU %",
        "all cores CPU %",
    )
    body = [
        (
            row.label,
            _num(row.throughput, ",.1f"),
            _num(_latency(row.result, "p50")),
            _num(_latency(row.result, "p95")),
            _num(_latency(row.result, "p99")),
            row.errors,
            _num(row.cpu.get("server_us_per_call"), ",.0f"),
            _num(row.cpu.get("server_pct"), ".0f"),
            _num(row.cpu.get("loadgen_pct"), ".0f"),
            _num(row.cpu.get(backend.cpu_key), ".0f"),
            _num(row.cpu.get("machine_pct"), ".0f"),
        )
        for row in rows
    ]
    return [
        *_table(header, body, "lrrrrrrrrrr"),
        "",
        "CPU % over the measured window: 100 = one core busy, except *all cores*. "
        f"*server µs/{unit}* is the server's CPU time per call, the figure least "
        "dependent on what else ran.",
    ]


def _bench_section(outcome: BenchOutcome) -> list[str]:
    command = f"dt bench {outcome.name}"
    out = [f"## {outcome.title} (issue {outcome.issue}): `{command}`", ""]
    if outcome.measured is None:
        error = (outcome.error or "no reason given").strip()
        out.append(f"Not run: {_first_line(error)}")
        if "\n" in error:
            out += ["", "```", error, "```"]
        return out
    figures = outcome.measured.figures
    settings = ", ".join(f"{k}={v}" for k, v in figures.get("settings", {}).items())
    busy = figures["machine"].get("busy_before_pct")
    out += [
        f"Settings: {settings}. Took {_duration(outcome.seconds)}; the machine was "
        f"{_num(busy, '.0f')} % busy in the second before it started.",
        "",
    ]
    if isinstance(busy, int | float) and busy > BUSY_WARNING_PCT:
        out += [f"**Warning:** {busy:.0f} % busy before the start: figures are skewed.", ""]
    details = {
        "heartbeats": _heartbeats_details,
        "join": _join_details,
        "assign": _assign_details,
        "mixed": _mixed_details,
    }.get(outcome.name)
    if outcome.name == "join":
        out += [*_join_rates(figures), ""]
    out += _systems_table(outcome, outcome.measured.rows)
    if details is not None:
        out += ["", *details(figures)]
    return out


def _ratio_bullet(label: str, value: object) -> str:
    return f"- {label}: **{_num(value, '.3f')}**"


def _heartbeats_details(figures: Mapping[str, Any]) -> list[str]:
    ratios = figures["ratios"]
    out = [
        _ratio_bullet("GC / floor (asyncio) throughput", ratios.get("gc_to_floor_asyncio")),
        _ratio_bullet(
            "server CPU per heartbeat, floor (asyncio) / GC", ratios.get("cpu_floor_asyncio_to_gc")
        ),
    ]
    if "gc_to_floor_trio_asyncio" in ratios:
        out += [
            _ratio_bullet(
                "GC / floor (trio-asyncio): the service logic alone",
                ratios["gc_to_floor_trio_asyncio"],
            ),
            _ratio_bullet(
                "floor trio-asyncio / asyncio: the asyncio-on-trio loop alone",
                ratios.get("floor_trio_asyncio_to_floor_asyncio"),
            ),
        ]
    registration = figures["systems"].get("gc", {}).get("registration")
    if registration:
        out.append(
            f"- registration of {figures['settings']['mcs']:,} MCs through the GC: "
            f"{_num(registration.get('seconds'))} s"
        )
    health = figures.get("health_statement")
    if health:
        out += [
            "",
            f"Health-check statement over {health['mcs']:,} MCs, {health['runs']} runs:",
            "",
            *_table(
                ("Case", "min ms", "median ms", "max ms"),
                [
                    (
                        f"marking {health['stale']} stale",
                        *(_num(health["marking"][k]) for k in ("min_ms", "median_ms", "max_ms")),
                    ),
                    (
                        "nothing stale",
                        *(_num(health["noop"][k]) for k in ("min_ms", "median_ms", "max_ms")),
                    ),
                ],
                "lrrr",
            ),
        ]
    return out


def _join_rates(figures: Mapping[str, Any]) -> list[str]:
    """P50/P95/P99 per listed rate, first joins, re-joins and the floor side
    by side: the issue's table."""
    systems = figures["systems"]
    rates = [r for r in str(figures["settings"]["rates"]).split(",") if r]
    body = []
    for rate in rates:
        row: list[object] = [f"{rate}/s"]
        for kind in ("first_join", "re_join", "floor"):
            result = systems.get(f"{kind}@{rate}", {})
            row.append(" / ".join(_num(_latency(result, p)) for p in ("p50", "p95", "p99")))
        body.append(row)
    return [
        "P50 / P95 / P99 latency (ms) at each listed rate, open loop, from each join's intended "
        "send time:",
        "",
        *_table(("Rate", "first join", "re-join", "floor (constant response)"), body, "rrrr"),
    ]


def _join_details(figures: Mapping[str, Any]) -> list[str]:
    out = ["Highest rate with P99 ≤ 100 ms (≤ 0.1 % errors, every lower rate passing too):", ""]
    systems = figures["systems"]
    for kind, label in (("first_join", "first joins"), ("re_join", "re-joins")):
        best = figures["highest_rate_p99_le_100ms"].get(kind)
        outcomes = figures["search_outcomes"].get(kind, [])
        failed = [rate for rate, ok in outcomes if not ok]
        detail = ""
        if failed:
            first_fail = systems.get(f"{kind}@{failed[0]}", {})
            detail = f" ({failed[0]}/s failed: P99 {_num(_latency(first_fail, 'p99'))} ms)"
        elif figures["settings"].get("search") != "off":
            detail = " (the search stopped at its highest rate)"
        out.append(f"- {label}: **{_rate(best)}**{detail}")
    saturation = figures["saturation_throughput"]
    out += [
        "",
        f"- saturation (closed loop): GC re-joins {_num(saturation['re_join'], ',.1f')}/s, "
        f"floor {_num(saturation['floor'], ',.1f')}/s",
        _ratio_bullet(
            "re-join / floor throughput", figures["ratios"].get("rejoin_to_floor_throughput")
        ),
    ]
    cleanup = figures.get("cleanup", {})
    if cleanup:
        out.append(
            f"- at the end: {cleanup.get('meetings', '?')} meetings, "
            f"{cleanup.get('active_assignments', '?')} active assignments, "
            f"{cleanup.get('meetings_in_redis', '?')} meetings fenced in Redis"
        )
    return out


def _assign_details(figures: Mapping[str, Any]) -> list[str]:
    ratios = figures["ratios"]
    return [
        _ratio_bullet("MC / floor throughput", ratios.get("mc_to_floor")),
        _ratio_bullet("server CPU per accept, floor / MC", ratios.get("cpu_floor_to_mc")),
        *(
            f"- {key}: {system.get('meetings_stored')} meetings stored in Redis"
            for key, system in figures["systems"].items()
        ),
    ]


def _mixed_details(figures: Mapping[str, Any]) -> list[str]:
    settings = figures["settings"]
    errors = dict(figures.get("errors_by_status", {}))
    spread = figures["assignments_during_load"]
    total = spread["total"]
    out = [
        f"- offered **{figures['offered_rate']} joins/s**, achieved "
        f"**{_num(figures.get('achieved_rate'), ',.1f')} joins/s** "
        f"({settings['first_share']:.0%} first joins, spread over {settings['gcs']} GCs)",
        f"- failed joins: **{sum(errors.values())}**",
        "",
    ]
    if errors:
        out += [
            *_table(("Status", "joins"), sorted(errors.items()), "lr"),
            "",
        ]
    by_mc = [
        (mc_id, count, f"{count / total:.0%}" if total else "-")
        for mc_id, count in spread["by_mc"].items()
    ]
    max_to_min = spread.get("max_to_min")
    out += [
        f"Assignments recorded during the load (warm-up included), {total} in all; most / "
        f"fewest per MC = **{_num(max_to_min) if max_to_min is not None else 'n/a'}**:",
        "",
        *_table(("MC", "assignments", "share"), by_mc, "lrr"),
        "",
        "Recorded by: " + (", ".join(f"{gc} {n}" for gc, n in spread["by_gc"].items()) or "none"),
    ]
    cpu = figures.get("cpu") or {}
    if cpu:
        groups = (
            ("GCs", "gc"), ("MCs", "mc"), ("simulated MHs", "mh"), ("load generator", "loadgen"),
            ("PostgreSQL", "postgres"), ("Redis", "redis"),
        )  # fmt: skip
        out += [
            "",
            "CPU over the measured window (% of one core): "
            + ", ".join(f"{name} {_num(cpu.get(f'{key}_pct'), '.0f')}" for name, key in groups)
            + f"; all cores {_num(cpu.get('machine_pct'), '.0f')} %.",
        ]
    out += ["", "No issue sets a target for this scenario."]
    return out


# --------------------------------------------------------------------------


def render_markdown(report: SuiteReport) -> str:
    """The whole ``BENCHMARKS.md``."""
    ran = ", ".join(f"`{o.name}`" for o in report.outcomes)
    out = [
        "# Benchmarks",
        "",
        f"Measured by `dt bench all` on {report.started_at} in {_duration(report.seconds)} "
        f"({ran}), on the machine below. Every figure comes from that one run; to measure "
        "again, run:",
        "",
        "```",
        report.command,
        "```",
        "",
        "Each benchmark drives the real services (separate processes, real gRPC/HTTP, real "
        "PostgreSQL and Redis) from a load generator in its own process and, in the same run, "
        "the bare libraries doing the same operation (the *floor*), so the service's overhead "
        "reads as a ratio. Latencies of open-loop runs are measured from each request's "
        "intended send time.",
        "",
        *_machine_section(report),
        "",
        *_targets_section(report),
    ]
    for outcome in report.outcomes:
        out += ["", *_bench_section(outcome)]
    return "\n".join(out) + "\n"
