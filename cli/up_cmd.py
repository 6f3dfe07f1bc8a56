"""``dt up``: the local system in one command.

So far it runs what exists: PostgreSQL (embedded unless ``DATABASE_URL`` is
given), throwaway dev keys, and one Global Controller as its own process. It
prints the endpoints and ready-made MC/MH tokens, and Ctrl-C stops everything
and removes what it created. (MCs and simulated MHs join it in a later issue.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from darktower.shared import keys, tokens
from darktower.shared.devstack import embedded_postgres

_READY_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=1) as response,  # noqa: S310 - our loopback URL
        ):
            if response.status == 200:
                return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _database(explicit: str | None) -> Iterator[str]:
    if explicit:
        yield explicit
        return
    print("starting embedded PostgreSQL ...", flush=True)
    with embedded_postgres() as dsn:
        yield dsn


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_up(args: argparse.Namespace) -> int:
    database_url = args.database_url or os.environ.get("DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="dt-up-") as tmp, _database(database_url) as dsn:
        work = Path(tmp)
        private_key = keys.generate_private_key()
        keys.save_private_key(private_key, work / "signing_key.pem")
        kid = keys.key_id(private_key.public_key())
        keys.write_jwks(work / "jwks.json", [keys.public_jwk(private_key.public_key())])
        grpc_port, http_port = _free_port(), _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "AUTH_JWKS": str(work / "jwks.json"),
            "GC_SIGNING_KEY": str(work / "signing_key.pem"),
            "GC_SERVICE_TOKEN": tokens.mint_gc_token(private_key, kid=kid, gc_id="gc-local-1"),
            "GC_ID": "gc-local-1",
            "GC_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "GC_HTTP_ADDR": f"127.0.0.1:{http_port}",
        }
        print("starting the Global Controller ...", flush=True)
        gc = subprocess.Popen([sys.executable, "-m", "darktower.gc"], env=env)
        try:
            if not _wait_ready(f"http://127.0.0.1:{http_port}/health/ready", gc):
                print("error: the Global Controller did not become ready", file=sys.stderr)
                return 1
            mc_token = tokens.mint_mc_token(private_key, kid=kid, mc_id="mc-local-1")
            print(
                "\nDark Tower is up\n"
                f"  GC gRPC   http://127.0.0.1:{grpc_port}\n"
                f"  GC HTTP   http://127.0.0.1:{http_port}  (/health/ready, /metrics)\n"
                f"  keys      {work}\n"
                f"  MC token  (sub mc-local-1) {mc_token}\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                gc.wait()
            return 0 if gc.returncode in (None, 0) else 1
        finally:
            _stop(gc)
            print("stopped; removed", work, flush=True)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser("up", help="run the local system until Ctrl-C")
    up.add_argument(
        "--database-url",
        help="use this PostgreSQL instead of an embedded one (default: $DATABASE_URL,"
        " preferable when the URL holds a password)",
    )
    up.set_defaults(func=_run_up)
