"""PostgreSQL connection pool (asyncpg) and the translation of its errors.

asyncpg is asyncio-flavoured: the pool is created, used and closed on the
asyncio side of :mod:`darktower.shared.seam`. Repository modules take a
:class:`asyncpg.Pool` and hold all SQL; nothing above them names an asyncpg
exception - they see :class:`DatabaseUnavailable` instead.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import asyncpg
import trio
from asyncpg import Record
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from darktower.shared.logging import get_logger
from darktower.shared.seam import run_aio

log = get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Every statement is bounded: asyncpg terminates a connection whose query is
#: cancelled, so an unbounded query is a stuck request *and* a lost connection.
DEFAULT_COMMAND_TIMEOUT_S = 5.0
#: Bounded connect so that a database outage turns into a fast UNAVAILABLE
#: (a connection to a reachable server takes milliseconds, TLS included).
DEFAULT_CONNECT_TIMEOUT_S = 1.0
#: Bound on taking a connection from a pool: the wait for a free one plus,
#: when it has none, connecting it. A request must learn "unavailable" within
#: this however many requests queue for the pool: unbounded, a request behind
#: the others waits one connect timeout per turn while they all fail against
#: an unreachable server. The GC answers a join 503 within 2 s of an outage.
DEFAULT_ACQUIRE_TIMEOUT_S = 1.5
#: Statement timeout of a request that must fail fast (a join), instead of the
#: pool's: a database that hangs (connections open, nothing answered) turns
#: into UNAVAILABLE / 503 within this. Waiting for a connection is bounded by
#: the acquisition timeout (the same 1.5 s): when the database hangs, a slot
#: frees only once a timed-out statement's cancellation went unconfirmed and
#: its connection was dropped (:meth:`BoundedPool.release`), so whoever takes
#: it next must connect afresh - within the same acquisition bound. Either
#: way the GC answers a join 503 within 2 s.
FAIL_FAST_TIMEOUT_S = 1.5


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


class DatabaseRefused(Exception):
    """The database answered but refused us (unknown database or role, bad
    password, bad connection options): configuration, not an outage, so
    retrying will not help. ``str()`` names the error class only."""


class SchemaMissing(DatabaseRefused):
    """The database has no (or not all of) the schema: ``dt db init`` or a GC
    start applies it."""


# The explicit map of what "database down" means; everything else is a bug and
# propagates as itself.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    socket.gaierror,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # Class 53: too many connections, disk full, out of memory.
    asyncpg.exceptions.InsufficientResourcesError,
    # A DSN that now reaches a standby (after a failover): writes refused.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # The server's goodbye racing a query: at a shutdown PostgreSQL sends
    # each idle connection a FATAL error, then closes it. Until asyncpg has
    # seen the close, the unexpected message leaves the connection's
    # protocol refusing every new statement with this (not a connection
    # error); once it has, the pool connects the slot afresh.
    asyncpg.exceptions.InternalClientError,
    # Contention that outlasted its retry: transient, so "try again".
    asyncpg.exceptions.DeadlockDetectedError,
    # At run time (a reconnect after the database was dropped or the role
    # revoked) the caller can only be told "unavailable"; at start the same
    # errors mean misconfiguration (see _REFUSED_AT_START).
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)

#: Errors that at connect time mean "wrong settings", not "down": no retry.
_REFUSED_AT_START: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
)


def translate_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorate an asyncio-flavoured repository function: outages become
    :class:`DatabaseUnavailable`, so callers map exactly one exception to
    UNAVAILABLE / 503."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        except (
            asyncpg.exceptions.UndefinedTableError,
            asyncpg.exceptions.UndefinedColumnError,
        ) as exc:
            raise SchemaMissing("the schema is not applied (run `dt db init`)") from exc

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


async def keep_session(connection: asyncpg.Connection) -> None:
    """Pool ``reset`` hook that skips asyncpg's reset query.

    By default every release runs ``SELECT pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL`` - one more round trip per statement, about
    15% of a heartbeat's cost. Our connections never carry session state
    (advisory locks are transaction-scoped, no LISTEN, SET or cursors), and
    asyncpg still rolls back any open transaction before this hook runs.
    """


class BoundedPool(asyncpg.Pool):
    """Our asyncpg pool: every acquisition and every statement time-bounded.

    asyncpg bounds an acquisition only when the caller passes ``timeout``,
    and its own shortcuts (``pool.fetch``, ``pool.execute`` ...) never do.
    Here an acquisition without one gets ``acquire_timeout_s``, so a
    repository call is bounded in all three places it can wait: for a
    connection, for connecting it (``connect_timeout_s``, inside the
    acquisition), for the statement (``command_timeout_s``).
    """

    __slots__ = ("_acquire_timeout_s", "_background_releases")

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        command_timeout_s: float,
        connect_timeout_s: float,
        acquire_timeout_s: float,
    ) -> None:
        super().__init__(
            dsn,
            min_size=min_size,
            max_size=max_size,
            max_queries=50_000,  # asyncpg's default
            command_timeout=command_timeout_s,
            timeout=connect_timeout_s,
            # The pool outlives database restarts: stale connections are
            # replaced on their next use.
            max_inactive_connection_lifetime=60.0,
            reset=keep_session,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=Record,
        )
        self._acquire_timeout_s = acquire_timeout_s
        #: Releases still waiting for a cancellation (see :meth:`release`).
        self._background_releases: set[asyncio.Future[None]] = set()

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[Record]:
        return super().acquire(timeout=self._acquire_timeout_s if timeout is None else timeout)

    async def release(
        self,
        connection: PoolConnectionProxy[Record],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's signature, overridden
    ) -> None:
        """Give a connection back; at once when nothing is left to wait for,
        or (a statement timed out or was cancelled) dropped at once.

        asyncpg always runs a release as a separate task under
        ``asyncio.shield`` so that a cancelled caller cannot leave it half
        done. Inside trio-asyncio a task costs loop rounds: measured, about
        90 µs of CPU per statement, a third of a ``pool.fetchrow``. When the
        release cannot suspend (:func:`_releases_at_once`: an open, idle
        connection of this pool's generation, under its query budget, no
        transaction, no cancellation in progress, and our reset hook, which
        does no I/O), there is nothing to shield - a cancellation can only
        land at a suspension - so it runs here, in the caller's task.
        Otherwise asyncpg's own release runs.

        A connection whose statement timed out or was cancelled is still
        having that statement cancelled (asyncpg sends PostgreSQL a
        CancelRequest on a second connection); asyncpg's release waits for
        the cancellation to be confirmed, up to the acquisition's timeout,
        then reuses the connection - or, unconfirmed, drops it. That wait is
        the pool's business, not the caller's: against a server that hangs
        every caller would pay it on top of its own timeout. So it runs in
        the background (:meth:`_release_in_background`), and the caller,
        whose statement already failed, returns at once. The slot stays
        taken until then, as it would have been with the caller waiting.
        """
        if _cancelling(self, connection):
            self._release_in_background(connection, timeout)
            return
        if _releases_at_once(self, connection):
            proxy: Any = connection  # asyncpg's private state (see _releases_at_once)
            proxy._con._on_release()
            # No timeout: it completes without suspending (no timer needed).
            await proxy._holder.release(None)
            return
        await super().release(connection, timeout=timeout)

    def _release_in_background(
        self, connection: PoolConnectionProxy[Record], timeout: float | None
    ) -> None:
        """asyncpg's release of ``connection`` as a task of its own, bounded
        by the acquisition timeout (the release's budget); its outcome - the
        connection reused, or dropped with a ``TimeoutError`` - is the
        pool's, so it is retrieved and not reported."""
        task = asyncio.ensure_future(super().release(connection, timeout=timeout))
        self._background_releases.add(task)
        task.add_done_callback(self._background_release_done)

    def _background_release_done(self, task: asyncio.Future[None]) -> None:
        self._background_releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("pool_background_release_failed", error=type(task.exception()).__name__)


def _cancelling(pool: asyncpg.Pool, connection: object) -> bool:
    """Whether ``connection`` (of ``pool``) is having a statement cancelled
    (it timed out, or its caller was cancelled). Reads asyncpg's private
    state; an attribute missing means "no" (the release then runs as
    asyncpg's own, in the caller's task)."""
    if type(connection) is not PoolConnectionProxy:
        return False
    proxy: Any = connection  # asyncpg's private state, typed loosely on purpose
    try:
        con = proxy._con
        if proxy._holder._pool is not pool or con is None or con.is_closed():
            return False
        return bool(con._protocol._is_cancelling())
    except AttributeError:
        return False


def _releases_at_once(pool: asyncpg.Pool, connection: object) -> bool:
    """Whether asyncpg's ``PoolConnectionHolder.release`` would complete
    without suspending for ``connection`` (see :meth:`BoundedPool.release`).

    Reads asyncpg's private state (as asyncpg 0.32 lays it out); any
    attribute missing means "not sure", and asyncpg's own release runs.
    ``tests/test_db_pool.py`` fails if the installed asyncpg no longer
    takes this path.
    """
    if type(connection) is not PoolConnectionProxy:
        return False
    proxy: Any = connection  # asyncpg's private state, typed loosely on purpose
    state: Any = pool
    try:
        holder = proxy._holder
        con = proxy._con
        if holder._pool is not pool or holder._in_use is None or con is None:
            return False
        protocol = con._protocol
        return bool(
            state._reset is keep_session
            and not con.is_closed()
            and con._top_xact is None
            and not protocol.is_in_transaction()
            and not protocol._is_cancelling()
            and protocol.queries_count < holder._max_queries
            and holder._generation == state._generation
        )
    except AttributeError:
        return False


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    acquire_timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S,
) -> asyncpg.Pool:
    """Asyncio-flavoured: open a :class:`BoundedPool`."""
    try:
        pool = await BoundedPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout_s=command_timeout_s,
            connect_timeout_s=connect_timeout_s,
            acquire_timeout_s=acquire_timeout_s,
        )
    except _REFUSED_AT_START as exc:
        raise DatabaseRefused(type(exc).__name__) from None
    except _UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc
    except (asyncpg.PostgresError, ValueError) as exc:
        raise DatabaseRefused(type(exc).__name__) from None
    assert pool is not None
    return pool


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=2.0)
    except TimeoutError:
        pool.terminate()


@asynccontextmanager
async def open_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    attempts: int = 1,
    retry_delay_s: float = 1.0,
) -> AsyncIterator[asyncpg.Pool]:
    """Trio-flavoured: a pool for the duration of the block (inside
    :func:`darktower.shared.seam.asyncio_loop`); closed with a bounded,
    shielded cleanup even when the block is cancelled.

    Up to ``attempts`` tries ``retry_delay_s`` apart, then
    :class:`DatabaseUnavailable`: a service started together with its
    database waits for it, but never forever.
    """
    for attempt in range(1, attempts + 1):
        try:
            pool = await run_aio(create_pool, dsn, min_size=min(min_size, max_size),
                                 max_size=max_size)  # fmt: skip
            break
        except DatabaseUnavailable:
            if attempt == attempts:
                raise
            log.warning("database_connect_retry", attempt=attempt, of=attempts)
            await trio.sleep(retry_delay_s)
    try:
        yield pool
    finally:
        with trio.move_on_after(3, shield=True):
            await run_aio(_close_pool, pool)


@translate_errors
async def database_now(pool: asyncpg.Pool) -> datetime:
    """Asyncio-flavoured: the database's clock, the one every staleness and
    age is judged on (SPEC §6.2) - never a host's clock, which may be skewed."""
    now: datetime = await pool.fetchval("SELECT now()")
    return now


@translate_errors
async def ping(pool: asyncpg.Pool) -> None:
    """Asyncio-flavoured: a round trip to PostgreSQL (readiness, grace ticks)."""
    # Bounded twice: waiting for a (connected) connection, then the query itself.
    async with pool.acquire(timeout=DEFAULT_ACQUIRE_TIMEOUT_S) as con:
        await con.fetchval("SELECT 1", timeout=DEFAULT_CONNECT_TIMEOUT_S)
