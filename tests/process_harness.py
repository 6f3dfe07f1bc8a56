"""Test support for services run as real processes (``python -m
darktower.gc``): free ports, the child's environment, readiness, stopping,
and reading a database the processes share.

Waiting for a child process to become ready is a bounded readiness poll
(small steps, a hard cap), not a sleep standing in for synchronisation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from darktower.gc.config import VARIABLES
from darktower.mc.config import VARIABLES as MC_VARIABLES
from darktower.shared.db import open_pool
from darktower.shared.seam import run_aio

#: Readiness poll: steps of this many seconds, at most this long in all.
POLL_STEP_S = 0.05
READY_WITHIN_S = 20.0
#: SPEC §2: shutdown is graceful and bounded.
STOPPED_WITHIN_S = 10.0

T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_environ(environ: dict[str, str]) -> dict[str, str]:
    """The test's own environment without any GC configuration it may carry,
    plus ``environ``: the child sees exactly the configuration under test."""
    names = {var.name for var in (*VARIABLES, *MC_VARIABLES)}
    inherited = {k: v for k, v in os.environ.items() if k not in names}
    return inherited | environ


@dataclass
class GcProcess:
    """A GC or MC process (:func:`gc_process`, :func:`mc_process`)."""

    process: trio.Process
    http_port: int
    grpc_port: int
    stderr_path: Path
    #: What its logs are named after (an MC's id; a GC's, in fleets).
    name: str = ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        """Poll ``GET /health/ready`` until it answers 200 (bounded)."""
        url = f"http://127.0.0.1:{self.http_port}/health/ready"
        async with httpx.AsyncClient(timeout=2.0) as client:
            for _ in range(int(READY_WITHIN_S / POLL_STEP_S)):
                if self.process.returncode is not None:
                    pytest.fail(
                        f"process exited with {self.process.returncode} before it was ready:\n"
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
        pytest.fail(f"process not ready within {READY_WITHIN_S} s:\n{self.stderr()}")

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (``name`` and exactly ``labels``) of the
        GC's ``GET /metrics``; 0 if it has none."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(f"http://127.0.0.1:{self.http_port}/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal the GC and wait for it to exit (bounded); its status."""
        self.process.send_signal(signum)
        with trio.fail_after(STOPPED_WITHIN_S):
            return await self.process.wait()


@asynccontextmanager
async def gc_process(
    environ: dict[str, str],
    workdir: Path,
    name: str = "gc",
    *,
    ports: tuple[int, int] | None = None,
) -> AsyncIterator[GcProcess]:
    """``python -m darktower.gc`` on fixed free ports (or ``ports`` = (http,
    grpc), e.g. to restart a GC where its MCs expect it); killed if still
    running when the block ends. ``name`` labels its logs; its id is the one
    its service token names (``GC_ID`` in ``environ``)."""
    http_port, grpc_port = ports if ports is not None else (free_port(), free_port())
    environ = environ | {
        "GC_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "GC_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
    }
    async with _service_process("darktower.gc", environ, workdir, name, http_port, grpc_port) as gc:
        yield gc


@asynccontextmanager
async def mc_process(
    environ: dict[str, str], workdir: Path, name: str = "mc"
) -> AsyncIterator[GcProcess]:
    """``python -m darktower.mc`` on fixed free ports (its id is ``name``);
    killed if still running when the block ends."""
    http_port, grpc_port = free_port(), free_port()
    environ = environ | {
        "MC_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "MC_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "MC_ID": name,
    }
    async with _service_process("darktower.mc", environ, workdir, name, http_port, grpc_port) as mc:
        yield mc


@asynccontextmanager
async def _service_process(
    module: str, environ: dict[str, str], workdir: Path, name: str, http_port: int, grpc_port: int
) -> AsyncIterator[GcProcess]:
    stderr_path = workdir / f"{name}.stderr"
    n = 1
    while stderr_path.exists():  # a restarted process keeps its first log
        n += 1
        stderr_path = workdir / f"{name}.{n}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", module],
            env=child_environ(environ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield GcProcess(process, http_port, grpc_port, stderr_path, name)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


@asynccontextmanager
async def ready_gc_processes(
    environ: dict[str, str], workdir: Path, names: Sequence[str] = ("gc-a", "gc-b")
) -> AsyncIterator[list[GcProcess]]:
    """One :func:`gc_process` per name, started at the same moment, all ready
    when the block begins."""
    async with AsyncExitStack() as stack:
        gcs = [await stack.enter_async_context(gc_process(environ, workdir, n)) for n in names]
        await wait_all_ready(gcs)
        yield gcs


async def wait_all_ready(processes: Iterable[GcProcess]) -> None:
    """:meth:`GcProcess.wait_ready` for every one of ``processes`` at once
    (processes started together import in parallel)."""
    async with trio.open_nursery() as nursery:
        for process in processes:
            nursery.start_soon(process.wait_ready)


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str | Callable[[], str],
    *,
    within_s: float,
    step_s: float = POLL_STEP_S,
) -> T:
    """``probe``'s first result that is neither ``None`` nor ``False``,
    polled every ``step_s`` for at most ``within_s``; else the test fails
    saying ``what`` did not happen in time. (A yes/no check is a probe too:
    it returns ``True`` once it holds.)"""
    with trio.move_on_after(within_s):
        while True:
            result = await probe()
            if result is not None and result is not False:
                return result
            await trio.sleep(step_s)
    pytest.fail(f"not within {within_s:g} s: {what if isinstance(what, str) else what()}")


def assert_clean_stop(gc: GcProcess, status: int) -> None:
    """The GC exited 0 after logging its start and stop, and logged no error
    or traceback on the way."""
    log = gc.stderr()
    assert status == 0, log
    assert "event=gc_started" in log
    assert "event=gc_stopped" in log
    assert "Traceback" not in log
    assert "level=error" not in log


async def fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    """``query``'s rows, read over a short-lived pool (call inside ``aio_loop``)."""
    async with open_pool(dsn, max_size=1) as pool:
        rows: list[asyncpg.Record] = await run_aio(pool.fetch, query)
        return rows
