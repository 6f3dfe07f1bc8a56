"""The Global Controller as one trio nursery tree (SPEC §2).

Resources outermost (asyncio loop, PostgreSQL pool), then the request
handlers (gRPC, HTTP), then the control tasks (health checkers) - the shape of
hypercorn's ``worker_serve``. ``run_gc`` reports ready only once both servers
listen and the schema is in place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import trio

from darktower.gc.config import GcConfig
from darktower.gc.health_checker import HealthChecker, NodeStore, SweepResult
from darktower.gc.http_app import create_app
from darktower.gc.metrics import GRPC_RPCS
from darktower.gc.registry_service import (
    POLICY,
    GlobalControllerService,
    MediaHandlerRegistryService,
)
from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.gc.schema import apply_schema
from darktower.shared.db import open_pool, ping
from darktower.shared.grpc_server import GrpcServer
from darktower.shared.http_server import run_http
from darktower.shared.jwks import load_key_store, refresh_keys_periodically
from darktower.shared.logging import get_logger
from darktower.shared.seam import asyncio_loop, run_aio
from darktower.shared.tokens import TokenValidator

log = get_logger(__name__)

#: Attempts x delay to reach PostgreSQL at start (GC and database may be
#: started together, e.g. by ``dt up``); then the GC exits with a clear line.
_START_ATTEMPTS = 15
_START_RETRY_DELAY_S = 1.0


@dataclass(frozen=True, slots=True)
class GcEndpoints:
    """Where a started GC listens (ports matter when binding port 0)."""

    grpc_port: int
    http_port: int


def mc_node_store(pool: asyncpg.Pool) -> NodeStore:
    """The health checker's view of the meeting controllers' table."""
    return _node_store(
        "mc", pool, meeting_controllers.mark_stale_unhealthy, meeting_controllers.count_by_health
    )


def mh_node_store(pool: asyncpg.Pool) -> NodeStore:
    """The health checker's view of the media handlers' table."""
    return _node_store(
        "mh", pool, media_handlers.mark_stale_unhealthy, media_handlers.count_by_health
    )


def _node_store(
    kind: str,
    pool: asyncpg.Pool,
    mark_stale_unhealthy: Callable[[asyncpg.Pool, float], Awaitable[list[str]]],
    count_by_health: Callable[[asyncpg.Pool], Awaitable[dict[str, int]]],
) -> NodeStore:
    async def mark_stale(stale_after_s: float) -> list[str]:
        return await run_aio(mark_stale_unhealthy, pool, stale_after_s)

    async def count() -> dict[str, int]:
        return await run_aio(count_by_health, pool)

    async def do_ping() -> None:
        await run_aio(ping, pool)

    return NodeStore(kind, mark_stale, count, do_ping)


async def run_gc(
    config: GcConfig,
    *,
    on_sweep: Callable[[SweepResult], None] | None = None,
    task_status: trio.TaskStatus[GcEndpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Trio-flavoured: run the whole GC until cancelled."""
    key_store = await load_key_store(config.auth_jwks)
    validator = TokenValidator(key_store)
    async with (
        asyncio_loop(),
        open_pool(
            config.database_url.reveal(),
            max_size=config.db_pool_size,
            attempts=_START_ATTEMPTS,
            retry_delay_s=_START_RETRY_DELAY_S,
        ) as pool,
    ):
        await run_aio(apply_schema, pool)
        grpc = GrpcServer(
            [
                GlobalControllerService(
                    pool,
                    fast_heartbeat_ms=config.fast_heartbeat_ms,
                    comprehensive_heartbeat_ms=config.comprehensive_heartbeat_ms,
                ),
                MediaHandlerRegistryService(pool, load_report_ms=config.load_report_ms),
            ],
            validator=validator,
            policy=POLICY,
            rpc_counter=GRPC_RPCS,
        )

        async def database_ping() -> None:
            await run_aio(ping, pool)

        checkers = [
            HealthChecker(
                mc_node_store(pool),
                interval_s=config.health_check_interval_s,
                stale_after_s=config.stale_after_s,
                grace_s=config.fast_heartbeat_ms / 1000,
                on_result=on_sweep,
            ),
            HealthChecker(
                mh_node_store(pool),
                interval_s=config.health_check_interval_s,
                stale_after_s=config.stale_after_s,
                grace_s=config.load_report_ms / 1000,
                on_result=on_sweep,
            ),
        ]
        async with trio.open_nursery() as nursery:
            grpc_port = await nursery.start(grpc.run, config.grpc_addr)
            http_port = await nursery.start(
                run_http, create_app(database_ping=database_ping), config.http_addr
            )
            for checker in checkers:
                await nursery.start(checker.run)
            nursery.start_soon(refresh_keys_periodically, key_store)
            log.info(
                "gc_started",
                gc_id=config.gc_id,
                region=config.region,
                grpc_port=grpc_port,
                http_port=http_port,
            )
            task_status.started(GcEndpoints(grpc_port, http_port))
