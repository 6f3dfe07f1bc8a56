"""``dt bench heartbeats`` as a user runs it, with tiny settings.

A smoke test of the tool, not of performance: it proves that every process
starts, talks real gRPC, reaches the database and is stopped, that the
figures come out whole, and that nothing is left behind. Throughput numbers
are only required to be non-zero (a loaded CI machine may be arbitrarily
slow).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import psutil
import pytest
from bench_harness import run_bench

from darktower.cli.__main__ import build_parser
from darktower.cli.bench.floor import fast_heartbeat_sql
from darktower.gc.repositories import meeting_controllers

#: Generous: the run itself takes ~15 s; the bound only catches a hang.
BENCH_TIMEOUT_S = 150


def test_floor_runs_exactly_the_gcs_statement() -> None:
    # The floor reads the SQL from the repository's source (it must not import
    # the repository, see floor.py); the two must never drift apart.
    assert fast_heartbeat_sql() == meeting_controllers._FAST_HEARTBEAT


def test_heartbeats_defaults_are_the_issues() -> None:
    args = build_parser().parse_args(["bench", "heartbeats"])
    assert (args.mcs, args.concurrency, args.channels) == (1000, 64, 4)
    assert (args.warmup, args.duration, args.pool_size) == (2.0, 10.0, 10)
    assert args.health_mcs == 10_000


def test_bench_requires_a_benchmark_name() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])


def _bench_children() -> set[int]:
    """Processes started from our bench modules or as a GC (to prove cleanup)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "darktower.cli.bench." in cmdline or "-m darktower.gc" in cmdline:
            found.add(proc.pid)
    return found


def _bench_databases(server_dsn: str) -> set[str]:
    async def names() -> set[str]:
        conn = await asyncpg.connect(server_dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'dt_bench_%'"
            )
        finally:
            await conn.close()
        return {row[0] for row in rows}

    return asyncio.run(names())


@pytest.mark.slow
@pytest.mark.dt_timeout(BENCH_TIMEOUT_S + 30)
def test_heartbeats_bench_runs_end_to_end(pg_server_dsn: str, tmp_path: Path) -> None:
    before = _bench_children()
    databases_before = _bench_databases(pg_server_dsn)
    figures_path = tmp_path / "figures.json"
    argv = ["heartbeats", "--database-url", pg_server_dsn, "--json", str(figures_path)]
    argv += ["--mcs", "20", "--duration", "1", "--warmup", "0.2", "--concurrency", "4"]
    argv += ["--health-runs", "3"]
    completed = run_bench(argv, timeout_s=BENCH_TIMEOUT_S).completed

    figures = json.loads(figures_path.read_text())
    systems = figures["systems"]
    assert set(systems) == {"gc", "floor_asyncio", "floor_trio_asyncio"}
    for key, system in systems.items():
        assert system["throughput"] > 0, key
        assert system["calls"] > 0, key
        assert system["errors"] == {}, (key, system["errors"])
        assert system["latency_ms"]["p99"] > 0, key
        # Every MC's row was reached: heartbeats really updated the table.
        assert system["rows_by_health"] == {"healthy": 20}, key
    assert systems["gc"]["registration"]["errors"] == {}

    health = figures["health_statement"]
    assert health["mcs"] == 10_000
    assert health["stale"] == 100
    assert health["marked_per_run"] == [100]
    for case in ("marking", "noop"):
        assert 0 < health[case]["min_ms"] <= health[case]["median_ms"] <= health[case]["max_ms"]

    assert figures["ratios"]["gc_to_floor_asyncio"] > 0
    assert {target["name"] for target in figures["targets"]} >= {"GC heartbeats/s"}
    assert figures["machine"]["postgresql"]["version"]

    # The table is printed, and nothing the bench started is still running.
    assert "GC / floor (asyncio)" in completed.stdout
    assert "targets" in completed.stdout
    assert _bench_children() <= before
    assert _bench_databases(pg_server_dsn) <= databases_before
