"""The GC's registry (SPEC §3, §6.1) over real gRPC and real PostgreSQL.

Every test starts a real GC in-process (ports bound to 0) against the
session's database and talks to it with grpclib stubs over loopback; rows are
read back with the GC's own repositories. Time-dependent states (a stale MC)
are produced by back-dating rows on the database clock, never by waiting.

The validation boundaries (one table per RPC) run against one GC per RPC
rather than one GC per case: a GC start costs ~0.1 s and there are ~80 cases;
a failure lists every case that misbehaved. ``tests/test_validation.py``
covers the same rules exhaustively without I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import trio
from gc_harness import (
    DevKeys,
    GcClients,
    RunningGc,
    gc_clients,
    gc_environ,
    mc_registration,
    metadata,
    mh_registration,
    running_gc,
)
from grpclib.client import UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.gc.repositories.media_handlers import MediaHandlerRow
from darktower.gc.repositories.meeting_controllers import MeetingControllerRow
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys, gc, clients

INT4_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1

GC_SERVICE = "/dark_tower.internal.GlobalControllerService/"

Health: TypeAlias = pb.HealthStatus.ValueType


# --- fixtures and helpers ------------------------------------------------------------------


async def call(method: UnaryUnaryMethod[Any, Any], request: Any, token: str) -> Any:
    """One unary RPC (trio-flavoured) with ``token`` as the bearer."""
    return await run_aio(method, request, metadata=metadata(token))


async def call_error(method: UnaryUnaryMethod[Any, Any], request: Any, token: str) -> GRPCError:
    """The :class:`GRPCError` an RPC must fail with."""
    with pytest.raises(GRPCError) as info:
        await call(method, request, token)
    return info.value


async def mc_row(pool: asyncpg.Pool, controller_id: str) -> MeetingControllerRow:
    row = await run_aio(meeting_controllers.get, pool, controller_id)
    assert row is not None, f"no row for {controller_id}"
    return row


async def mh_row(pool: asyncpg.Pool, handler_id: str) -> MediaHandlerRow:
    row = await run_aio(media_handlers.get, pool, handler_id)
    assert row is not None, f"no row for {handler_id}"
    return row


async def count_rows(pool: asyncpg.Pool, table: str) -> int:
    assert table in ("meeting_controllers", "media_handlers")
    value: int = await run_aio(pool.fetchval, f"SELECT count(*) FROM {table}")  # noqa: S608
    return value


async def backdate(pool: asyncpg.Pool, table: str, node_id: str, by: timedelta) -> None:
    """Move a row's heartbeat and registration times into the past (database clock)."""
    key = {"meeting_controllers": "controller_id", "media_handlers": "handler_id"}[table]
    status = await run_aio(
        pool.execute,
        f"UPDATE {table} SET last_heartbeat_at = last_heartbeat_at - $2::interval, "  # noqa: S608
        "registered_at = registered_at - $2::interval, "
        f"updated_at = updated_at - $2::interval WHERE {key} = $1",
        node_id,
        by,
    )
    assert status == "UPDATE 1"


async def database_now(pool: asyncpg.Pool) -> datetime:
    value: datetime = await run_aio(pool.fetchval, "SELECT now()")
    return value


def capacity(meetings: int = 0, participants: int = 0) -> pb.ControllerCapacity:
    return pb.ControllerCapacity(
        max_meetings=100,
        current_meetings=meetings,
        max_participants=1000,
        current_participants=participants,
    )


def fast(
    controller_id: str = "mc-1",
    *,
    meetings: int = 0,
    participants: int = 0,
    health: Health = pb.HEALTHY,
) -> pb.FastHeartbeatRequest:
    return pb.FastHeartbeatRequest(
        controller_id=controller_id, capacity=capacity(meetings, participants), health=health
    )


def comprehensive(
    controller_id: str = "mc-1",
    *,
    meetings: int = 0,
    participants: int = 0,
    health: Health = pb.HEALTHY,
    cpu: float = 0.0,
    memory: float = 0.0,
) -> pb.ComprehensiveHeartbeatRequest:
    return pb.ComprehensiveHeartbeatRequest(
        controller_id=controller_id,
        capacity=capacity(meetings, participants),
        health=health,
        cpu_usage_percent=cpu,
        memory_usage_percent=memory,
    )


def load_report(
    handler_id: str = "mh-1",
    *,
    streams: int = 0,
    health: Health = pb.HEALTHY,
    cpu: float = 0.0,
    memory: float = 0.0,
    bandwidth: float = 0.0,
) -> pb.MHLoadReportRequest:
    return pb.MHLoadReportRequest(
        handler_id=handler_id,
        current_streams=streams,
        health=health,
        cpu_usage_percent=cpu,
        memory_usage_percent=memory,
        bandwidth_usage_percent=bandwidth,
    )


async def register_mc(clients: GcClients, keys: DevKeys, mc_id: str = "mc-1") -> None:
    response = await call(clients.mc.RegisterMC, mc_registration(mc_id), keys.mc_token(mc_id))
    assert response.accepted


async def register_mh(clients: GcClients, keys: DevKeys, mh_id: str = "mh-1") -> None:
    response = await call(clients.mh.RegisterMH, mh_registration(mh_id), keys.mh_token(mh_id))
    assert response.accepted


def epoch_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


# --- validation boundaries over the wire ---------------------------------------------------


@dataclass(frozen=True)
class Invalid:
    """One invalid request and the field its INVALID_ARGUMENT must name."""

    name: str
    request: Any
    field: str


def _endpoint(scheme: str, length: int) -> str:
    return scheme + "a" * (length - len(scheme))


BAD_IDS = [
    ("empty", ""),
    ("256-chars", "a" * 256),
    ("dot", "mc.1"),
    ("space", "mc 1"),
    ("newline", "mc-1\n"),
    ("non-ascii", "mç-1"),
]
BAD_REGIONS = [("empty", ""), ("51-chars", "r" * 51), ("space", "eu west")]
BAD_ENDPOINTS = [
    ("empty", ""),
    ("no-scheme", "127.0.0.1:1"),
    ("ftp", "ftp://host"),
    ("scheme-only", "http://"),
    ("256-chars", _endpoint("http://", 256)),
    ("space", "http://a b"),
    ("trailing-newline", "http://a\n"),
]
BAD_CAPACITIES = [("zero", 0), ("2^31", INT4_MAX + 1), ("uint32-max", UINT32_MAX)]
BAD_COUNTS = [("2^31", INT4_MAX + 1), ("uint32-max", UINT32_MAX)]
BAD_PERCENTS = [
    ("nan", math.nan),
    ("inf", math.inf),
    ("minus-inf", -math.inf),
    ("negative", -1.0),
    ("over-100", 100.5),
]
UNKNOWN_HEALTH = Health(99)


def _register_mc_cases() -> list[Invalid]:
    cases = [Invalid(f"id-{n}", mc_registration(v), "id") for n, v in BAD_IDS]
    cases += [
        Invalid(f"region-{n}", mc_registration("mc-new", region=v), "region")
        for n, v in BAD_REGIONS
    ]
    for endpoint_field in ("grpc_endpoint", "webtransport_endpoint"):
        cases += [
            Invalid(
                f"{endpoint_field}-{n}",
                mc_registration("mc-new", **{endpoint_field: v}),
                endpoint_field,
            )
            for n, v in BAD_ENDPOINTS
        ]
    for capacity_field in ("max_meetings", "max_participants"):
        cases += [
            Invalid(
                f"{capacity_field}-{n}",
                mc_registration("mc-new", **{capacity_field: v}),
                capacity_field,
            )
            for n, v in BAD_CAPACITIES
        ]
    return cases


def _heartbeat_cases(kind: str, make: Callable[..., Any], message: type[Any]) -> list[Invalid]:
    cases = [Invalid(f"{kind}-id-{n}", make(controller_id=v), "controller_id") for n, v in BAD_IDS]
    cases.append(Invalid(f"{kind}-capacity-missing", message(controller_id="mc-1"), "capacity"))
    for n, v in BAD_COUNTS:
        cases.append(Invalid(f"{kind}-meetings-{n}", make(meetings=v), "capacity.current_meetings"))
        cases.append(
            Invalid(
                f"{kind}-participants-{n}", make(participants=v), "capacity.current_participants"
            )
        )
    cases.append(Invalid(f"{kind}-health-99", make(health=UNKNOWN_HEALTH), "health"))
    return cases


def _comprehensive_cases() -> list[Invalid]:
    cases = _heartbeat_cases("comprehensive", comprehensive, pb.ComprehensiveHeartbeatRequest)
    cases += [
        Invalid(f"cpu-{n}", comprehensive(cpu=v), "cpu_usage_percent") for n, v in BAD_PERCENTS
    ]
    cases += [
        Invalid(f"memory-{n}", comprehensive(memory=v), "memory_usage_percent")
        for n, v in BAD_PERCENTS
    ]
    return cases


def _register_mh_cases() -> list[Invalid]:
    cases = [Invalid(f"id-{n}", mh_registration(v), "handler_id") for n, v in BAD_IDS]
    cases += [
        Invalid(f"region-{n}", mh_registration("mh-new", region=v), "region")
        for n, v in BAD_REGIONS
    ]
    cases += [
        Invalid("zone-51-chars", mh_registration("mh-new", zone="z" * 51), "zone"),
        Invalid("zone-space", mh_registration("mh-new", zone="zone a"), "zone"),
    ]
    for endpoint_field in ("webtransport_endpoint", "grpc_endpoint"):
        cases += [
            Invalid(
                f"{endpoint_field}-{n}",
                mh_registration("mh-new", **{endpoint_field: v}),
                endpoint_field,
            )
            for n, v in BAD_ENDPOINTS
        ]
    cases += [
        Invalid(f"max_streams-{n}", mh_registration("mh-new", max_streams=v), "max_streams")
        for n, v in BAD_CAPACITIES
    ]
    return cases


def _load_report_cases() -> list[Invalid]:
    cases = [Invalid(f"id-{n}", load_report(v), "handler_id") for n, v in BAD_IDS]
    cases += [
        Invalid(f"streams-{n}", load_report(streams=v), "current_streams") for n, v in BAD_COUNTS
    ]
    cases.append(Invalid("health-99", load_report(health=UNKNOWN_HEALTH), "health"))
    percent_fields: list[tuple[str, Callable[[float], pb.MHLoadReportRequest]]] = [
        ("cpu_usage_percent", lambda v: load_report(cpu=v)),
        ("memory_usage_percent", lambda v: load_report(memory=v)),
        ("bandwidth_usage_percent", lambda v: load_report(bandwidth=v)),
    ]
    for percent_field, make in percent_fields:
        cases += [Invalid(f"{percent_field}-{n}", make(v), percent_field) for n, v in BAD_PERCENTS]
    return cases


def _token_subject(request: Any, default: str) -> str:
    """The token matches the id the request claims (when it has one), so
    only validation can refuse it."""
    for id_field in ("id", "controller_id", "handler_id"):
        value = getattr(request, id_field, None)
        if value:
            return str(value)
    return default


async def _expect_invalid(
    method: UnaryUnaryMethod[Any, Any], case: Invalid, token: str
) -> str | None:
    """``None`` if the RPC failed exactly as it must, else what went wrong."""
    try:
        await call(method, case.request, token)
    except GRPCError as exc:
        if exc.status is not Status.INVALID_ARGUMENT:
            return f"{case.name}: status {exc.status.name} ({exc.message!r})"
        message = exc.message or ""
        if message.split(": ", 1)[0] != case.field:
            return f"{case.name}: message {message!r} does not name {case.field!r}"
        if len(message) > 200:
            return f"{case.name}: message of {len(message)} characters echoes the value"
        return None
    return f"{case.name}: accepted"


async def test_register_mc_refuses_each_invalid_field(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    cases = _register_mc_cases()
    assert len(cases) == 6 + 3 + 14 + 6
    failures = []
    for case in cases:
        token = keys.mc_token(_token_subject(case.request, "mc-new"))
        failure = await _expect_invalid(clients.mc.RegisterMC, case, token)
        if failure is None and await count_rows(db_pool, "meeting_controllers") != 0:
            failure = f"{case.name}: a row was written"
        if failure is not None:
            failures.append(failure)
    assert failures == []


async def test_register_mc_accepts_the_largest_values(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The upper edges of every rule are inside it: 255-char id and endpoints,
    50-char region, capacities of 2**31 - 1."""
    mc_id = "m" * 255
    request = mc_registration(
        mc_id,
        region="r" * 50,
        grpc_endpoint=_endpoint("http://", 255),
        webtransport_endpoint=_endpoint("https://", 255),
        max_meetings=INT4_MAX,
        max_participants=INT4_MAX,
    )
    response = await call(clients.mc.RegisterMC, request, keys.mc_token(mc_id))
    assert response.accepted
    row = await mc_row(db_pool, mc_id)
    assert (row.region, row.grpc_endpoint, row.webtransport_endpoint) == (
        request.region,
        request.grpc_endpoint,
        request.webtransport_endpoint,
    )
    assert (row.max_meetings, row.max_participants) == (INT4_MAX, INT4_MAX)


@pytest.mark.parametrize(
    ("kind", "cases"),
    [
        pytest.param("fast", _heartbeat_cases("fast", fast, pb.FastHeartbeatRequest), id="fast"),
        pytest.param("comprehensive", _comprehensive_cases(), id="comprehensive"),
    ],
)
async def test_heartbeat_refuses_each_invalid_field(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool, kind: str, cases: list[Invalid]
) -> None:
    """An invalid heartbeat changes nothing, not even ``last_heartbeat_at``."""
    await register_mc(clients, keys)
    await call(
        clients.mc.ComprehensiveHeartbeat,
        comprehensive(meetings=2, participants=20, cpu=10.0, memory=20.0),
        keys.mc_token("mc-1"),
    )
    before = await mc_row(db_pool, "mc-1")
    method = clients.mc.FastHeartbeat if kind == "fast" else clients.mc.ComprehensiveHeartbeat
    failures = []
    for case in cases:
        token = keys.mc_token(_token_subject(case.request, "mc-1"))
        failure = await _expect_invalid(method, case, token)
        if failure is None and await mc_row(db_pool, "mc-1") != before:
            failure = f"{case.name}: the row changed"
        if failure is not None:
            failures.append(failure)
    assert failures == []
    assert await count_rows(db_pool, "meeting_controllers") == 1


async def test_register_mh_refuses_each_invalid_field(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    cases = _register_mh_cases()
    failures = []
    for case in cases:
        token = keys.mh_token(_token_subject(case.request, "mh-new"))
        failure = await _expect_invalid(clients.mh.RegisterMH, case, token)
        if failure is None and await count_rows(db_pool, "media_handlers") != 0:
            failure = f"{case.name}: a row was written"
        if failure is not None:
            failures.append(failure)
    assert failures == []


async def test_load_report_refuses_each_invalid_field(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register_mh(clients, keys)
    await call(
        clients.mh.SendLoadReport,
        load_report(streams=5, cpu=1.0, memory=2.0, bandwidth=3.0),
        keys.mh_token("mh-1"),
    )
    before = await mh_row(db_pool, "mh-1")
    failures = []
    for case in _load_report_cases():
        token = keys.mh_token(_token_subject(case.request, "mh-1"))
        failure = await _expect_invalid(clients.mh.SendLoadReport, case, token)
        if failure is None and await mh_row(db_pool, "mh-1") != before:
            failure = f"{case.name}: the row changed"
        if failure is not None:
            failures.append(failure)
    assert failures == []


# --- MC registration -----------------------------------------------------------------------


async def test_register_mc_inserts_a_pending_row_with_every_field(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    request = mc_registration(
        "mc-1",
        region="eu-west-1",
        grpc_endpoint="http://10.0.0.1:50052",
        webtransport_endpoint="https://mc-1.example:4433",
        max_meetings=7,
        max_participants=70,
    )
    before = await database_now(db_pool)
    response = await call(clients.mc.RegisterMC, request, keys.mc_token("mc-1"))
    assert response.accepted
    assert response.message

    row = await mc_row(db_pool, "mc-1")
    assert row.controller_id == "mc-1"
    assert row.region == "eu-west-1"
    assert row.grpc_endpoint == "http://10.0.0.1:50052"
    assert row.webtransport_endpoint == "https://mc-1.example:4433"
    assert (row.max_meetings, row.max_participants) == (7, 70)
    assert (row.current_meetings, row.current_participants) == (0, 0)
    assert row.health_status == "pending"
    assert (row.cpu_usage_percent, row.memory_usage_percent) == (None, None)
    assert row.registered_at == row.last_heartbeat_at == row.updated_at
    assert row.registered_at >= before
    assert await count_rows(db_pool, "meeting_controllers") == 1


async def test_register_mc_answers_default_heartbeat_intervals(
    clients: GcClients, keys: DevKeys
) -> None:
    response = await call(clients.mc.RegisterMC, mc_registration("mc-1"), keys.mc_token("mc-1"))
    assert response.fast_heartbeat_interval_ms == 10_000
    assert response.comprehensive_heartbeat_interval_ms == 30_000
    mh_response = await call(clients.mh.RegisterMH, mh_registration("mh-1"), keys.mh_token("mh-1"))
    assert mh_response.load_report_interval_ms == 10_000


async def test_registration_answers_configured_intervals(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    environ = gc_environ(
        keys,
        database_dsn,
        GC_FAST_HEARTBEAT_MS="1234",
        GC_COMPREHENSIVE_HEARTBEAT_MS="5678",
        GC_LOAD_REPORT_MS="4321",
    )
    async with running_gc(environ) as gc, gc_clients(gc.endpoints.grpc_port) as clients:
        response = await call(clients.mc.RegisterMC, mc_registration("mc-1"), keys.mc_token("mc-1"))
        mh_response = await call(
            clients.mh.RegisterMH, mh_registration("mh-1"), keys.mh_token("mh-1")
        )
    assert response.accepted
    assert response.fast_heartbeat_interval_ms == 1234
    assert response.comprehensive_heartbeat_interval_ms == 5678
    assert mh_response.accepted
    assert mh_response.load_report_interval_ms == 4321


async def test_reregistration_replaces_endpoints_and_capacity(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """An MC restarting re-registers: still one row, endpoints and capacity
    replaced, ``registered_at`` kept, heartbeat refreshed; its reported
    health and load stay until its next heartbeat tells the truth."""
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    await call(clients.mc.FastHeartbeat, fast(meetings=3, participants=9), token)
    await backdate(db_pool, "meeting_controllers", "mc-1", timedelta(hours=1))
    old = await mc_row(db_pool, "mc-1")

    before = await database_now(db_pool)
    request = mc_registration(
        "mc-1",
        region="eu-west-2",
        grpc_endpoint="http://10.0.0.2:6000",
        webtransport_endpoint="https://mc-1b.example:5000",
        max_meetings=11,
        max_participants=111,
    )
    response = await call(clients.mc.RegisterMC, request, token)
    assert response.accepted

    new = await mc_row(db_pool, "mc-1")
    assert await count_rows(db_pool, "meeting_controllers") == 1
    assert new.region == "eu-west-2"
    assert new.grpc_endpoint == "http://10.0.0.2:6000"
    assert new.webtransport_endpoint == "https://mc-1b.example:5000"
    assert (new.max_meetings, new.max_participants) == (11, 111)
    assert new.registered_at == old.registered_at
    assert new.last_heartbeat_at >= before > old.last_heartbeat_at
    assert new.updated_at >= before
    assert new.health_status == "healthy"
    assert (new.current_meetings, new.current_participants) == (3, 9)


# --- MC heartbeats -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fast", "comprehensive"])
async def test_heartbeat_from_unknown_mc_is_not_found(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool, kind: str
) -> None:
    """The token is genuine and speaks for ``mc-ghost``; only the row is missing."""
    await register_mc(clients, keys, "mc-1")
    if kind == "fast":
        error = await call_error(
            clients.mc.FastHeartbeat, fast("mc-ghost"), keys.mc_token("mc-ghost")
        )
    else:
        error = await call_error(
            clients.mc.ComprehensiveHeartbeat, comprehensive("mc-ghost"), keys.mc_token("mc-ghost")
        )
    assert error.status is Status.NOT_FOUND
    assert error.message
    assert "mc-ghost" not in error.message
    assert await run_aio(meeting_controllers.get, db_pool, "mc-ghost") is None
    assert await count_rows(db_pool, "meeting_controllers") == 1


async def test_first_healthy_fast_heartbeat_makes_mc_healthy_with_its_load(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    await backdate(db_pool, "meeting_controllers", "mc-1", timedelta(seconds=5))
    registered = await mc_row(db_pool, "mc-1")
    assert registered.health_status == "pending"

    response = await call(clients.mc.FastHeartbeat, fast(meetings=4, participants=40), token)
    assert response.acknowledged

    row = await mc_row(db_pool, "mc-1")
    assert row.health_status == "healthy"
    assert (row.current_meetings, row.current_participants) == (4, 40)
    assert row.last_heartbeat_at > registered.last_heartbeat_at
    # The answer carries the database's time of the heartbeat, in ms.
    assert abs(response.timestamp - epoch_ms(row.last_heartbeat_at)) <= 1
    # A fast heartbeat carries no cpu/memory and leaves them alone.
    assert (row.cpu_usage_percent, row.memory_usage_percent) == (None, None)
    # The registration itself is untouched.
    assert (row.max_meetings, row.registered_at) == (
        registered.max_meetings,
        registered.registered_at,
    )


async def test_comprehensive_heartbeat_writes_cpu_and_memory(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    response = await call(
        clients.mc.ComprehensiveHeartbeat,
        comprehensive(meetings=5, participants=55, cpu=12.5, memory=87.25),
        token,
    )
    assert response.acknowledged
    row = await mc_row(db_pool, "mc-1")
    assert row.health_status == "healthy"
    assert (row.current_meetings, row.current_participants) == (5, 55)
    assert (row.cpu_usage_percent, row.memory_usage_percent) == (12.5, 87.25)
    assert abs(response.timestamp - epoch_ms(row.last_heartbeat_at)) <= 1

    # A later fast heartbeat updates the load and keeps the last cpu/memory.
    await call(clients.mc.FastHeartbeat, fast(meetings=6, participants=60), token)
    row = await mc_row(db_pool, "mc-1")
    assert (row.current_meetings, row.current_participants) == (6, 60)
    assert (row.cpu_usage_percent, row.memory_usage_percent) == (12.5, 87.25)


async def test_percent_edges_are_stored(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    await call(clients.mc.ComprehensiveHeartbeat, comprehensive(cpu=0.0, memory=100.0), token)
    row = await mc_row(db_pool, "mc-1")
    assert (row.cpu_usage_percent, row.memory_usage_percent) == (0.0, 100.0)


async def test_reported_health_is_stored_as_reported(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """Each heartbeat sets the status to what the MC reports, in any order."""
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    sequence = [
        ("fast", pb.HEALTHY, "healthy"),
        ("fast", pb.DEGRADED, "degraded"),
        ("fast", pb.HEALTHY, "healthy"),
        ("fast", pb.DRAINING, "draining"),
        ("comprehensive", pb.HEALTHY, "healthy"),
        ("comprehensive", pb.DEGRADED, "degraded"),
        ("comprehensive", pb.DRAINING, "draining"),
        ("comprehensive", pb.UNHEALTHY, "unhealthy"),
        ("fast", pb.UNHEALTHY, "unhealthy"),
    ]
    seen = []
    for step, (kind, health, _) in enumerate(sequence):
        if kind == "fast":
            await call(clients.mc.FastHeartbeat, fast(meetings=step, health=health), token)
        else:
            await call(
                clients.mc.ComprehensiveHeartbeat,
                comprehensive(meetings=step, health=health),
                token,
            )
        row = await mc_row(db_pool, "mc-1")
        seen.append((kind, health, row.health_status))
        assert row.current_meetings == step
    assert seen == sequence


async def test_stale_mc_recovers_on_its_next_heartbeat(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The health checker's own statement marks a silent MC unhealthy; its
    next healthy heartbeat brings it back."""
    token = keys.mc_token("mc-1")
    await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
    await call(clients.mc.FastHeartbeat, fast(meetings=1), token)
    await register_mc(clients, keys, "mc-fresh")
    await backdate(db_pool, "meeting_controllers", "mc-1", timedelta(minutes=2))

    marked = await run_aio(meeting_controllers.mark_stale_unhealthy, db_pool, 30.0)
    assert marked == ["mc-1"]
    assert (await mc_row(db_pool, "mc-1")).health_status == "unhealthy"
    assert (await mc_row(db_pool, "mc-fresh")).health_status == "pending"

    await call(clients.mc.FastHeartbeat, fast(meetings=2), token)
    row = await mc_row(db_pool, "mc-1")
    assert row.health_status == "healthy"
    assert row.current_meetings == 2
    assert await run_aio(meeting_controllers.mark_stale_unhealthy, db_pool, 30.0) == []


# --- media handlers ------------------------------------------------------------------------


async def test_register_mh_inserts_a_pending_row_with_zone(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    request = mh_registration(
        "mh-1",
        region="eu-west-1",
        zone="eu-west-1b",
        webtransport_endpoint="https://mh-1.example:4434",
        grpc_endpoint="http://10.0.1.1:50060",
        max_streams=321,
    )
    response = await call(clients.mh.RegisterMH, request, keys.mh_token("mh-1"))
    assert response.accepted
    row = await mh_row(db_pool, "mh-1")
    assert row.handler_id == "mh-1"
    assert (row.region, row.zone) == ("eu-west-1", "eu-west-1b")
    assert row.webtransport_endpoint == "https://mh-1.example:4434"
    assert row.grpc_endpoint == "http://10.0.1.1:50060"
    assert (row.max_streams, row.current_streams) == (321, 0)
    assert row.health_status == "pending"
    assert (row.cpu_usage_percent, row.memory_usage_percent, row.bandwidth_usage_percent) == (
        None,
        None,
        None,
    )
    assert row.registered_at == row.last_heartbeat_at


async def test_register_mh_with_unknown_zone(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """``zone`` is optional: empty means unknown; 50 characters is the limit."""
    await call(clients.mh.RegisterMH, mh_registration("mh-1", zone=""), keys.mh_token("mh-1"))
    await call(clients.mh.RegisterMH, mh_registration("mh-2", zone="z" * 50), keys.mh_token("mh-2"))
    assert (await mh_row(db_pool, "mh-1")).zone == ""
    assert (await mh_row(db_pool, "mh-2")).zone == "z" * 50


async def test_mh_reregistration_replaces_zone_endpoints_and_capacity(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    token = keys.mh_token("mh-1")
    await call(clients.mh.RegisterMH, mh_registration("mh-1"), token)
    await backdate(db_pool, "media_handlers", "mh-1", timedelta(hours=1))
    old = await mh_row(db_pool, "mh-1")
    request = mh_registration(
        "mh-1", zone="zone-b", grpc_endpoint="http://10.9.9.9:1", max_streams=9
    )
    await call(clients.mh.RegisterMH, request, token)
    new = await mh_row(db_pool, "mh-1")
    assert await count_rows(db_pool, "media_handlers") == 1
    assert (new.zone, new.grpc_endpoint, new.max_streams) == ("zone-b", "http://10.9.9.9:1", 9)
    assert new.registered_at == old.registered_at
    assert new.last_heartbeat_at > old.last_heartbeat_at


@pytest.mark.parametrize(
    ("health", "stored"),
    [(pb.HEALTHY, "healthy"), (pb.DEGRADED, "degraded"), (pb.DRAINING, "draining")],
)
async def test_load_report_writes_load_and_health(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool, health: Health, stored: str
) -> None:
    token = keys.mh_token("mh-1")
    await call(clients.mh.RegisterMH, mh_registration("mh-1"), token)
    response = await call(
        clients.mh.SendLoadReport,
        load_report(streams=42, health=health, cpu=25.5, memory=50.25, bandwidth=75.125),
        token,
    )
    assert response.acknowledged
    row = await mh_row(db_pool, "mh-1")
    assert row.current_streams == 42
    assert row.health_status == stored
    assert (row.cpu_usage_percent, row.memory_usage_percent, row.bandwidth_usage_percent) == (
        25.5,
        50.25,
        75.125,
    )
    assert abs(response.timestamp - epoch_ms(row.last_heartbeat_at)) <= 1


async def test_load_report_from_unknown_mh_is_not_found(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    await register_mh(clients, keys, "mh-1")
    error = await call_error(
        clients.mh.SendLoadReport, load_report("mh-ghost"), keys.mh_token("mh-ghost")
    )
    assert error.status is Status.NOT_FOUND
    assert await run_aio(media_handlers.get, db_pool, "mh-ghost") is None


async def test_stale_mh_recovers_on_its_next_load_report(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    token = keys.mh_token("mh-1")
    await call(clients.mh.RegisterMH, mh_registration("mh-1"), token)
    await call(clients.mh.SendLoadReport, load_report(streams=3), token)
    await backdate(db_pool, "media_handlers", "mh-1", timedelta(minutes=2))
    assert await run_aio(media_handlers.mark_stale_unhealthy, db_pool, 30.0) == ["mh-1"]
    assert (await mh_row(db_pool, "mh-1")).health_status == "unhealthy"

    await call(clients.mh.SendLoadReport, load_report(streams=4), token)
    row = await mh_row(db_pool, "mh-1")
    assert (row.health_status, row.current_streams) == ("healthy", 4)


# --- HTTP: health and metrics --------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_health_endpoints(gc: RunningGc) -> None:
    base = f"http://127.0.0.1:{gc.endpoints.http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        live = await http.get("/health/live")
        ready = await http.get("/health/ready")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_metrics_count_heartbeats_registrations_and_rpcs(
    gc: RunningGc, clients: GcClients, keys: DevKeys
) -> None:
    """The metrics registry is process-wide, so the test checks increments."""
    base = f"http://127.0.0.1:{gc.endpoints.http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        first = await http.get("/metrics")
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/plain")
        before = metric_samples(first.text)

        token = keys.mc_token("mc-1")
        await call(clients.mc.RegisterMC, mc_registration("mc-1"), token)
        await call(clients.mc.FastHeartbeat, fast(), token)
        await call(clients.mc.FastHeartbeat, fast(), token)
        await call(clients.mc.ComprehensiveHeartbeat, comprehensive(), token)
        await call_error(clients.mc.FastHeartbeat, fast("mc-ghost"), keys.mc_token("mc-ghost"))
        await register_mh(clients, keys)
        await call(clients.mh.SendLoadReport, load_report(), keys.mh_token("mh-1"))

        text = (await http.get("/metrics")).text
    after = metric_samples(text)
    assert 'gc_heartbeats_total{kind="fast",result="ok"}' in text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("gc_heartbeats_total", kind="fast", result="ok") == 2
    assert delta("gc_heartbeats_total", kind="fast", result="not_found") == 1
    assert delta("gc_heartbeats_total", kind="comprehensive", result="ok") == 1
    assert delta("gc_heartbeats_total", kind="mh_load_report", result="ok") == 1
    assert delta("gc_registrations_total", kind="mc") == 1
    assert delta("gc_registrations_total", kind="mh") == 1
    rpcs = "gc_grpc_server_rpcs_total"
    assert delta(rpcs, method=GC_SERVICE + "FastHeartbeat", status="OK") == 2
    assert delta(rpcs, method=GC_SERVICE + "FastHeartbeat", status="NOT_FOUND") == 1
    assert delta(rpcs, method=GC_SERVICE + "RegisterMC", status="OK") == 1


# --- database outage -----------------------------------------------------------------------


class PostgresProxy:
    """A TCP proxy in front of the session's PostgreSQL that the test can cut:
    a real outage for one GC without touching the shared server.

    ``cut`` closes every proxied connection and makes new ones close at once
    (what a GC sees when PostgreSQL restarts); ``restore`` proxies again.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        self._unix_path = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._tcp = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.up = True
        self._connections: set[trio.CancelScope] = set()
        self._all_closed = trio.Event()
        self.port = 0

    def dsn(self) -> str:
        """The DSN reaching the same database through the proxy."""
        parts = urlsplit(self._dsn)
        user = f"{parts.username}@" if parts.username else ""
        if parts.password:
            user = f"{parts.username}:{parts.password}@"
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path, "", ""))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    async def _connect_upstream(self) -> trio.abc.Stream:
        if self._unix_path is not None:
            return await trio.open_unix_socket(self._unix_path)
        return await trio.open_tcp_stream(*self._tcp)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            upstream = await self._connect_upstream()
            async with upstream:
                with trio.CancelScope() as scope:
                    self._connections.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, upstream, scope)
                            nursery.start_soon(self._pump, upstream, client, scope)
                    finally:
                        self._connections.discard(scope)
                        if not self._connections:
                            self._all_closed.set()

    @staticmethod
    async def _pump(
        source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def cut(self) -> None:
        """Close every connection through the proxy; returns once they are closed."""
        self.up = False
        if self._connections:
            self._all_closed = trio.Event()
            for scope in list(self._connections):
                scope.cancel()
            await self._all_closed.wait()

    def restore(self) -> None:
        self.up = True


async def test_database_outage_is_unavailable_and_recovers(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    proxy = PostgresProxy(database_dsn)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with (
            running_gc(gc_environ(keys, proxy.dsn())) as gc,
            gc_clients(gc.endpoints.grpc_port) as clients,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.endpoints.http_port}") as http,
        ):
            mc_token, mh_token = keys.mc_token("mc-1"), keys.mh_token("mh-1")
            await call(clients.mc.RegisterMC, mc_registration("mc-1"), mc_token)
            await call(clients.mh.RegisterMH, mh_registration("mh-1"), mh_token)

            await proxy.cut()
            outage: list[tuple[str, Callable[[], Awaitable[GRPCError]]]] = [
                (
                    "RegisterMC",
                    lambda: call_error(clients.mc.RegisterMC, mc_registration("mc-1"), mc_token),
                ),
                ("FastHeartbeat", lambda: call_error(clients.mc.FastHeartbeat, fast(), mc_token)),
                (
                    "ComprehensiveHeartbeat",
                    lambda: call_error(
                        clients.mc.ComprehensiveHeartbeat, comprehensive(), mc_token
                    ),
                ),
                (
                    "RegisterMH",
                    lambda: call_error(clients.mh.RegisterMH, mh_registration("mh-1"), mh_token),
                ),
                (
                    "SendLoadReport",
                    lambda: call_error(clients.mh.SendLoadReport, load_report(), mh_token),
                ),
            ]
            for name, rpc in outage:
                error = await rpc()
                assert (name, error.status, error.message) == (
                    name,
                    Status.UNAVAILABLE,
                    "database unavailable",
                )
            ready = await http.get("/health/ready")
            assert ready.status_code == 503
            assert ready.headers["retry-after"] == "1"
            assert (await http.get("/health/live")).status_code == 200

            proxy.restore()
            assert (await http.get("/health/ready")).status_code == 200
            response = await call(clients.mc.FastHeartbeat, fast(meetings=8), mc_token)
            assert response.acknowledged
            await call(clients.mh.SendLoadReport, load_report(streams=8), mh_token)
        nursery.cancel_scope.cancel()

    assert (await mc_row(db_pool, "mc-1")).current_meetings == 8
    assert (await mh_row(db_pool, "mh-1")).current_streams == 8


def test_proxy_dsn_keeps_database_and_credentials() -> None:
    proxy = PostgresProxy("postgresql://u:p%40ss@/dt_test_x?host=/tmp/sock")
    proxy.port = 1234
    assert proxy.dsn() == "postgresql://u:p%40ss@127.0.0.1:1234/dt_test_x"
