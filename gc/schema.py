"""Applying ``schema.sql`` safely from any number of GCs at once."""

from __future__ import annotations

from importlib.resources import files

import asyncpg

from darktower.shared.db import translate_errors

#: Arbitrary but fixed: every GC (and ``dt db init``) serialises schema
#: application on this advisory lock key ("DTSCHEMA" in ASCII).
SCHEMA_LOCK_KEY = 0x4454534348454D41


def schema_sql() -> str:
    """The hand-written schema shipped inside the package (a copy of the
    repository's top-level ``schema.sql``)."""
    return files("darktower.gc").joinpath("schema.sql").read_text(encoding="utf-8")


@translate_errors
async def apply_schema(pool: asyncpg.Pool) -> None:
    """Asyncio-flavoured: apply the idempotent schema under a transaction-scoped
    advisory lock, so GCs starting together never race on ``CREATE ... IF NOT
    EXISTS`` (which is not concurrency-safe by itself)."""
    async with pool.acquire() as con, con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        await con.execute(schema_sql())
