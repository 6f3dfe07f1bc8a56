"""The Global Controller as a real process (SPEC §5, §8, §10): ``python -m
darktower.gc`` on a real database, driven through its public interfaces
(HTTP readiness, gRPC registry, signals, exit status, stderr).

Waiting for a child process to become ready is a bounded readiness poll
(small steps, a hard cap), not a sleep standing in for synchronisation.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
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

from darktower.gc.config import VARIABLES
from darktower.protos import internal_pb2 as pb
from darktower.shared.db import open_pool
from darktower.shared.devstack import create_database, drop_database
from darktower.shared.seam import run_aio

pytestmark = pytest.mark.slow

#: Readiness poll: steps of this many seconds, at most this long in all.
POLL_STEP_S = 0.05
READY_WITHIN_S = 20.0
#: SPEC §2: shutdown is graceful and bounded.
STOPPED_WITHIN_S = 10.0

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


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_environ(environ: dict[str, str]) -> dict[str, str]:
    """The test's own environment without any GC configuration it may carry,
    plus ``environ``: the child sees exactly the configuration under test."""
    names = {var.name for var in VARIABLES}
    inherited = {k: v for k, v in os.environ.items() if k not in names}
    return inherited | environ


@pytest.fixture
def dev_keys(tmp_path: Path) -> DevKeys:
    return DevKeys.create(tmp_path / "keys")


@pytest.fixture
def empty_database(pg_server_dsn: str) -> Iterator[str]:
    """A brand-new database with no schema at all; dropped afterwards."""
    name = f"dt_test_empty_{secrets.token_hex(6)}"
    dsn = create_database(pg_server_dsn, name)
    try:
        yield dsn
    finally:
        drop_database(pg_server_dsn, name)


@dataclass
class GcProcess:
    process: trio.Process
    http_port: int
    grpc_port: int
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        """Poll ``GET /health/ready`` until it answers 200 (bounded)."""
        url = f"http://127.0.0.1:{self.http_port}/health/ready"
        async with httpx.AsyncClient(timeout=2.0) as client:
            for _ in range(int(READY_WITHIN_S / POLL_STEP_S)):
                if self.process.returncode is not None:
                    pytest.fail(
                        f"GC exited with {self.process.returncode} before it was ready:\n"
                        f"{self.stderr()}"
                    )
                try:
                    response = await client.get(url)
                except httpx.TransportError:
                    pass
                else:
                    if response.status_code == 200:
                        assert response.json() == {"status": "ready"}
                        return
                await trio.sleep(POLL_STEP_S)
        pytest.fail(f"GC not ready within {READY_WITHIN_S} s:\n{self.stderr()}")

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal the GC and wait for it to exit (bounded); its status."""
        self.process.send_signal(signum)
        with trio.fail_after(STOPPED_WITHIN_S):
            return await self.process.wait()


@asynccontextmanager
async def gc_process(
    environ: dict[str, str], workdir: Path, name: str = "gc"
) -> AsyncIterator[GcProcess]:
    """``python -m darktower.gc`` on fixed free ports; killed if still
    running when the block ends."""
    http_port, grpc_port = free_port(), free_port()
    environ = environ | {
        "GC_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "GC_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "GC_ID": name,
    }
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "darktower.gc"],
            env=child_environ(environ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield GcProcess(process, http_port, grpc_port, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


def assert_clean_stop(gc: GcProcess, status: int) -> None:
    log = gc.stderr()
    assert status == 0, log
    assert "event=gc_started" in log
    assert "event=gc_stopped" in log
    assert "Traceback" not in log
    assert "level=error" not in log


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


async def fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    async with open_pool(dsn, max_size=1) as pool:
        rows: list[asyncpg.Record] = await run_aio(pool.fetch, query)
        return rows


async def public_tables(dsn: str) -> list[str]:
    rows = await fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return sorted(row[0] for row in rows)


# --- a GC's life ------------------------------------------------------------------------------


async def test_gc_on_an_empty_database_serves_the_registry_and_stops_on_sigterm(
    aio_loop: None, empty_database: str, dev_keys: DevKeys, tmp_path: Path
) -> None:
    assert await public_tables(empty_database) == []
    async with gc_process(gc_environ(dev_keys, empty_database), tmp_path) as gc:
        await gc.wait_ready()
        assert set(await public_tables(empty_database)) >= TABLES

        async with gc_clients(gc.grpc_port) as clients:
            await register_and_heartbeat(clients, dev_keys, "mc-1")
            auth = metadata(dev_keys.mh_token("mh-1"))
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
    clean_database: str, dev_keys: DevKeys, tmp_path: Path
) -> None:
    async with gc_process(gc_environ(dev_keys, clean_database), tmp_path) as gc:
        await gc.wait_ready()
        status = await gc.stop(signal.SIGINT)
    assert_clean_stop(gc, status)
    assert "signal=SIGINT" in gc.stderr()


async def test_two_gcs_on_one_empty_database_both_come_up(
    aio_loop: None, empty_database: str, dev_keys: DevKeys, tmp_path: Path
) -> None:
    """Started at the same moment, both apply the schema (under the advisory
    lock): neither fails on the other's half-created objects."""
    environ = gc_environ(dev_keys, empty_database)
    async with (
        gc_process(environ, tmp_path, "gc-a") as gc_a,
        gc_process(environ, tmp_path, "gc-b") as gc_b,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gc_a.wait_ready)
            nursery.start_soon(gc_b.wait_ready)
        tables = await public_tables(empty_database)
        assert len(tables) == len(set(tables))
        assert set(tables) >= TABLES
        for gc, mc_id in ((gc_a, "mc-a"), (gc_b, "mc-b")):
            async with gc_clients(gc.grpc_port) as clients:
                await register_and_heartbeat(clients, dev_keys, mc_id)
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
    dev_keys: DevKeys, missing: str
) -> None:
    environ = gc_environ(dev_keys, "postgresql://postgres@127.0.0.1:1/none")
    del environ[missing]
    result = await run_gc_command(environ)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert missing in lines[0]
    assert result.stdout == b""


async def test_an_invalid_secret_is_named_but_never_shown(dev_keys: DevKeys) -> None:
    environ = gc_environ(dev_keys, "mysql://admin:hunter2@db.example/x")
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
