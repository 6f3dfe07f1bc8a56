"""The assignment load generator: ``python -m darktower.cli.bench.assign_loadgen CONFIG.json``.

Like the heartbeat load generator (:mod:`.loadgen`, whose helpers it uses),
it runs in a process of its own, is plain asyncio + grpclib and imports
nothing of the services (importing ``trio_asyncio`` would patch asyncio
process-wide and slow the client down).

It plays the GC: every call is ``AssignMeetingWithMh`` with the GC service
token (aud ``mc``, scope ``mc.assign``, ``sub`` = ``requesting_gc_id``), for
a meeting id never used before (``<prefix><worker>-<n>``: one fresh fenced
claim per call, never an idempotent repeat), generation 1 and two MH
assignments (primary and backup). An answer ``accepted=false`` counts as an
error (``REJECTED_<reason>``): the bench measures accepts.

First a readiness probe: one assignment retried (bounded) until accepted -
the MC's ``/health/ready`` stays 503 without a GC, so a first accepted
assignment is what proves it serves. Then closed loop as :mod:`.loadgen`:
``concurrency`` workers over ``channels`` HTTP/2 connections, warm-up, then
calls *completing* in the measured window are counted.

JSON lines on stdout: ``{"event": "ready", ...}``, ``{"event":
"measure_start"}``, ``{"event": "measure_end"}``, ``{"event": "result", ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from darktower.cli.bench.loadgen import _emit, _error_name, measure_closed_loop
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb

#: Where the (fictional) media handlers are; the MC stores them, never dials.
MH_ASSIGNMENTS = (
    ("mh-bench-1", "https://127.0.0.1:4434", pb.MH_ROLE_PRIMARY),
    ("mh-bench-2", "https://127.0.0.1:4435", pb.MH_ROLE_BACKUP),
)
_PROBE_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class AssignLoadConfig:
    """What the parent hands over (a JSON file: the token stays out of argv)."""

    host: str
    port: int
    token: str
    gc_id: str
    meeting_prefix: str
    concurrency: int
    channels: int
    warmup_s: float
    duration_s: float
    timeout_s: float
    ready_timeout_s: float

    @classmethod
    def load(cls, path: Path) -> AssignLoadConfig:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        config = cls(**raw)
        if config.concurrency < 1 or config.channels < 1:
            raise ValueError("concurrency and channels must be at least 1")
        return config

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        path.chmod(0o600)


def assignment_request(gc_id: str, meeting_id: str) -> pb.AssignMeetingWithMhRequest:
    """A valid first assignment of ``meeting_id`` (generation 1, two MHs)."""
    return pb.AssignMeetingWithMhRequest(
        meeting_id=meeting_id,
        mh_assignments=[
            pb.MhAssignment(mh_id=mh_id, webtransport_endpoint=url, role=role)
            for mh_id, url, role in MH_ASSIGNMENTS
        ],
        requesting_gc_id=gc_id,
        generation=1,
    )


def _rejection(response: pb.AssignMeetingWithMhResponse) -> str | None:
    if response.accepted:
        return None
    return "REJECTED_" + pb.RejectionReason.Name(response.rejection_reason)


async def _probe(
    config: AssignLoadConfig,
    stub: internal_grpc.MeetingControllerServiceStub,
    metadata: tuple[tuple[str, str], ...],
) -> dict[str, object]:
    """Retry one assignment until it is accepted (connection refused while
    the server starts is expected); give up after ``ready_timeout_s``."""
    started = time.perf_counter()
    attempts = 0
    last = "no attempt"
    while time.perf_counter() - started < config.ready_timeout_s:
        attempts += 1
        try:
            response = await stub.AssignMeetingWithMh(
                assignment_request(config.gc_id, f"{config.meeting_prefix}probe-{attempts}"),
                timeout=config.timeout_s,
                metadata=metadata,
            )
        except (TimeoutError, GRPCError, OSError) as exc:
            last = _error_name(exc)
        else:
            rejection = _rejection(response)
            if rejection is None:
                return {"seconds": time.perf_counter() - started, "attempts": attempts}
            last = rejection
        await asyncio.sleep(_PROBE_INTERVAL_S)
    raise SystemExit(f"server never accepted an assignment: last outcome {last}")


async def _assignments(
    config: AssignLoadConfig,
    stubs: Sequence[internal_grpc.MeetingControllerServiceStub],
    metadata: tuple[tuple[str, str], ...],
) -> dict[str, object]:
    """Warm up, then measure; the figures of the measured window. Every call
    assigns a new meeting (worker-numbered ids)."""
    sequences = [0] * config.concurrency

    async def assign(w: int) -> str | None:
        sequences[w] += 1
        request = assignment_request(config.gc_id, f"{config.meeting_prefix}{w}-{sequences[w]}")
        try:
            response = await stubs[w % len(stubs)].AssignMeetingWithMh(
                request, timeout=config.timeout_s, metadata=metadata
            )
        except (TimeoutError, GRPCError, OSError) as exc:
            return _error_name(exc)
        return _rejection(response)

    return await measure_closed_loop(
        concurrency=config.concurrency,
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        call=assign,
    )


async def run(config: AssignLoadConfig) -> None:
    """The whole session against one server: probe, then load."""
    channels = [Channel(config.host, config.port) for _ in range(config.channels)]
    try:
        stubs = [internal_grpc.MeetingControllerServiceStub(ch) for ch in channels]
        metadata = (("authorization", f"Bearer {config.token}"),)
        _emit("ready", **await _probe(config, stubs[0], metadata))
        _emit("result", **await _assignments(config, stubs, metadata))
    finally:
        for channel in channels:
            channel.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m darktower.cli.bench.assign_loadgen CONFIG.json", file=sys.stderr)
        return 2
    asyncio.run(run(AssignLoadConfig.load(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
