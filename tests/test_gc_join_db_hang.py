"""A join against a database that hangs fails fast (SPEC §6.3, issue 5: a
join answers 503 within 2 s of an outage).

"Hangs": the connections stay open and nothing answers - a SIGSTOP'd
server, or one wedged on a lock or a full disk. The pool's statement
timeout (5 s) would keep every join that long and longer (asyncpg then
waits, up to the acquisition's timeout, for the cancellation of the timed-out
statement); a join's statements time out after ``FAIL_FAST_TIMEOUT_S``, the
pool waits for their cancellation in the background (and drops the
connections when it goes unconfirmed), and whoever waits for a connection
meanwhile gives up at the acquisition bound (the same 1.5 s).

The hang is a TCP proxy in front of the session's PostgreSQL that stops
forwarding (:class:`HangingProxy`): the shared server is never touched.
Virtual time: asyncio's timers inside trio-asyncio follow trio's
``MockClock``, which jumps only once every task has been idle for
:data:`IDLE_BEFORE_JUMP_S` of real time (loopback I/O finishes well within
it), so the figures are exact.
"""

from __future__ import annotations

import functools
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest
import trio
import trio.testing
from gc_fleet import add_mc, add_mh, fakes, join, join_service, new_meeting
from gc_harness import DevKeys
from mc_fakes import ACCEPT

from darktower.shared.db import (
    DEFAULT_COMMAND_TIMEOUT_S,
    FAIL_FAST_TIMEOUT_S,
    DatabaseUnavailable,
    create_pool,
)
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

#: Real seconds every task must have been idle before the mock clock jumps.
IDLE_BEFORE_JUMP_S = 0.1
#: SPEC / issue 5: a join answers 503 within this of an outage (the HTTP
#: round trip on loopback is a matter of milliseconds).
FAIL_FAST_S = 2.0


class HangingProxy:
    """A TCP proxy in front of a PostgreSQL server that the test can make
    hang: :meth:`hang` stops it forwarding anything, in either direction, on
    the connections it has and on those it accepts from then on (the kernel
    completes their handshake, nobody reads them) - the server stopped,
    as a client sees it. :meth:`resume` closes every connection made before
    (dropping what they held, as a restarted server would) and proxies
    again."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        self._unix_path = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._tcp = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._hung = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._links: set[trio.CancelScope] = set()
        self.port = 0

    def dsn(self) -> str:
        """The DSN reaching the same database through the proxy."""
        parts = urlsplit(self._dsn)
        user = f"{parts.username}@" if parts.username else ""
        if parts.password:
            user = f"{parts.username}:{parts.password}@"
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path, "", ""))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    def hang(self) -> None:
        self._hung = True
        self._resumed = trio.Event()

    def resume(self) -> None:
        self._hung = False
        for scope in self._links:
            scope.cancel()
        self._resumed.set()

    async def _connect_upstream(self) -> trio.abc.Stream:
        if self._unix_path is not None:
            return await trio.open_unix_socket(self._unix_path)
        return await trio.open_tcp_stream(*self._tcp)

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._links.add(scope)
            try:
                async with client:
                    await self._resumed.wait()  # accepted during a hang: never answered
                    upstream = await self._connect_upstream()
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self._links.discard(scope)

    async def _pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if self._hung:
                    await trio.sleep_forever()  # held until resume() closes the link
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.fixture
def gc_token(keys: DevKeys) -> str:
    return keys.gc_token()


async def terminate_pool(pool: asyncpg.Pool) -> None:
    """Asyncio-flavoured: close at once (nothing to wait for on a hung server)."""
    pool.terminate()


async def test_joins_against_a_hanging_database_fail_within_the_fail_fast_bound(
    db_pool: asyncpg.Pool,
    database_dsn: str,
    gc_token: str,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Six joins on a pool of two once the database hangs - re-joins of an
    assigned meeting and first joins of another, some waiting for a
    connection behind the others: each gives up at the bound, none waits out
    the pool's statement timeout, and once the database answers again joins
    succeed on fresh connections."""
    assert FAIL_FAST_TIMEOUT_S < FAIL_FAST_S < DEFAULT_COMMAND_TIMEOUT_S
    mock_clock.autojump_threshold = IDLE_BEFORE_JUMP_S
    proxy = HangingProxy(database_dsn)
    async with fakes(gc_token, ACCEPT) as (mc,), trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        await add_mc(db_pool, "mc-1", mc.endpoint)
        await add_mh(db_pool, "mh-a")
        assigned, unassigned = await new_meeting(db_pool), await new_meeting(db_pool)
        pool = await run_aio(create_pool, proxy.dsn(), min_size=2, max_size=2)
        try:
            async with join_service(pool, gc_token) as service:
                assert (await join(service, assigned)).assigned  # both connections in use

                proxy.hang()
                started = trio.current_time()
                gave_up: list[float] = []

                async def joiner(code: str) -> None:
                    with pytest.raises(DatabaseUnavailable):
                        await join(service, code)
                    gave_up.append(trio.current_time() - started)

                async with trio.open_nursery() as joins:
                    for code in 3 * [assigned, unassigned]:
                        joins.start_soon(joiner, code)
                assert gave_up == pytest.approx(6 * [FAIL_FAST_TIMEOUT_S], abs=0.01)

                proxy.resume()
                resumed = trio.current_time()
                again = await join(service, assigned)
                assert not again.assigned
                first = await join(service, unassigned)
                assert first.assigned
                # No lease was left behind by the joins that gave up.
                assert trio.current_time() - resumed < FAIL_FAST_TIMEOUT_S
        finally:
            await run_aio(terminate_pool, pool)
        nursery.cancel_scope.cancel()
    assert len(mc.requests) == 2
