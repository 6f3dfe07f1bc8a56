"""SQL for the ``meeting_controllers`` table (asyncio-flavoured).

Staleness is always judged on the database clock (``now()``), never a host
clock, so GCs with skewed clocks agree (SPEC §6.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from darktower.gc.metrics import DB_QUERY_SECONDS
from darktower.gc.registry_requests import McHeartbeat, McRegistration
from darktower.shared.db import translate_errors
from darktower.shared.metrics import timed


@dataclass(frozen=True, slots=True)
class MeetingControllerRow:
    controller_id: str
    region: str
    grpc_endpoint: str
    webtransport_endpoint: str
    max_meetings: int
    current_meetings: int
    max_participants: int
    current_participants: int
    health_status: str
    cpu_usage_percent: float | None
    memory_usage_percent: float | None
    last_heartbeat_at: datetime
    registered_at: datetime
    updated_at: datetime


_UPSERT = """
INSERT INTO meeting_controllers AS mc (
    controller_id, region, grpc_endpoint, webtransport_endpoint,
    max_meetings, max_participants, health_status, last_heartbeat_at, registered_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, 'pending', now(), now(), now())
ON CONFLICT (controller_id) DO UPDATE SET
    region = EXCLUDED.region,
    grpc_endpoint = EXCLUDED.grpc_endpoint,
    webtransport_endpoint = EXCLUDED.webtransport_endpoint,
    max_meetings = EXCLUDED.max_meetings,
    max_participants = EXCLUDED.max_participants,
    -- Health and load stay until the next heartbeat reports the truth (SPEC
    -- §6.1 replaces endpoints and capacity only); the MC already listens
    -- when it registers (SPEC §7.1), so staying assignable is safe.
    last_heartbeat_at = now(),
    updated_at = now()
"""

_FAST_HEARTBEAT = """
UPDATE meeting_controllers SET
    current_meetings = $2, current_participants = $3, health_status = $4,
    last_heartbeat_at = now(), updated_at = now()
WHERE controller_id = $1
RETURNING (extract(epoch FROM now()) * 1000)::bigint
"""

_COMPREHENSIVE_HEARTBEAT = """
UPDATE meeting_controllers SET
    current_meetings = $2, current_participants = $3, health_status = $4,
    cpu_usage_percent = $5, memory_usage_percent = $6,
    last_heartbeat_at = now(), updated_at = now()
WHERE controller_id = $1
RETURNING (extract(epoch FROM now()) * 1000)::bigint
"""

# Many heartbeats in one statement (gc/heartbeat_batcher.py). Fast heartbeats
# carry no cpu/memory (NULL in the arrays): the stored values stay.
_HEARTBEAT_BATCH = """
UPDATE meeting_controllers AS mc SET
    current_meetings = b.current_meetings,
    current_participants = b.current_participants,
    health_status = b.health_status,
    cpu_usage_percent = coalesce(b.cpu_usage_percent, mc.cpu_usage_percent),
    memory_usage_percent = coalesce(b.memory_usage_percent, mc.memory_usage_percent),
    last_heartbeat_at = now(),
    updated_at = now()
FROM unnest($1::text[], $2::integer[], $3::integer[], $4::text[], $5::real[], $6::real[])
    AS b(controller_id, current_meetings, current_participants, health_status,
         cpu_usage_percent, memory_usage_percent)
WHERE mc.controller_id = b.controller_id
RETURNING mc.controller_id, (extract(epoch FROM now()) * 1000)::bigint
"""

_MARK_STALE_UNHEALTHY = """
UPDATE meeting_controllers SET health_status = 'unhealthy', updated_at = now()
WHERE health_status IN ('pending', 'healthy', 'degraded')
  AND last_heartbeat_at < now() - make_interval(secs => $1)
RETURNING controller_id
"""

_COUNT_BY_HEALTH = """
SELECT health_status, count(*) FROM meeting_controllers GROUP BY health_status
"""

_GET = "SELECT * FROM meeting_controllers WHERE controller_id = $1"
_LIST = "SELECT * FROM meeting_controllers ORDER BY region, controller_id"


@translate_errors
@timed(DB_QUERY_SECONDS, "mc_register")
async def register(pool: asyncpg.Pool, reg: McRegistration) -> None:
    """Insert a new MC as ``pending`` or replace a known one's endpoints and
    capacity (one statement, so concurrent re-registrations leave one row)."""
    await pool.execute(
        _UPSERT,
        reg.controller_id,
        reg.region,
        reg.grpc_endpoint,
        reg.webtransport_endpoint,
        reg.max_meetings,
        reg.max_participants,
    )


async def _heartbeat_one(pool: asyncpg.Pool, hb: McHeartbeat) -> int | None:
    """One heartbeat, one row: the database time in ms, or ``None`` when the
    MC is not registered (the caller answers NOT_FOUND: re-register)."""
    if hb.cpu_usage_percent is None or hb.memory_usage_percent is None:
        result: int | None = await pool.fetchval(
            _FAST_HEARTBEAT, hb.controller_id, hb.current_meetings, hb.current_participants,
            hb.health,
        )  # fmt: skip
    else:
        result = await pool.fetchval(
            _COMPREHENSIVE_HEARTBEAT, hb.controller_id, hb.current_meetings,
            hb.current_participants, hb.health, hb.cpu_usage_percent, hb.memory_usage_percent,
        )  # fmt: skip
    return result


@translate_errors
@timed(DB_QUERY_SECONDS, "mc_heartbeat_batch")
async def heartbeat_batch(pool: asyncpg.Pool, heartbeats: Sequence[McHeartbeat]) -> dict[str, int]:
    """Record many heartbeats (distinct ids) in one statement; the database
    time in ms of each id that is registered (absent ids are not).

    Batches from several GCs, or a batch and the health checker's sweep, may
    lock rows in different orders (the join's plan decides the order);
    PostgreSQL then aborts one of them as a deadlock. A heartbeat is
    idempotent, so that one is simply run again. A batch of one (the common
    case at low load) takes the cheaper single-row statement.
    """
    if len(heartbeats) == 1:
        hb = heartbeats[0]
        timestamp_ms = await _heartbeat_one(pool, hb)
        return {} if timestamp_ms is None else {hb.controller_id: timestamp_ms}
    ids = [hb.controller_id for hb in heartbeats]
    if len(set(ids)) != len(ids):
        # UPDATE ... FROM would apply an arbitrary one of the duplicates.
        raise ValueError("heartbeat_batch needs distinct controller ids")
    args = (
        ids,
        [hb.current_meetings for hb in heartbeats],
        [hb.current_participants for hb in heartbeats],
        [hb.health for hb in heartbeats],
        [hb.cpu_usage_percent for hb in heartbeats],
        [hb.memory_usage_percent for hb in heartbeats],
    )
    for attempt in (1, 2):
        try:
            rows = await pool.fetch(_HEARTBEAT_BATCH, *args)
            break
        except asyncpg.exceptions.DeadlockDetectedError:
            if attempt == 2:
                raise
    return {row[0]: row[1] for row in rows}


@translate_errors
@timed(DB_QUERY_SECONDS, "mc_mark_stale")
async def mark_stale_unhealthy(pool: asyncpg.Pool, stale_after_s: float) -> list[str]:
    """Mark MCs whose last heartbeat is older than ``stale_after_s`` (database
    clock) unhealthy, draining ones excepted; the ids that changed."""
    rows = await pool.fetch(_MARK_STALE_UNHEALTHY, stale_after_s)
    return sorted(row[0] for row in rows)


@translate_errors
@timed(DB_QUERY_SECONDS, "mc_count_by_health")
async def count_by_health(pool: asyncpg.Pool) -> dict[str, int]:
    return {row[0]: row[1] for row in await pool.fetch(_COUNT_BY_HEALTH)}


@translate_errors
async def get(pool: asyncpg.Pool, controller_id: str) -> MeetingControllerRow | None:
    row = await pool.fetchrow(_GET, controller_id)
    return None if row is None else MeetingControllerRow(**dict(row))


@translate_errors
async def list_all(pool: asyncpg.Pool) -> list[MeetingControllerRow]:
    return [MeetingControllerRow(**dict(row)) for row in await pool.fetch(_LIST)]


# --- the join's view (SPEC §6.3) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class McCandidate:
    controller_id: str
    grpc_endpoint: str
    webtransport_endpoint: str
    current_meetings: int
    max_meetings: int


def candidates_sql(*, region: int, stale_after_s: int, exclude: int, limit: int) -> str:
    """The MC candidates query (SPEC §6.3 step 5) over the given placeholders
    (parameter numbers: ``1`` for ``$1``), for the join's one-statement
    attempts (:func:`darktower.gc.repositories.assignments.attempt_columns_sql`:
    ``begin_attempt`` and the join's lookup). Only placeholders are
    substituted, never values. The MCs a meeting may go to: ``healthy``,
    heartbeating within the staleness bound (database clock), in the region,
    with room, not excluded. Rows are ranked: least loaded (by ratio) first,
    then freshest heartbeat, then id, so the order is total."""
    # Only placeholder numbers (ints) are interpolated, never values.
    return f"""
    SELECT controller_id, grpc_endpoint, webtransport_endpoint, current_meetings, max_meetings,
           row_number() OVER (ORDER BY current_meetings::float8 / max_meetings,
                                       last_heartbeat_at DESC, controller_id) AS rank
    FROM meeting_controllers
    WHERE region = ${region}
      AND health_status = 'healthy'
      AND last_heartbeat_at > now() - make_interval(secs => ${stale_after_s})
      AND current_meetings < max_meetings
      AND controller_id <> all(${exclude}::text[])
    ORDER BY rank
    LIMIT ${limit}
    """  # noqa: S608 - only placeholder numbers are interpolated


_LIVE_ENDPOINTS = """
SELECT controller_id, grpc_endpoint FROM meeting_controllers
WHERE health_status = 'healthy' AND last_heartbeat_at > now() - make_interval(secs => $1)
"""


@translate_errors
@timed(DB_QUERY_SECONDS, "mc_live_endpoints")
async def live_endpoints(pool: asyncpg.Pool, *, stale_after_s: float) -> dict[str, str]:
    """``controller_id`` → gRPC endpoint of every live MC (``healthy`` and
    heartbeating within ``stale_after_s``): the channels worth keeping."""
    return {row[0]: row[1] for row in await pool.fetch(_LIVE_ENDPOINTS, stale_after_s)}
