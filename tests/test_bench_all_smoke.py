"""``dt bench all`` (and ``dt bench mixed``) as a user runs them, with tiny
settings, and the mixed scenario's pure rules.

The end-to-end test is a smoke test of the tool, not of performance: every
benchmark runs (real GC, MC and MH processes, real PostgreSQL and Redis),
``BENCHMARKS.md`` is written with every section, and the figures read back
from the markdown are the run's own (they match the JSON written beside it).
Nothing the run made - process, database, Redis key - is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from bench_harness import (
    HEADINGS,
    existing_databases,
    run_bench,
    section,
    server_options,
    table_rows,
)

from darktower.cli import bench_cmd
from darktower.cli.bench.all import AllOptions, redact_argv, run_all
from darktower.cli.bench.heartbeats import HeartbeatOptions
from darktower.cli.bench.join import JoinOptions
from darktower.cli.bench.join_loadgen import mixed_first_joins, mixed_schedule
from darktower.cli.bench.mixed import split, spread
from darktower.cli.bench.procs import GroupSample, group_usage

#: Generous: the run itself takes ~45 s; the bound only catches a hang.
BENCH_TIMEOUT_S = 240


# --------------------------------------------------------------------------
# Pure rules


def test_mixed_schedule_interleaves_first_joins_evenly() -> None:
    plan = mixed_schedule(20, 0.2, 2)
    firsts = [i for i, request in enumerate(plan) if request.first]
    assert firsts == [4, 9, 14, 19]  # one in five, evenly
    assert [plan[i].index for i in firsts] == [0, 1, 2, 3]  # each meeting once, in order
    rejoins = [request.index for request in plan if not request.first]
    assert rejoins == list(range(16))
    assert [request.kind for request in plan[3:5]] == ["re_join", "first_join"]


def test_mixed_schedule_spreads_each_kind_over_the_servers() -> None:
    # A share of 1/2 over two servers: alternating by request number would
    # send every first join to one GC.
    plan = mixed_schedule(400, 0.5, 2)
    for first in (True, False):
        servers = [request.server for request in plan if request.first is first]
        assert servers.count(0) == servers.count(1) == 100
    assert {request.server for request in mixed_schedule(9, 0.0, 3)} == {0, 1, 2}
    assert all(request.first for request in mixed_schedule(5, 1.0, 2))
    assert not any(request.first for request in mixed_schedule(5, 0.0, 2))


def test_mixed_first_joins_counts_the_meetings_a_run_needs() -> None:
    # 100/s for 5 + 60 s, a fifth of them first joins.
    assert mixed_first_joins(100, 5.0, 60.0, 0.2) == 1300
    assert mixed_first_joins(20, 0.5, 2.0, 0.2) == 10
    assert mixed_first_joins(20, 0.5, 2.0, 0.0) == 0


def test_spread_and_split() -> None:
    assert spread({"a": 40, "b": 50, "c": 60}) == 1.5
    assert spread({"a": 10, "b": 0}) is None  # an MC got nothing
    assert spread({"a": 10}) is None
    assert split(10, 3) == [4, 3, 3]
    assert split(1, 2) == [1, 0]
    assert sum(split(1301, 2)) == 1301


def test_group_usage_accounts_each_group_and_the_server() -> None:
    before = GroupSample(10.0, {"gc": 1.0, "mc": 2.0}, machine_busy=100.0, machine_total=400.0)
    after = GroupSample(12.0, {"gc": 2.0, "mc": 2.5}, machine_busy=103.0, machine_total=404.0)
    usage = group_usage(before, after, 1000, server="gc")
    assert usage["gc_pct"] == pytest.approx(50.0)
    assert usage["mc_pct"] == pytest.approx(25.0)
    assert usage["server_pct"] == usage["gc_pct"]
    assert usage["machine_pct"] == pytest.approx(75.0)
    assert usage["server_us_per_call"] == pytest.approx(1000.0)
    assert group_usage(after, after, 10, server="gc") == {}


def test_the_command_shown_never_carries_a_password() -> None:
    shown = redact_argv(
        ["bench", "all", "--database-url", "postgresql://u:secret@db:5432/x", "--output=a b.md"]
    )
    assert "secret" not in shown
    assert shown == "dt bench all --database-url 'postgresql://u:***@db:5432/x' '--output=a b.md'"
    assert redact_argv(["bench", "all", "--redis-url=redis://:pw@r/15"]) == (
        "dt bench all '--redis-url=redis://:***@r/15'"
    )


def _parse(*argv: str) -> argparse.Namespace:
    """``dt bench ...`` as the command line parses it (only ``bench``'s
    parser: ``dt`` builds a subcommand's parser when it runs it)."""
    parser = argparse.ArgumentParser(prog="dt")
    bench_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_mixed_and_all_defaults_are_the_issues() -> None:
    mixed = _parse("mixed")
    assert (mixed.gcs, mixed.mcs, mixed.duration, mixed.rate) == (2, 3, 60.0, 100)
    every = _parse("all")
    assert every.output == Path("BENCHMARKS.md")
    assert (every.mixed_gcs, every.mixed_mcs, every.mixed_duration) == (2, 3, 60.0)
    assert every.join_rates == (50, 100, 200)
    assert (every.duration, every.warmup, every.skip) == (10.0, 2.0, frozenset())
    assert _parse("all", "--skip", "join,mixed").skip == {
        "join",
        "mixed",
    }
    for bad in (["--skip", "nope"], ["--mixed-first-share", "1.5"], ["--mixed-gcs", "0"]):
        with pytest.raises(SystemExit):
            _parse("all", *bad)


def test_a_bench_that_cannot_run_is_reported_and_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on the port: the heartbeat bench cannot reach its
    # database; the report is written all the same and says why.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"postgresql://postgres@127.0.0.1:{sock.getsockname()[1]}/postgres"
    output = tmp_path / "BENCHMARKS.md"
    options = AllOptions(
        heartbeats=HeartbeatOptions(database_url=closed),
        join=JoinOptions(database_url=closed),
        output=output,
        skip=frozenset({"join", "assign", "mixed"}),
        command="dt bench all --skip join,assign,mixed",
    )
    assert run_all(options) == 1
    markdown = output.read_text()
    assert "| 2 | Heartbeats | every target of this benchmark |" in markdown
    assert "Connect call failed" in markdown.split("## Heartbeats", 1)[1]
    assert (
        "| 5 | Mixed scenario | every target of this benchmark | skipped (--skip) | not run |"
        in (markdown)
    )
    assert "could not run: heartbeats" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.partial"))


# --------------------------------------------------------------------------
# End to end


def _table(text: str, first_header: str) -> dict[str, list[str]]:
    """The table whose first header cell is ``first_header``: first cell ->
    the row's cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    return {row[0]: row for row in table_rows("\n".join(lines[start:end]))}


def _number(text: str) -> float:
    match = re.search(r"-?[\d,]+(\.\d+)?", text)
    assert match, text
    return float(match.group().replace(",", ""))


def _target_text(target: dict[str, Any]) -> str:
    relation = "≥" if target["at_least"] else "≤"
    return f"{target['name']} {relation}"


@pytest.mark.slow
@pytest.mark.dt_timeout(BENCH_TIMEOUT_S + 30)
def test_bench_all_writes_the_report_end_to_end(
    pg_server_dsn: str, redis_server_url: str, tmp_path: Path
) -> None:
    report_path = tmp_path / "BENCHMARKS.md"
    figures_path = tmp_path / "figures.json"
    argv = ["all", *server_options(pg_server_dsn, redis_server_url)]
    argv += ["--output", str(report_path), "--json", str(figures_path)]
    argv += ["--duration", "1", "--warmup", "0.2", "--concurrency", "4"]
    argv += ["--heartbeat-mcs", "20", "--health-mcs", "200", "--health-runs", "2"]
    argv += ["--join-rates", "20", "--no-search", "--join-mcs", "1", "--join-meetings", "10"]
    argv += ["--mixed-duration", "2", "--mixed-warmup", "0.5", "--mixed-rate", "20"]
    argv += ["--mixed-meetings", "10"]
    ran = run_bench(argv, timeout_s=BENCH_TIMEOUT_S)
    assert f"report written to {report_path}" in ran.stdout
    # Each bench's own report was printed as it ended.
    for name in ("heartbeats", "join", "assign", "mixed"):
        assert f"dt bench {name}\n" in ran.stdout

    markdown = report_path.read_text()
    run = json.loads(figures_path.read_text())
    benches = run["benchmarks"]
    assert list(benches) == ["heartbeats", "join", "assign", "mixed"]
    assert all("error" not in figures for figures in benches.values())

    # Every section, in order.
    assert [line for line in markdown.splitlines() if line.startswith("#")] == HEADINGS
    assert "--mixed-rate 20" in markdown  # the command that made it

    # The machine it ran on.
    machine = _table(section(markdown, "## Machine"), "")
    assert machine["CPU"][1].endswith(f", {os.cpu_count()} cores")
    assert machine["Memory"][1].endswith(" GiB")
    assert platform.python_version() in machine["Python"][1]
    pg = benches["join"]["machine"]["postgresql"]
    assert machine["PostgreSQL"][1].startswith(pg["version"])
    assert machine["Redis"][1].startswith(benches["join"]["machine"]["redis"]["version"])
    load = machine["Load average at start"][1]
    assert re.fullmatch(r"[\d.]+ / [\d.]+ / [\d.]+ \(1, 5, 15 min\)", load), load
    assert [float(v) for v in load.split(" (")[0].split(" / ")] == pytest.approx(
        run["machine"]["load_average"], abs=0.01
    )

    # Every target of every bench beside its result, as the run judged it.
    by_text = {row[2]: row for row in table_rows(section(markdown, "## Targets"))}
    issues = {"heartbeats": "2", "join": "3", "assign": "4"}
    for bench, issue in issues.items():
        assert benches[bench]["targets"], bench
        for target in benches[bench]["targets"]:
            prefix = _target_text(target)
            row = next(cells for text, cells in by_text.items() if text.startswith(prefix))
            assert row[0] == issue
            assert row[4] == ("PASS" if target["passed"] else "MISS"), row
            if target["value"] is None:
                assert row[3] == "not measured"
            else:
                assert _number(row[3]) == pytest.approx(target["value"], rel=0.01, abs=0.01)
    assert any(row[4] == "reported" and row[0] == "5" for row in by_text.values())

    # Each bench's table carries its run's figures.
    gc = _table(section(markdown, "## Heartbeats"), "System")["GC (python -m darktower.gc)"]
    assert _number(gc[1]) == pytest.approx(benches["heartbeats"]["systems"]["gc"]["throughput"])
    assert _number(gc[1]) > 0
    rates = _table(section(markdown, "## Join"), "Rate")["20/s"]
    first_join = benches["join"]["systems"]["first_join@20"]["latency_ms"]
    p50, p95, p99 = (_number(v) for v in rates[1].split(" / "))
    assert (p50, p95, p99) == pytest.approx(
        (first_join["p50"], first_join["p95"], first_join["p99"]), abs=0.01
    )
    assert 0 < p50 <= p95 <= p99
    mc = _table(section(markdown, "## Assign"), "System")["MC (python -m darktower.mc)"]
    assert _number(mc[1]) == pytest.approx(benches["assign"]["systems"]["mc"]["throughput"])

    # The mixed scenario: the rate achieved, latency, errors, the spread.
    mixed = benches["mixed"]
    mixed_section = section(markdown, "## Mixed scenario")
    achieved = re.search(r"achieved \*\*([\d.,]+) joins/s\*\*", mixed_section)
    assert achieved is not None
    assert float(achieved.group(1)) == pytest.approx(mixed["achieved_rate"], abs=0.05)
    assert mixed["achieved_rate"] > 0
    assert mixed["errors_by_status"] == {}
    assert "- failed joins: **0**" in mixed_section
    overall = mixed["systems"]["mixed"]
    assert overall["sent"] == 40  # 20/s for the 2 s window
    kinds = [mixed["systems"][f"mixed_{kind}"] for kind in ("first_join", "re_join")]
    gcs = [mixed["systems"][f"mixed_gc_{n}"] for n in (1, 2)]
    assert sum(k["sent"] for k in kinds) == sum(g["sent"] for g in gcs) == 40
    assert kinds[0]["sent"] == 8  # a fifth
    assert gcs[0]["sent"] == gcs[1]["sent"] == 20  # both GCs took joins
    assignments = mixed["assignments_during_load"]
    assert len(assignments["by_mc"]) == 3
    assert assignments["total"] == sum(assignments["by_mc"].values()) >= 8
    mcs = _table(mixed_section, "MC")
    assert {name: int(cells[1]) for name, cells in mcs.items()} == assignments["by_mc"]
    assert set(assignments["by_gc"]) == {"gc-bench", "gc-bench-2"}

    # Nothing left: processes, databases, Redis keys.
    assert ran.marked_processes() == []
    databases = [benches[b]["machine"]["postgresql"]["database"] for b in ("heartbeats", "join")]
    databases.append(mixed["machine"]["postgresql"]["database"])
    assert existing_databases(pg_server_dsn, databases) == []
    for bench in ("join", "mixed"):
        assert benches[bench]["cleanup"]["keys_left"] == 0, bench
