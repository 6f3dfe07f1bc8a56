"""``BENCHMARKS.md`` rendering (:func:`darktower.cli.bench.markdown.render_markdown`).

Pure: the results are built here, shaped as the benches return them (rows,
targets, JSON figures), and the markdown is read back - sections, the
machine, each target beside its result with its verdict, the per-bench
tables - without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench_harness import HEADINGS, cells, section, table_rows

from darktower.cli.bench.markdown import BenchOutcome, SuiteReport, render_markdown
from darktower.cli.bench.report import REDIS, SystemRow, Target

MACHINE: dict[str, Any] = {
    "busy_before_pct": 3.0,
    "load_average": [0.42, 0.3, 0.25],
    "cpu_model": "Test CPU 9000",
    "cores": 2,
    "memory_gib": 23.5,
    "python": "3.11.7",
    "implementation": "CPython",
    "platform": "Linux-test",
}
POSTGRES_FACTS = {
    "version": "15.20",
    "where": "127.0.0.1:5432",
    "settings": {"fsync": "on", "synchronous_commit": "on"},
}
REDIS_FACTS = {"version": "7.0.15", "where": "redis://127.0.0.1:6379/15", "settings": {}}


@dataclass(frozen=True)
class Result:
    """What a bench's ``measure`` returns (:class:`report.Measured`)."""

    rows: list[SystemRow]
    targets: list[Target]
    figures: dict[str, Any] = field(default_factory=dict)


def _latency(p50: float, p95: float, p99: float) -> dict[str, float]:
    return {"p50": p50, "p95": p95, "p99": p99}


def _system(throughput: float, p50: float, p95: float, p99: float, **more: Any) -> dict[str, Any]:
    return {"throughput": throughput, "latency_ms": _latency(p50, p95, p99), "errors": {}, **more}


def _machine(**stores: Any) -> dict[str, Any]:
    return {**MACHINE, "busy_before_pct": 2.0, "libraries": {"trio": "0.35.0"}, **stores}


def _heartbeats() -> Result:
    gc = _system(636.0, 98.0, 126.0, 153.0, registration={"seconds": 1.5, "errors": {}})
    floor = _system(548.0, 100.0, 300.0, 534.0)
    rows = [
        SystemRow("gc", "GC (python -m darktower.gc)", gc, {"server_us_per_call": 1550.0}),
        SystemRow("floor_asyncio", "floor | asyncio", floor, {}),
    ]
    targets = [
        Target("GC heartbeats/s", 636.0, 1000.0, True, "/s"),
        Target("GC / floor (asyncio) throughput", 1.16, 0.7, True, "x"),
        Target("health statement over 10,000 MCs, worst of 20 runs", 8.8, 50.0, False, "ms"),
    ]
    figures = {
        "benchmark": "heartbeats",
        "machine": _machine(postgresql=POSTGRES_FACTS),
        "settings": {"mcs": 1000, "concurrency": 64},
        "systems": {"gc": gc, "floor_asyncio": floor},
        "ratios": {"gc_to_floor_asyncio": 1.16, "cpu_floor_asyncio_to_gc": 0.97},
        "health_statement": {
            "mcs": 10_000,
            "runs": 20,
            "stale": 100,
            "marking": {"min_ms": 5.0, "median_ms": 6.9, "max_ms": 8.8},
            "noop": {"min_ms": 1.2, "median_ms": 1.5, "max_ms": 1.9},
        },
    }
    return Result(rows, targets, figures)


def _join() -> Result:
    systems: dict[str, Any] = {}
    rows = []
    for rate in (50, 100, 200):
        for kind, base in (("first_join", 10.0), ("re_join", 4.0), ("floor", 1.0)):
            system = _system(float(rate), base, base * 2 + rate / 100, base * 3 + rate / 100)
            systems[f"{kind}@{rate}"] = system
            rows.append(SystemRow(f"{kind}@{rate}", f"{kind} {rate}/s", system, {}))
    for key, value in (("re_join_saturation", 700.0), ("floor_saturation", 1300.0)):
        systems[key] = _system(value, 5.0, 9.0, 13.0)
        rows.append(SystemRow(key, key, systems[key], {}))
    targets = [
        Target("first-join P95 at 100 joins/s", 21.0, 20.0, False, "ms"),
        Target("re-join P95 at 100 joins/s", 9.0, 10.0, False, "ms"),
        Target("re-join / floor max throughput", 700 / 1300, 0.5, True, "x"),
    ]
    figures = {
        "benchmark": "join",
        "machine": _machine(postgresql=POSTGRES_FACTS, redis=REDIS_FACTS),
        "settings": {"rates": "50,100,200", "search": "x1.25 to 2000/s"},
        "systems": systems,
        "highest_rate_p99_le_100ms": {"first_join": 200, "re_join": 312},
        "search_outcomes": {
            "first_join": [[50, True], [100, True], [200, True], [250, False]],
            "re_join": [[50, True], [100, True], [200, True], [250, True], [312, True]],
        },
        "saturation_throughput": {"re_join": 700.0, "floor": 1300.0},
        "ratios": {"rejoin_to_floor_throughput": 700 / 1300},
        "cleanup": {"meetings": 5000, "active_assignments": 4800, "meetings_in_redis": 4800},
    }
    systems["first_join@250"] = _system(250.0, 50.0, 90.0, 180.0)
    return Result(rows, targets, figures)


def _mixed() -> Result:
    overall = _system(99.6, 7.0, 25.0, 60.0, errors={"HTTP_503_SERVICE_UNAVAILABLE": 3})
    rows = [SystemRow("mixed", "all joins, 100/s offered over 2 GCs", overall, {})]
    figures = {
        "benchmark": "mixed",
        "machine": _machine(postgresql=POSTGRES_FACTS, redis=REDIS_FACTS),
        "settings": {"rate": 100, "first_share": 0.2, "gcs": 2, "mcs": 3, "mhs": 2},
        "systems": {"mixed": overall},
        "offered_rate": 100,
        "achieved_rate": 99.6,
        "errors_by_status": {"HTTP_503_SERVICE_UNAVAILABLE": 3},
        "assignments_during_load": {
            "by_mc": {"mc-1": 400, "mc-2": 420, "mc-3": 380},
            "by_gc": {"gc-bench": 600, "gc-bench-2": 600},
            "total": 1200,
            "max_to_min": 420 / 380,
        },
        "cpu": {"gc_pct": 55.0, "mc_pct": 20.0, "machine_pct": 70.0},
    }
    return Result(rows, [], figures)


def _report(*, assign_error: str | None = None) -> SuiteReport:
    assign = (
        BenchOutcome("assign", 1.0, error=assign_error, unit="accept", backend=REDIS)
        if assign_error
        else BenchOutcome(
            "assign",
            30.0,
            measured=Result(
                [],
                [
                    Target("MC accepts/s", 327.0, 800.0, True, "/s"),
                    Target("MC / floor throughput", 0.596, 0.6, True, "x"),
                ],
                {
                    "benchmark": "assign",
                    "machine": _machine(redis=REDIS_FACTS),
                    "settings": {},
                    "systems": {},
                    "ratios": {"mc_to_floor": 0.596, "cpu_floor_to_mc": 0.36},
                },
            ),
            unit="accept",
            backend=REDIS,
        )
    )
    return SuiteReport(
        started_at="2025-01-02 03:04 UTC",
        command="dt bench all --redis-url redis://127.0.0.1:6379/15",
        machine=MACHINE,
        outcomes=[
            BenchOutcome("heartbeats", 50.0, measured=_heartbeats(), unit="hb"),
            BenchOutcome("join", 300.0, measured=_join(), unit="join"),
            assign,
            BenchOutcome("mixed", 80.0, measured=_mixed(), unit="join"),
        ],
        seconds=460.0,
    )


def _target_rows(markdown: str) -> dict[str, list[str]]:
    """The targets table: target text -> its row's cells."""
    return {row[2]: row for row in table_rows(section(markdown, "## Targets"))}


def test_every_section_is_there_in_order() -> None:
    markdown = render_markdown(_report())
    assert [line for line in markdown.splitlines() if line.startswith("#")] == HEADINGS
    assert "dt bench all --redis-url redis://127.0.0.1:6379/15" in markdown
    assert "2025-01-02 03:04 UTC in 7 min 40 s" in markdown
    assert markdown.endswith("\n")
    assert render_markdown(_report()) == markdown  # a function of its input only


def test_the_machine_is_described() -> None:
    markdown = render_markdown(_report())
    assert "| CPU | Test CPU 9000, 2 cores |" in markdown
    assert "| Memory | 23.5 GiB |" in markdown
    assert "| Python | CPython 3.11.7 (Linux-test) |" in markdown
    assert "| PostgreSQL | 15.20 at 127.0.0.1:5432 (fsync=on, synchronous_commit=on) |" in markdown
    assert "| Redis | 7.0.15 at redis://127.0.0.1:6379/15 |" in markdown
    assert "| Load average at start | 0.42 / 0.30 / 0.25 (1, 5, 15 min) |" in markdown
    assert "| CPU busy in the second before start | 3 % |" in markdown
    assert "| Libraries | trio 0.35.0 |" in markdown
    assert "Warning" not in markdown.split("## Targets")[0]


def test_a_busy_machine_is_called_out() -> None:
    report = _report()
    busy = SuiteReport(
        report.started_at,
        report.command,
        {**MACHINE, "busy_before_pct": 40.0},
        report.outcomes,
        report.seconds,
    )
    assert "**Warning:** the machine was 40 % busy" in render_markdown(busy)


def test_each_target_is_beside_its_result_with_pass_or_miss() -> None:
    rows = _target_rows(render_markdown(_report()))
    assert rows["GC heartbeats/s ≥ 1,000/s"] == [
        "2", "Heartbeats", "GC heartbeats/s ≥ 1,000/s", "636.0/s", "MISS",
    ]  # fmt: skip
    assert rows["GC / floor (asyncio) throughput ≥ 0.7x"][3:] == ["1.160x", "PASS"]
    assert rows["health statement over 10,000 MCs, worst of 20 runs ≤ 50 ms"][3:] == [
        "8.80 ms",
        "PASS",
    ]
    assert rows["first-join P95 at 100 joins/s ≤ 20 ms"][0] == "3"
    assert rows["first-join P95 at 100 joins/s ≤ 20 ms"][3:] == ["21.00 ms", "MISS"]
    assert rows["re-join P95 at 100 joins/s ≤ 10 ms"][3:] == ["9.00 ms", "PASS"]
    assert rows["re-join / floor max throughput ≥ 0.5x"][3:] == ["0.538x", "PASS"]
    # A ratio just under its bar does not read as reaching it.
    assert rows["MC / floor throughput ≥ 0.6x"][3:] == ["0.596x", "MISS"]
    assert rows["MC accepts/s ≥ 800/s"][0] == "4"
    # What an issue asks to be measured without a bar.
    assert rows["highest rate with P99 ≤ 100 ms"][3:] == [
        "first joins 200/s, re-joins 312/s",
        "reported",
    ]
    assert rows["P50/P95/P99 at 50, 100, 200 joins/s, first joins and re-joins"][4] == "reported"
    mixed = rows["mixed joins over 2 GCs, 3 MCs, 2 MHs (no bar)"]
    assert mixed[0] == "5"
    assert mixed[3:] == ["99.6 of 100 joins/s, P99 60.00 ms, 3 failed", "reported"]
    assert "4 passed, 4 missed." in render_markdown(_report())


def test_a_target_without_a_value_is_missed() -> None:
    report = _report()
    join = report.outcomes[1]
    assert join.measured is not None
    targets = [Target("first-join P95 at 100 joins/s", None, 20.0, False, "ms")]
    broken = BenchOutcome(
        "join", 1.0, measured=Result(join.measured.rows, targets, join.measured.figures)
    )
    markdown = render_markdown(
        SuiteReport("t", "c", MACHINE, [broken], 1.0),
    )
    assert _target_rows(markdown)["first-join P95 at 100 joins/s ≤ 20 ms"][3:] == [
        "not measured",
        "MISS",
    ]


def test_a_bench_that_could_not_run_says_why() -> None:
    markdown = render_markdown(_report(assign_error="mc exited with status 1\nlog tail..."))
    rows = _target_rows(markdown)
    assert rows["every target of this benchmark"] == [
        "4", "Assign", "every target of this benchmark", "mc exited with status 1", "not run",
    ]  # fmt: skip
    assert "Not run: mc exited with status 1\n\n```\nmc exited with status 1\nlog tail...\n```" in (
        markdown
    )
    assert "1 benchmark(s) not run" in markdown
    # The others are all there.
    assert "## Mixed scenario (issue 5)" in markdown


def test_join_latencies_per_rate_and_the_highest_rate() -> None:
    markdown = render_markdown(_report())
    join = section(markdown, "## Join (issue 3)")
    assert "| 100/s | 10.00 / 21.00 / 31.00 | 4.00 / 9.00 / 13.00 | 1.00 / 3.00 / 4.00 |" in join
    assert "- first joins: **200/s** (250/s failed: P99 180.00 ms)" in join
    assert "- re-joins: **312/s** (the search stopped at its highest rate)" in join
    assert "- re-join / floor throughput: **0.538**" in join


def test_heartbeat_and_assign_details() -> None:
    markdown = render_markdown(_report())
    heartbeats = section(markdown, "## Heartbeats")
    assert "| marking 100 stale | 5.00 | 6.90 | 8.80 |" in heartbeats
    assert "- registration of 1,000 MCs through the GC: 1.50 s" in heartbeats
    # A label with a pipe does not break its table.
    assert "| floor \\| asyncio | 548.0 |" in heartbeats
    assert "| GC (python -m darktower.gc) | 636.0 | 98.00 | 126.00 | 153.00 | 0 | 1,550 |" in (
        heartbeats
    )
    assign = section(markdown, "## Assign")
    assert "- MC / floor throughput: **0.596**" in assign
    assert "| System | accept/s |" in assign
    assert "Redis CPU %" in assign


def test_mixed_errors_by_status_and_spread_over_the_mcs() -> None:
    markdown = render_markdown(_report())
    mixed = section(markdown, "## Mixed scenario")
    assert "- offered **100 joins/s**, achieved **99.6 joins/s**" in mixed
    assert "| HTTP_503_SERVICE_UNAVAILABLE | 3 |" in mixed
    assert "1200 in all; most / fewest per MC = **1.11**" in mixed
    assert "| mc-2 | 420 | 35% |" in mixed
    assert "Recorded by: gc-bench 600, gc-bench-2 600" in mixed
    assert "GCs 55, MCs 20" in mixed


def test_every_table_is_well_formed() -> None:
    lines = render_markdown(_report(assign_error="boom")).splitlines()
    tables: list[list[str]] = []
    previous = ""
    for line in lines:
        if line.startswith("| "):
            if not previous.startswith("| "):
                tables.append([])
            tables[-1].append(line)
        previous = line
    assert len(tables) >= 8
    for table in tables:
        width = len(cells(table[0]))
        assert set(cells(table[1])) <= {"---", "---:"}, table[1]
        for row in table:
            assert len(cells(row)) == width, row
