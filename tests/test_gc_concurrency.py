"""The registry under real concurrency (SPEC §6.1, §10): many trio tasks
calling over several HTTP/2 connections into GCs whose handlers run
concurrently against real PostgreSQL through their own pools - GCs in-process
and, at the end, two GC processes on one database.

Every RPC must succeed, and what is left in the database must be exactly what
some one request wrote: no lost rows, no duplicated ids, no row mixing the
fields of two registrations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
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
from process_harness import GcProcess, assert_clean_stop, ready_gc_processes

import darktower.gc.app
from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.gc.repositories.meeting_controllers import MeetingControllerRow
from darktower.protos import internal_pb2 as pb
from darktower.shared.grpc_server import GrpcServer
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

CHANNELS = 4
GC_SERVICE = "/dark_tower.internal.GlobalControllerService/"


@asynccontextmanager
async def open_clients(ports: Sequence[int], channels: int) -> AsyncIterator[list[GcClients]]:
    """``channels`` separate connections, spread round-robin over ``ports``."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(gc_clients(ports[i % len(ports)]))
            for i in range(channels)
        ]


def grpc_ports(gcs: Sequence[RunningGc]) -> list[int]:
    return [gc.endpoints.grpc_port for gc in gcs]


@pytest.fixture
def grpc_servers(monkeypatch: pytest.MonkeyPatch) -> list[GrpcServer]:
    """Every :class:`GrpcServer` a GC builds during the test, in order: the
    real class, only recorded, so a test can read its statistics."""
    servers: list[GrpcServer] = []

    class RecordedGrpcServer(GrpcServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(darktower.gc.app, "GrpcServer", RecordedGrpcServer)
    return servers


@pytest.fixture
async def gc(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str, grpc_servers: list[GrpcServer]
) -> AsyncIterator[RunningGc]:
    """The default GC (``gc_fixtures.gc``), its gRPC server recorded."""
    async with running_gc(gc_environ(keys, database_dsn)) as running:
        yield running


@pytest.fixture
async def channels(gc: RunningGc) -> AsyncIterator[list[GcClients]]:
    async with open_clients(grpc_ports([gc]), CHANNELS) as clients:
        yield clients


async def call(method: UnaryUnaryMethod[Any, Any], request: Any, token: str) -> Any:
    return await run_aio(method, request, metadata=metadata(token))


def heartbeat(mc_id: str, meetings: int, participants: int, cpu: float) -> Any:
    return pb.ComprehensiveHeartbeatRequest(
        controller_id=mc_id,
        capacity=pb.ControllerCapacity(
            max_meetings=1000, current_meetings=meetings, current_participants=participants
        ),
        health=pb.HEALTHY,
        cpu_usage_percent=cpu,
        memory_usage_percent=100.0 - cpu,
    )


def fleet_endpoint(i: int) -> str:
    return f"http://10.0.{i // 250}.{i % 250}:50052"


async def register_and_heartbeat_fleet(
    channels: Sequence[GcClients], keys: DevKeys, count: int
) -> list[str]:
    """``count`` MCs at once, MC ``i`` over ``channels[i % len(channels)]``:
    each registers, then sends one comprehensive heartbeat. Their ids."""
    ids = [f"mc-{i:03d}" for i in range(count)]
    tokens = {mc_id: keys.mc_token(mc_id) for mc_id in ids}
    acknowledged: list[str] = []

    async def one_mc(i: int, mc_id: str) -> None:
        clients = channels[i % len(channels)]
        registered = await call(
            clients.mc.RegisterMC,
            mc_registration(mc_id, grpc_endpoint=fleet_endpoint(i)),
            tokens[mc_id],
        )
        assert registered.accepted
        response = await call(
            clients.mc.ComprehensiveHeartbeat,
            heartbeat(mc_id, meetings=i % 100, participants=i * 3, cpu=float(i % 100)),
            tokens[mc_id],
        )
        assert response.acknowledged
        acknowledged.append(mc_id)

    async with trio.open_nursery() as nursery:
        for i, mc_id in enumerate(ids):
            nursery.start_soon(one_mc, i, mc_id)
    assert sorted(acknowledged) == ids
    return ids


def assert_fleet_rows(rows: Sequence[MeetingControllerRow], ids: Sequence[str]) -> None:
    """One healthy row per MC of :func:`register_and_heartbeat_fleet`, each
    holding exactly what that MC sent."""
    assert [row.controller_id for row in rows] == list(ids)
    for i, row in enumerate(rows):
        assert row.health_status == "healthy", row.controller_id
        assert row.grpc_endpoint == fleet_endpoint(i)
        assert (row.current_meetings, row.current_participants) == (i % 100, i * 3)
        assert (row.cpu_usage_percent, row.memory_usage_percent) == (i % 100, 100 - i % 100)


async def test_100_mcs_register_and_heartbeat_concurrently(
    channels: list[GcClients],
    keys: DevKeys,
    db_pool: asyncpg.Pool,
    grpc_servers: list[GrpcServer],
) -> None:
    ids = await register_and_heartbeat_fleet(channels, keys, 100)
    assert_fleet_rows(await run_aio(meeting_controllers.list_all, db_pool), ids)
    # The GC's handlers really overlapped (each awaits PostgreSQL): more of
    # them ran at once than there are connections, so the server took the
    # streams of one connection side by side too, not one after another.
    [server] = grpc_servers
    assert server.statistics().peak_in_flight > CHANNELS


async def test_50_mhs_register_and_report_concurrently(
    channels: list[GcClients], keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    ids = [f"mh-{i:02d}" for i in range(50)]

    async def one_mh(i: int, mh_id: str) -> None:
        clients = channels[i % len(channels)]
        token = keys.mh_token(mh_id)
        await call(clients.mh.RegisterMH, mh_registration(mh_id, zone=f"zone-{i % 3}"), token)
        report = pb.MHLoadReportRequest(
            handler_id=mh_id,
            current_streams=i,
            health=pb.HEALTHY,
            cpu_usage_percent=1.0,
            memory_usage_percent=2.0,
            bandwidth_usage_percent=float(i),
        )
        assert (await call(clients.mh.SendLoadReport, report, token)).acknowledged

    async with trio.open_nursery() as nursery:
        for i, mh_id in enumerate(ids):
            nursery.start_soon(one_mh, i, mh_id)

    rows = await run_aio(media_handlers.list_all, db_pool)
    assert [row.handler_id for row in rows] == ids
    for i, row in enumerate(rows):
        assert (row.health_status, row.zone) == ("healthy", f"zone-{i % 3}")
        assert (row.current_streams, row.bandwidth_usage_percent) == (i, i)


def reregistrations(mc_id: str, count: int) -> dict[int, pb.RegisterMCRequest]:
    """``count`` registrations of ``mc_id`` that differ in every field."""
    return {
        i: mc_registration(
            mc_id,
            region=f"region-{i}",
            grpc_endpoint=f"http://10.1.0.{i}:50052",
            webtransport_endpoint=f"https://10.1.0.{i}:4433",
            max_meetings=100 + i,
            max_participants=1000 + i,
        )
        for i in range(count)
    }


async def register_all_at_once(
    channels: Sequence[GcClients], sent: dict[int, pb.RegisterMCRequest], token: str
) -> None:
    """Every registration of ``sent`` at once, registration ``i`` over
    ``channels[i % len(channels)]``; each must be accepted."""

    async def register(i: int) -> None:
        response = await call(channels[i % len(channels)].mc.RegisterMC, sent[i], token)
        assert response.accepted

    async with trio.open_nursery() as nursery:
        for i in sent:
            nursery.start_soon(register, i)


def assert_one_whole_row(
    rows: Sequence[MeetingControllerRow], sent: dict[int, pb.RegisterMCRequest]
) -> None:
    """One row, and all of its fields come from the same one of ``sent``."""
    assert len(rows) == 1
    row = rows[0]
    winner = next(
        (i for i, request in sent.items() if request.grpc_endpoint == row.grpc_endpoint), None
    )
    assert winner is not None, f"stored endpoint {row.grpc_endpoint!r} was never sent"
    request = sent[winner]
    assert (
        row.region,
        row.webtransport_endpoint,
        row.max_meetings,
        row.max_participants,
    ) == (
        request.region,
        request.webtransport_endpoint,
        request.max_meetings,
        request.max_participants,
    )
    assert row.health_status == "pending"


async def test_concurrent_reregistrations_leave_one_whole_row(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    """20 registrations of one id at once, through two GCs (two pools) and
    four connections: one row, and all of its fields come from the same one
    of the 20 requests."""
    sent = reregistrations("mc-1", 20)
    async with (
        running_gc(gc_environ(keys, database_dsn, GC_ID="gc-a")) as gc_a,
        running_gc(gc_environ(keys, database_dsn, GC_ID="gc-b")) as gc_b,
        open_clients(grpc_ports([gc_a, gc_b]), CHANNELS) as clients,
    ):
        await register_all_at_once(clients, sent, keys.mc_token("mc-1"))
    assert_one_whole_row(await run_aio(meeting_controllers.list_all, db_pool), sent)


async def test_heartbeats_racing_reregistration_never_fail(
    channels: list[GcClients], keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """An MC re-registering (after a restart) while heartbeats of the same id
    are still in flight: every call succeeds, one row remains, and it holds
    one of the registrations and one of the reported loads."""
    token = keys.mc_token("mc-1")
    await call(channels[0].mc.RegisterMC, mc_registration("mc-1"), token)
    endpoints = [f"http://10.2.0.{i}:50052" for i in range(20)]
    loads = list(range(1, 41))
    results: list[str] = []

    async def reregister(endpoint: str, clients: GcClients) -> None:
        response = await call(
            clients.mc.RegisterMC, mc_registration("mc-1", grpc_endpoint=endpoint), token
        )
        assert response.accepted
        results.append("register")

    async def beat(meetings: int, clients: GcClients) -> None:
        if meetings % 2:
            request: Any = pb.FastHeartbeatRequest(
                controller_id="mc-1",
                capacity=pb.ControllerCapacity(current_meetings=meetings),
                health=pb.HEALTHY,
            )
            response = await call(clients.mc.FastHeartbeat, request, token)
        else:
            response = await call(
                clients.mc.ComprehensiveHeartbeat,
                heartbeat("mc-1", meetings=meetings, participants=0, cpu=50.0),
                token,
            )
        assert response.acknowledged
        results.append("beat")

    async with trio.open_nursery() as nursery:
        for n, (endpoint, meetings) in enumerate(zip(endpoints, loads[:20], strict=True)):
            nursery.start_soon(reregister, endpoint, channels[n % len(channels)])
            nursery.start_soon(beat, meetings, channels[(n + 1) % len(channels)])
        for n, meetings in enumerate(loads[20:]):
            nursery.start_soon(beat, meetings, channels[n % len(channels)])

    assert sorted(results) == ["beat"] * 40 + ["register"] * 20
    rows = await run_aio(meeting_controllers.list_all, db_pool)
    assert len(rows) == 1
    assert rows[0].grpc_endpoint in endpoints
    assert rows[0].current_meetings in loads
    # Re-registration keeps health; every heartbeat reported healthy.
    assert rows[0].health_status == "healthy"


# --- two GC processes on one database ----------------------------------------------------------


@pytest.fixture
async def gc_processes(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str, tmp_path: Path
) -> AsyncIterator[list[GcProcess]]:
    """Two GCs as real processes (``python -m darktower.gc``) on the
    (emptied) session database, both ready."""
    async with ready_gc_processes(gc_environ(keys, database_dsn), tmp_path) as gcs:
        yield gcs


async def rpcs_served(gc: GcProcess, method: str) -> float:
    """How many ``method`` RPCs ``gc`` answered with OK (its own metrics)."""
    return await gc.metric("gc_grpc_server_rpcs_total", method=f"{GC_SERVICE}{method}", status="OK")


async def stop_cleanly(gcs: Sequence[GcProcess]) -> None:
    """SIGTERM each GC; each exits 0 and logged no error on the way."""
    for gc in gcs:
        assert_clean_stop(gc, await gc.stop())


@pytest.mark.slow
async def test_reregistrations_split_across_two_gc_processes_leave_one_whole_row(
    gc_processes: list[GcProcess], keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """As above, with the GCs as separate processes: 20 registrations of one
    id at once, alternating between the two over four connections."""
    sent = reregistrations("mc-1", 20)
    async with open_clients([gc.grpc_port for gc in gc_processes], CHANNELS) as clients:
        await register_all_at_once(clients, sent, keys.mc_token("mc-1"))
    assert_one_whole_row(await run_aio(meeting_controllers.list_all, db_pool), sent)
    assert [await rpcs_served(gc, "RegisterMC") for gc in gc_processes] == [10, 10]
    await stop_cleanly(gc_processes)


@pytest.mark.slow
async def test_100_mcs_split_across_two_gc_processes_are_all_healthy(
    gc_processes: list[GcProcess], keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """100 MCs register and heartbeat at once, alternating between two GC
    processes over four connections: 100 healthy rows, each as sent."""
    async with open_clients([gc.grpc_port for gc in gc_processes], CHANNELS) as clients:
        ids = await register_and_heartbeat_fleet(clients, keys, 100)
    assert_fleet_rows(await run_aio(meeting_controllers.list_all, db_pool), ids)
    for method in ("RegisterMC", "ComprehensiveHeartbeat"):
        assert [await rpcs_served(gc, method) for gc in gc_processes] == [50, 50], method
    await stop_cleanly(gc_processes)
