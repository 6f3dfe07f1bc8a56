"""``dt bench join`` as a user runs it, with tiny settings, and its pure rules.

A smoke test of the tool, not of performance: the GC, simulated MHs, an MC
and the floor start, meetings are created and joined through the real API
(the MC accepting over real gRPC, fencing in Redis), the figures come out
whole, and nothing the run made - process, database, Redis key - is left
behind. Latencies are only required to be positive and ordered (a loaded CI
machine may be arbitrarily slow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench_harness import existing_databases, run_bench, server_options

from darktower.cli.__main__ import build_parser
from darktower.cli.bench.join import (
    FIRST,
    REJOIN,
    error_fraction,
    highest_passing,
    next_rate,
    passes,
)

#: Generous: the run itself takes ~20 s; the bound only catches a hang.
BENCH_TIMEOUT_S = 150


def _result(p99: float | None, calls: int = 100, errors: int = 0) -> dict[str, Any]:
    return {
        "latency_ms": {"p99": p99},
        "calls": calls,
        "errors": {"HTTP_503_SERVICE_UNAVAILABLE": errors} if errors else {},
    }


def test_a_rate_passes_with_p99_within_100_ms_and_almost_no_errors() -> None:
    assert passes(_result(99.9))
    assert passes(_result(100.0))
    assert not passes(_result(100.1))
    assert not passes(_result(None, calls=0))
    assert passes(_result(5.0, calls=9990, errors=10))  # 0.1 %
    assert not passes(_result(5.0, calls=998, errors=2))  # 0.2 %
    assert error_fraction(_result(None, calls=0)) == 1.0


def test_the_search_steps_up_and_reports_the_sustained_rate() -> None:
    assert next_rate(200, 1.25) == 250
    assert next_rate(2, 1.25) == 3  # always at least one more
    assert highest_passing([(100, True), (50, True), (200, False)]) == 100
    # A pass above a failure is noise, not capacity.
    assert highest_passing([(50, True), (100, False), (200, True)]) == 50
    assert highest_passing([(50, False), (100, False)]) is None
    assert highest_passing([]) is None


def test_join_defaults_are_the_issues() -> None:
    args = build_parser().parse_args(["bench", "join"])
    assert args.rates == (50, 100, 200)
    assert (args.warmup, args.duration) == (2.0, 10.0)
    assert (args.no_search, args.step, args.max_rate) == (False, 1.25, 2000)
    assert (args.concurrency, args.mcs, args.meetings) == (32, 2, 200)
    assert args.redis_url is None
    assert args.database_url is None


def test_join_rates_are_parsed_sorted_and_checked() -> None:
    args = build_parser().parse_args(["bench", "join", "--rates", "200, 50,100,50"])
    assert args.rates == (50, 100, 200)
    for bad in ("", "fast", "0,10", "-5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "join", "--rates", bad])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "join", "--step", "1"])


@pytest.mark.slow
@pytest.mark.dt_timeout(BENCH_TIMEOUT_S + 30)
def test_join_bench_runs_end_to_end(
    pg_server_dsn: str, redis_server_url: str, tmp_path: Path
) -> None:
    figures_path = tmp_path / "figures.json"
    argv = ["join", *server_options(pg_server_dsn, redis_server_url)]
    argv += ["--json", str(figures_path), "--rates", "20", "--max-rate", "25"]
    argv += ["--duration", "1", "--warmup", "0.2", "--concurrency", "4", "--mcs", "1"]
    argv += ["--meetings", "10"]
    bench = run_bench(argv, timeout_s=BENCH_TIMEOUT_S)

    figures = json.loads(figures_path.read_text())
    systems = figures["systems"]
    measured = {f"{FIRST}@20", f"{REJOIN}@20", "floor@20", f"{REJOIN}_saturation"}
    assert measured | {"floor_saturation"} <= set(systems)
    for key, system in systems.items():
        assert system["calls"] > 0, key
        assert system["throughput"] > 0, key
        latency = system["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], key
    for key in (f"{FIRST}@20", f"{REJOIN}@20", "floor@20"):
        # Open loop: every join of the window was sent, at the asked rate.
        assert systems[key]["rate"] == 20
        assert systems[key]["sent"] == 20, key
        assert systems[key]["errors"] == {}, (key, systems[key]["errors"])
    # The search ran (one step above 20, if 20 passed) and its answer is a
    # measured rate or None.
    for kind in (FIRST, REJOIN):
        outcomes = figures["search_outcomes"][kind]
        assert {rate for rate, _ in outcomes} <= {20, 25}
        assert figures["highest_rate_p99_le_100ms"][kind] in {None, 20, 25}
    assert figures["ratios"]["rejoin_to_floor_throughput"] > 0
    assert {t["name"] for t in figures["targets"]} == {
        "first-join P95 at 100 joins/s",
        "re-join P95 at 100 joins/s",
        "re-join / floor max throughput",
    }
    assert figures["join_response_bytes"] > 100
    assert figures["machine"]["postgresql"]["version"]
    assert figures["machine"]["redis"]["version"]

    # First joins really assigned (through the MC, fenced in Redis), and the
    # bench removed exactly what it made.
    cleanup = figures["cleanup"]
    first_joins = sum(s["calls"] for k, s in systems.items() if k.startswith(FIRST)) + 10
    assert cleanup["active_assignments"] >= first_joins
    assert cleanup["meetings_in_redis"] >= first_joins
    assert cleanup["keys_deleted"] >= cleanup["meetings_in_redis"]
    assert cleanup["keys_left"] == 0

    assert "highest rate with P99 <= 100 ms" in bench.stdout
    assert "targets" in bench.stdout
    assert bench.marked_processes() == []
    database = figures["machine"]["postgresql"]["database"]
    assert existing_databases(pg_server_dsn, [database]) == []
