"""``dt bench assign``: one MC process's assignment throughput against its floor.

The run, in one process tree on loopback:

1. Redis: ``--redis-url`` / ``REDIS_URL`` if given, else an embedded server
   (:func:`darktower.shared.devstack.embedded_redis`). The MC writes its
   fenced keys without a prefix (``meeting:{id}:...``), so on a shared
   server give the bench a logical database of its own (``.../15``). The
   bench never flushes anything: every meeting id it sends starts with a
   run-unique ``bench-<run>-`` and the floor's keys also carry the prefix
   ``dtbench:<run>:``; at the end exactly those keys are counted and
   deleted (``SCAN`` + ``UNLINK``).
2. a throwaway signing key and JWKS; the GC service token the load
   generator presents (aud ``mc``, scope ``mc.assign``, ``sub`` = the GC id
   it names in every request) and the MC's own service token.
3. **MC**: the real ``python -m darktower.mc`` in its own process, with a
   capacity large enough never to refuse. No GC is started: an assignment
   does not involve the GC, so ``GC_GRPC_URL`` points at a closed loopback
   port and the MC keeps retrying its registration in the background (1 s
   -> 30 s backoff, a handful of attempts over a run) - the cheapest honest
   setup. Its ``/health/ready`` then says 503 "not registered", so
   readiness is ``/health/live`` plus a first *accepted* assignment (the
   load generator's probe). A separate load-generator process
   (:mod:`.assign_loadgen`) drives ``AssignMeetingWithMh`` closed-loop over
   real gRPC: warm-up, then the measured window.
4. **floor**: the bare grpclib + coredis ``EVALSHA`` server of
   :mod:`.assign_floor` under plain asyncio, the same load.
5. the bench's keys deleted, every process stopped; the table (and
   ``--json``) printed.

Beside the throughput: the CPU used by the server, the load generator and
the Redis server over the measured window (on a two-core machine they share
the cores), and the server's CPU time per accepted assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import psutil

from darktower.cli.bench.assign_loadgen import AssignLoadConfig
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
    process_cpu,
    progress,
    stop_and_report,
    wait_http_ok,
)
from darktower.cli.bench.report import (
    REDIS,
    Presentation,
    SystemRow,
    Target,
    ratio,
    run_and_report,
    target_figures,
)
from darktower.mc.config import VARIABLES as MC_VARIABLES
from darktower.shared.devstack import EmbeddedServerError, embedded_redis

#: Targets from the issue.
TARGET_ACCEPTS_PER_S = 800.0
TARGET_FLOOR_RATIO = 0.6

MC_ID = "mc-bench"
GC_ID = "gc-bench"
#: Never reached: one meeting per call for the whole run.
MC_MAX_MEETINGS = 10_000_000
MC_MAX_PARTICIPANTS = 2**31 - 1
#: No participant ever joins a bench meeting; none may end during the run.
MC_EMPTY_MEETING_TIMEOUT_S = 86_400

_MC_LIVE_TIMEOUT_S = 60.0
_FLOOR_READY_TIMEOUT_S = 30.0
#: How long the load generator's probe may wait for a first accept.
_PROBE_TIMEOUT_S = 60.0
_LOADGEN_SLACK_S = 60.0
_REDIS_TIMEOUT_S = 120.0
_SCAN_BATCH = 1000
_LIBRARIES = ("grpclib", "coredis", "anyio", "trio", "trio-asyncio", "protobuf", "h2", "hiredis")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AssignOptions:
    """Everything ``dt bench assign`` can be told (defaults = the issue's)."""

    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 64
    channels: int = 4
    redis_url: str | None = None
    json_path: Path | None = None
    call_timeout_s: float = 5.0


# --------------------------------------------------------------------------
# Redis, from this (synchronous) process


def _run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one asyncio coroutine (coredis on anyio's asyncio backend) from
    synchronous code, in a private thread with its own loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dt-bench-redis") as pool:
        return pool.submit(lambda: asyncio.run(fn())).result(timeout=_REDIS_TIMEOUT_S)


def _redacted(url: str) -> str:
    """The URL without credentials (for the report)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or '/0'}"


def _redis_facts(url: str) -> dict[str, Any]:
    """Version, pid (for CPU accounting when the server is local) and the
    settings that change write cost."""

    async def facts() -> dict[str, Any]:
        client: coredis.Redis[Any] = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            info = await client.info("server")
            settings: dict[str, Any] = {}
            with contextlib.suppress(coredis.exceptions.RedisError):
                config = await client.config_get(["appendonly", "appendfsync", "save"])
                settings = {k: v for k, v in config.items() if k in ("appendonly", "appendfsync")}
                settings["save"] = config.get("save") or '""'
            return {
                "version": info.get("redis_version", "?"),
                "process_id": info.get("process_id"),
                "settings": settings,
            }

    try:
        return _run_async(facts)
    except (coredis.exceptions.RedisError, OSError, TimeoutError) as exc:
        raise BenchError(f"Redis at {_redacted(url)} is unreachable: {exc}") from exc


def _sweep(url: str, patterns: list[str]) -> dict[str, int]:
    """Delete every key matching ``patterns``; per pattern, how many
    meetings (``...:gen`` keys) were among them."""

    async def sweep() -> dict[str, int]:
        meetings: dict[str, int] = {}
        client: coredis.Redis[Any] = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            for pattern in patterns:
                meetings[pattern] = 0
                batch: list[str] = []
                async for key in client.scan_iter(match=pattern, count=_SCAN_BATCH):
                    meetings[pattern] += key.endswith(":gen")
                    batch.append(key)
                    if len(batch) >= _SCAN_BATCH:
                        await client.unlink(batch)
                        batch = []
                if batch:
                    await client.unlink(batch)
        return meetings

    return _run_async(sweep)


def _redis_cpu(pid: int | None) -> Callable[[], float]:
    """The Redis server's CPU seconds, if it runs on this machine and is
    visible (else always 0: the column then shows 0 and says so)."""
    if pid is None or not psutil.pid_exists(pid):
        return lambda: 0.0
    return lambda: process_cpu(pid)


# --------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """The state shared by the phases of one bench run."""

    options: AssignOptions
    workdir: Path
    redis_url: str
    run_id: str
    keys: BenchKeys
    redis_cpu: Callable[[], float]

    def meeting_prefix(self, system: str) -> str:
        return f"bench-{self.run_id}-{system}-"

    @property
    def floor_key_prefix(self) -> str:
        return f"dtbench:{self.run_id}:"

    def sweep_patterns(self) -> list[str]:
        # The MC's keys: meeting:{bench-<run>-...}:*; the floor's: dtbench:<run>:*.
        return [f"meeting:{{bench-{self.run_id}-*", f"{self.floor_key_prefix}*"]

    def base_env(self) -> dict[str, str]:
        """Ours minus every MC setting (the bench decides those), the GC's,
        and the database and Redis URLs (only who needs one gets it)."""
        drop = {var.name for var in MC_VARIABLES} | {"DATABASE_URL", "REDIS_URL"}
        return {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith(("MC_", "GC_"))
        }


def _drive(run: _Run, key: str, label: str, server: Child, port: int) -> SystemRow:
    """Run the load generator against ``server`` and account CPU over the
    measured window."""
    opts = run.options
    config = AssignLoadConfig(
        host="127.0.0.1",
        port=port,
        token=run.keys.gc_token(GC_ID),
        gc_id=GC_ID,
        meeting_prefix=run.meeting_prefix(key),
        concurrency=opts.concurrency,
        channels=min(opts.channels, opts.concurrency),
        warmup_s=opts.warmup_s,
        duration_s=opts.duration_s,
        timeout_s=opts.call_timeout_s,
        ready_timeout_s=_PROBE_TIMEOUT_S,
    )
    config_path = run.workdir / f"loadgen-{key}.json"
    config.dump(config_path)
    generator = Child.start(
        f"loadgen-{key}",
        [sys.executable, "-m", "darktower.cli.bench.assign_loadgen", str(config_path)],
        env=run.base_env(),
        log_dir=run.workdir,
        json_stdout=True,
    )
    deadline = (
        time.monotonic() + _PROBE_TIMEOUT_S + opts.warmup_s + opts.duration_s + _LOADGEN_SLACK_S
    )
    result: dict[str, Any] = {}
    before: CpuSample | None = None
    after: CpuSample | None = None
    try:
        while True:
            line = generator.next_line(deadline)
            event = line.pop("event", None)
            if event == "ready":
                result["ready"] = line
                progress(f"{label}: first accept after {line['seconds']:.2f} s")
            elif event == "measure_start":
                before = cpu_sample(server.proc.pid, generator.proc.pid, backend_cpu=run.redis_cpu)
            elif event == "measure_end":
                after = cpu_sample(server.proc.pid, generator.proc.pid, backend_cpu=run.redis_cpu)
            elif event == "result":
                result.update(line)
                break
    finally:
        generator.stop()
    if not server.alive():
        raise BenchError(f"{server.name} died under load\n{server.log_tail()}")
    calls = int(result["calls"])
    cpu = cpu_usage(before, after, calls, backend_key="redis") if before and after else {}
    progress(f"{label}: {result['throughput']:,.1f} accepts/s, errors {result['errors']}")
    return SystemRow(key, label, result, cpu)


def _run_mc(run: _Run) -> SystemRow:
    label = "MC (python -m darktower.mc)"
    grpc_port, http_port, gc_port = free_port(), free_port(), free_port()
    env = run.base_env()
    env.update(
        REDIS_URL=run.redis_url,
        # Nothing listens there (see the module docstring).
        GC_GRPC_URL=f"http://127.0.0.1:{gc_port}",
        AUTH_JWKS=str(run.keys.jwks_path),
        MC_ID=MC_ID,
        MC_SERVICE_TOKEN=run.keys.mc_token(MC_ID),
        MC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        MC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        MC_MAX_MEETINGS=str(MC_MAX_MEETINGS),
        MC_MAX_PARTICIPANTS=str(MC_MAX_PARTICIPANTS),
        MC_EMPTY_MEETING_TIMEOUT_S=str(MC_EMPTY_MEETING_TIMEOUT_S),
        # Its meetings never end (no participant, no timeout): a drain could
        # only wait out its bound, so stop at once (SIGTERM still drains).
        MC_DRAIN_TIMEOUT_S="0",
        MC_LOG_LEVEL="WARNING",
    )
    progress(f"{label}: starting")
    mc = Child.start("mc", [sys.executable, "-m", "darktower.mc"], env=env, log_dir=run.workdir)
    try:
        wait_http_ok(mc, f"http://127.0.0.1:{http_port}/health/live", _MC_LIVE_TIMEOUT_S)
        return _drive(run, "mc", label, mc, grpc_port)
    finally:
        _stop_quietly(mc, label)


def _stop_quietly(mc: Child, label: str) -> None:
    """Stop the MC. Its log holds the expected registration warnings (no GC);
    it is shown only if the MC did not exit cleanly."""
    status = mc.stop()
    if status not in (0, None):
        progress(f"{label}: exit status {status}\n{mc.log_tail()}")


def _run_floor(run: _Run) -> SystemRow:
    key = "floor"
    label = "floor: bare grpclib+coredis EVALSHA, asyncio"
    env = run.base_env()
    env["REDIS_URL"] = run.redis_url
    progress(f"{label}: starting")
    argv = [sys.executable, "-m", "darktower.cli.bench.assign_floor"]
    argv += ["--key-prefix", run.floor_key_prefix, "--mc-id", MC_ID]
    floor = Child.start(key, argv, env=env, log_dir=run.workdir, json_stdout=True)
    try:
        ready = floor.next_line(time.monotonic() + _FLOOR_READY_TIMEOUT_S)
        if ready.get("trio_asyncio_loaded"):
            raise BenchError("the plain-asyncio floor loaded trio_asyncio; it is not a floor")
        return _drive(run, key, label, floor, int(ready["port"]))
    finally:
        stop_and_report(floor, label)


@contextlib.contextmanager
def _redis(options: AssignOptions) -> Iterator[tuple[str, str]]:
    """The Redis URL to use and where it is (for the report)."""
    url = options.redis_url or os.environ.get("REDIS_URL") or None
    if url is not None:
        yield url, _redacted(url)
        return
    progress("redis: starting an embedded server")
    with embedded_redis() as embedded:
        yield embedded, f"embedded ({_redacted(embedded)})"


@dataclass(frozen=True, slots=True)
class Measurement:
    """The outcome of one run: the table's rows and the JSON figures."""

    rows: list[SystemRow]
    targets: list[Target]
    figures: dict[str, Any]


def measure(options: AssignOptions) -> Measurement:
    """Run the whole benchmark (every process, file and Redis key it made is
    gone when this returns or raises)."""
    machine = machine_facts()
    machine["libraries"] = library_versions(_LIBRARIES)
    rows: list[SystemRow] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dt-bench-")))
        redis_url, where = stack.enter_context(_redis(options))
        facts = _redis_facts(redis_url)
        facts["where"] = where
        machine["redis"] = facts
        progress(f"redis: {facts['version']} at {where}")
        run = _Run(
            options=options,
            workdir=workdir,
            redis_url=redis_url,
            run_id=uuid.uuid4().hex[:12],
            keys=BenchKeys.create(workdir / "keys"),
            redis_cpu=_redis_cpu(facts.get("process_id")),
        )
        facts["cpu_visible"] = facts.get("process_id") is not None and psutil.pid_exists(
            int(facts["process_id"])
        )
        # Registered first, so the keys go even when a phase fails.
        stored: dict[str, int] = {}
        stack.callback(lambda: stored.update(_cleanup(run)))
        rows.append(_run_mc(run))
        rows.append(_run_floor(run))
        progress("cleaning up")
    # Meetings each system really stored (probe + warm-up + window + calls
    # completing after it): at least every accept counted.
    patterns = dict(zip(("mc", "floor"), run.sweep_patterns(), strict=True))
    ratios = _ratios(rows)
    targets = _targets(rows, ratios)
    figures = {
        "benchmark": "assign",
        "machine": machine,
        "settings": _settings(options),
        "systems": {
            row.key: {
                "label": row.label,
                **row.result,
                "meetings_stored": stored.get(patterns[row.key]),
                "cpu": dict(row.cpu),
            }
            for row in rows
        },
        "ratios": ratios,
        "redis_keys_deleted": stored,
        "targets": target_figures(targets),
    }
    return Measurement(rows, targets, figures)


def _cleanup(run: _Run) -> dict[str, int]:
    try:
        return _sweep(run.redis_url, run.sweep_patterns())
    except (coredis.exceptions.RedisError, OSError, TimeoutError) as exc:
        progress(f"warning: could not delete the bench's Redis keys {run.sweep_patterns()}: {exc}")
        return {}


def _settings(options: AssignOptions) -> dict[str, object]:
    return {
        "concurrency": options.concurrency,
        "channels": min(options.channels, options.concurrency),
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "mh_per_meeting": 2,
    }


def _ratios(rows: list[SystemRow]) -> dict[str, float | None]:
    by_key = {row.key: row.throughput for row in rows}
    cpu = {row.key: row.cpu.get("server_us_per_call") or 0.0 for row in rows}
    return {
        "mc_to_floor": ratio(by_key["mc"], by_key["floor"]),
        # Floor CPU per accept over the MC's: the throughput ratio the MC
        # would reach were the server's own CPU the only limit.
        "cpu_floor_to_mc": ratio(cpu["floor"], cpu["mc"]),
    }


def _targets(rows: list[SystemRow], ratios: dict[str, float | None]) -> list[Target]:
    mc = next(row for row in rows if row.key == "mc")
    return [
        Target("MC accepts/s", mc.throughput, TARGET_ACCEPTS_PER_S, True, "/s"),
        Target("MC / floor throughput", ratios["mc_to_floor"], TARGET_FLOOR_RATIO, True, "x"),
    ]


def _extra_lines(figures: dict[str, Any]) -> list[str]:
    ratios = figures["ratios"]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        f"MC / floor                              = {shown(ratios['mc_to_floor'])}",
        f"server CPU per accept, floor / MC       = {shown(ratios['cpu_floor_to_mc'])}",
    ]
    for key, system in figures["systems"].items():
        lines.append(
            f"{key}: meetings stored in Redis (all phases) {system.get('meetings_stored')}, "
            f"warm-up calls {system.get('warmup_calls')}, warm-up errors "
            f"{system.get('warmup_errors')}"
        )
    if not figures["machine"]["redis"].get("cpu_visible"):
        lines.append("redis CPU% is 0: the Redis server's process is not visible from here")
    lines.append(
        "no GC runs: the MC's registration retries in the background (its readiness is "
        "/health/live + a first accepted assignment)"
    )
    return lines


#: How ``dt bench assign`` prints its figures.
PRESENTATION = Presentation("assign", _extra_lines, unit="accept", backend=REDIS)


def run_assign(options: AssignOptions) -> int:
    """The ``dt bench assign`` handler (see :func:`report.run_and_report`)."""
    return run_and_report(
        lambda: measure(options),
        PRESENTATION,
        json_path=options.json_path,
        expected_errors=(BenchError, EmbeddedServerError),
    )
