"""``dt db init``: apply ``schema.sql`` explicitly (the GC also does at start)."""

from __future__ import annotations

import argparse
import sys

import trio

from darktower.cli.args import database_url
from darktower.gc.schema import apply_schema
from darktower.shared.db import DatabaseRefused, DatabaseUnavailable, open_pool
from darktower.shared.seam import asyncio_loop, run_aio


async def _init(dsn: str) -> None:
    async with asyncio_loop(), open_pool(dsn, min_size=1, max_size=1) as pool:
        await run_aio(apply_schema, pool)


def _run_init(args: argparse.Namespace) -> int:
    dsn = database_url(args)
    if dsn is None:
        return 2
    problem = ""
    try:
        trio.run(_init, dsn)
    except* DatabaseUnavailable:
        # `return` is not allowed inside `except*` (a SyntaxError).
        problem = "error: PostgreSQL is unreachable"
    except* DatabaseRefused as group:
        problem = f"error: PostgreSQL refused the connection ({group.exceptions[0]})"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print("schema applied")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="database tasks")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    init = db_sub.add_parser("init", help="apply schema.sql (idempotent, advisory-locked)")
    init.add_argument(
        "--database-url",
        help="PostgreSQL DSN (default: $DATABASE_URL, preferable when the URL holds a"
        " password: command lines are visible to other local users)",
    )
    init.set_defaults(func=_run_init)
