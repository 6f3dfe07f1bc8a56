"""``dt bench assign`` as a user runs it, with tiny settings.

A smoke test of the tool, not of performance: every process starts, talks
real gRPC, makes real fenced claims in Redis and is stopped, the figures
come out whole, and neither a process nor a Redis key of the run is left
behind. Throughput is only required to be non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import coredis
import psutil
import pytest

from darktower.cli.__main__ import build_parser
from darktower.cli.bench.assign_floor import claim_payload
from darktower.cli.bench.assign_loadgen import assignment_request
from darktower.mc.assignment import parse_assignment

#: Generous: the run itself takes ~15 s; the bound only catches a hang.
BENCH_TIMEOUT_S = 150


def test_floor_stores_exactly_what_the_mc_stores() -> None:
    # The MC's claim stores its payload as compact JSON with sorted keys.
    request = assignment_request("gc-bench", "bench-x-1")
    expected = json.dumps(
        parse_assignment(request).mh_payload(), separators=(",", ":"), sort_keys=True
    ).encode()
    assert claim_payload(request) == expected


def test_assign_defaults_are_the_issues() -> None:
    args = build_parser().parse_args(["bench", "assign"])
    assert (args.concurrency, args.channels, args.warmup, args.duration) == (64, 4, 2.0, 10.0)
    assert args.redis_url is None


def test_assign_refuses_a_non_redis_url() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "assign", "--redis-url", "http://x"])


def _bench_processes() -> set[int]:
    """Processes of the assign bench: its modules, and MCs it started
    (recognised by their MC_ID, so other tests' MCs are not counted)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "darktower.cli.bench.assign" in cmdline:
            found.add(proc.pid)
        elif "-m darktower.mc" in cmdline:
            try:
                if proc.environ().get("MC_ID") == "mc-bench":
                    found.add(proc.pid)
            except psutil.Error:
                pass
    return found


def _bench_keys(url: str) -> set[str]:
    async def keys() -> set[str]:
        client: coredis.Redis[Any] = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            found: set[str] = set()
            for pattern in ("meeting:{bench-*", "dtbench:*"):
                found |= {key async for key in client.scan_iter(match=pattern, count=1000)}
            return found

    return asyncio.run(keys())


@pytest.mark.slow
@pytest.mark.dt_timeout(BENCH_TIMEOUT_S + 30)
def test_assign_bench_runs_end_to_end(redis_server_url: str, tmp_path: Path) -> None:
    before = _bench_processes()
    keys_before = _bench_keys(redis_server_url)
    figures_path = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    argv = [sys.executable, "-m", "darktower.cli", "bench", "assign"]
    argv += ["--redis-url", redis_server_url, "--json", str(figures_path)]
    argv += ["--duration", "1", "--warmup", "0.2", "--concurrency", "4", "--channels", "2"]
    completed = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    figures = json.loads(figures_path.read_text())
    systems = figures["systems"]
    assert set(systems) == {"mc", "floor"}
    for key, system in systems.items():
        assert system["throughput"] > 0, key
        assert system["calls"] > 0, key
        assert system["errors"] == {}, (key, system["errors"])
        assert system["warmup_errors"] == 0, key
        assert system["latency_ms"]["p99"] > 0, key
        # Every accept was a real fenced claim stored in Redis.
        assert system["meetings_stored"] >= system["calls"], key
    assert figures["ratios"]["mc_to_floor"] > 0
    assert {t["name"] for t in figures["targets"]} == {"MC accepts/s", "MC / floor throughput"}
    assert figures["machine"]["redis"]["version"]

    assert "MC / floor" in completed.stdout
    assert "targets" in completed.stdout
    # Nothing the bench started is still running, and its keys are gone.
    assert _bench_processes() <= before
    assert _bench_keys(redis_server_url) <= keys_before
    assert "exit status" not in completed.stderr, completed.stderr[-4000:]
