"""Targets, the printed table and the JSON figures of a bench run.

A bench is a measurement: a missed target is printed as FAIL, loudly, but
the command still succeeds - the figures are the product, and the targets
(from the issues) are judged by people reading them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from darktower.cli.bench.procs import BenchError, sigterm_as_interrupt
from darktower.shared.devstack import EmbeddedServerError

#: Above this, the report warns that the machine was not idle.
_BUSY_WARNING_PCT = 10.0
#: At or above this, a process (or the machine) is taken to be the bottleneck.
_SATURATED_PCT = 90.0
#: CPU outside the bench's own processes worth mentioning (% of one core).
_OTHER_WARNING_PCT = 25.0


@dataclass(frozen=True, slots=True)
class Target:
    """One bar from the issue: ``value`` compared with ``bound``."""

    name: str
    value: float | None
    bound: float
    at_least: bool
    unit: str

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        relation = ">=" if self.at_least else "<="
        shown = "n/a" if self.value is None else f"{self.value:,.2f}"
        return f"  {verdict}  {self.name} {relation} {self.bound:g} {self.unit}: {shown}"


@dataclass(frozen=True, slots=True)
class SystemRow:
    """One system's line of the table (the load generator's result plus the
    CPU accounting of the measured window)."""

    key: str
    label: str
    result: Mapping[str, Any]
    cpu: Mapping[str, float | None]

    @property
    def throughput(self) -> float:
        return float(self.result.get("throughput", 0.0))

    @property
    def errors(self) -> int:
        return sum(int(n) for n in dict(self.result.get("errors", {})).values())


@dataclass(frozen=True, slots=True)
class Backend:
    """The backing store of a benchmark, as the report shows it."""

    #: Human name (``PostgreSQL``, ``Redis``).
    name: str
    #: Key of its facts in the machine figures.
    machine_key: str
    #: Key of its CPU figure in a row's CPU accounting (``procs.cpu_usage``).
    cpu_key: str
    #: Table column heading.
    column: str

    def describe(self, facts: Mapping[str, Any]) -> str:
        """The report's line about the store."""
        if self.machine_key == "postgresql":
            settings = facts.get("settings", {})
            return (
                f"postgres   {facts.get('version', '?')} at {facts.get('where', '?')} "
                f"(fsync={settings.get('fsync', '?')}, "
                f"synchronous_commit={settings.get('synchronous_commit', '?')})"
            )
        details = ", ".join(f"{k}={v}" for k, v in facts.get("settings", {}).items())
        return f"{self.machine_key:<11}{facts.get('version', '?')} at {facts.get('where', '?')}" + (
            f" ({details})" if details else ""
        )


POSTGRES = Backend("PostgreSQL", "postgresql", "postgres_pct", "pg CPU%")
REDIS = Backend("Redis", "redis", "redis_pct", "redis CPU%")


def _num(value: object, fmt: str) -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def render(
    *,
    title: str,
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
    rows: Sequence[SystemRow],
    extra_lines: Sequence[str],
    targets: Sequence[Target],
    unit: str = "hb",
    backend: Backend = POSTGRES,
) -> str:
    """The human-readable report (plain text, fixed-width). ``unit`` names
    one call (``hb`` -> ``hb/s``, ``srv µs/hb``); ``backend`` is the backing
    store whose CPU is a column and whose facts are a line."""
    out = [
        f"dt bench {title}",
        "",
        f"machine    {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB; {machine['implementation']} {machine['python']}; "
        f"{machine['busy_before_pct']:.0f}% busy before the run",
        backend.describe(machine.get(backend.machine_key, {})),
        "libraries  " + ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items()),
        "load       " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    if machine["busy_before_pct"] > _BUSY_WARNING_PCT:
        out += [
            f"WARNING: the machine was {machine['busy_before_pct']:.0f}% busy before the run: "
            "other processes compete for the cores and every figure below is skewed.",
            "",
        ]
    header = (
        f"{'system':<44}{unit + '/s':>{max(9, len(unit) + 4)}}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'errors':>8}{'srv µs/' + unit:>{max(11, len(unit) + 9)}}"
        f"{'srv CPU%':>10}{'gen CPU%':>10}{backend.column:>{max(9, len(backend.column) + 1)}}"
        f"{'all CPU%':>10}"
    )
    out += [header, "-" * len(header)]
    for row in rows:
        latency = row.result.get("latency_ms", {})
        out.append(
            f"{row.label:<44}{_num(row.throughput, ',.1f'):>{max(9, len(unit) + 4)}}"
            f"{_num(latency.get('p50'), '.2f'):>9}{_num(latency.get('p95'), '.2f'):>9}"
            f"{_num(latency.get('p99'), '.2f'):>9}{row.errors:>8}"
            f"{_num(row.cpu.get('server_us_per_call'), ',.0f'):>{max(11, len(unit) + 9)}}"
            f"{_num(row.cpu.get('server_pct'), '.0f'):>10}"
            f"{_num(row.cpu.get('loadgen_pct'), '.0f'):>10}"
            f"{_num(row.cpu.get(backend.cpu_key), '.0f'):>{max(9, len(backend.column) + 1)}}"
            f"{_num(row.cpu.get('machine_pct'), '.0f'):>10}"
        )
    out += [
        "(CPU% over the measured window: 100 = one core busy; 'all' is of every core.",
        f" srv µs/{unit} = server CPU time per call, the cost least dependent on contention.)",
        *_saturation_notes(rows, backend.name),
        "",
        *extra_lines,
        "",
        "targets",
        *(target.line() for target in targets),
        *([] if targets else ["  none: no issue sets one for this benchmark"]),
    ]
    return "\n".join(out)


def _saturation_notes(rows: Sequence[SystemRow], backend_name: str) -> list[str]:
    """Say when a figure is bounded by something other than the server."""
    notes = []
    for row in rows:
        generator = row.cpu.get("loadgen_pct")
        machine = row.cpu.get("machine_pct")
        other = row.cpu.get("other_pct")
        if other is not None and other >= _OTHER_WARNING_PCT:
            notes.append(
                f"note: {row.label}: {other:.0f}% of a core went to other processes and the "
                "kernel during the window (noise)"
            )
        if generator is not None and generator >= _SATURATED_PCT:
            notes.append(
                f"note: {row.label}: the load generator used {generator:.0f}% of a core - "
                "the throughput is a lower bound"
            )
        elif machine is not None and machine >= _SATURATED_PCT:
            notes.append(
                f"note: {row.label}: all cores were {machine:.0f}% busy - server, load "
                f"generator and {backend_name} shared them (compare srv µs per call)"
            )
    return notes


def write_json(path: Path, figures: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(figures, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def target_figures(targets: Sequence[Target]) -> list[dict[str, Any]]:
    return [{**asdict(target), "passed": target.passed} for target in targets]


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when there is nothing to divide by."""
    return numerator / denominator if denominator > 0 else None


class Measured(Protocol):
    """What a bench's ``measure`` returns."""

    @property
    def figures(self) -> dict[str, Any]: ...

    @property
    def rows(self) -> list[SystemRow]: ...

    @property
    def targets(self) -> list[Target]: ...


@dataclass(frozen=True, slots=True)
class Presentation:
    """How a bench's figures are printed: its title, the lines under its
    table (from the JSON figures), the name of one call and the backing store."""

    title: str
    extra_lines: Callable[[dict[str, Any]], list[str]]
    unit: str = "hb"
    backend: Backend = POSTGRES

    def text(self, result: Measured) -> str:
        """The printed report of ``result``."""
        return render(
            title=self.title,
            machine=result.figures["machine"],
            settings=result.figures["settings"],
            rows=result.rows,
            extra_lines=self.extra_lines(result.figures),
            targets=result.targets,
            unit=self.unit,
            backend=self.backend,
        )


def run_and_report(
    measure: Callable[[], Measured],
    presentation: Presentation,
    *,
    json_path: Path | None,
    expected_errors: tuple[type[Exception], ...] = (BenchError, EmbeddedServerError),
) -> int:
    """A ``dt bench`` handler's whole life: measure (SIGTERM unwinds like
    Ctrl-C so cleanup runs), print the report, write the JSON. 0 whenever
    the measurement ran (missed targets included: it is a measurement), 1
    when it could not run (``expected_errors``: by default a bench's own
    failure or an embedded server's), 130 on interrupt."""
    try:
        with sigterm_as_interrupt():
            result = measure()
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except expected_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(presentation.text(result))
    if json_path is not None:
        write_json(json_path, result.figures)
        print(f"\nfigures written to {json_path}")
    if not all(target.passed for target in result.targets):
        print("\nsome targets were missed (FAIL above); this is a measurement: exit status 0")
    return 0
