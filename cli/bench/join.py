"""``dt bench join``: one GC process's join latency under open-loop load, against its floor.

The run, in one process tree on loopback:

1. a fresh bench database (``--database-url`` / ``DATABASE_URL``, else an
   embedded server) and Redis (``--redis-url`` / ``REDIS_URL``, else an
   embedded server; on a shared server give the bench a logical database of
   its own, e.g. ``.../15``);
2. a throwaway signing key and JWKS (standing in for the AC): user tokens
   (one org, a few users), the GC's service token, MC and MH tokens;
3. **the stack**: the real ``python -m darktower.gc``; simulated MHs
   registering and reporting load over gRPC from a ``dt mh-sim`` process
   (:mod:`darktower.cli.mh_sim`; two idle MHs in two zones);
   ``--mcs`` real ``python -m darktower.mc`` processes registering
   themselves and accepting assignments over real gRPC, with Redis fencing.
   Heartbeats and load reports every second so the fleet turns healthy at
   once. Ready = every MC healthy in the database and a probe meeting
   created and joined through the API;
4. **re-joins** (the assignment exists and is found): ``--meetings``
   meetings created through ``POST /api/v1/meetings`` and joined once
   (closed loop, not measured), then joined again round-robin, open-loop at
   each rate of ``--rates`` (default 50, 100, 200 joins/s), then the search
   (below), then **saturation**: closed loop over ``--concurrency``
   connections, the GC's highest re-join throughput;
5. **first joins** (no assignment yet: the GC picks MHs and an MC, calls it
   and records the assignment): per rate, fresh meetings created through
   the API (not measured), each then joined once, open-loop at the rate;
   then the search. Re-joins go first because an overloaded first-join
   phase leaves the GC a backlog of abandoned requests (bounded by its
   request deadline) that nothing should measure through. Latency is always
   measured from each request's intended send time (:mod:`.join_loadgen`);
6. **the search**: above the largest listed rate, rates grow by ``--step``
   (for each kind, when every listed rate passed) until P99 exceeds 100 ms
   (or more than 0.1 % of the joins fail) or ``--max-rate``; the highest
   rate that passed, with every lower measured rate passing too, is
   reported; then the stack is stopped;
7. **the floor** (:mod:`.join_floor`): the same HTTP stack (hypercorn on trio,
   the GC's configuration, Starlette) answering the bytes of a real join
   response, driven by the same generator at the same rates and to
   saturation. The ratio of the saturated throughputs is the service's
   overhead;
8. cleanup: every process stopped, the Redis keys of every meeting in the
   bench database deleted (the MC writes ``meeting:{id}:*``; nothing is
   flushed, nothing else touched), the database dropped.

Two settings keep the measurement about the join: the bench's meetings never
get a participant, so the MCs' empty-meeting timeout is a day (re-joins must
find their assignment), and the MCs' fencing watch runs hourly instead of
every 5 s - it writes every hosted meeting to Redis each round, and the
bench leaves its MCs hosting thousands of meetings, far past a real MC's
load, which would tax later rates for earlier ones on a two-core machine.
Between phases the bench waits (bounded) for the GC to go idle, so a phase
does not inherit an overloaded predecessor's backlog.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import coredis
import coredis.exceptions
import psutil
import trio

from darktower.cli import mh_sim_cmd
from darktower.cli.bench import database
from darktower.cli.bench.assign import _redacted, _redis_facts, _run_async
from darktower.cli.bench.join_loadgen import JoinLoadConfig, open_loop_counts
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
    postgres_cpu,
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
from darktower.mc.config import VARIABLES as MC_VARIABLES
from darktower.mc.repositories.meeting_state import MeetingStateStore
from darktower.shared import tokens
from darktower.shared.db import open_pool
from darktower.shared.devstack import EmbeddedServerError, embedded_redis
from darktower.shared.seam import asyncio_loop, run_aio

#: Targets from the issue.
TARGET_RATE = 100
TARGET_FIRST_JOIN_P95_MS = 20.0
TARGET_REJOIN_P95_MS = 10.0
TARGET_FLOOR_RATIO = 0.5
#: The search's bar: P99 at most this, and at most this fraction of joins failing.
P99_BOUND_MS = 100.0
MAX_ERROR_FRACTION = 0.001

GC_ID = "gc-bench"
MC_ID_PREFIX = "mc-bench-join-"
MH_ID_PREFIX = "mh-bench-join-"
MH_COUNT = 2
MH_ZONES = ("zone-a", "zone-b")
#: Idle MHs of huge capacity: the MHs never limit the joins measured.
MH_MAX_STREAMS = 1_000_000
MH_LOAD = "constant:0"
#: Users (tokens) the joins are spread over, all of one org.
USERS = 20
#: Never reached: every first join of a run stays hosted.
MC_MAX_MEETINGS = 10_000_000
MC_MAX_PARTICIPANTS = 2**31 - 1
MC_EMPTY_MEETING_TIMEOUT_S = 86_400
MC_FENCE_CHECK_INTERVAL_S = 3_600
#: Heartbeats/load reports every second: healthy within a second of starting.
GC_ENV = {
    "GC_FAST_HEARTBEAT_MS": "1000",
    "GC_LOAD_REPORT_MS": "1000",
    "GC_STALE_AFTER_S": "15",
    "GC_HEALTH_CHECK_INTERVAL_S": "2",
    # The bench creates thousands of meetings per user (the create limit is
    # per user): measured is the join, not the limiter.
    "GC_CREATES_PER_MINUTE": "1000000",
}

_GC_READY_TIMEOUT_S = 60.0
_MC_READY_TIMEOUT_S = 60.0
_HEALTHY_TIMEOUT_S = 30.0
_FLOOR_READY_TIMEOUT_S = 30.0
_PROBE_TIMEOUT_S = 60.0
_LOADGEN_SLACK_S = 60.0
_EXIT_GRACE_S = 10.0
#: Meetings are created at well over this rate; the bound only catches a hang.
_MIN_CREATE_PER_S = 20.0
_CREATE_CONCURRENCY = 16
#: Settling: the server counts as idle below this (% of one core) over two
#: consecutive windows of this length. The wait is bounded by more than the
#: GC's own request deadline (``GC_JOIN_TIMEOUT_S``, 40 s): no backlog outlives it.
_IDLE_PCT = 20.0
_IDLE_WINDOW_S = 0.25
_SETTLE_MAX_S = 60.0
_REDIS_BATCH = 256
_LIBRARIES = (
    "hypercorn", "starlette", "h11", "trio", "trio-asyncio", "asyncpg", "grpclib", "coredis",
    "pyjwt", "cryptography", "hdrhistogram",
)  # fmt: skip

FIRST = "first_join"
REJOIN = "re_join"
KIND_LABELS = {FIRST: "first join", REJOIN: "re-join"}


@dataclass(frozen=True, slots=True)
class JoinOptions:
    """Everything ``dt bench join`` can be told (defaults = the issue's)."""

    rates: tuple[int, ...] = (50, 100, 200)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    search: bool = True
    step: float = 1.25
    max_rate: int = 2000
    concurrency: int = 32
    mcs: int = 2
    meetings: int = 200
    max_connections: int = 256
    database_url: str | None = None
    redis_url: str | None = None
    json_path: Path | None = None
    request_timeout_s: float = 5.0


# --------------------------------------------------------------------------
# Pure rules (unit-tested)


def error_fraction(result: dict[str, Any]) -> float:
    """Failed joins among the measured ones."""
    errors = sum(int(n) for n in dict(result.get("errors", {})).values())
    total = errors + int(result.get("calls", 0))
    return errors / total if total else 1.0


def passes(result: dict[str, Any], bound_ms: float = P99_BOUND_MS) -> bool:
    """The search's bar: P99 within ``bound_ms`` and at most 0.1 % failed."""
    p99 = result.get("latency_ms", {}).get("p99")
    return p99 is not None and p99 <= bound_ms and error_fraction(result) <= MAX_ERROR_FRACTION


def next_rate(rate: int, step: float) -> int:
    """The search's next rate (always at least one more)."""
    return max(rate + 1, round(rate * step))


def highest_passing(outcomes: Sequence[tuple[int, bool]]) -> int | None:
    """The highest rate that passed with every lower measured rate passing
    too (a pass above a failure is noise, not capacity); None if the lowest
    failed."""
    best = None
    for rate, passed in sorted(outcomes):
        if not passed:
            break
        best = rate
    return best


def first_join_count(rate: int, warmup_s: float, duration_s: float) -> int:
    """Meetings an open-loop first-join phase consumes (one per request)."""
    return sum(open_loop_counts(rate, warmup_s, duration_s))


# --------------------------------------------------------------------------
# The run


@dataclass
class JoinRun:
    """The state shared by the phases of one run of the join stack (this
    bench's, and :mod:`.mixed`'s)."""

    options: JoinOptions
    workdir: Path
    dsn: str
    redis_url: str
    keys: BenchKeys
    org_id: str
    user_tokens: list[str]
    #: The Redis server's process, when it runs on this machine (CPU accounting).
    redis_pid: int | None = None
    jobs: int = 0
    #: Meetings created and joined once before the re-join phases.
    pool: list[str] = field(default_factory=list)
    creation: list[dict[str, Any]] = field(default_factory=list)

    def base_env(self) -> dict[str, str]:
        """Ours minus every GC/MC setting (the bench decides those) and the
        database and Redis URLs (only who needs one gets it)."""
        drop = {var.name for var in (*GC_VARIABLES, *MC_VARIABLES)} | {"DATABASE_URL", "REDIS_URL"}
        return {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith(("GC_", "MC_"))
        }

    def job_config(self, mode: str, port: int) -> JoinLoadConfig:
        """A job against the server on ``port`` (``dataclasses.replace`` adds
        the mode's own fields)."""
        return JoinLoadConfig(
            mode=mode,
            host="127.0.0.1",
            port=port,
            tokens=self.user_tokens,
            timeout_s=self.options.request_timeout_s,
            max_connections=self.options.max_connections,
        )


@dataclass
class Server:
    """A server under load: its process and HTTP port."""

    child: Child
    port: int
    backend_cpu: Callable[[], float] = postgres_cpu


def _start_job(run: JoinRun, name: str, config: JoinLoadConfig) -> Child:
    run.jobs += 1
    path = run.workdir / f"job-{run.jobs:03d}-{name}.json"
    config.dump(path)
    return Child.start(
        f"loadgen-{run.jobs:03d}-{name}",
        [sys.executable, "-m", "darktower.cli.bench.join_loadgen", str(path)],
        env=run.base_env(),
        log_dir=run.workdir,
        json_stdout=True,
    )


def run_job(
    run: JoinRun,
    name: str,
    config: JoinLoadConfig,
    budget_s: float,
    server: Server | None = None,
    *,
    on_window: Callable[[str, Child], None] | None = None,
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Run one load-generator job to its result; with ``server``, CPU is
    accounted over the measured window. ``on_window(event, generator)`` is
    called at ``measure_start`` and ``measure_end`` (a caller accounting
    CPU its own way)."""
    generator = _start_job(run, name, config)
    deadline = time.monotonic() + budget_s + _LOADGEN_SLACK_S
    before: CpuSample | None = None
    after: CpuSample | None = None
    result: dict[str, Any] = {}
    try:
        while True:
            line = generator.next_line(deadline)
            event = line.pop("event", None)
            if on_window is not None and event in ("measure_start", "measure_end"):
                on_window(event, generator)
            if server is None:
                pass
            elif event == "measure_start":
                before = _sample(server, generator)
            elif event == "measure_end":
                after = _sample(server, generator)
            if event == "result":
                result = line
                break
    finally:
        if result:  # it exits on its own after its result
            with contextlib.suppress(subprocess.TimeoutExpired):
                generator.proc.wait(timeout=_EXIT_GRACE_S)
        status = generator.stop()
    if status not in (0, None):
        raise BenchError(f"{generator.name} failed\n{generator.log_tail()}")
    if server is not None and not server.child.alive():
        raise BenchError(f"{server.child.name} died under load\n{server.child.log_tail()}")
    calls = int(result.get("calls", 0))
    cpu = cpu_usage(before, after, calls) if before and after else {}
    return result, cpu


def _sample(server: Server, generator: Child) -> CpuSample:
    return cpu_sample(server.child.proc.pid, generator.proc.pid, backend_cpu=server.backend_cpu)


def _settle(server: Server) -> float:
    """Wait (bounded) until the server is idle; the seconds waited. An
    overloaded phase leaves a backlog of requests whose clients gave up (the
    server does not stop work on a closed connection), and the next phase
    must not pay for it."""
    started = time.monotonic()
    try:
        proc = psutil.Process(server.child.proc.pid)
        proc.cpu_percent(None)
        idle = 0
        while idle < 2 and time.monotonic() - started < _SETTLE_MAX_S:
            time.sleep(_IDLE_WINDOW_S)
            idle = idle + 1 if proc.cpu_percent(None) < _IDLE_PCT else 0
    except psutil.Error:
        pass
    return time.monotonic() - started


# --------------------------------------------------------------------------
# The stack: GC, simulated MHs, MCs


def _gc_env(run: JoinRun, http_port: int, grpc_port: int, gc_id: str) -> dict[str, str]:
    env = run.base_env()
    env.update(
        DATABASE_URL=run.dsn,
        AUTH_JWKS=str(run.keys.jwks_path),
        GC_SIGNING_KEY=str(run.keys.directory / "signing_key.pem"),
        GC_SERVICE_TOKEN=run.keys.gc_token(gc_id),
        GC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        GC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        GC_ID=gc_id,
        GC_LOG_LEVEL="WARNING",
        **GC_ENV,
    )
    return env


def _mc_env(run: JoinRun, index: int, grpc_port: int, gc_grpc_port: int) -> dict[str, str]:
    mc_id = f"{MC_ID_PREFIX}{index + 1}"
    env = run.base_env()
    env.update(
        REDIS_URL=run.redis_url,
        GC_GRPC_URL=f"http://127.0.0.1:{gc_grpc_port}",
        AUTH_JWKS=str(run.keys.jwks_path),
        MC_ID=mc_id,
        MC_SERVICE_TOKEN=run.keys.mc_token(mc_id),
        MC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        MC_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MC_WEBTRANSPORT_ENDPOINT=f"https://127.0.0.1:{4433 + index}",
        MC_MAX_MEETINGS=str(MC_MAX_MEETINGS),
        MC_MAX_PARTICIPANTS=str(MC_MAX_PARTICIPANTS),
        MC_EMPTY_MEETING_TIMEOUT_S=str(MC_EMPTY_MEETING_TIMEOUT_S),
        MC_FENCE_CHECK_INTERVAL_S=str(MC_FENCE_CHECK_INTERVAL_S),
        MC_DRAIN_TIMEOUT_S="0",
        MC_LOG_LEVEL="WARNING",
    )
    return env


@dataclass(frozen=True, slots=True)
class Stack:
    """The running stack: its GCs (HTTP servers under load), MCs and the
    simulated MHs' process, and the probe's result (a real join response)."""

    gcs: list[Server]
    mcs: list[Child]
    mhs: Child
    probe: dict[str, Any]


def gc_id(index: int) -> str:
    """The id of GC number ``index`` of a stack (the first is the join bench's)."""
    return GC_ID if index == 0 else f"{GC_ID}-{index + 1}"


@contextlib.contextmanager
def running_stack(run: JoinRun, *, gcs: int = 1) -> Iterator[Stack]:
    """``gcs`` GCs on the one database, simulated MHs (registered with the
    first) and ``run.options.mcs`` MCs (registered with the GCs in turn), all
    ready; stopped (MCs, MHs, GCs) at the end."""
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        grpc_ports: list[int] = []
        for index in range(gcs):
            http_port, grpc_port = free_port(), free_port()
            name = "GC" if gcs == 1 else f"GC {index + 1}"
            progress(f"{name} (python -m darktower.gc): starting")
            gc = Child.start(
                "gc" if index == 0 else f"gc-{index + 1}",
                [sys.executable, "-m", "darktower.gc"],
                env=_gc_env(run, http_port, grpc_port, gc_id(index)),
                log_dir=run.workdir,
            )
            stack.callback(stop_and_report, gc, name)
            servers.append(Server(gc, http_port))
            grpc_ports.append(grpc_port)
        for server in servers:
            wait_http_ok(
                server.child,
                f"http://127.0.0.1:{server.port}/health/ready",
                _GC_READY_TIMEOUT_S,
            )

        mhs = Child.start(
            "mh-sim",
            mh_sim_cmd.command(
                gc_url=f"http://127.0.0.1:{grpc_ports[0]}",
                count=MH_COUNT,
                keys_dir=run.keys.directory,
                id_prefix=MH_ID_PREFIX,
                zones=MH_ZONES,
                load=MH_LOAD,
                max_streams=MH_MAX_STREAMS,
                log_level="WARNING",
            ),
            env=run.base_env(),
            log_dir=run.workdir,
            json_stdout=True,
        )
        stack.callback(stop_and_report, mhs, "simulated MHs")
        ready = mhs.next_line(time.monotonic() + _HEALTHY_TIMEOUT_S + _LOADGEN_SLACK_S)
        if ready.get("event") != "ready":
            raise BenchError(f"simulated MHs did not report ready: {ready}")
        progress(f"simulated MHs: {MH_COUNT} registered and healthy")

        progress(f"MCs (python -m darktower.mc): starting {run.options.mcs}")
        mcs: list[tuple[Child, str]] = []
        for index in range(run.options.mcs):
            env = _mc_env(run, index, free_port(), grpc_ports[index % gcs])
            mc = Child.start(
                env["MC_ID"], [sys.executable, "-m", "darktower.mc"], env=env, log_dir=run.workdir
            )
            stack.callback(stop_and_report, mc, env["MC_ID"])
            mcs.append((mc, env["MC_HTTP_ADDR"]))
        for mc, addr in mcs:
            wait_http_ok(mc, f"http://{addr}/health/ready", _MC_READY_TIMEOUT_S)
        _wait_healthy(run)
        probe_config = replace(
            run.job_config("probe", servers[0].port), ready_timeout_s=_PROBE_TIMEOUT_S
        )
        probe, _ = run_job(run, "probe", probe_config, _PROBE_TIMEOUT_S)
        progress(f"stack ready: probe join after {probe['seconds']:.2f} s")
        yield Stack(servers, [mc for mc, _ in mcs], mhs, probe)


def _wait_healthy(run: JoinRun) -> None:
    """Every MC healthy in the GC's database (its first heartbeat after
    registering), so that joins spread over the whole fleet from the start."""
    deadline = time.monotonic() + _HEALTHY_TIMEOUT_S
    health: dict[str, int] = {}
    while time.monotonic() < deadline:
        health = database.controller_health(run.dsn)
        if health.get("healthy", 0) >= run.options.mcs:
            progress(f"MCs: {run.options.mcs} healthy")
            return
        time.sleep(0.2)
    raise BenchError(f"MCs not healthy after {_HEALTHY_TIMEOUT_S:.0f} s: {health}")


# --------------------------------------------------------------------------
# Phases


def create_meetings(run: JoinRun, server: Server, count: int, *, join: bool = False) -> list[str]:
    """``count`` new meetings through the API (``join``: each joined once,
    closed-loop, not measured); their codes."""
    config = replace(
        run.job_config("create", server.port),
        count=count,
        concurrency=_CREATE_CONCURRENCY,
        join=join,
    )
    name = f"{'pool' if join else 'create'}-{count}"
    result, _ = run_job(run, name, config, count / _MIN_CREATE_PER_S * (2 if join else 1))
    meetings = result["meetings"]
    if len(meetings) < count:
        what = "created and joined" if join else "created"
        raise BenchError(f"{what} {len(meetings)} of {count} meetings: {result['errors']}")
    run.creation.append({"count": count, "joined": join, "seconds": result["seconds"]})
    return [code for _, code in meetings]


def _label(system: str, kind: str | None, rate: int | None, *, search: bool = False) -> str:
    what = f"{system} {KIND_LABELS[kind]}" if kind else system
    load = f"{rate}/s" if rate is not None else "saturation"
    return ("search: " if search else "") + f"{what}, {load}"


def _open_phase(
    run: JoinRun,
    server: Server,
    kind: str,
    rate: int,
    codes: list[str],
    *,
    system: str,
    search: bool = False,
) -> SystemRow:
    opts = run.options
    config = replace(
        run.job_config("open", server.port),
        codes=codes,
        rate=float(rate),
        cycle=kind != FIRST,
        warmup_s=opts.warmup_s,
        duration_s=opts.duration_s,
    )
    key = f"{'floor' if system == 'floor' else kind}@{rate}"
    label = _label(system, None if system == "floor" else kind, rate, search=search)
    budget = opts.warmup_s + opts.duration_s + opts.request_timeout_s
    result, cpu = run_job(run, key, config, budget, server)
    result.pop("failed_codes", None)
    result["settle_s"] = _settle(server)
    latency = result["latency_ms"]
    progress(
        f"{label}: p50 {_ms(latency['p50'])} / p95 {_ms(latency['p95'])} / p99 "
        f"{_ms(latency['p99'])} ms, {result['throughput']:,.1f}/s, errors {result['errors']}"
    )
    return SystemRow(key, label, result, cpu)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _gc_phase(run: JoinRun, server: Server, kind: str, rate: int, *, search: bool) -> SystemRow:
    """First joins: fresh meetings, each joined once. Re-joins: the pool."""
    if kind == FIRST:
        opts = run.options
        codes = create_meetings(run, server, first_join_count(rate, opts.warmup_s, opts.duration_s))
    else:
        codes = run.pool
    return _open_phase(run, server, kind, rate, codes, system="GC", search=search)


def _measure_kind(
    run: JoinRun, server: Server, kind: str
) -> tuple[list[SystemRow], list[SystemRow]]:
    """The listed rates, then (all passing, and searching) the rates above
    them, growing by ``step`` until one fails or ``max_rate``."""
    opts = run.options
    listed = [_gc_phase(run, server, kind, rate, search=False) for rate in opts.rates]
    searched: list[SystemRow] = []
    if not opts.search or not all(passes(dict(row.result)) for row in listed):
        return listed, searched
    rate = max(opts.rates)
    while (rate := next_rate(rate, opts.step)) <= opts.max_rate:
        progress(f"search: {KIND_LABELS[kind]}s at {rate}/s")
        searched.append(_gc_phase(run, server, kind, rate, search=True))
        if not passes(dict(searched[-1].result)):
            break
    return listed, searched


def _outcomes(rows: Sequence[SystemRow]) -> dict[str, list[tuple[int, bool]]]:
    found: dict[str, list[tuple[int, bool]]] = {FIRST: [], REJOIN: []}
    for row in rows:
        kind, _, rate = row.key.partition("@")
        if kind in found and rate.isdigit():
            found[kind].append((int(rate), passes(dict(row.result))))
    return found


def _saturation(run: JoinRun, server: Server, codes: list[str], system: str) -> SystemRow:
    opts = run.options
    config = replace(
        run.job_config("closed", server.port),
        codes=codes,
        concurrency=opts.concurrency,
        warmup_s=opts.warmup_s,
        duration_s=opts.duration_s,
    )
    key = f"{'floor' if system == 'floor' else REJOIN}_saturation"
    label = f"{system}{' re-join' if system == 'GC' else ''}, saturation ({opts.concurrency} conn.)"
    result, cpu = run_job(run, key, config, opts.warmup_s + opts.duration_s, server)
    result["settle_s"] = _settle(server)
    progress(f"{label}: {result['throughput']:,.1f}/s, errors {result['errors']}")
    return SystemRow(key, label, result, cpu)


def _floor(run: JoinRun, body: bytes, codes: list[str]) -> list[SystemRow]:
    body_path = run.workdir / "join-response.json"
    body_path.write_bytes(body)
    body_path.chmod(0o600)
    label = "floor (hypercorn+trio+Starlette, constant response)"
    progress(f"{label}: starting")
    argv = [sys.executable, "-m", "darktower.cli.bench.join_floor", "--body-file", str(body_path)]
    floor = Child.start("floor", argv, env=run.base_env(), log_dir=run.workdir, json_stdout=True)
    try:
        ready = floor.next_line(time.monotonic() + _FLOOR_READY_TIMEOUT_S)
        server = Server(floor, int(ready["port"]))
        rows = [
            _open_phase(run, server, REJOIN, rate, codes, system="floor")
            for rate in run.options.rates
        ]
        rows.append(_saturation(run, server, codes, "floor"))
        return rows
    finally:
        stop_and_report(floor, "floor")


# --------------------------------------------------------------------------
# Cleanup


def _database_counts(dsn: str) -> tuple[list[str], dict[str, int]]:
    """Every meeting id in the bench database (all are the bench's) and the
    assignment counts (proof that first joins assigned)."""

    async def fetch(pool: asyncpg.Pool) -> tuple[list[str], dict[str, int]]:
        ids = [row[0] for row in await pool.fetch("SELECT meeting_id::text FROM meetings")]
        row = await pool.fetchrow(
            "SELECT count(*) AS assignments, count(*) FILTER (WHERE ended_at IS NULL) AS active"
            " FROM meeting_assignments"
        )
        counts = {"meetings": len(ids), "assignments": 0, "active_assignments": 0}
        if row is not None:
            counts.update(
                assignments=int(row["assignments"]), active_assignments=int(row["active"])
            )
        return ids, counts

    async def main() -> tuple[list[str], dict[str, int]]:
        async with asyncio_loop(), open_pool(dsn, min_size=1, max_size=1) as pool:
            return await run_aio(fetch, pool)

    return trio.run(main)


def _delete_meeting_keys(redis_url: str, meeting_ids: list[str]) -> dict[str, int]:
    """Exactly the MC's keys of the bench's meetings (no SCAN, no flush)."""

    async def delete() -> dict[str, int]:
        client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url, decode_responses=True)
        layout = MeetingStateStore(client)  # key names only, no I/O
        stored = deleted = left = 0
        async with client:
            for start in range(0, len(meeting_ids), _REDIS_BATCH):
                batch = meeting_ids[start : start + _REDIS_BATCH]
                names = [name for mid in batch for name in layout.keys(mid)]
                stored += await client.exists(names[0::4])  # the ``gen`` keys
                deleted += await client.unlink(names)
                left += await client.exists(names)
        return {"meetings_in_redis": stored, "keys_deleted": deleted, "keys_left": left}

    return _run_async(delete)


def _cleanup(run: JoinRun, into: dict[str, Any]) -> None:
    """After every process stopped, before the database is dropped."""
    progress("cleaning up")
    try:
        ids, counts = _database_counts(run.dsn)
        into.update(counts)
        into.update(_delete_meeting_keys(run.redis_url, ids))
    except (coredis.exceptions.RedisError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
        progress(f"warning: could not delete the bench's Redis keys: {exc}")


@contextlib.contextmanager
def prepared_run(
    options: JoinOptions, machine: dict[str, Any], cleanup: dict[str, Any]
) -> Iterator[JoinRun]:
    """Everything a run of the join stack needs before a process starts:
    Redis, a fresh bench database with the schema, a signing key and the
    user tokens of one org. The facts of both stores go into ``machine``.
    On the way out (after whatever ran inside stopped) the run's Redis keys
    are deleted - their counts go into ``cleanup`` - the database is
    dropped and the files are removed."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dt-bench-")))
        redis_url, where = stack.enter_context(_redis(options))
        redis = _redis_facts(redis_url)
        redis["where"] = where
        redis_pid = redis.pop("process_id", None)
        machine["redis"] = redis
        progress(f"database: {database.describe_server(options.database_url)}")
        dsn = stack.enter_context(database.bench_database(options.database_url))
        pg = database.prepare(dsn)
        pg["where"] = database.describe_server(options.database_url)
        pg["database"] = urlsplit(dsn).path.lstrip("/")
        machine["postgresql"] = pg
        bench_keys = BenchKeys.create(workdir / "keys")
        org_id = str(uuid.uuid4())
        user_tokens = [
            tokens.mint_user_token(
                bench_keys.private_key, kid=bench_keys.kid, user_id=f"bench-user-{i}", org_id=org_id
            )
            for i in range(USERS)
        ]
        run = JoinRun(options, workdir, dsn, redis_url, bench_keys, org_id, user_tokens)
        run.redis_pid = int(redis_pid) if redis_pid is not None else None
        # Registered before any process starts, so the keys go even when a
        # phase fails; it runs after the stack is stopped (LIFO).
        stack.callback(_cleanup, run, cleanup)
        yield run


@contextlib.contextmanager
def _redis(options: JoinOptions) -> Iterator[tuple[str, str]]:
    """The Redis URL to use and where it is (for the report)."""
    url = options.redis_url or os.environ.get("REDIS_URL") or None
    if url is not None:
        yield url, _redacted(url)
        return
    progress("redis: starting an embedded server")
    with embedded_redis() as embedded:
        yield embedded, f"embedded ({_redacted(embedded)})"


# --------------------------------------------------------------------------
# Measurement and report


@dataclass(frozen=True, slots=True)
class Measurement:
    """The outcome of one run: the table's rows and the JSON figures."""

    rows: list[SystemRow]
    targets: list[Target]
    figures: dict[str, Any]


def measure(options: JoinOptions) -> Measurement:
    """Run the whole benchmark (every process, file, Redis key and database
    it made is gone when this returns or raises)."""
    options = replace(options, rates=tuple(sorted(set(options.rates))))
    machine = machine_facts()
    machine["libraries"] = library_versions(_LIBRARIES)
    gc_rows: list[SystemRow] = []
    search_rows: list[SystemRow] = []
    saturation_rows: list[SystemRow] = []
    floor_rows: list[SystemRow] = []
    cleanup: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    with prepared_run(options, machine, cleanup) as run:
        with running_stack(run) as stack:
            server = stack.gcs[0]
            probe = stack.probe
            # Re-joins first: an overloaded first-join phase leaves the GC a
            # backlog (bounded by its request deadline) that no later phase
            # should meet, and re-joins must not depend on first joins' outcome.
            progress(f"re-join pool: creating and joining {options.meetings} meetings")
            run.pool = create_meetings(run, server, options.meetings, join=True)
            listed, searched = _measure_kind(run, server, REJOIN)
            saturation_rows.append(_saturation(run, server, run.pool, "GC"))
            gc_rows += listed
            search_rows += searched
            listed, searched = _measure_kind(run, server, FIRST)
            gc_rows += listed
            search_rows += searched
            progress("stopping the stack")
        floor_rows = _floor(run, probe["body"].encode(), run.pool)
    rows = _table_rows(options, gc_rows, floor_rows) + search_rows + saturation_rows
    rows.append(floor_rows[-1])
    return _measurement(options, run, machine, rows, probe, cleanup)


def _table_rows(
    options: JoinOptions, gc_rows: list[SystemRow], floor_rows: list[SystemRow]
) -> list[SystemRow]:
    """Per rate: first join, re-join, floor."""
    by_key = {row.key: row for row in (*gc_rows, *floor_rows)}
    ordered = []
    for rate in options.rates:
        for kind in (FIRST, REJOIN, "floor"):
            row = by_key.get(f"{kind}@{rate}")
            if row is not None:
                ordered.append(row)
    return ordered


def _measurement(
    options: JoinOptions,
    run: JoinRun,
    machine: dict[str, Any],
    rows: list[SystemRow],
    probe: dict[str, Any],
    cleanup: dict[str, Any],
) -> Measurement:
    outcomes = _outcomes(rows)
    highest = {kind: highest_passing(outcomes[kind]) for kind in (FIRST, REJOIN)}
    by_key = {row.key: row for row in rows}
    saturation = {
        "re_join": by_key[f"{REJOIN}_saturation"].throughput,
        "floor": by_key["floor_saturation"].throughput,
    }
    ratios = {"rejoin_to_floor_throughput": ratio(saturation["re_join"], saturation["floor"])}
    targets = _targets(by_key, ratios)
    figures = {
        "benchmark": "join",
        "machine": machine,
        "settings": _settings(options),
        "systems": {
            row.key: {"label": row.label, **row.result, "cpu": dict(row.cpu)} for row in rows
        },
        "highest_rate_p99_le_100ms": highest,
        "search_outcomes": {kind: sorted(outcomes[kind]) for kind in (FIRST, REJOIN)},
        "saturation_throughput": saturation,
        "ratios": ratios,
        "probe": {k: v for k, v in probe.items() if k != "body"},
        "join_response_bytes": len(probe.get("body", "").encode()),
        "meeting_creation": run.creation,
        "cleanup": cleanup,
        "targets": target_figures(targets),
    }
    return Measurement(rows, targets, figures)


def _settings(options: JoinOptions) -> dict[str, object]:
    return {
        "rates": ",".join(str(r) for r in options.rates),
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "search": f"x{options.step:g} to {options.max_rate}/s" if options.search else "off",
        "saturation_conns": options.concurrency,
        "rejoin_meetings": options.meetings,
        "mcs": options.mcs,
        "mhs": MH_COUNT,
        "users": USERS,
        "max_conns": options.max_connections,
    }


def _p95(row: SystemRow | None) -> float | None:
    if row is None:
        return None
    value = row.result.get("latency_ms", {}).get("p95")
    return None if value is None else float(value)


def _targets(by_key: dict[str, SystemRow], ratios: dict[str, float | None]) -> list[Target]:
    return [
        Target(
            f"first-join P95 at {TARGET_RATE} joins/s",
            _p95(by_key.get(f"{FIRST}@{TARGET_RATE}")),
            TARGET_FIRST_JOIN_P95_MS,
            False,
            "ms",
        ),
        Target(
            f"re-join P95 at {TARGET_RATE} joins/s",
            _p95(by_key.get(f"{REJOIN}@{TARGET_RATE}")),
            TARGET_REJOIN_P95_MS,
            False,
            "ms",
        ),
        Target(
            "re-join / floor max throughput",
            ratios["rejoin_to_floor_throughput"],
            TARGET_FLOOR_RATIO,
            True,
            "x",
        ),
    ]


def _extra_lines(figures: dict[str, Any]) -> list[str]:
    redis = figures["machine"]["redis"]
    lines = [
        f"redis      {redis.get('version', '?')} at {redis.get('where', '?')} (the MCs' fencing)",
        "",
        "first join = a meeting without an assignment (the GC picks MHs and an MC, calls it "
        "over gRPC, records it);",
        "re-join = the same meetings again (the assignment is found). Open loop: latency from "
        "each join's intended send time.",
        "",
        f"highest rate with P99 <= {P99_BOUND_MS:g} ms (and <= {MAX_ERROR_FRACTION:.1%} "
        "errors, every lower rate passing too):",
    ]
    systems = figures["systems"]
    for kind in (FIRST, REJOIN):
        best = figures["highest_rate_p99_le_100ms"][kind]
        outcomes = figures["search_outcomes"][kind]
        failed = [rate for rate, ok in outcomes if not ok]
        shown = f"{best}/s" if best is not None else f"below {outcomes[0][0]}/s"
        detail = ""
        if failed:
            first_fail = systems[f"{kind}@{failed[0]}"]
            detail = (
                f"  ({failed[0]}/s failed: p99 {_ms(first_fail['latency_ms']['p99'])} ms, "
                f"{error_fraction(first_fail):.2%} errors)"
            )
        elif figures["settings"]["search"] != "off":
            detail = "  (search stopped at --max-rate)"
        lines.append(f"  {KIND_LABELS[kind] + 's':<12}{shown}{detail}")
    ratio_value = figures["ratios"]["rejoin_to_floor_throughput"]
    saturation = figures["saturation_throughput"]
    lines += [
        "",
        f"saturation: GC re-joins {saturation['re_join']:,.1f}/s, floor {saturation['floor']:,.1f}"
        f"/s, ratio {_ms(ratio_value)}",
        "open-loop details (p99.9 / max latency ms; generator send lag p99 / max ms; most "
        "connections open at once; seconds the server then took to go idle):",
    ]
    for system in systems.values():
        if "send_lag_ms" not in system:
            continue
        latency, lag = system["latency_ms"], system["send_lag_ms"]
        lines.append(
            f"  {system['label']:<44} {_ms(latency.get('p999'))} / {_ms(latency.get('max'))}"
            f"   lag {_ms(lag.get('p99'))} / {_ms(lag.get('max'))}   conns "
            f"{system.get('connections')}   idle after {system.get('settle_s', 0):.1f} s"
        )
    creation = figures["meeting_creation"]
    created = sum(c["count"] for c in creation if not c["joined"])
    seconds = sum(c["seconds"] for c in creation if not c["joined"])
    pool = next((c for c in creation if c["joined"]), None)
    cleanup = figures["cleanup"]
    lines += [
        f"meetings created through the API for first joins: {created:,} "
        f"({created / seconds if seconds else 0:,.0f}/s, concurrency {_CREATE_CONCURRENCY})"
        + (
            f"; re-join pool: {pool['count']:,} created and joined in {pool['seconds']:.1f} s"
            if pool
            else ""
        ),
        f"join response {figures['join_response_bytes']} bytes",
        f"database at the end: {cleanup.get('meetings', '?')} meetings, "
        f"{cleanup.get('active_assignments', '?')} active assignments; Redis: "
        f"{cleanup.get('meetings_in_redis', '?')} meetings stored, "
        f"{cleanup.get('keys_deleted', '?')} keys deleted",
    ]
    return lines


#: How ``dt bench join`` prints its figures.
PRESENTATION = Presentation("join", _extra_lines, unit="join")


def run_join(options: JoinOptions) -> int:
    """The ``dt bench join`` handler (see :func:`report.run_and_report`)."""
    return run_and_report(
        lambda: measure(options),
        PRESENTATION,
        json_path=options.json_path,
        expected_errors=(BenchError, EmbeddedServerError),
    )
