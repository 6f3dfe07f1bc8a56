"""Child processes of a benchmark, CPU accounting and the machine's facts,
and the small pieces every ``dt bench`` run shares (progress lines, the
throwaway signing key, SIGTERM handling, library versions).

Every process a bench starts is a :class:`Child`: its output goes to a log
file (or a pipe read by a thread, for the JSON lines it reports), every wait
on it is bounded, and :meth:`Child.stop` always ends it (SIGTERM, then
SIGKILL). Children start in their own session so that a Ctrl-C reaches only
the bench, which then stops them in order instead of racing them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from darktower.shared import keys, tokens

_STOP_GRACE_S = 10.0
_LOG_TAIL_CHARS = 3000


class BenchError(RuntimeError):
    """The bench could not run (a process failed to start or misbehaved)."""


def progress(message: str) -> None:
    """One progress line on stderr (the report itself goes to stdout)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup (children, database,
    embedded servers, Redis keys, temporary files) runs either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones omitted)."""
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


@dataclass(frozen=True, slots=True)
class BenchKeys:
    """A throwaway signing key and its JWKS, standing in for the AC: the
    services under test get the JWKS path, the load generators the tokens."""

    directory: Path
    private_key: keys.Ed25519PrivateKey
    kid: str

    @classmethod
    def create(cls, directory: Path) -> BenchKeys:
        directory.mkdir(mode=0o700)
        private_key = keys.generate_private_key()
        keys.save_private_key(private_key, directory / "signing_key.pem")
        keys.write_jwks(directory / "jwks.json", [keys.public_jwk(private_key.public_key())])
        return cls(directory, private_key, keys.key_id(private_key.public_key()))

    @property
    def jwks_path(self) -> Path:
        return self.directory / "jwks.json"

    def mc_token(self, mc_id: str) -> str:
        """MC -> GC (aud gc, scope mc.register, sub = the MC)."""
        return tokens.mint_mc_token(self.private_key, kid=self.kid, mc_id=mc_id)

    def gc_token(self, gc_id: str = "gc-bench") -> str:
        """GC -> MC (aud mc, scope mc.assign, sub = the GC)."""
        return tokens.mint_gc_token(self.private_key, kid=self.kid, gc_id=gc_id)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for the GC's addresses,
    which are given to it rather than chosen by it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """A started process; ``lines`` yields the JSON objects it prints on stdout
    when started with ``json_stdout=True``."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        log_dir: Path,
        json_stdout: bool = False,
    ) -> Child:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if json_stdout else log,
                stderr=log,
                start_new_session=True,
            )
        child = cls(name, proc, log_path)
        if json_stdout:
            threading.Thread(target=child._read_lines, name=f"{name}-stdout", daemon=True).start()
        return child

    def _read_lines(self) -> None:
        # The pipe is closed here, at end of file, never from another thread
        # while this one may be reading it.
        assert self.proc.stdout is not None
        with self.proc.stdout as stream:
            for raw in stream:
                with contextlib.suppress(ValueError):
                    value = json.loads(raw)
                    if isinstance(value, dict):
                        self._lines.put(value)
        self._lines.put(None)

    def next_line(self, deadline: float) -> dict[str, Any]:
        """The next JSON object printed, waiting until ``deadline`` (monotonic)."""
        try:
            value = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise BenchError(f"{self.name} did not report in time\n{self.log_tail()}") from None
        if value is None:
            self.proc.wait(timeout=_STOP_GRACE_S)
            raise BenchError(
                f"{self.name} exited with status {self.proc.returncode}\n{self.log_tail()}"
            )
        return value

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return f"--- {self.name} log (end) ---\n{text[-_LOG_TAIL_CHARS:] or '(empty)'}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait up to a grace period, then SIGKILL; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=_STOP_GRACE_S)
        return self.proc.returncode


def stop_and_report(server: Child, label: str) -> None:
    """Stop a server; show its log if it failed or logged anything (services
    run at WARNING in a bench, so any line is worth a look)."""
    status = server.stop()
    if status not in (0, None) or server.log_path.stat().st_size > 0:
        progress(f"{label}: exit status {status}\n{server.log_tail()}")


def wait_http_ok(child: Child, url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200 (bounded), failing early if the
    process exits: a GC that cannot start must not cost the whole timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(
                f"{child.name} exited with status {child.proc.returncode} while starting\n"
                f"{child.log_tail()}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=1.0) as response,  # noqa: S310 - loopback
        ):
            if response.status == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"{child.name} not ready after {timeout_s:.0f} s\n{child.log_tail()}")


# --------------------------------------------------------------------------
# CPU accounting over the measured window


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds used so far by the server, the load generator and the
    backing store (every PostgreSQL process, or the Redis server), and the
    machine's busy/total seconds."""

    at: float
    server: float
    loadgen: float
    backend: float
    machine_busy: float
    machine_total: float


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``; 0 if it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def postgres_cpu() -> float:
    """All processes named ``postgres`` (the postmaster and every backend):
    the database is on this machine and competes for the same two cores."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] == "postgres" and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def cpu_sample(
    server_pid: int, loadgen_pid: int, *, backend_cpu: Callable[[], float] = postgres_cpu
) -> CpuSample:
    """Sample now; ``backend_cpu`` measures the backing store (PostgreSQL's
    processes by default)."""
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    total = sum(machine)
    return CpuSample(
        at=time.monotonic(),
        server=process_cpu(server_pid),
        loadgen=process_cpu(loadgen_pid),
        backend=backend_cpu(),
        machine_busy=total - idle,
        machine_total=total,
    )


def cpu_usage(
    before: CpuSample, after: CpuSample, calls: int, *, backend_key: str = "postgres"
) -> dict[str, float | None]:
    """Utilisation over the window (100 = one core fully busy; the machine
    figure is of all cores) and the server's CPU time per call - the cost that
    does not depend on how busy the other processes kept the cores. The
    backing store's figure is ``<backend_key>_pct``."""
    wall = after.at - before.at
    machine_total = after.machine_total - before.machine_total
    if wall <= 0 or machine_total <= 0:
        return {}
    server = 100 * (after.server - before.server) / wall
    loadgen = 100 * (after.loadgen - before.loadgen) / wall
    backend = 100 * (after.backend - before.backend) / wall
    machine = 100 * (after.machine_busy - before.machine_busy) / machine_total
    cores = os.cpu_count() or 1
    return {
        "server_pct": server,
        "loadgen_pct": loadgen,
        f"{backend_key}_pct": backend,
        "machine_pct": machine,
        # Kernel work on no process's account (loopback TCP) and, above all,
        # anything else running on the machine: large values mean noise.
        "other_pct": max(machine * cores - server - loadgen - backend, 0.0),
        "server_us_per_call": (after.server - before.server) * 1e6 / calls if calls else None,
    }


@dataclass(frozen=True, slots=True)
class GroupSample:
    """CPU seconds used so far by named groups of processes (several GCs,
    several MCs, ...) and the machine's busy/total seconds: the accounting of
    a scenario with more than one server."""

    at: float
    groups: dict[str, float]
    machine_busy: float
    machine_total: float


def group_sample(groups: Mapping[str, Callable[[], float]]) -> GroupSample:
    """Sample now; each group's callable returns its CPU seconds so far."""
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    total = sum(machine)
    return GroupSample(
        at=time.monotonic(),
        groups={name: cpu() for name, cpu in groups.items()},
        machine_busy=total - idle,
        machine_total=total,
    )


def pids_cpu(pids: Iterable[int]) -> Callable[[], float]:
    """A group's CPU seconds: the sum over ``pids`` (gone ones count 0)."""
    frozen = tuple(pids)
    return lambda: sum(process_cpu(pid) for pid in frozen)


def group_usage(
    before: GroupSample, after: GroupSample, calls: int, *, server: str
) -> dict[str, float | None]:
    """As :func:`cpu_usage`, per group (``<group>_pct``); ``server`` names the
    group whose CPU time per call is ``server_us_per_call`` and whose
    utilisation is also ``server_pct``."""
    wall = after.at - before.at
    machine_total = after.machine_total - before.machine_total
    if wall <= 0 or machine_total <= 0:
        return {}
    used = {name: after.groups[name] - before.groups.get(name, 0.0) for name in after.groups}
    usage: dict[str, float | None] = {f"{name}_pct": 100 * s / wall for name, s in used.items()}
    machine = 100 * (after.machine_busy - before.machine_busy) / machine_total
    cores = os.cpu_count() or 1
    usage["server_pct"] = usage.get(f"{server}_pct")
    usage["machine_pct"] = machine
    usage["other_pct"] = max(machine * cores - 100 * sum(used.values()) / wall, 0.0)
    usage["server_us_per_call"] = used.get(server, 0.0) * 1e6 / calls if calls else None
    return usage


# --------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, object]:
    """What a reader needs to compare two runs (SPEC §10: each bench prints
    the machine it ran on). PostgreSQL's facts are added by the caller.

    ``busy_before_pct`` is how busy the cores were in the second before the
    bench started: on a two-core machine anything else running skews every
    figure, and the reader must be able to tell; the load averages say the
    same over the minutes before."""
    load_1, load_5, load_15 = os.getloadavg()
    return {
        "busy_before_pct": psutil.cpu_percent(interval=1.0),
        "load_average": [round(load_1, 2), round(load_5, 2), round(load_15, 2)],
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
    }
