"""Simulated Media Handlers: the MH's control-plane face (SPEC §1, §3, §6.1).

A real MH forwards media and is outside this project; what the GC sees of it
is two RPCs of ``MediaHandlerRegistryService``: ``RegisterMH`` once, then
``SendLoadReport`` at the interval the GC returned. This module speaks exactly
that, for any number of MHs from one process, so ``dt up``, the tests and the
benchmarks get a realistic fleet without media servers (``dt mh-sim``,
:mod:`darktower.cli.mh_sim_cmd`, is its command line).

One trio task per MH, modelled on the MC's GC task (:mod:`darktower.mc.gc_task`):

* **Register, then report.** A report is sent right after every
  (re-)registration, so the GC sees the MH healthy (and selectable) without
  waiting an interval; then one every ``load_report_interval_ms`` the GC
  returned (10 s when it says 0). Ticks missed while a call was in flight
  are skipped, never replayed.
* **NOT_FOUND** on a report means the GC forgot the MH (its row was deleted,
  or another database): register again at once, then report.
* **Never exits on GC trouble.** Registration is retried forever with the
  MC's backoff (1 s, 2 s, 4 s ... capped at 30 s, jittered); a failed report
  is retried after the same backoff, but never later than the regular
  interval. Each failure is logged (one line: the MH, the RPC and the gRPC
  status - never the token); only cancellation ends :meth:`SimulatedMh.run`.
* **Load** follows a :class:`~darktower.cli.mh_load.LoadPattern` over the
  simulator's own time (``trio.current_time()``, so tests drive it with
  ``MockClock``): the load fraction sets streams (of ``max_streams``), CPU
  and bandwidth. Tokens come from a
  :class:`~darktower.cli.mh_tokens.TokenSource`.

The gRPC side is the MC's (:mod:`darktower.shared.gc_calls`): one channel,
each call bounded and crossing the seam once, and every library failure
leaving :class:`GrpcMhRegistry` as :class:`NotRegistered` or
:class:`GcUnavailable`. Tests replace the client with a fake implementing
:class:`MhRegistry`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar

import trio

from darktower.cli.mh_load import LoadPattern
from darktower.cli.mh_tokens import TokenSource
from darktower.mc.backoff import Backoff, Rng
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared import validation
from darktower.shared.config import Secret
from darktower.shared.gc_calls import (
    GcChannel,
    GcError,
    GcUnavailable,
    NotRegistered,
    gc_host_port,
    open_gc_channel,
)
from darktower.shared.logging import get_logger

__all__ = [
    "DEFAULT_ID_PREFIX",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_REGION",
    "DEFAULT_REPORT_INTERVAL_S",
    "DEFAULT_WEBTRANSPORT_BASE_PORT",
    "DEFAULT_ZONES",
    "GcError",
    "GcUnavailable",
    "GrpcMhRegistry",
    "MhFleet",
    "MhRegistry",
    "MhSpec",
    "MhStatistics",
    "NotRegistered",
    "SimulatedMh",
    "fleet_specs",
    "gc_host_port",
    "load_report",
    "open_mh_registry",
]

log = get_logger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

DEFAULT_ID_PREFIX = "mh-sim-"
DEFAULT_REGION = "local"
DEFAULT_ZONES = ("zone-a", "zone-b")
DEFAULT_MAX_STREAMS = 1000
#: Used when the GC's answer leaves the interval at 0 (SPEC §6.1 default).
DEFAULT_REPORT_INTERVAL_S = 10.0
#: Where the simulated MHs claim to listen (the GC stores the endpoints and
#: hands the WebTransport one to clients; nothing dials them). MH ``i``
#: (0-based) gets ``base + i``.
DEFAULT_WEBTRANSPORT_BASE_PORT = 4500
_GRPC_PORT_OFFSET = 100
CONNECT_TIMEOUT_S = 5.0
REGISTER_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 5.0
#: Added to an RPC's deadline for this module's own bound on the call.
_CALL_SLACK_S = 1.0
_MAX_DETAIL = 200


# --------------------------------------------------------------------------
# What an MH says


@dataclass(frozen=True, slots=True)
class MhSpec:
    """One simulated MH: what it registers as."""

    handler_id: str
    region: str
    zone: str
    webtransport_endpoint: str
    grpc_endpoint: str
    max_streams: int

    def registration(self) -> pb.RegisterMHRequest:
        return pb.RegisterMHRequest(
            handler_id=self.handler_id,
            region=self.region,
            webtransport_endpoint=self.webtransport_endpoint,
            grpc_endpoint=self.grpc_endpoint,
            max_streams=self.max_streams,
            zone=self.zone,
        )


def fleet_specs(
    count: int,
    *,
    id_prefix: str = DEFAULT_ID_PREFIX,
    region: str = DEFAULT_REGION,
    zones: Sequence[str] = DEFAULT_ZONES,
    max_streams: int = DEFAULT_MAX_STREAMS,
    base_port: int = DEFAULT_WEBTRANSPORT_BASE_PORT,
    host: str = "127.0.0.1",
) -> list[MhSpec]:
    """``count`` MHs ``<prefix>1`` ... ``<prefix>N``, zones round-robin,
    distinct endpoints. Checked against the GC's own rules (SPEC §6.1), so a
    bad option fails here with :class:`ValueError` naming it, not as an
    ``INVALID_ARGUMENT`` retried for ever."""
    if count < 1:
        raise ValueError("count: must be at least 1")
    zones = list(zones) or [""]
    specs = []
    for index in range(count):
        port = base_port + index
        if not 0 < port + _GRPC_PORT_OFFSET <= 65535:
            raise ValueError("base port: the endpoints' ports must stay within 1-65535")
        spec = MhSpec(
            handler_id=f"{id_prefix}{index + 1}",
            region=region,
            zone=zones[index % len(zones)],
            webtransport_endpoint=f"https://{host}:{port}",
            grpc_endpoint=f"http://{host}:{port + _GRPC_PORT_OFFSET}",
            max_streams=max_streams,
        )
        _check_spec(spec)
        specs.append(spec)
    return specs


def _check_spec(spec: MhSpec) -> None:
    try:
        validation.node_id("id", spec.handler_id)
        validation.region("region", spec.region)
        validation.label("zone", spec.zone, min_len=0, max_len=50)
        validation.endpoint("endpoint", spec.webtransport_endpoint)
        validation.capacity("max streams", spec.max_streams)
    except validation.InvalidArgument as exc:
        raise ValueError(str(exc)) from None


#: Memory in use at zero load and at full load (percent): a media server
#: holds its buffers whatever the load.
_IDLE_MEMORY_PCT = 10.0
_FULL_MEMORY_PCT = 90.0


def load_report(spec: MhSpec, load: float) -> pb.MHLoadReportRequest:
    """The report of an MH at ``load`` (0..1): streams in proportion, CPU and
    bandwidth likewise, memory from an idle floor."""
    return pb.MHLoadReportRequest(
        handler_id=spec.handler_id,
        current_streams=round(load * spec.max_streams),
        health=pb.HEALTHY,
        cpu_usage_percent=100.0 * load,
        memory_usage_percent=_IDLE_MEMORY_PCT + (_FULL_MEMORY_PCT - _IDLE_MEMORY_PCT) * load,
        bandwidth_usage_percent=100.0 * load,
    )


# --------------------------------------------------------------------------
# The registry client


class MhRegistry(Protocol):
    """Trio-flavoured MH → GC operations. Each raises :class:`NotRegistered`
    or :class:`GcUnavailable` on failure, nothing else for GC trouble."""

    async def register(
        self, request: pb.RegisterMHRequest, token: Secret
    ) -> pb.RegisterMHResponse: ...

    async def report(
        self, request: pb.MHLoadReportRequest, token: Secret
    ) -> pb.MHLoadReportResponse: ...


class GrpcMhRegistry:
    """:class:`MhRegistry` over one :class:`GcChannel` (made by
    :func:`open_mh_registry`), shared by every MH of the process: the GC sees
    one HTTP/2 connection, the way one host's MHs would share a proxy."""

    def __init__(
        self,
        channel: GcChannel,
        *,
        register_timeout: float = REGISTER_TIMEOUT_S,
        report_timeout: float = REPORT_TIMEOUT_S,
    ) -> None:
        self._channel = channel
        self._stub = internal_grpc.MediaHandlerRegistryServiceStub(channel.channel)
        self._register_timeout = register_timeout
        self._report_timeout = report_timeout

    def __repr__(self) -> str:
        return f"GrpcMhRegistry({self._channel!r})"

    async def register(self, request: pb.RegisterMHRequest, token: Secret) -> pb.RegisterMHResponse:
        return await self._channel.call(
            "RegisterMH",
            self._stub.RegisterMH,
            request,
            deadline_s=self._register_timeout,
            token=token,
        )

    async def report(
        self, request: pb.MHLoadReportRequest, token: Secret
    ) -> pb.MHLoadReportResponse:
        return await self._channel.call(
            "SendLoadReport",
            self._stub.SendLoadReport,
            request,
            deadline_s=self._report_timeout,
            token=token,
        )


@asynccontextmanager
async def open_mh_registry(url: str) -> AsyncIterator[GrpcMhRegistry]:
    """Trio-flavoured: a :class:`GrpcMhRegistry` for the GC at ``url``. Call
    inside :func:`darktower.shared.seam.asyncio_loop`. It connects lazily (on
    the first RPC, and again after a lost connection), so opening never fails
    because the GC is down."""
    async with open_gc_channel(url, connect_timeout=CONNECT_TIMEOUT_S) as channel:
        yield GrpcMhRegistry(channel)


# --------------------------------------------------------------------------
# One MH


@dataclass(frozen=True, slots=True)
class MhStatistics:
    """Counters since the MH was created (tests, the final summary)."""

    registrations: int
    registration_failures: int
    reports: int
    report_failures: int
    not_found: int
    interval_s: float


def _next_due(started: float, interval: float, now: float) -> float:
    """``interval`` after ``started`` - or after ``now`` if that already
    passed while the call was in flight: missed ticks are skipped."""
    due = started + interval
    return due if due >= now else now + interval


class SimulatedMh:
    """One MH: registers, reports, re-registers; see the module docstring.

    ``started_at`` (trio time) is the zero of the load pattern: the MHs of a
    fleet share it, so their loads move together.
    """

    def __init__(
        self,
        spec: MhSpec,
        registry: MhRegistry,
        tokens: TokenSource,
        pattern: LoadPattern,
        *,
        started_at: float,
        rng: Rng | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.spec = spec
        self._registry = registry
        self._tokens = tokens
        self._pattern = pattern
        self._started_at = started_at
        self._rng: Rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter
        self._backoff = backoff if backoff is not None else Backoff()
        self._interval = DEFAULT_REPORT_INTERVAL_S
        self._first_report = trio.Event()
        self._registrations = 0
        self._registration_failures = 0
        self._reports = 0
        self._report_failures = 0
        self._not_found = 0

    @property
    def reported(self) -> bool:
        """Whether the GC has taken at least one load report from this MH."""
        return self._first_report.is_set()

    async def wait_reported(self) -> None:
        """Trio-flavoured: return once the GC took this MH's first report."""
        await self._first_report.wait()

    def statistics(self) -> MhStatistics:
        return MhStatistics(
            registrations=self._registrations,
            registration_failures=self._registration_failures,
            reports=self._reports,
            report_failures=self._report_failures,
            not_found=self._not_found,
            interval_s=self._interval,
        )

    async def run(self) -> NoReturn:
        """Trio-flavoured: register and report until cancelled."""
        while True:
            await self._register()
            await self._report_until_not_registered()

    async def _bounded(
        self,
        rpc: str,
        deadline_s: float,
        call: Callable[[Req, Secret], Awaitable[Resp]],
        request: Req,
    ) -> Resp:
        """``call(request, token)`` bounded here too, whatever the client does."""
        token = self._tokens(self.spec.handler_id)
        with trio.move_on_after(deadline_s + _CALL_SLACK_S):
            return await call(request, token)
        raise GcUnavailable(f"{rpc}: no answer in time", code="DEADLINE_EXCEEDED")

    async def _register(self) -> None:
        """Register, retrying with backoff until the GC accepts."""
        request = self.spec.registration()
        attempt = 0
        while True:
            try:
                response = await self._bounded(
                    "RegisterMH", REGISTER_TIMEOUT_S, self._registry.register, request
                )
            except GcError as exc:
                error = str(exc)
            else:
                if response.accepted:
                    break
                error = f"RegisterMH: refused ({response.message[:_MAX_DETAIL]})"
            self._registration_failures += 1
            delay = self._backoff.delay(attempt, self._rng)
            log.warning(
                "mh_registration_failed",
                handler_id=self.spec.handler_id,
                error=error,
                attempt=attempt + 1,
                retry_in_s=round(delay, 3),
            )
            attempt += 1
            await trio.sleep(delay)
        ms = response.load_report_interval_ms
        self._interval = ms / 1000 if ms > 0 else DEFAULT_REPORT_INTERVAL_S
        self._registrations += 1
        log.info(
            "mh_registered",
            handler_id=self.spec.handler_id,
            zone=self.spec.zone,
            attempts=attempt + 1,
            interval_s=self._interval,
        )

    async def _report_until_not_registered(self) -> None:
        """Report now, then every interval; return on ``NOT_FOUND``."""
        next_due = trio.current_time()
        failures = 0
        while True:
            await trio.sleep_until(next_due)
            started = trio.current_time()
            load = self._pattern.at(started - self._started_at)
            request = load_report(self.spec, load)
            try:
                await self._bounded(
                    "SendLoadReport", REPORT_TIMEOUT_S, self._registry.report, request
                )
            except NotRegistered as exc:
                self._not_found += 1
                log.warning("mh_not_registered", handler_id=self.spec.handler_id, error=str(exc))
                return
            except GcError as exc:
                self._report_failures += 1
                delay = min(self._backoff.delay(failures, self._rng), self._interval)
                failures += 1
                log.warning(
                    "mh_load_report_failed",
                    handler_id=self.spec.handler_id,
                    error=str(exc),
                    failures=failures,
                    retry_in_s=round(delay, 3),
                )
                next_due = trio.current_time() + delay
                continue
            if failures:
                log.info("mh_load_report_recovered", handler_id=self.spec.handler_id)
            failures = 0
            self._reports += 1
            self._first_report.set()
            next_due = _next_due(started, self._interval, trio.current_time())


# --------------------------------------------------------------------------
# A fleet


class MhFleet:
    """The simulated MHs of one process, run side by side. Create it inside
    the trio run: its load patterns start at creation."""

    def __init__(
        self,
        specs: Sequence[MhSpec],
        registry: MhRegistry,
        tokens: TokenSource,
        pattern: LoadPattern,
        *,
        rng: Rng | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        started_at = trio.current_time()
        self.mhs = [
            SimulatedMh(
                spec,
                registry,
                tokens,
                pattern,
                started_at=started_at,
                rng=rng,
                backoff=backoff,
            )
            for spec in specs
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Trio-flavoured: run every MH until cancelled (started at once)."""
        async with trio.open_nursery() as nursery:
            for mh in self.mhs:
                nursery.start_soon(mh.run, name=f"mh-{mh.spec.handler_id}")
            task_status.started()

    async def wait_ready(self) -> None:
        """Trio-flavoured: return once the GC took a report from every MH."""
        for mh in self.mhs:
            await mh.wait_reported()

    @property
    def interval_s(self) -> float:
        """The report interval (the GC hands every MH the same one)."""
        return max(mh.statistics().interval_s for mh in self.mhs)

    def totals(self) -> dict[str, int]:
        """Counters summed over the fleet."""
        stats = [mh.statistics() for mh in self.mhs]
        return {
            "registrations": sum(s.registrations for s in stats),
            "registration_failures": sum(s.registration_failures for s in stats),
            "reports": sum(s.reports for s in stats),
            "report_failures": sum(s.report_failures for s in stats),
            "not_found": sum(s.not_found for s in stats),
        }
