"""The heartbeat floor: ``python -m darktower.cli.bench.floor --loop asyncio|trio-asyncio``.

The least any implementation of ``FastHeartbeat`` on our stack can cost: a
bare grpclib server whose handler runs the GC's own heartbeat statement
through an asyncpg pool of the GC's size and answers. No authentication, no
validation, no metrics, no logging, no error translation. The load generator
sends it exactly what it sends the GC (same messages, same ``authorization``
metadata, which the floor ignores), so the two differ only by the service.

``--loop asyncio`` is plain ``asyncio.run``. It must not import
``trio_asyncio`` (even importing it patches asyncio process-wide), which is
why the SQL is read from the repository module's source instead of
importing that module: the repository imports :mod:`darktower.shared.db`,
which imports the seam. ``--loop trio-asyncio`` runs the same server inside
``trio.run`` on trio-asyncio's loop through :mod:`darktower.shared.seam`,
exactly as the GC hosts grpclib; the difference between the two floors is
the cost of the asyncio-on-trio loop alone.

The server binds ``127.0.0.1:0`` and reports ``{"port": N}`` as one JSON line
on stdout once it listens; SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import asyncpg
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from darktower.gc.registry_requests import HEALTH_NAMES
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb

LOOPS = ("asyncio", "trio-asyncio")
_REPOSITORY = "darktower.gc.repositories.meeting_controllers"
_STATEMENT = "_FAST_HEARTBEAT"


def fast_heartbeat_sql() -> str:
    """The GC's fast-heartbeat statement, read from its repository module's
    source without executing the module (see the module docstring)."""
    spec = importlib.util.find_spec(_REPOSITORY)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot locate {_REPOSITORY}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == _STATEMENT for target in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                return value
    raise RuntimeError(f"{_REPOSITORY}.{_STATEMENT} is not a string constant")


class FloorService(internal_grpc.GlobalControllerServiceBase):
    """Only ``FastHeartbeat`` is served; the floor's rows are pre-inserted."""

    def __init__(self, pool: asyncpg.Pool, sql: str) -> None:
        self._pool = pool
        self._sql = sql

    async def FastHeartbeat(
        self, stream: Stream[pb.FastHeartbeatRequest, pb.HeartbeatResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        capacity = request.capacity
        timestamp: int | None = await self._pool.fetchval(
            self._sql,
            request.controller_id,
            capacity.current_meetings,
            capacity.current_participants,
            HEALTH_NAMES[request.health],
        )
        if timestamp is None:
            raise GRPCError(Status.NOT_FOUND)
        await stream.send_message(pb.HeartbeatResponse(acknowledged=True, timestamp=timestamp))

    async def RegisterMC(self, stream: Stream[pb.RegisterMCRequest, pb.RegisterMCResponse]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def ComprehensiveHeartbeat(
        self, stream: Stream[pb.ComprehensiveHeartbeatRequest, pb.HeartbeatResponse]
    ) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    async def NotifyMeetingEnded(
        self, stream: Stream[pb.NotifyMeetingEndedRequest, pb.NotifyMeetingEndedResponse]
    ) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """As ``darktower.shared.db.keep_session``: no reset query on release."""


async def _start(dsn: str, pool_size: int) -> tuple[Server, asyncpg.Pool]:
    """Asyncio-flavoured: the pool with the GC's settings, then the listening
    server. The settings mirror :func:`darktower.shared.db.create_pool` (min
    2, max ``pool_size``, 5 s statement timeout, no reset query on release:
    the floor gets every pool setting the GC has, so the ratio is the cost of
    the service alone); that module cannot be imported here (it loads the seam), so a
    change there must be made here too or the floor stops being comparable."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(2, pool_size),
        max_size=pool_size,
        command_timeout=5.0,
        timeout=2.0,
        max_inactive_connection_lifetime=60.0,
        reset=_keep_session,
    )
    assert pool is not None
    server = Server([FloorService(pool, fast_heartbeat_sql())])
    await server.start("127.0.0.1", 0)
    listener: asyncio.Server | None = getattr(server, "_server", None)
    assert listener is not None
    port: int = listener.sockets[0].getsockname()[1]
    # Reported so the parent can refuse a "plain asyncio" floor that is not.
    ready = {"port": port, "trio_asyncio_loaded": "trio_asyncio" in sys.modules}
    print(json.dumps(ready), flush=True)
    return server, pool


async def _stop(server: Server, pool: asyncpg.Pool) -> None:
    server.close()
    await server.wait_closed()
    await asyncio.wait_for(pool.close(), timeout=5.0)


async def _serve_asyncio(dsn: str, pool_size: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server, pool = await _start(dsn, pool_size)
    await stop.wait()
    await _stop(server, pool)


def _serve_trio_asyncio(dsn: str, pool_size: int) -> None:
    # Imported here: the plain-asyncio floor must not load trio-asyncio at all.
    import trio

    from darktower.shared.seam import asyncio_loop, run_aio

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with asyncio_loop():
                server, pool = await run_aio(_start, dsn, pool_size)
                try:
                    async for _ in signals:
                        break
                finally:
                    with trio.move_on_after(10, shield=True):
                        await run_aio(_stop, server, pool)

    trio.run(serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darktower.cli.bench.floor")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args(argv)
    # From the environment, like the GC's: a DSN may hold a password, and
    # argv is visible to every local user.
    dsn = os.environ.get("DATABASE_URL", "")
    if not dsn:
        print("error: DATABASE_URL is not set", file=sys.stderr)
        return 2
    if args.loop == "asyncio":
        asyncio.run(_serve_asyncio(dsn, args.pool_size))
    else:
        _serve_trio_asyncio(dsn, args.pool_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
