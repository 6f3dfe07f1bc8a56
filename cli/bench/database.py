"""The bench's own database: creation, schema, table resets and the
health-check statement timing.

A bench never touches data it did not create: on a given server it creates
``dt_bench_<hex>`` and drops it at the end (with no server given it starts
the embedded one, :mod:`darktower.shared.devstack`). The bench process is a
CLI, not a service, but it reaches PostgreSQL the way the GC does - asyncpg
on trio-asyncio's loop through the seam - so the health-check statement is
timed exactly as the GC's health checker issues it (one ``run_aio`` crossing
around the repository call).

The SQL here only makes test data (bulk rows, back-dated heartbeats); the
statements being measured are the repository's own.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
import trio

from darktower.cli.bench.loadgen import (
    MC_GRPC_ENDPOINT,
    MC_MAX_MEETINGS,
    MC_MAX_PARTICIPANTS,
    MC_REGION,
    MC_WEBTRANSPORT_ENDPOINT,
)
from darktower.gc.repositories import meeting_controllers
from darktower.gc.schema import apply_schema
from darktower.shared import devstack
from darktower.shared.db import open_pool
from darktower.shared.seam import asyncio_loop, run_aio

T = TypeVar("T")

#: The GC's default staleness threshold (SPEC §8 ``GC_STALE_AFTER_S``).
STALE_AFTER_S = 30.0

_INSERT_PENDING = """
INSERT INTO meeting_controllers (
    controller_id, region, grpc_endpoint, webtransport_endpoint,
    max_meetings, max_participants, health_status, last_heartbeat_at, registered_at, updated_at)
SELECT id, $2, $3, $4, $5, $6, 'pending', now(), now(), now() FROM unnest($1::text[]) AS id
"""

_INSERT_FLEET = """
INSERT INTO meeting_controllers (
    controller_id, region, grpc_endpoint, webtransport_endpoint,
    max_meetings, current_meetings, max_participants, current_participants,
    health_status, last_heartbeat_at, registered_at, updated_at)
SELECT 'mc-health-' || lpad(i::text, 6, '0'), $2, $3, $4, $5, i % $5, $6, i % $6,
       'healthy',
       now() - CASE WHEN i % $7 = 0 THEN interval '1 hour' ELSE interval '0' END,
       now(), now()
FROM generate_series(1, $1) AS i
RETURNING controller_id, last_heartbeat_at < now() - interval '1 minute' AS stale
"""

_RESET_STALE = """
UPDATE meeting_controllers
SET health_status = 'healthy', last_heartbeat_at = now() - interval '1 hour'
WHERE controller_id = ANY($1::text[])
"""


def describe_server(server_dsn: str | None) -> str:
    """Where the database is, for the report - never the DSN (it may hold a
    password)."""
    if server_dsn is None:
        return "embedded server (pgserver wheel)"
    parts = urlsplit(server_dsn)
    return f"{parts.hostname or 'unix socket'}:{parts.port or 5432}"


@contextlib.contextmanager
def bench_database(server_dsn: str | None) -> Iterator[str]:
    """A fresh database for the duration of the block; its DSN. With no
    server, an embedded one is started and stopped around it."""
    with contextlib.ExitStack() as stack:
        if server_dsn is None:
            server_dsn = stack.enter_context(devstack.embedded_postgres())
        name = f"dt_bench_{secrets.token_hex(4)}"
        dsn = devstack.create_database(server_dsn, name)
        stack.callback(devstack.drop_database, server_dsn, name)
        yield dsn


def _with_pool(dsn: str, fn: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run one asyncio-flavoured operation on a one-connection pool."""

    async def main() -> T:
        async with asyncio_loop(), open_pool(dsn, min_size=1, max_size=1) as pool:
            return await run_aio(fn, pool)

    return trio.run(main)


def prepare(dsn: str) -> dict[str, object]:
    """Apply the schema (as the GC would) and report the server's facts that
    decide what a commit costs."""

    async def run(pool: asyncpg.Pool) -> dict[str, object]:
        await apply_schema(pool)
        settings = await pool.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["fsync", "synchronous_commit", "shared_buffers", "max_connections"],
        )
        return {
            "version": await pool.fetchval("SHOW server_version"),
            "settings": {row["name"]: row["setting"] for row in settings},
        }

    return _with_pool(dsn, run)


def reset_controllers(dsn: str, pending_ids: list[str] | None = None) -> None:
    """Empty ``meeting_controllers`` (each system starts from the same state)
    and optionally insert ``pending_ids`` exactly as a registration would."""

    async def run(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as con, con.transaction():
            await con.execute("TRUNCATE meeting_controllers CASCADE")
            if pending_ids:
                await con.execute(
                    _INSERT_PENDING, pending_ids, MC_REGION, MC_GRPC_ENDPOINT,
                    MC_WEBTRANSPORT_ENDPOINT, MC_MAX_MEETINGS, MC_MAX_PARTICIPANTS,
                )  # fmt: skip
        await pool.execute("ANALYZE meeting_controllers")

    _with_pool(dsn, run)


def controller_health(dsn: str) -> dict[str, int]:
    """Rows by health: proof that the heartbeats reached the table."""
    return _with_pool(dsn, meeting_controllers.count_by_health)


def _ms_summary(samples: list[float]) -> dict[str, float]:
    return {
        "min_ms": min(samples),
        "median_ms": statistics.median(samples),
        "max_ms": max(samples),
    }


def time_health_statement(dsn: str, *, mcs: int, runs: int, stale_every: int) -> dict[str, object]:
    """Time ``meeting_controllers.mark_stale_unhealthy`` over ``mcs`` healthy
    MCs of which every ``stale_every``-th is an hour stale: ``runs`` times
    marking (the stale ones are reset between runs) and ``runs`` times the
    no-op sweep (nothing stale left) - the two cases the GC meets every tick.
    One untimed run of each first (prepares the statement, like any tick but
    the GC's first)."""
    mark_stale = meeting_controllers.mark_stale_unhealthy

    async def main() -> dict[str, object]:
        async with asyncio_loop(), open_pool(dsn, min_size=1, max_size=1) as pool:
            stale_ids = await run_aio(_insert_fleet, pool, mcs, stale_every)
            marking: list[float] = []
            noop: list[float] = []
            marked_counts: set[int] = set()
            for run in range(runs + 1):
                await run_aio(pool.execute, _RESET_STALE, stale_ids)
                started = time.perf_counter()
                marked = await run_aio(mark_stale, pool, STALE_AFTER_S)
                elapsed = time.perf_counter() - started
                started = time.perf_counter()
                unmarked = await run_aio(mark_stale, pool, STALE_AFTER_S)
                elapsed_noop = time.perf_counter() - started
                if unmarked:
                    raise RuntimeError("the no-op sweep marked controllers")
                if run:  # run 0 is the untimed warm-up
                    marking.append(1000 * elapsed)
                    noop.append(1000 * elapsed_noop)
                    marked_counts.add(len(marked))
            plan = await run_aio(
                pool.fetch, "EXPLAIN " + meeting_controllers._MARK_STALE_UNHEALTHY, STALE_AFTER_S
            )
        return {
            "mcs": mcs,
            "stale": len(stale_ids),
            "marked_per_run": sorted(marked_counts),
            "runs": runs,
            "marking": _ms_summary(marking),
            "noop": _ms_summary(noop),
            "plan": [row[0] for row in plan],
        }

    return trio.run(main)


async def _insert_fleet(pool: asyncpg.Pool, mcs: int, stale_every: int) -> list[str]:
    async with pool.acquire() as con, con.transaction():
        await con.execute("TRUNCATE meeting_controllers CASCADE")
        rows = await con.fetch(
            _INSERT_FLEET, mcs, MC_REGION, MC_GRPC_ENDPOINT, MC_WEBTRANSPORT_ENDPOINT,
            MC_MAX_MEETINGS, MC_MAX_PARTICIPANTS, stale_every,
        )  # fmt: skip
    # What autovacuum would have done long before a fleet this size is swept.
    await pool.execute("ANALYZE meeting_controllers")
    return [row["controller_id"] for row in rows if row["stale"]]


def clock(dsn: str) -> datetime:
    """The database's clock now (assignment times are on it)."""

    async def read(pool: asyncpg.Pool) -> datetime:
        value: datetime = await pool.fetchval("SELECT clock_timestamp()")
        return value

    return _with_pool(dsn, read)


def assignments_since(dsn: str, since: datetime) -> dict[str, dict[str, int]]:
    """Assignments recorded at or after ``since`` (database clock), by MC -
    every registered MC listed, those given none with 0 - and by the GC that
    recorded them: how a load was spread."""

    async def read(pool: asyncpg.Pool) -> dict[str, dict[str, int]]:
        by_mc = await pool.fetch(
            "SELECT c.controller_id, count(a.meeting_id) AS n"
            " FROM meeting_controllers c LEFT JOIN meeting_assignments a"
            "   ON a.meeting_controller_id = c.controller_id AND a.assigned_at >= $1"
            " GROUP BY c.controller_id ORDER BY c.controller_id",
            since,
        )
        by_gc = await pool.fetch(
            "SELECT assigned_by_gc_id, count(*) AS n FROM meeting_assignments"
            " WHERE assigned_at >= $1 GROUP BY 1 ORDER BY 1",
            since,
        )
        return {
            "by_mc": {row[0]: int(row["n"]) for row in by_mc},
            "by_gc": {row[0]: int(row["n"]) for row in by_gc},
        }

    return _with_pool(dsn, read)
