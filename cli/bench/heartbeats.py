"""``dt bench heartbeats``: one GC process's heartbeat throughput against its floor.

The run, in one process tree on loopback:

1. a fresh bench database (on ``--database-url`` / ``DATABASE_URL``, else an
   embedded server) with the schema applied;
2. a throwaway signing key and JWKS, and one MC service token per MC;
3. **GC**: the real ``python -m darktower.gc`` in its own process; the load
   generator (another process) registers the MCs through it over gRPC, then
   drives ``FastHeartbeat`` closed-loop (warm-up, then the measured window);
4. **floor**: the bare grpclib + asyncpg server of :mod:`.floor` under plain
   asyncio with the same rows pre-inserted and the same load, and the same
   server under trio-asyncio's loop (separating the loop's cost from the
   service logic's);
5. the health checker's statement over a 10,000-MC fleet (GC stopped);
6. everything stopped and removed; the table (and ``--json``) printed.

Each system starts from an emptied table, so none inherits the other's dead
rows. The CPU used by the server, the load generator and PostgreSQL over the
measured window is reported beside the throughput: on a two-core machine they
compete for the same cores, and the server's CPU time per heartbeat is the
figure that does not depend on who else was running.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from darktower.cli.bench import database
from darktower.cli.bench.floor import fast_heartbeat_sql
from darktower.cli.bench.loadgen import LoadConfig
from darktower.cli.bench.procs import (
    BenchError,
    BenchKeys,
    Child,
    CpuSample,
    cpu_sample,
    cpu_usage,
    free_port,
    library_versions,
    machine_facts,
    progress,
    stop_and_report,
    wait_http_ok,
)
from darktower.cli.bench.report import (
    Presentation,
    SystemRow,
    Target,
    ratio,
    run_and_report,
    target_figures,
)
from darktower.gc.config import VARIABLES as GC_VARIABLES
from darktower.gc.repositories import meeting_controllers
from darktower.shared.devstack import EmbeddedServerError

#: Targets from the issue.
TARGET_HEARTBEATS_PER_S = 1000.0
TARGET_FLOOR_RATIO = 0.7
TARGET_HEALTH_STATEMENT_MS = 50.0

_GC_READY_TIMEOUT_S = 60.0
_FLOOR_READY_TIMEOUT_S = 30.0
#: Beyond warm-up + duration (+ registration), how long a load generator may
#: take before the bench gives up on it.
_LOADGEN_SLACK_S = 60.0
_REGISTER_BUDGET_S = 130.0
_LIBRARIES = ("grpclib", "asyncpg", "trio", "trio-asyncio", "protobuf", "h2")


@dataclass(frozen=True, slots=True)
class HeartbeatOptions:
    """Everything ``dt bench heartbeats`` can be told (defaults = the issue's)."""

    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 64
    channels: int = 4
    mcs: int = 1000
    database_url: str | None = None
    json_path: Path | None = None
    pool_size: int = 10
    call_timeout_s: float = 5.0
    trio_floor: bool = True
    health_mcs: int = 10_000
    health_runs: int = 20
    health_stale_every: int = 100


@dataclass
class _Run:
    """The state shared by the phases of one bench run."""

    options: HeartbeatOptions
    workdir: Path
    dsn: str
    keys: BenchKeys
    mc_ids: list[str]
    mc_tokens: list[str]

    def base_env(self) -> dict[str, str]:
        """The environment for children: ours minus every GC setting (the
        bench decides those) and minus the database URL (only who needs it
        gets it)."""
        drop = {var.name for var in GC_VARIABLES}
        return {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith("GC_") and k != "DATABASE_URL"
        }


def _drive(
    run: _Run, key: str, label: str, server: Child, port: int, *, register: bool
) -> SystemRow:
    """Run the load generator against ``server`` and account CPU over the
    measured window."""
    opts = run.options
    config = LoadConfig(
        host="127.0.0.1",
        port=port,
        mc_ids=run.mc_ids,
        tokens=run.mc_tokens,
        register=register,
        concurrency=opts.concurrency,
        channels=min(opts.channels, opts.concurrency),
        warmup_s=opts.warmup_s,
        duration_s=opts.duration_s,
        timeout_s=opts.call_timeout_s,
    )
    config_path = run.workdir / f"loadgen-{key}.json"
    config.dump(config_path)
    generator = Child.start(
        f"loadgen-{key}",
        [sys.executable, "-m", "darktower.cli.bench.loadgen", str(config_path)],
        env=run.base_env(),
        log_dir=run.workdir,
        json_stdout=True,
    )
    budget = opts.warmup_s + opts.duration_s + _LOADGEN_SLACK_S
    deadline = time.monotonic() + budget + (_REGISTER_BUDGET_S if register else 0.0)
    result: dict[str, Any] = {}
    before: CpuSample | None = None
    after: CpuSample | None = None
    try:
        while True:
            line = generator.next_line(deadline)
            event = line.pop("event", None)
            if event == "registered":
                result["registration"] = line
                progress(f"{label}: registered {len(run.mc_ids)} MCs in {line['seconds']:.2f} s")
            elif event == "measure_start":
                before = cpu_sample(server.proc.pid, generator.proc.pid)
            elif event == "measure_end":
                after = cpu_sample(server.proc.pid, generator.proc.pid)
            elif event == "result":
                result.update(line)
                break
    finally:
        generator.stop()
    if not server.alive():
        raise BenchError(f"{server.name} died under load\n{server.log_tail()}")
    cpu = cpu_usage(before, after, int(result["calls"])) if before and after else {}
    result["rows_by_health"] = database.controller_health(run.dsn)
    progress(f"{label}: {result['throughput']:,.1f} heartbeats/s, errors {result['errors']}")
    return SystemRow(key, label, result, cpu)


def _run_gc(run: _Run) -> SystemRow:
    label = "GC (python -m darktower.gc)"
    database.reset_controllers(run.dsn)
    grpc_port, http_port = free_port(), free_port()
    env = run.base_env()
    env.update(
        DATABASE_URL=run.dsn,
        AUTH_JWKS=str(run.keys.directory / "jwks.json"),
        GC_SIGNING_KEY=str(run.keys.directory / "signing_key.pem"),
        GC_SERVICE_TOKEN=run.keys.gc_token(),
        GC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        GC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        GC_ID="gc-bench",
        GC_DB_POOL_SIZE=str(run.options.pool_size),
        GC_LOG_LEVEL="WARNING",
    )
    progress(f"{label}: starting")
    gc = Child.start("gc", [sys.executable, "-m", "darktower.gc"], env=env, log_dir=run.workdir)
    try:
        wait_http_ok(gc, f"http://127.0.0.1:{http_port}/health/ready", _GC_READY_TIMEOUT_S)
        return _drive(run, "gc", label, gc, grpc_port, register=True)
    finally:
        stop_and_report(gc, label)


def _run_floor(run: _Run, loop: str) -> SystemRow:
    key = "floor_" + loop.replace("-", "_")
    label = f"floor: bare grpclib+asyncpg, {loop}"
    database.reset_controllers(run.dsn, run.mc_ids)
    env = run.base_env()
    env["DATABASE_URL"] = run.dsn
    progress(f"{label}: starting")
    argv = [sys.executable, "-m", "darktower.cli.bench.floor"]
    argv += ["--loop", loop, "--pool-size", str(run.options.pool_size)]
    floor = Child.start(
        key,
        argv,
        env=env,
        log_dir=run.workdir,
        json_stdout=True,
    )
    try:
        ready = floor.next_line(time.monotonic() + _FLOOR_READY_TIMEOUT_S)
        if loop == "asyncio" and ready.get("trio_asyncio_loaded"):
            raise BenchError("the plain-asyncio floor loaded trio_asyncio; it is not a floor")
        return _drive(run, key, label, floor, int(ready["port"]), register=False)
    finally:
        stop_and_report(floor, label)


@dataclass(frozen=True, slots=True)
class Measurement:
    """The outcome of one run: the table's rows and the JSON figures."""

    rows: list[SystemRow]
    targets: list[Target]
    figures: dict[str, Any]


def measure(options: HeartbeatOptions) -> Measurement:
    """Run the whole benchmark (every process and file it made is gone when
    this returns or raises)."""
    if fast_heartbeat_sql() != meeting_controllers._FAST_HEARTBEAT:
        raise BenchError("the floor's statement differs from the GC's")
    server_dsn = options.database_url
    machine = machine_facts()
    machine["libraries"] = library_versions(_LIBRARIES)
    rows: list[SystemRow] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dt-bench-")))
        progress(f"database: {database.describe_server(server_dsn)}")
        dsn = stack.enter_context(database.bench_database(server_dsn))
        pg = database.prepare(dsn)
        pg["where"] = database.describe_server(server_dsn)
        pg["database"] = urlsplit(dsn).path.lstrip("/")
        machine["postgresql"] = pg
        bench_keys = BenchKeys.create(workdir / "keys")
        mc_ids = [f"mc-bench-{i:05d}" for i in range(options.mcs)]
        mc_tokens = [bench_keys.mc_token(mc_id) for mc_id in mc_ids]
        run = _Run(options, workdir, dsn, bench_keys, mc_ids, mc_tokens)
        rows.append(_run_gc(run))
        rows.append(_run_floor(run, "asyncio"))
        if options.trio_floor:
            rows.append(_run_floor(run, "trio-asyncio"))
        progress(f"health-check statement: {options.health_mcs:,} MCs, {options.health_runs} runs")
        health = database.time_health_statement(
            dsn,
            mcs=options.health_mcs,
            runs=options.health_runs,
            stale_every=options.health_stale_every,
        )
        progress("cleaning up")
    ratios = _ratios(rows)
    targets = _targets(rows, ratios, health)
    figures = {
        "benchmark": "heartbeats",
        "machine": machine,
        "settings": _settings(options),
        "systems": {
            row.key: {"label": row.label, **row.result, "cpu": dict(row.cpu)} for row in rows
        },
        "ratios": ratios,
        "health_statement": health,
        "targets": target_figures(targets),
    }
    return Measurement(rows, targets, figures)


def _settings(options: HeartbeatOptions) -> dict[str, object]:
    return {
        "mcs": options.mcs,
        "concurrency": options.concurrency,
        "channels": min(options.channels, options.concurrency),
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "pool_size": options.pool_size,
    }


def _ratios(rows: list[SystemRow]) -> dict[str, float | None]:
    by_key = {row.key: row.throughput for row in rows}
    cpu = {row.key: row.cpu.get("server_us_per_call") or 0.0 for row in rows}
    ratios = {
        "gc_to_floor_asyncio": ratio(by_key["gc"], by_key["floor_asyncio"]),
        # Floor CPU per heartbeat over the GC's: the throughput ratio the GC
        # would reach were the server's own CPU the only limit.
        "cpu_floor_asyncio_to_gc": ratio(cpu["floor_asyncio"], cpu["gc"]),
    }
    if "floor_trio_asyncio" in by_key:
        ratios["gc_to_floor_trio_asyncio"] = ratio(by_key["gc"], by_key["floor_trio_asyncio"])
        ratios["floor_trio_asyncio_to_floor_asyncio"] = ratio(
            by_key["floor_trio_asyncio"], by_key["floor_asyncio"]
        )
    return ratios


def _targets(
    rows: list[SystemRow], ratios: dict[str, float | None], health: dict[str, Any]
) -> list[Target]:
    gc = next(row for row in rows if row.key == "gc")
    worst_health_ms = max(health["marking"]["max_ms"], health["noop"]["max_ms"])
    return [
        Target("GC heartbeats/s", gc.throughput, TARGET_HEARTBEATS_PER_S, True, "/s"),
        Target(
            "GC / floor (asyncio) throughput",
            ratios["gc_to_floor_asyncio"],
            TARGET_FLOOR_RATIO,
            True,
            "x",
        ),
        Target(
            f"health statement over {health['mcs']:,} MCs, worst of {health['runs']} runs",
            worst_health_ms,
            TARGET_HEALTH_STATEMENT_MS,
            False,
            "ms",
        ),
    ]


def _extra_lines(figures: dict[str, Any]) -> list[str]:
    ratios = figures["ratios"]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        f"GC / floor (asyncio)         = {shown(ratios['gc_to_floor_asyncio'])}",
        f"server CPU per heartbeat, floor (asyncio) / GC = "
        f"{shown(ratios['cpu_floor_asyncio_to_gc'])}",
    ]
    if "gc_to_floor_trio_asyncio" in ratios:
        lines += [
            f"GC / floor (trio-asyncio)    = {shown(ratios['gc_to_floor_trio_asyncio'])}"
            "   (the service logic alone)",
            f"floor trio-asyncio / asyncio = "
            f"{shown(ratios['floor_trio_asyncio_to_floor_asyncio'])}"
            "   (the asyncio-on-trio loop alone)",
        ]
    registration = figures["systems"]["gc"].get("registration")
    if registration:
        lines.append(
            f"GC registration of {figures['settings']['mcs']:,} MCs: "
            f"{registration['seconds']:.2f} s, errors {registration['errors'] or 0}"
        )
    h = figures["health_statement"]
    lines += [
        "",
        f"health-check statement (meeting_controllers.mark_stale_unhealthy) over {h['mcs']:,} "
        f"MCs, {h['runs']} runs:",
        f"  marking {h['stale']} stale   min {h['marking']['min_ms']:.2f} / median "
        f"{h['marking']['median_ms']:.2f} / max {h['marking']['max_ms']:.2f} ms",
        f"  nothing stale      min {h['noop']['min_ms']:.2f} / median "
        f"{h['noop']['median_ms']:.2f} / max {h['noop']['max_ms']:.2f} ms",
    ]
    return lines


#: How ``dt bench heartbeats`` prints its figures.
PRESENTATION = Presentation("heartbeats", _extra_lines)


def run_heartbeats(options: HeartbeatOptions) -> int:
    """The ``dt bench heartbeats`` handler (see :func:`report.run_and_report`)."""
    return run_and_report(
        lambda: measure(options),
        PRESENTATION,
        json_path=options.json_path,
        expected_errors=(BenchError, EmbeddedServerError),
    )
