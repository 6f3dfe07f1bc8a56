"""``dt status``: the fleet and its active assignments, read from PostgreSQL.

Reads what the GCs read (SPEC §5) through the GC's own repository functions,
so the picture is exactly the one joins are decided on: every MC and MH with
its health, load and heartbeat age, and the newest active assignments. It
writes nothing and needs no GC running.

Ages are measured against the database's clock, the one the GC judges
staleness on, so a skewed host clock cannot make nodes look stale or fresh.
``--stale-after`` (default ``$GC_STALE_AFTER_S``
or 30 s, the GC's own threshold) marks heartbeats older than that as stale:
such a node gets no new meetings even if its health has not been swept yet.

The three lists are read with three statements, not one snapshot; a row may
change between them. ``--json`` prints one document for scripts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import trio

from darktower.cli.args import database_url, positive_float, positive_int
from darktower.cli.join_cmd import printable
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers
from darktower.gc.repositories.assignments import AssignmentSummary
from darktower.gc.repositories.media_handlers import MediaHandlerRow
from darktower.gc.repositories.meeting_controllers import MeetingControllerRow
from darktower.shared.config import first_error
from darktower.shared.db import (
    DatabaseRefused,
    DatabaseUnavailable,
    SchemaMissing,
    database_now,
    open_pool,
)
from darktower.shared.seam import asyncio_loop, run_aio

DEFAULT_STALE_AFTER_S = 30.0
DEFAULT_ASSIGNMENT_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Fleet:
    """What ``dt status`` shows, as read (``now`` is the database's clock at
    the read, the reference for every age)."""

    controllers: list[MeetingControllerRow]
    handlers: list[MediaHandlerRow]
    assignments: list[AssignmentSummary]
    assignments_truncated: bool
    now: datetime


async def _read(
    pool: asyncpg.Pool, limit: int
) -> tuple[list[MeetingControllerRow], list[MediaHandlerRow], list[AssignmentSummary], datetime]:
    """Asyncio-flavoured: the reads in one seam crossing. One row more than
    ``limit`` is asked for, to tell whether the list was cut; ages are judged
    on the database's clock, like staleness in the GC."""
    return (
        await meeting_controllers.list_all(pool),
        await media_handlers.list_all(pool),
        await assignments.list_active(pool, limit=limit + 1),
        await database_now(pool),
    )


async def read_fleet(dsn: str, *, limit: int) -> Fleet:
    """Trio-flavoured: open a small pool, read, close."""
    async with asyncio_loop(), open_pool(dsn, min_size=1, max_size=1) as pool:
        controllers, handlers, active, now = await run_aio(_read, pool, limit)
    return Fleet(
        controllers=controllers,
        handlers=handlers,
        assignments=active[:limit],
        assignments_truncated=len(active) > limit,
        now=now,
    )


def _age_s(now: datetime, then: datetime) -> float:
    return round((now - then).total_seconds(), 1)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    """Aligned columns, numbers right-aligned; every cell made printable
    (regions and zones are free text registered by the nodes)."""
    cells = [[printable(cell, 80) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def _health_summary(statuses: Sequence[str]) -> str:
    if not statuses:
        return "none"
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _heartbeat(age: float, stale_after_s: float) -> str:
    text = f"{age:.0f}s ago"
    return f"{text} STALE" if age > stale_after_s else text


def render(fleet: Fleet, *, stale_after_s: float) -> str:
    """The three tables as text."""
    now = fleet.now
    out: list[str] = []
    mcs = fleet.controllers
    out.append(
        f"Meeting controllers: {len(mcs)} ({_health_summary([m.health_status for m in mcs])})"
    )
    if mcs:
        out += _table(
            ["ID", "REGION", "HEALTH", "MEETINGS", "PARTICIPANTS", "CPU%", "MEM%", "HEARTBEAT"],
            [
                [
                    m.controller_id,
                    m.region,
                    m.health_status,
                    f"{m.current_meetings}/{m.max_meetings}",
                    f"{m.current_participants}/{m.max_participants}",
                    _percent(m.cpu_usage_percent),
                    _percent(m.memory_usage_percent),
                    _heartbeat(_age_s(now, m.last_heartbeat_at), stale_after_s),
                ]
                for m in mcs
            ],
            numeric={3, 4, 5, 6},
        )
    mhs = fleet.handlers
    out.append("")
    out.append(f"Media handlers: {len(mhs)} ({_health_summary([h.health_status for h in mhs])})")
    if mhs:
        out += _table(
            ["ID", "REGION", "ZONE", "HEALTH", "STREAMS", "CPU%", "MEM%", "BW%", "HEARTBEAT"],
            [
                [
                    h.handler_id,
                    h.region,
                    h.zone or "-",
                    h.health_status,
                    f"{h.current_streams}/{h.max_streams}",
                    _percent(h.cpu_usage_percent),
                    _percent(h.memory_usage_percent),
                    _percent(h.bandwidth_usage_percent),
                    _heartbeat(_age_s(now, h.last_heartbeat_at), stale_after_s),
                ]
                for h in mhs
            ],
            numeric={4, 5, 6, 7},
        )
    active = fleet.assignments
    out.append("")
    count = f"{len(active)}+ (newest {len(active)} shown)" if fleet.assignments_truncated else ""
    out.append(f"Active assignments: {count or len(active)}")
    if active:
        out += _table(
            ["MEETING", "CODE", "REGION", "MC", "GENERATION", "MEDIA HANDLERS", "BY GC", "AGE"],
            [
                [
                    str(a.meeting_id),
                    printable(a.meeting_code or "-"),
                    a.region,
                    a.controller_id,
                    str(a.generation),
                    a.primary_mh_id + (f", {a.backup_mh_id}" if a.backup_mh_id else ""),
                    a.assigned_by_gc_id,
                    f"{_age_s(now, a.assigned_at):.0f}s",
                ]
                for a in active
            ],
            numeric={4, 7},
        )
    return "\n".join(out)


def to_json(fleet: Fleet, *, stale_after_s: float) -> dict[str, Any]:
    """The document ``--json`` prints: every listed column, timestamps in ISO
    8601, ages in seconds (one decimal) and a ``stale`` flag per node."""
    now = fleet.now

    def node_age(last: datetime) -> dict[str, Any]:
        age = _age_s(now, last)
        return {
            "last_heartbeat_at": last.isoformat(),
            "heartbeat_age_s": age,
            "stale": age > stale_after_s,
        }

    return {
        "now": now.isoformat(),
        "stale_after_s": stale_after_s,
        "meeting_controllers": [
            {
                "id": m.controller_id,
                "region": m.region,
                "health": m.health_status,
                "current_meetings": m.current_meetings,
                "max_meetings": m.max_meetings,
                "current_participants": m.current_participants,
                "max_participants": m.max_participants,
                "cpu_usage_percent": m.cpu_usage_percent,
                "memory_usage_percent": m.memory_usage_percent,
                "grpc_endpoint": m.grpc_endpoint,
                "webtransport_endpoint": m.webtransport_endpoint,
                **node_age(m.last_heartbeat_at),
            }
            for m in fleet.controllers
        ],
        "media_handlers": [
            {
                "id": h.handler_id,
                "region": h.region,
                "zone": h.zone,
                "health": h.health_status,
                "current_streams": h.current_streams,
                "max_streams": h.max_streams,
                "cpu_usage_percent": h.cpu_usage_percent,
                "memory_usage_percent": h.memory_usage_percent,
                "bandwidth_usage_percent": h.bandwidth_usage_percent,
                "grpc_endpoint": h.grpc_endpoint,
                "webtransport_endpoint": h.webtransport_endpoint,
                **node_age(h.last_heartbeat_at),
            }
            for h in fleet.handlers
        ],
        "assignments": [
            {
                "meeting_id": str(a.meeting_id),
                "meeting_code": a.meeting_code,
                "region": a.region,
                "controller_id": a.controller_id,
                "generation": a.generation,
                "primary_mh_id": a.primary_mh_id,
                "backup_mh_id": a.backup_mh_id,
                "assigned_by_gc_id": a.assigned_by_gc_id,
                "assigned_at": a.assigned_at.isoformat(),
                "age_s": _age_s(now, a.assigned_at),
            }
            for a in fleet.assignments
        ],
        "assignments_truncated": fleet.assignments_truncated,
    }


def _run(args: argparse.Namespace) -> int:
    dsn = database_url(args)
    if dsn is None:
        return 2
    stale_after_s = args.stale_after
    if stale_after_s is None:
        try:
            stale_after_s = positive_float(
                os.environ.get("GC_STALE_AFTER_S") or str(DEFAULT_STALE_AFTER_S)
            )
        except argparse.ArgumentTypeError as exc:
            print(f"error: GC_STALE_AFTER_S: {exc}", file=sys.stderr)
            return 2
    problem = ""
    fleet: Fleet | None = None
    try:
        fleet = trio.run(functools.partial(read_fleet, dsn, limit=args.limit))
    except* DatabaseUnavailable:
        # `return` is not allowed inside `except*` (a SyntaxError).
        problem = "error: PostgreSQL is unreachable"
    except* SchemaMissing as group:
        problem = f"error: {first_error(group)}"
    except* DatabaseRefused as group:
        problem = f"error: PostgreSQL refused the connection ({first_error(group)})"
    if problem or fleet is None:
        print(problem, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(fleet, stale_after_s=stale_after_s), indent=2))
    else:
        print(render(fleet, stale_after_s=stale_after_s))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dt status``."""
    status = subparsers.add_parser(
        "status",
        help="fleet table: MCs, MHs, health, load, active assignments",
        description="Read the fleet and the active assignments from PostgreSQL (read-only).",
    )
    status.add_argument(
        "--database-url",
        help="PostgreSQL DSN (default: $DATABASE_URL, preferable when the URL holds a"
        " password: command lines are visible to other local users)",
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--stale-after",
        type=positive_float,
        metavar="S",
        help="heartbeat age in seconds past which a node is shown stale"
        f" (default: $GC_STALE_AFTER_S or {DEFAULT_STALE_AFTER_S:g})",
    )
    status.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_ASSIGNMENT_LIMIT,
        metavar="N",
        help=f"show at most N active assignments, newest first"
        f" (default: {DEFAULT_ASSIGNMENT_LIMIT})",
    )
    status.set_defaults(func=_run)
