"""SQL for the ``media_handlers`` table (asyncio-flavoured).

Staleness is judged on the database clock, as for meeting controllers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from darktower.gc.metrics import DB_QUERY_SECONDS
from darktower.gc.registry_requests import MhLoadReport, MhRegistration
from darktower.shared.db import translate_errors
from darktower.shared.metrics import timed


@dataclass(frozen=True, slots=True)
class MediaHandlerRow:
    handler_id: str
    region: str
    zone: str
    webtransport_endpoint: str
    grpc_endpoint: str
    max_streams: int
    current_streams: int
    health_status: str
    cpu_usage_percent: float | None
    memory_usage_percent: float | None
    bandwidth_usage_percent: float | None
    last_heartbeat_at: datetime
    registered_at: datetime
    updated_at: datetime


_UPSERT = """
INSERT INTO media_handlers AS mh (
    handler_id, region, zone, webtransport_endpoint, grpc_endpoint, max_streams,
    health_status, last_heartbeat_at, registered_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, 'pending', now(), now(), now())
ON CONFLICT (handler_id) DO UPDATE SET
    region = EXCLUDED.region,
    zone = EXCLUDED.zone,
    webtransport_endpoint = EXCLUDED.webtransport_endpoint,
    grpc_endpoint = EXCLUDED.grpc_endpoint,
    max_streams = EXCLUDED.max_streams,
    last_heartbeat_at = now(),
    updated_at = now()
"""

_LOAD_REPORT = """
UPDATE media_handlers SET
    current_streams = $2, health_status = $3, cpu_usage_percent = $4,
    memory_usage_percent = $5, bandwidth_usage_percent = $6,
    last_heartbeat_at = now(), updated_at = now()
WHERE handler_id = $1
RETURNING (extract(epoch FROM now()) * 1000)::bigint
"""

_MARK_STALE_UNHEALTHY = """
UPDATE media_handlers SET health_status = 'unhealthy', updated_at = now()
WHERE health_status IN ('pending', 'healthy', 'degraded')
  AND last_heartbeat_at < now() - make_interval(secs => $1)
RETURNING handler_id
"""

_COUNT_BY_HEALTH = "SELECT health_status, count(*) FROM media_handlers GROUP BY health_status"
_GET = "SELECT * FROM media_handlers WHERE handler_id = $1"
_LIST = "SELECT * FROM media_handlers ORDER BY region, handler_id"


@translate_errors
@timed(DB_QUERY_SECONDS, "mh_register")
async def register(pool: asyncpg.Pool, reg: MhRegistration) -> None:
    """Insert a new MH as ``pending`` or replace a known one's endpoints,
    zone and capacity."""
    await pool.execute(
        _UPSERT,
        reg.handler_id,
        reg.region,
        reg.zone,
        reg.webtransport_endpoint,
        reg.grpc_endpoint,
        reg.max_streams,
    )


@translate_errors
@timed(DB_QUERY_SECONDS, "mh_load_report")
async def load_report(pool: asyncpg.Pool, report: MhLoadReport) -> int | None:
    """Record a load report; the database time in ms, or ``None`` when the MH
    is not registered (NOT_FOUND: it must re-register)."""
    result: int | None = await pool.fetchval(
        _LOAD_REPORT, report.handler_id, report.current_streams, report.health,
        report.cpu_usage_percent, report.memory_usage_percent, report.bandwidth_usage_percent,
    )  # fmt: skip
    return result


@translate_errors
@timed(DB_QUERY_SECONDS, "mh_mark_stale")
async def mark_stale_unhealthy(pool: asyncpg.Pool, stale_after_s: float) -> list[str]:
    """Mark MHs whose last report is older than ``stale_after_s`` unhealthy
    (draining ones excepted); the ids that changed."""
    rows = await pool.fetch(_MARK_STALE_UNHEALTHY, stale_after_s)
    return sorted(row[0] for row in rows)


@translate_errors
@timed(DB_QUERY_SECONDS, "mh_count_by_health")
async def count_by_health(pool: asyncpg.Pool) -> dict[str, int]:
    return {row[0]: row[1] for row in await pool.fetch(_COUNT_BY_HEALTH)}


@translate_errors
async def get(pool: asyncpg.Pool, handler_id: str) -> MediaHandlerRow | None:
    row = await pool.fetchrow(_GET, handler_id)
    return None if row is None else MediaHandlerRow(**dict(row))


@translate_errors
async def list_all(pool: asyncpg.Pool) -> list[MediaHandlerRow]:
    return [MediaHandlerRow(**dict(row)) for row in await pool.fetch(_LIST)]


# --- the join's view (SPEC §6.3) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MhCandidate:
    handler_id: str
    zone: str
    webtransport_endpoint: str
    current_streams: int
    max_streams: int
    health_status: str  # "healthy" | "degraded"


def candidates_sql(*, region: int, stale_after_s: int, limit: int) -> str:
    """The MH candidates query (SPEC §6.3 step 3) over the given placeholders
    (parameter numbers: ``1`` for ``$1``), for the join's one-statement
    attempts (:func:`darktower.gc.repositories.assignments.attempt_columns_sql`:
    ``begin_attempt`` and the join's lookup); only placeholders are
    substituted, never values. The MHs a meeting may use: ``healthy`` or
    ``degraded``, reporting within the staleness bound (database clock), in
    the region, with free streams.

    Degraded MHs are candidates (the selection halves their score). The best
    ``limit`` by score (free share, halved when degraded - the order
    gc/selection.py ranks by) plus the best of every zone, so that neither a
    crowd of one zone nor of lightly loaded degraded MHs hides the backup in
    another zone or a better healthy MH. Ties go by id."""
    # Only placeholder numbers (ints) are interpolated, never values.
    return f"""
    WITH eligible AS (
        SELECT handler_id, zone, webtransport_endpoint, current_streams, max_streams,
               health_status,
               (1 - current_streams::float8 / max_streams)
                 * CASE WHEN health_status = 'degraded' THEN 0.5 ELSE 1 END AS score
        FROM media_handlers
        WHERE region = ${region}
          AND health_status IN ('healthy', 'degraded')
          AND last_heartbeat_at > now() - make_interval(secs => ${stale_after_s})
          AND current_streams < max_streams
    ), best AS (
        SELECT * FROM eligible ORDER BY score DESC, handler_id LIMIT ${limit}
    ), best_per_zone AS (
        SELECT DISTINCT ON (zone) * FROM eligible ORDER BY zone, score DESC, handler_id
    )
    SELECT handler_id, zone, webtransport_endpoint, current_streams, max_streams, health_status
    FROM (SELECT * FROM best UNION SELECT * FROM best_per_zone) AS candidates
    ORDER BY score DESC, handler_id
    """  # noqa: S608 - only placeholder numbers are interpolated
