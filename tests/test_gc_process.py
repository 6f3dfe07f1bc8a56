"""The Global Controller as a real process (SPEC §5, §8, §10): ``python -m
darktower.gc`` on a real database, driven through its public interfaces
(HTTP readiness, gRPC registry, signals, exit status, stderr). The process
helpers are in :mod:`process_harness`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from gc_harness import (
    DevKeys,
    GcClients,
    gc_clients,
    gc_environ,
    mc_registration,
    metadata,
    mh_registration,
)
from process_harness import (
    READY_WITHIN_S,
    assert_clean_stop,
    child_environ,
    fetch,
    gc_process,
    ready_gc_processes,
)

from darktower.gc.config import VARIABLES
from darktower.protos import internal_pb2 as pb
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys, empty_database

pytestmark = pytest.mark.slow

#: The tables schema.sql creates (SPEC §5).
TABLES = {"meetings", "meeting_controllers", "media_handlers", "meeting_assignments"}

#: SPEC §8: the GC's variables, as the operator reads them in the table.
SPEC_VARIABLES = [
    "DATABASE_URL",
    "GC_HTTP_ADDR",
    "GC_GRPC_ADDR",
    "GC_ID",
    "GC_REGION",
    "AUTH_JWKS",
    "GC_SIGNING_KEY",
    "GC_SERVICE_TOKEN",
    "GC_STALE_AFTER_S",
    "GC_HEALTH_CHECK_INTERVAL_S",
    "GC_FAST_HEARTBEAT_MS",
    "GC_COMPREHENSIVE_HEARTBEAT_MS",
]


async def register_and_heartbeat(clients: GcClients, keys: DevKeys, mc_id: str) -> None:
    auth = metadata(keys.mc_token(mc_id))
    registered = await run_aio(clients.mc.RegisterMC, mc_registration(mc_id), metadata=auth)
    assert registered is not None
    assert registered.accepted
    heartbeat = pb.FastHeartbeatRequest(
        controller_id=mc_id,
        capacity=pb.ControllerCapacity(
            max_meetings=100, current_meetings=7, max_participants=1000, current_participants=42
        ),
        health=pb.HEALTHY,
    )
    reply = await run_aio(clients.mc.FastHeartbeat, heartbeat, metadata=auth)
    assert reply is not None
    assert reply.acknowledged


async def public_tables(dsn: str) -> list[str]:
    rows = await fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return sorted(row[0] for row in rows)


# --- a GC's life ------------------------------------------------------------------------------


async def test_gc_on_an_empty_database_serves_the_registry_and_stops_on_sigterm(
    aio_loop: None, empty_database: str, keys: DevKeys, tmp_path: Path
) -> None:
    assert await public_tables(empty_database) == []
    async with gc_process(gc_environ(keys, empty_database), tmp_path) as gc:
        await gc.wait_ready()
        assert set(await public_tables(empty_database)) >= TABLES

        async with gc_clients(gc.grpc_port) as clients:
            await register_and_heartbeat(clients, keys, "mc-1")
            auth = metadata(keys.mh_token("mh-1"))
            await run_aio(clients.mh.RegisterMH, mh_registration("mh-1"), metadata=auth)
            report = pb.MHLoadReportRequest(
                handler_id="mh-1",
                current_streams=5,
                health=pb.HEALTHY,
                cpu_usage_percent=10,
                memory_usage_percent=20,
                bandwidth_usage_percent=30,
            )
            await run_aio(clients.mh.SendLoadReport, report, metadata=auth)

        mcs = await fetch(
            empty_database,
            "SELECT controller_id, health_status, current_meetings, current_participants,"
            " max_meetings FROM meeting_controllers",
        )
        assert [tuple(row) for row in mcs] == [("mc-1", "healthy", 7, 42, 100)]
        mhs = await fetch(
            empty_database,
            "SELECT handler_id, health_status, current_streams, zone FROM media_handlers",
        )
        assert [tuple(row) for row in mhs] == [("mh-1", "healthy", 5, "zone-a")]

        status = await gc.stop(signal.SIGTERM)
    assert_clean_stop(gc, status)


async def test_sigint_stops_the_gc_cleanly(
    clean_database: str, keys: DevKeys, tmp_path: Path
) -> None:
    async with gc_process(gc_environ(keys, clean_database), tmp_path) as gc:
        await gc.wait_ready()
        status = await gc.stop(signal.SIGINT)
    assert_clean_stop(gc, status)
    assert "signal=SIGINT" in gc.stderr()


async def test_two_gcs_on_one_empty_database_both_come_up(
    aio_loop: None, empty_database: str, keys: DevKeys, tmp_path: Path
) -> None:
    """Started at the same moment, both apply the schema (under the advisory
    lock): neither fails on the other's half-created objects."""
    async with ready_gc_processes(gc_environ(keys, empty_database), tmp_path) as [gc_a, gc_b]:
        tables = await public_tables(empty_database)
        assert len(tables) == len(set(tables))
        assert set(tables) >= TABLES
        for gc, mc_id in ((gc_a, "mc-a"), (gc_b, "mc-b")):
            async with gc_clients(gc.grpc_port) as clients:
                await register_and_heartbeat(clients, keys, mc_id)
        rows = await fetch(
            empty_database, "SELECT controller_id, health_status FROM meeting_controllers"
        )
        assert sorted(tuple(row) for row in rows) == [("mc-a", "healthy"), ("mc-b", "healthy")]
        statuses = [await gc_a.stop(), await gc_b.stop()]
    assert_clean_stop(gc_a, statuses[0])
    assert_clean_stop(gc_b, statuses[1])


# --- configuration at the command line -------------------------------------------------------


async def run_gc_command(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(READY_WITHIN_S):
        return await trio.run_process(
            [sys.executable, "-m", "darktower.gc", *args],
            env=child_environ(environ),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize(
    "missing", ["AUTH_JWKS", "DATABASE_URL", "GC_SIGNING_KEY", "GC_SERVICE_TOKEN"]
)
async def test_a_missing_required_variable_stops_the_gc_with_one_line(
    keys: DevKeys, missing: str
) -> None:
    environ = gc_environ(keys, "postgresql://postgres@127.0.0.1:1/none")
    del environ[missing]
    result = await run_gc_command(environ)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert missing in lines[0]
    assert result.stdout == b""


async def test_an_invalid_secret_is_named_but_never_shown(keys: DevKeys) -> None:
    environ = gc_environ(keys, "mysql://admin:hunter2@db.example/x")
    result = await run_gc_command(environ)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "DATABASE_URL" in lines[0]
    assert "hunter2" not in lines[0]


async def test_help_lists_every_variable() -> None:
    result = await run_gc_command({}, "--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for name in [*SPEC_VARIABLES, *(var.name for var in VARIABLES)]:
        assert name in text, name
