"""The GC's asyncpg pool (``shared/db.py``) against real PostgreSQL: how a
connection goes back to it.

* An idle connection goes back in the caller's task, without asyncpg's
  shielded release task (about 90 µs of CPU per statement inside
  trio-asyncio). These tests fail if the installed asyncpg no longer takes
  that path - the pool would still work, only slower.
* A connection left in a transaction still goes through asyncpg's release
  (which rolls the transaction back).
* A connection whose statement was cut short (timed out, or its caller
  cancelled) goes back through asyncpg's release, which waits for
  PostgreSQL to confirm the cancellation - in the background, not in the
  caller's task (see ``tests/test_gc_join_db_hang.py`` for why).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import trio
import trio.testing

from darktower.shared.db import open_pool
from darktower.shared.seam import run_aio

#: Real seconds every task must have been idle before the mock clock jumps.
IDLE_BEFORE_JUMP_S = 0.1


@pytest.fixture
async def pool(aio_loop: None, database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection on the session database."""
    async with open_pool(database_dsn, min_size=1, max_size=1) as pool:
        yield pool


@pytest.fixture
def stock_releases(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The connections asyncpg's own ``Pool.release`` was handed."""
    calls: list[object] = []
    original = asyncpg.Pool.release

    async def spy(
        self: asyncpg.Pool,
        connection: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's signature, spied on
    ) -> None:
        calls.append(connection)
        await original(self, connection, timeout=timeout)

    monkeypatch.setattr(asyncpg.Pool, "release", spy)
    return calls


async def server_pid(pool: asyncpg.Pool) -> int:
    """Asyncio-flavoured: the backend serving the pool's next connection."""
    async with pool.acquire() as con:
        pid: int = con.get_server_pid()
        return pid


async def test_an_idle_connection_goes_back_without_asyncpgs_release(
    pool: asyncpg.Pool, stock_releases: list[object]
) -> None:
    before = await run_aio(server_pid, pool)
    for _ in range(3):
        assert await run_aio(pool.fetchval, "SELECT 1") == 1
    assert stock_releases == []
    assert pool.get_idle_size() == 1
    # The same connection, reused.
    assert await run_aio(server_pid, pool) == before


async def test_a_connection_left_in_a_transaction_is_rolled_back_by_asyncpg(
    pool: asyncpg.Pool, stock_releases: list[object]
) -> None:
    async def leave_a_transaction_open() -> None:
        async with pool.acquire() as con:
            await con.execute("BEGIN")
            await con.execute("CREATE TEMPORARY TABLE left_open (x int)")

    async def in_transaction() -> bool:
        async with pool.acquire() as con:
            return con.is_in_transaction()

    await run_aio(leave_a_transaction_open)
    assert len(stock_releases) == 1
    assert not await run_aio(in_transaction)
    # Rolled back: the table never existed.
    assert await run_aio(pool.fetchval, "SELECT to_regclass('pg_temp.left_open')") is None


async def test_a_statement_cut_short_returns_at_once_and_its_connection_is_reused(
    pool: asyncpg.Pool, stock_releases: list[object], mock_clock: trio.testing.MockClock
) -> None:
    """The statement timeout fires (virtual time) and the caller returns
    then, not once PostgreSQL has confirmed the cancellation: asyncpg's
    release (which waits for it) runs in the background, and the connection,
    its cancellation confirmed, serves the next statement."""
    mock_clock.autojump_threshold = IDLE_BEFORE_JUMP_S
    before = await run_aio(server_pid, pool)

    async def sleeper() -> None:
        await pool.fetchval("SELECT pg_sleep(5)", timeout=0.5)

    started = trio.current_time()
    with pytest.raises(TimeoutError):
        await run_aio(sleeper)
    assert trio.current_time() - started == pytest.approx(0.5, abs=0.01)
    assert len(stock_releases) == 1  # handed to asyncpg's release, in the background
    assert await run_aio(pool.fetchval, "SELECT 1") == 1
    assert await run_aio(server_pid, pool) == before
