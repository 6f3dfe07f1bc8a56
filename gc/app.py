"""The Global Controller as one trio nursery tree (SPEC §2).

Resources outermost (asyncio loop, PostgreSQL pool), then the request
handlers (gRPC, HTTP), then the control tasks (health checkers) - the shape of
hypercorn's ``worker_serve``. ``run_gc`` reports ready only once both servers
listen and the schema is in place.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import asyncpg
import trio

from darktower.gc.cleanup import AssignmentCleanup
from darktower.gc.config import GcConfig
from darktower.gc.health_checker import HealthChecker, NodeStore, SweepResult
from darktower.gc.http_app import create_app
from darktower.gc.join_flow import JoinResult, JoinService
from darktower.gc.mc_client import McClient
from darktower.gc.meetings_api import MeetingsApiDeps, meetings_routes
from darktower.gc.metrics import GRPC_RPCS
from darktower.gc.rate_limit import RateLimiter
from darktower.gc.registry_service import (
    POLICY,
    GlobalControllerService,
    MediaHandlerRegistryService,
)
from darktower.gc.repositories import media_handlers, meeting_controllers, meetings
from darktower.gc.repositories.meetings import MeetingRow
from darktower.gc.schema import apply_schema
from darktower.shared.db import DatabaseRefused, DatabaseUnavailable, open_pool, ping
from darktower.shared.grpc_server import GrpcServer
from darktower.shared.http_server import run_http
from darktower.shared.jwks import load_key_store, refresh_keys_periodically
from darktower.shared.keys import load_private_key
from darktower.shared.logging import get_logger
from darktower.shared.seam import asyncio_loop, run_aio
from darktower.shared.tokens import TokenValidator

log = get_logger(__name__)

#: Attempts x delay to reach PostgreSQL at start (GC and database may be
#: started together, e.g. by ``dt up``); then the GC exits with a clear line.
_START_ATTEMPTS = 15
_START_RETRY_DELAY_S = 1.0
#: Meetings a user may create back to back before GC_CREATES_PER_MINUTE paces them.
_CREATE_BURST = 10


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


async def prune_mc_channels(
    pool: asyncpg.Pool, mc_client: McClient, *, interval_s: float, stale_after_s: float
) -> None:
    """Drop cached MC channels of controllers no longer live or whose endpoint
    changed (SPEC §6.3): a dead MC's connection must not linger, and a
    re-registered MC is called at its new endpoint."""
    while True:
        await trio.sleep(interval_s)
        try:
            await run_aio(_retain_live_channels, pool, mc_client, stale_after_s)
        except DatabaseUnavailable:
            continue
        except DatabaseRefused as exc:
            log.error("mc_channel_prune_failed", error=str(exc))


async def _retain_live_channels(
    pool: asyncpg.Pool, mc_client: McClient, stale_after_s: float
) -> None:
    """Asyncio-flavoured (where the client's channels live)."""
    mc_client.retain(await meeting_controllers.live_endpoints(pool, stale_after_s=stale_after_s))


async def _close_mc_client(mc_client: McClient) -> None:
    mc_client.close()


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

        mc_client = McClient(
            config.service_token,
            rpc_timeout_s=config.mc_rpc_timeout_s,
            connect_timeout_s=config.mc_connect_timeout_s,
        )
        mc_checker = HealthChecker(
            mc_node_store(pool),
            interval_s=config.health_check_interval_s,
            stale_after_s=config.stale_after_s,
            grace_s=config.fast_heartbeat_ms / 1000,
            on_result=on_sweep,
        )
        mh_checker = HealthChecker(
            mh_node_store(pool),
            interval_s=config.health_check_interval_s,
            stale_after_s=config.stale_after_s,
            grace_s=config.load_report_ms / 1000,
            on_result=on_sweep,
        )
        join_service = JoinService(
            pool,
            mc_client,
            gc_id=config.gc_id,
            region=config.region,
            stale_after_s=config.stale_after_s,
            # One attempt (connect + call) and a margin; renewed per attempt.
            lease_ttl_s=config.mc_connect_timeout_s + config.mc_rpc_timeout_s + 5,
            # After an outage of the database (or of this GC), MCs nobody
            # could hear are not judged gone before the MC checker would.
            staleness=mc_checker.liveness_threshold_s,
        )

        async def join(code: str, org_id: uuid.UUID | None, /) -> JoinResult:
            return await run_aio(join_service.join, code, org_id)

        async def create_meeting(
            *,
            org_id: uuid.UUID,
            created_by: str,
            display_name: str,
            allow_guests: bool,
            max_participants: int,
        ) -> MeetingRow:
            return await run_aio(
                meetings.create,
                pool,
                org_id=org_id,
                created_by=created_by,
                display_name=display_name,
                allow_guests=allow_guests,
                max_participants=max_participants,
            )

        api_routes = meetings_routes(
            MeetingsApiDeps(
                validator=validator,
                create_meeting=create_meeting,
                join=join,
                signing_key=load_private_key(str(config.signing_key)),
                guest_limiter=RateLimiter(
                    burst=min(5, config.guest_tokens_per_minute),
                    refill_interval_s=60 / config.guest_tokens_per_minute,
                ),
                create_limiter=RateLimiter(
                    burst=min(_CREATE_BURST, config.creates_per_minute),
                    refill_interval_s=60 / config.creates_per_minute,
                ),
                request_timeout_s=config.join_timeout_s,
            )
        )
        cleanup = AssignmentCleanup(
            pool,
            interval_s=config.cleanup_interval_s,
            retention_s=config.retention_days * 86400,
            inactive_after_s=config.inactive_after_s,
            stale_after_s=config.stale_after_s,
        )
        checkers = [mc_checker, mh_checker]
        try:
            async with trio.open_nursery() as nursery:
                grpc_port = await nursery.start(grpc.run, config.grpc_addr)
                http_port = await nursery.start(
                    run_http,
                    create_app(database_ping=database_ping, routes=api_routes),
                    config.http_addr,
                )
                for checker in checkers:
                    await nursery.start(checker.run)
                await nursery.start(cleanup.run)
                nursery.start_soon(
                    partial(
                        prune_mc_channels,
                        pool,
                        mc_client,
                        interval_s=config.health_check_interval_s,
                        stale_after_s=config.stale_after_s,
                    )
                )
                nursery.start_soon(refresh_keys_periodically, key_store)
                log.info(
                    "gc_started",
                    gc_id=config.gc_id,
                    region=config.region,
                    grpc_port=grpc_port,
                    http_port=http_port,
                )
                task_status.started(GcEndpoints(grpc_port, http_port))
        finally:
            # Still inside the asyncio loop: the MC channels close on it
            # (bounded cleanup, so shielded from the cancellation that ends us).
            with trio.move_on_after(2, shield=True):
                await run_aio(_close_mc_client, mc_client)
