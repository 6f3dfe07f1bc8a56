"""The registry under real concurrency (SPEC §6.1, §10): many trio tasks
calling over several HTTP/2 connections into GCs whose handlers run
concurrently against real PostgreSQL through their own pools.

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

from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

CHANNELS = 4


@pytest.fixture
def keys(tmp_path: Path) -> DevKeys:
    return DevKeys.create(tmp_path / "keys")


@asynccontextmanager
async def open_clients(gcs: Sequence[RunningGc], channels: int) -> AsyncIterator[list[GcClients]]:
    """``channels`` separate connections, spread round-robin over ``gcs``."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(gc_clients(gcs[i % len(gcs)].endpoints.grpc_port))
            for i in range(channels)
        ]


@pytest.fixture
async def gc(db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str) -> AsyncIterator[RunningGc]:
    async with running_gc(gc_environ(keys, database_dsn, GC_DB_POOL_SIZE="10")) as running:
        yield running


@pytest.fixture
async def channels(gc: RunningGc) -> AsyncIterator[list[GcClients]]:
    async with open_clients([gc], CHANNELS) as clients:
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


class InFlight:
    """Counts RPCs in flight and remembers the peak: evidence that the tasks
    really overlapped rather than ran one after another."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    @asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            self.now -= 1


async def test_100_mcs_register_and_heartbeat_concurrently(
    channels: list[GcClients], keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    count = 100
    ids = [f"mc-{i:03d}" for i in range(count)]
    tokens = {mc_id: keys.mc_token(mc_id) for mc_id in ids}
    acknowledged: list[str] = []
    in_flight = InFlight()

    async def one_mc(i: int, mc_id: str) -> None:
        clients = channels[i % len(channels)]
        async with in_flight.track():
            registered = await call(
                clients.mc.RegisterMC,
                mc_registration(mc_id, grpc_endpoint=f"http://10.0.{i // 250}.{i % 250}:50052"),
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
    assert in_flight.peak == count
    rows = await run_aio(meeting_controllers.list_all, db_pool)
    assert [row.controller_id for row in rows] == ids
    for i, row in enumerate(rows):
        assert row.health_status == "healthy", row.controller_id
        assert row.grpc_endpoint == f"http://10.0.{i // 250}.{i % 250}:50052"
        assert (row.current_meetings, row.current_participants) == (i % 100, i * 3)
        assert (row.cpu_usage_percent, row.memory_usage_percent) == (i % 100, 100 - i % 100)


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


async def test_concurrent_reregistrations_leave_one_whole_row(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str
) -> None:
    """20 registrations of one id at once, through two GCs (two pools) and
    four connections: one row, and all of its fields come from the same one
    of the 20 requests."""
    token = keys.mc_token("mc-1")
    sent = {
        i: mc_registration(
            "mc-1",
            region=f"region-{i}",
            grpc_endpoint=f"http://10.1.0.{i}:50052",
            webtransport_endpoint=f"https://10.1.0.{i}:4433",
            max_meetings=100 + i,
            max_participants=1000 + i,
        )
        for i in range(20)
    }
    async with (
        running_gc(gc_environ(keys, database_dsn, GC_ID="gc-a")) as gc_a,
        running_gc(gc_environ(keys, database_dsn, GC_ID="gc-b")) as gc_b,
        open_clients([gc_a, gc_b], CHANNELS) as clients,
    ):

        async def register(i: int) -> None:
            response = await call(clients[i % len(clients)].mc.RegisterMC, sent[i], token)
            assert response.accepted

        async with trio.open_nursery() as nursery:
            for i in sent:
                nursery.start_soon(register, i)

    rows = await run_aio(meeting_controllers.list_all, db_pool)
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
