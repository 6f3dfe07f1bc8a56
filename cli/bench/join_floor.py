"""The join floor: ``python -m darktower.cli.bench.join_floor --body-file PATH``.

The least a join can cost on the GC's HTTP stack: the same hypercorn server
on trio (:func:`darktower.shared.http_server.run_http`, the GC's very
configuration) serving a Starlette app whose join route answers a constant
response - the bytes of a real join response the bench captured from the
GC, with the GC's content type and ``Cache-Control`` header. No
authentication, no database, no token signing, no metrics, no logging. The
load generator sends it exactly what it sends the GC (same paths, same
``Authorization`` headers, which the floor ignores), so the two differ only
by the service's work.

The server binds ``127.0.0.1:0`` and reports ``{"port": N}`` as one JSON line
on stdout once it listens; SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from darktower.shared.config import HostPort
from darktower.shared.http_server import run_http

#: The GC's join response headers besides the content type (gc/meetings_api.py).
_HEADERS = {"Cache-Control": "no-store"}


def create_app(body: bytes) -> Starlette:
    """The join route (path parameter matched like the GC's) answering
    ``body``, and ``/health/live`` for readiness."""

    async def join(request: Request) -> Response:
        return Response(body, media_type="application/json", headers=_HEADERS)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/api/v1/meetings/{code}", join, methods=["GET"]),
            Route("/health/live", live, methods=["GET"]),
        ]
    )


async def serve(body: bytes) -> None:
    """Serve until SIGTERM/SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(run_http, create_app(body), HostPort("127.0.0.1", 0))
            print(json.dumps({"port": port}), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darktower.cli.bench.join_floor")
    parser.add_argument(
        "--body-file", type=Path, required=True, help="the response body to serve (bytes)"
    )
    args = parser.parse_args(argv)
    trio.run(serve, args.body_file.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
