"""The heartbeat load generator: ``python -m darktower.cli.bench.loadgen CONFIG.json``.

It runs in a process of its own so that the client's CPU is not the server's
(the service under test must not share an interpreter, a GIL or an event loop
with what drives it). It is plain asyncio + grpclib and deliberately imports
nothing of the services: importing ``trio_asyncio`` patches asyncio's
module-level functions process-wide, which would slow the client down.

Closed loop: ``concurrency`` workers over ``channels`` HTTP/2 connections
each send one ``FastHeartbeat`` at a time, for the MCs in round-robin order,
each with that MC's own token (the GC checks that ``sub`` is the controller
id). A warm-up (connections, token cache, PostgreSQL plans, pool growth) is
run and discarded, then calls *completing* in the measured window are
counted; a worker issues no call once the window has ended.

Progress and the result are JSON lines on stdout, one object each, so the
parent can sample CPU usage exactly over the measured window:
``{"event": "registered", ...}`` (when asked to register first),
``{"event": "measure_start"}``, ``{"event": "measure_end"}``, then
``{"event": "result", ...}``. Diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from hdrh.histogram import HdrHistogram

from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb

#: Latencies are recorded in microseconds between 1 µs and one minute, with
#: three significant digits (0.1 % resolution): ample for P99 in ms.
_HISTOGRAM_MAX_US = 60_000_000
#: Registration is bounded too: a GC that cannot register the fleet in this
#: time is broken, and the bench must still end on its own.
_REGISTER_BUDGET_S = 120.0

#: Fake but valid endpoints: the GC stores them and never dials an MC for a
#: heartbeat. The floor's pre-inserted rows use the same values.
MC_REGION = "local"
MC_GRPC_ENDPOINT = "http://127.0.0.1:50052"
MC_WEBTRANSPORT_ENDPOINT = "https://127.0.0.1:4433"
MC_MAX_MEETINGS = 100
MC_MAX_PARTICIPANTS = 1000


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """What the parent hands over (as a JSON file: tokens do not belong in argv,
    where every local user can read them)."""

    host: str
    port: int
    mc_ids: list[str]
    tokens: list[str]
    register: bool
    concurrency: int
    channels: int
    warmup_s: float
    duration_s: float
    timeout_s: float

    @classmethod
    def load(cls, path: Path) -> LoadConfig:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        config = cls(**raw)
        if len(config.mc_ids) != len(config.tokens) or not config.mc_ids:
            raise ValueError("mc_ids and tokens must be non-empty and of equal length")
        if config.concurrency < 1 or config.channels < 1:
            raise ValueError("concurrency and channels must be at least 1")
        return config

    def dump(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "host": self.host,
                    "port": self.port,
                    "mc_ids": self.mc_ids,
                    "tokens": self.tokens,
                    "register": self.register,
                    "concurrency": self.concurrency,
                    "channels": self.channels,
                    "warmup_s": self.warmup_s,
                    "duration_s": self.duration_s,
                    "timeout_s": self.timeout_s,
                }
            ),
            encoding="utf-8",
        )
        path.chmod(0o600)


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _error_name(exc: BaseException) -> str:
    """A stable label for a failed call: the gRPC status, or the exception type
    for failures below gRPC (connection refused, client-side deadline)."""
    if isinstance(exc, GRPCError):
        return exc.status.name
    if isinstance(exc, TimeoutError):
        return "CLIENT_TIMEOUT"
    return type(exc).__name__


def heartbeat_request(index: int, mc_id: str) -> pb.FastHeartbeatRequest:
    """A plausible, valid heartbeat for MC number ``index`` (load varies
    between MCs so that rows really change)."""
    return pb.FastHeartbeatRequest(
        controller_id=mc_id,
        capacity=pb.ControllerCapacity(
            max_meetings=MC_MAX_MEETINGS,
            current_meetings=index % MC_MAX_MEETINGS,
            max_participants=MC_MAX_PARTICIPANTS,
            current_participants=(index * 7) % MC_MAX_PARTICIPANTS,
        ),
        health=pb.HEALTHY,
    )


def registration_request(mc_id: str) -> pb.RegisterMCRequest:
    return pb.RegisterMCRequest(
        id=mc_id,
        region=MC_REGION,
        grpc_endpoint=MC_GRPC_ENDPOINT,
        webtransport_endpoint=MC_WEBTRANSPORT_ENDPOINT,
        max_meetings=MC_MAX_MEETINGS,
        max_participants=MC_MAX_PARTICIPANTS,
    )


async def _run_workers(count: int, worker: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    tasks = [asyncio.create_task(worker(w)) for w in range(count)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _register(
    config: LoadConfig,
    stubs: Sequence[internal_grpc.GlobalControllerServiceStub],
    metadata: Sequence[tuple[tuple[str, str], ...]],
) -> dict[str, object]:
    """Register every MC through the service, ``concurrency`` at a time."""
    errors: Counter[str] = Counter()
    pending = iter(range(len(config.mc_ids)))

    async def worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        for index in pending:
            try:
                await stub.RegisterMC(
                    registration_request(config.mc_ids[index]),
                    timeout=config.timeout_s,
                    metadata=metadata[index],
                )
            except (TimeoutError, GRPCError, OSError) as exc:
                errors[_error_name(exc)] += 1

    started = time.perf_counter()
    await asyncio.wait_for(_run_workers(config.concurrency, worker), _REGISTER_BUDGET_S)
    return {"seconds": time.perf_counter() - started, "errors": dict(errors)}


#: One call of a closed-loop worker: the failure's name, or None on success.
CallOnce = Callable[[int], Awaitable[str | None]]


async def measure_closed_loop(
    *, concurrency: int, warmup_s: float, duration_s: float, call: CallOnce
) -> dict[str, object]:
    """``concurrency`` workers each ``call(worker_index)`` back to back: a
    warm-up, then the measured window (latency per call, start to end, in an
    HdrHistogram). Emits ``measure_start``/``measure_end`` markers so the
    parent can sample CPU over exactly that window. Shared by every bench."""
    histogram = HdrHistogram(1, _HISTOGRAM_MAX_US, 3)
    errors: Counter[str] = Counter()
    counts = {"ok": 0, "warmup_ok": 0, "warmup_errors": 0}
    t0 = time.perf_counter_ns()
    measure_start = t0 + int(warmup_s * 1e9)
    measure_end = measure_start + int(duration_s * 1e9)

    async def worker(w: int) -> None:
        while True:
            start = time.perf_counter_ns()
            if start >= measure_end:
                return
            failure = await call(w)
            end = time.perf_counter_ns()
            if end < measure_start:
                counts["warmup_errors" if failure else "warmup_ok"] += 1
            elif end <= measure_end:
                if failure is not None:
                    errors[failure] += 1
                else:
                    counts["ok"] += 1
                    histogram.record_value(min(max((end - start) // 1000, 1), _HISTOGRAM_MAX_US))

    async def markers() -> None:
        await asyncio.sleep(max(measure_start - time.perf_counter_ns(), 0) / 1e9)
        _emit("measure_start")
        await asyncio.sleep(max(measure_end - time.perf_counter_ns(), 0) / 1e9)
        _emit("measure_end")

    marker_task = asyncio.create_task(markers())
    await _run_workers(concurrency, worker)
    await marker_task
    seconds = (measure_end - measure_start) / 1e9

    def ms(percentile: float) -> float:
        return float(histogram.get_value_at_percentile(percentile)) / 1000.0

    ok = counts["ok"]
    return {
        "calls": ok,
        "seconds": seconds,
        "throughput": ok / seconds if seconds > 0 else 0.0,
        "latency_ms": {
            "p50": ms(50.0) if ok else None,
            "p95": ms(95.0) if ok else None,
            "p99": ms(99.0) if ok else None,
            "max": float(histogram.get_max_value()) / 1000.0 if ok else None,
            "mean": float(histogram.get_mean_value()) / 1000.0 if ok else None,
        },
        "errors": dict(errors),
        "warmup_calls": counts["warmup_ok"],
        "warmup_errors": counts["warmup_errors"],
    }


async def _heartbeats(
    config: LoadConfig,
    stubs: Sequence[internal_grpc.GlobalControllerServiceStub],
    metadata: Sequence[tuple[tuple[str, str], ...]],
) -> dict[str, object]:
    """Warm up, then measure; the figures of the measured window."""
    n = len(config.mc_ids)
    requests = [heartbeat_request(i, mc_id) for i, mc_id in enumerate(config.mc_ids)]
    next_index = 0

    async def heartbeat(w: int) -> str | None:
        nonlocal next_index
        index = next_index % n
        next_index += 1
        try:
            await stubs[w % len(stubs)].FastHeartbeat(
                requests[index], timeout=config.timeout_s, metadata=metadata[index]
            )
        except (TimeoutError, GRPCError, OSError) as exc:
            return _error_name(exc)
        return None

    return await measure_closed_loop(
        concurrency=config.concurrency,
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        call=heartbeat,
    )


async def run(config: LoadConfig) -> None:
    """The whole session against one server: register (optionally), then load."""
    channels = [Channel(config.host, config.port) for _ in range(config.channels)]
    try:
        stubs = [internal_grpc.GlobalControllerServiceStub(ch) for ch in channels]
        metadata = [(("authorization", f"Bearer {token}"),) for token in config.tokens]
        if config.register:
            _emit("registered", **await _register(config, stubs, metadata))
        result = await _heartbeats(config, stubs, metadata)
        _emit("result", **result)
    finally:
        for channel in channels:
            channel.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m darktower.cli.bench.loadgen CONFIG.json", file=sys.stderr)
        return 2
    asyncio.run(run(LoadConfig.load(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
