"""The health checkers (SPEC §6.2): stale nodes are marked unhealthy on the
database clock, and the checker's own blindness (start, pause, database
outage) buys the fleet a grace first: one fast-heartbeat interval, and one
tick more for the last heartbeat sent in it to land.

Two kinds of test:

* against real PostgreSQL (``db_pool`` and the GC's real node stores,
  ``mc_node_store`` / ``mh_node_store``), under ``mock_clock`` (no autojump:
  asyncpg's command timeouts follow trio's clock, so time moves only by an
  explicit ``jump`` while no query runs).
  Staleness is produced by back-dating ``last_heartbeat_at`` on the database
  clock, never by waiting;
* pure checker logic (cadence, thresholds) against :class:`FakeNodes`, an
  in-memory implementation of :class:`NodeStore` whose "database clock" is
  trio's, under ``autojump_clock`` or ``mock_clock``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
import trio
import trio.testing
from gc_harness import (
    DevKeys,
    gc_clients,
    gc_environ,
    mc_registration,
    metadata,
    mh_registration,
    running_gc,
)

from darktower.gc.app import mc_node_store, mh_node_store
from darktower.gc.health_checker import HealthChecker, NodeStore, SweepResult
from darktower.gc.metrics import REGISTRY
from darktower.gc.registry_requests import McHeartbeat, McRegistration, MhLoadReport, MhRegistration
from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.protos import internal_pb2 as pb
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.seam import run_aio

T = TypeVar("T")

INTERVAL = 5.0
STALE_AFTER = 30.0
GRACE = 10.0
#: A grace lasts this long: the first sweep is the first tick at or after
#: it, one tick past the grace's nominal end (GRACE)...
GRACE_SPAN = GRACE + INTERVAL
#: ...and blind for this long means grace first (the same one-tick delivery
#: allowance comes off the threshold).
BLIND_AFTER = max(STALE_AFTER - GRACE_SPAN, 1.5 * INTERVAL)
#: Ticks in a grace of GRACE_SPAN (INTERVAL divides GRACE here).
GRACE_TICKS = 3

LIVE = ("pending", "healthy", "degraded")


# --- an in-memory NodeStore ------------------------------------------------------------------


class FakeNodes:
    """One node kind's table in memory. Its "database clock" is trio's clock;
    ``available = False`` makes every operation raise
    :class:`DatabaseUnavailable`, as the real store does in an outage."""

    def __init__(self, kind: str = "mc") -> None:
        self.kind = kind
        self.available = True
        self.health: dict[str, str] = {}
        self.last_heartbeat: dict[str, float] = {}
        self.calls: list[str] = []

    def heartbeat(self, node_id: str, health: str = "healthy") -> None:
        self.health[node_id] = health
        self.last_heartbeat[node_id] = trio.current_time()

    async def _operation(self, name: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(name)
        if not self.available:
            raise DatabaseUnavailable("fake outage")

    async def mark_stale(self, stale_after_s: float) -> list[str]:
        await self._operation("mark_stale")
        cutoff = trio.current_time() - stale_after_s
        marked = sorted(
            node_id
            for node_id, health in self.health.items()
            if health in LIVE and self.last_heartbeat[node_id] < cutoff
        )
        for node_id in marked:
            self.health[node_id] = "unhealthy"
        return marked

    async def count_by_health(self) -> dict[str, int]:
        await self._operation("count_by_health")
        counts: dict[str, int] = {}
        for health in self.health.values():
            counts[health] = counts.get(health, 0) + 1
        return counts

    async def ping(self) -> None:
        await self._operation("ping")

    def store(self) -> NodeStore:
        return NodeStore(self.kind, self.mark_stale, self.count_by_health, self.ping)


def checker(
    store: NodeStore,
    on_result: Callable[[SweepResult], None] | None = None,
    *,
    interval_s: float = INTERVAL,
    stale_after_s: float = STALE_AFTER,
    grace_s: float = GRACE,
) -> HealthChecker:
    return HealthChecker(
        store,
        interval_s=interval_s,
        stale_after_s=stale_after_s,
        grace_s=grace_s,
        on_result=on_result,
    )


@asynccontextmanager
async def running_checker(
    store: NodeStore, **options: float
) -> AsyncIterator[trio.MemoryReceiveChannel[SweepResult]]:
    """The checker's ``run`` loop in the background; its results arrive on
    the yielded channel (buffered, so the loop never blocks on the test)."""
    send, receive = trio.open_memory_channel[SweepResult](math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(checker(store, send.send_nowait, **options).run)
        yield receive
        nursery.cancel_scope.cancel()


def drain(results: trio.MemoryReceiveChannel[SweepResult]) -> list[SweepResult]:
    out: list[SweepResult] = []
    while True:
        try:
            out.append(results.receive_nowait())
        except trio.WouldBlock:
            return out


async def ticks(hc: HealthChecker, clock: trio.testing.MockClock, count: int) -> list[SweepResult]:
    """``count`` ticks one interval apart (the first one now)."""
    results = []
    for i in range(count):
        if i:
            clock.jump(INTERVAL)
        results.append(await hc.tick())
    return results


def outcomes(results: list[SweepResult]) -> list[str]:
    return [r.outcome for r in results]


# --- cadence (pure logic) --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 12])
async def test_n_intervals_give_exactly_n_plus_one_ticks(
    autojump_clock: trio.testing.MockClock, n: int
) -> None:
    nodes = FakeNodes()
    start = trio.current_time()
    results: list[SweepResult] = []
    with trio.move_on_at(start + n * INTERVAL + INTERVAL / 2):
        await checker(nodes.store(), results.append).run()
    assert [r.at - start for r in results] == [k * INTERVAL for k in range(n + 1)]


async def test_missed_ticks_are_not_replayed_after_a_pause(
    mock_clock: trio.testing.MockClock,
) -> None:
    nodes = FakeNodes()
    async with running_checker(nodes.store()) as results:
        start = (await results.receive()).at
        for k in range(1, 4):
            mock_clock.jump(INTERVAL)
            assert (await results.receive()).at == start + k * INTERVAL
        # SIGSTOP-like: nothing runs for stale_after + 10 s.
        mock_clock.jump(STALE_AFTER + 10)
        await trio.testing.wait_all_tasks_blocked()
        resumed = drain(results)
        assert [r.at for r in resumed] == [start + 3 * INTERVAL + STALE_AFTER + 10]
        # ...and the cadence restarts from there, one tick per interval.
        mock_clock.jump(INTERVAL - 0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert drain(results) == []
        mock_clock.jump(0.001)
        assert (await results.receive()).at == resumed[0].at + INTERVAL


# --- grace (pure logic) ----------------------------------------------------------------------


async def test_grace_at_start_is_exactly_one_grace_period_and_one_tick(
    mock_clock: trio.testing.MockClock,
) -> None:
    nodes = FakeNodes()
    for node_id in ("mc-a", "mc-b"):
        nodes.heartbeat(node_id)
    mock_clock.jump(STALE_AFTER + 1)  # the GC was down; nothing was heard
    hc = checker(nodes.store())
    start = trio.current_time()
    results = [await hc.tick()]
    mock_clock.jump(GRACE)  # the grace's nominal end: not yet a sweep
    results.append(await hc.tick())
    mock_clock.jump(INTERVAL - 0.001)
    results.append(await hc.tick())
    assert outcomes(results) == ["grace", "grace", "grace"]
    assert nodes.calls == ["ping", "ping", "ping"]  # only pings while in grace
    nodes.heartbeat("mc-a")
    mock_clock.jump(0.001)
    assert trio.current_time() == start + GRACE_SPAN
    swept = await hc.tick()
    assert (swept.outcome, swept.marked) == ("swept", ("mc-b",))
    assert nodes.health == {"mc-a": "healthy", "mc-b": "unhealthy"}


@pytest.mark.parametrize(
    ("failed_ticks", "first_after"),
    [
        # Contact is lost for (failed_ticks + 1) intervals; grace starts once
        # that gap reaches BLIND_AFTER = max(30 - 10 - 5, 1.5 * 5) = 15 s.
        (1, "swept"),
        (2, "grace"),
        (3, "grace"),
        (5, "grace"),
    ],
)
async def test_outage_threshold_is_stale_after_minus_the_grace_span(
    mock_clock: trio.testing.MockClock, failed_ticks: int, first_after: str
) -> None:
    assert BLIND_AFTER == 15
    nodes = FakeNodes()
    hc = checker(nodes.store())
    assert outcomes(await ticks(hc, mock_clock, 5)) == ["grace"] * GRACE_TICKS + ["swept"] * 2
    nodes.available = False
    mock_clock.jump(INTERVAL)
    assert outcomes(await ticks(hc, mock_clock, failed_ticks)) == ["failed"] * failed_ticks
    nodes.available = True
    mock_clock.jump(INTERVAL)
    assert (await hc.tick()).outcome == first_after


@pytest.mark.parametrize(
    ("gap", "outcome"),
    [(INTERVAL, "swept"), (1.5 * INTERVAL - 0.001, "swept"), (1.5 * INTERVAL, "grace")],
)
async def test_blind_threshold_never_below_one_and_a_half_ticks(
    mock_clock: trio.testing.MockClock, gap: float, outcome: str
) -> None:
    # stale_after - grace - interval = -3 s would make every ordinary tick a "gap".
    # (Its start grace: 28 s and a tick, so ticks 0 ... 30 are grace.)
    nodes = FakeNodes()
    hc = checker(nodes.store(), stale_after_s=30, grace_s=28)
    assert outcomes(await ticks(hc, mock_clock, 8)) == ["grace"] * 7 + ["swept"]
    mock_clock.jump(gap)
    assert (await hc.tick()).outcome == outcome


async def test_grace_after_an_outage_counts_from_recovery(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Grace lasts a full GRACE and a tick from the first tick that reaches
    the database again, however the outage lined up with the ticks. The node
    heartbeats every GRACE seconds (at t = 7, 17, 27, ...); the outage (t =
    16 to 38) swallows three of its heartbeats; its first one after the
    outage is at t = 47, within GRACE of the recovery (the tick at t = 40)."""
    nodes = FakeNodes()
    hc = checker(nodes.store())
    start = trio.current_time()

    def advance_to(t: float) -> None:
        mock_clock.jump(start + t - trio.current_time())

    timeline: dict[float, str] = {}
    for t in (0, 5, 10, 15):
        if t == 10:
            advance_to(7)
            nodes.heartbeat("mc-live")
        advance_to(t)
        timeline[t] = (await hc.tick()).outcome
    nodes.available = False  # from t = 16
    for t in (20, 25, 30, 35):
        advance_to(t)
        timeline[t] = (await hc.tick()).outcome
    nodes.available = True  # from t = 38
    for t in (40, 45, 50, 55):
        if t == 50:
            advance_to(47)
            nodes.heartbeat("mc-live")
        advance_to(t)
        result = await hc.tick()
        timeline[t] = result.outcome
        assert result.marked == ()
    assert timeline == {
        0: "grace", 5: "grace", 10: "grace", 15: "swept",
        20: "failed", 25: "failed", 30: "failed", 35: "failed",
        40: "grace", 45: "grace", 50: "grace", 55: "swept",
    }  # fmt: skip
    assert nodes.health["mc-live"] == "healthy"


@pytest.mark.parametrize("gap", ["start", "outage"])
async def test_a_heartbeat_written_just_after_the_graces_nominal_end_is_in_time(
    mock_clock: trio.testing.MockClock, gap: str
) -> None:
    """The drills' timing: ticks every 0.5 s, heartbeats every 1 s, stale
    after 5 s. 0.5 divides 1.0, so a grace of exactly one heartbeat interval
    would sweep on the tick at its very end. A live node whose heartbeat was
    due just before the recovery sends the next one at that end, and it is
    written a moment later (delivery, the GC's heartbeat batcher): it must
    still be in time - the first sweep comes a tick later. A node that stays
    silent is marked then."""
    interval, grace, stale_after = 0.5, 1.0, 5.0
    nodes = FakeNodes()
    hc = checker(nodes.store(), interval_s=interval, stale_after_s=stale_after, grace_s=grace)

    def advance_to(t: float) -> None:
        mock_clock.jump(t - trio.current_time())

    nodes.heartbeat("mc-late")
    nodes.heartbeat("mc-dead")
    if gap == "start":
        mock_clock.jump(stale_after + 5)  # the GC was down; nothing was heard
    else:
        start = trio.current_time()
        for t in (0, 0.5, 1.0, 1.5):
            advance_to(start + t)
            await hc.tick()
        nodes.available = False
        for t in (2.0, 4.0, 6.0, 8.0):  # the database is gone for 6 s
            advance_to(start + t)
            assert (await hc.tick()).outcome == "failed"
        nodes.available = True
        advance_to(start + 8.5)
    recovery = trio.current_time()
    results = []
    for t in (0, 0.5, 1.0):  # up to the grace's nominal end (recovery + grace)
        advance_to(recovery + t)
        results.append(await hc.tick())
    assert outcomes(results) == ["grace"] * 3
    advance_to(recovery + grace + 0.01)
    nodes.heartbeat("mc-late")  # sent at the end of the grace, written just after it
    advance_to(recovery + grace + interval)
    swept = await hc.tick()
    assert (swept.outcome, swept.marked) == ("swept", ("mc-dead",))
    assert nodes.health == {"mc-late": "healthy", "mc-dead": "unhealthy"}


@pytest.mark.parametrize(
    ("interval", "grace"), [(0.5, 1.0), (0.4, 1.0), (0.3, 1.0), (0.334, 1.0), (2.0, 7.0)]
)
async def test_the_first_sweep_is_at_least_a_tick_past_the_graces_nominal_end(
    autojump_clock: trio.testing.MockClock, interval: float, grace: float
) -> None:
    """Whatever the two intervals (dividing or not, a tick just past the
    nominal end or just short of it), the first sweep after a grace leaves
    at least one tick - and less than two - for the last heartbeat sent in
    it."""
    nodes = FakeNodes()
    results: list[SweepResult] = []
    start = trio.current_time()
    hc = checker(
        nodes.store(),
        results.append,
        interval_s=interval,
        stale_after_s=grace + 10 * interval,
        grace_s=grace,
    )
    with trio.move_on_at(start + grace + 3 * interval):
        await hc.run()
    first_sweep = next(r.at for r in results if r.outcome == "swept") - start
    assert grace + interval - 1e-9 <= first_sweep < grace + 2 * interval - 1e-9
    assert all(r.outcome == "grace" for r in results if r.at - start < first_sweep)


# --- against PostgreSQL: helpers -------------------------------------------------------------

KINDS = [pytest.param("mc", id="mc"), pytest.param("mh", id="mh")]
_TABLE = {"mc": ("meeting_controllers", "controller_id"), "mh": ("media_handlers", "handler_id")}
#: The GC's real stores, by kind.
_STORE = {"mc": mc_node_store, "mh": mh_node_store}


async def register(pool: asyncpg.Pool, kind: str, node_id: str) -> None:
    """Register as a node does: the row starts ``pending``."""
    if kind == "mc":
        await run_aio(
            meeting_controllers.register,
            pool,
            McRegistration(node_id, "local", "http://127.0.0.1:50052", "https://127.0.0.1:4433",
                           100, 1000),
        )  # fmt: skip
    else:
        await run_aio(
            media_handlers.register,
            pool,
            MhRegistration(node_id, "local", "zone-a", "https://127.0.0.1:4434",
                           "http://127.0.0.1:50060", 500),
        )  # fmt: skip


async def heartbeat(pool: asyncpg.Pool, kind: str, node_id: str, health: str = "healthy") -> None:
    """A heartbeat (MC) or load report (MH) through the repository."""
    if kind == "mc":
        heartbeats = [McHeartbeat(node_id, 1, 2, health)]
        written = await run_aio(meeting_controllers.heartbeat_batch, pool, heartbeats)
        done = written.get(node_id)
    else:
        report = MhLoadReport(node_id, 3, health, 10.0, 20.0, 30.0)
        done = await run_aio(media_handlers.load_report, pool, report)
    assert done is not None


async def add_nodes(pool: asyncpg.Pool, kind: str, *node_ids: str, health: str = "healthy") -> None:
    for node_id in node_ids:
        await register(pool, kind, node_id)
        if health != "pending":
            await heartbeat(pool, kind, node_id, health)


async def backdate(pool: asyncpg.Pool, kind: str, seconds: float, *node_ids: str) -> None:
    """Age the nodes' last heartbeat on the database clock, as if nothing had
    been heard from them for ``seconds``."""
    table, key = _TABLE[kind]
    await run_aio(
        pool.execute,
        f"UPDATE {table} SET last_heartbeat_at = now() - make_interval(secs => $1) "  # noqa: S608
        f"WHERE {key} = any($2::text[])",
        seconds,
        list(node_ids),
    )


async def health_by_id(pool: asyncpg.Pool, kind: str) -> dict[str, str]:
    table, key = _TABLE[kind]
    rows = await run_aio(pool.fetch, f"SELECT {key}, health_status FROM {table}")  # noqa: S608
    return {row[0]: row[1] for row in rows}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def db_checker(
    pool: asyncpg.Pool, kind: str, on_result: Callable[[SweepResult], None] | None = None
) -> HealthChecker:
    return checker(_STORE[kind](pool), on_result)


async def past_start_grace(hc: HealthChecker, clock: trio.testing.MockClock) -> SweepResult:
    """Tick through the start-up grace; the first real sweep."""
    results = await ticks(hc, clock, GRACE_TICKS + 1)
    assert outcomes(results) == ["grace"] * GRACE_TICKS + ["swept"]
    return results[-1]


class FlakyStore:
    """The real store, failing like an outage while ``down`` is set (the
    fault is injected at the checker's network edge; PostgreSQL is real)."""

    def __init__(self, store: NodeStore) -> None:
        self.down = False
        self._store = store

    def _guard(self, op: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def guarded(*args: float) -> T:
            if self.down:
                await trio.lowlevel.checkpoint()
                raise DatabaseUnavailable("ConnectionRefusedError")
            return await op(*args)

        return guarded

    def store(self) -> NodeStore:
        s = self._store
        return NodeStore(
            s.kind, self._guard(s.mark_stale), self._guard(s.count_by_health), self._guard(s.ping)
        )


# --- against PostgreSQL: sweeping ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_sweep_marks_exactly_the_stale_live_nodes(
    db_pool: asyncpg.Pool,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    await add_nodes(db_pool, kind, "fresh", "age-29", "age-31", "age-300")
    await add_nodes(db_pool, kind, "degraded-31", health="degraded")
    await add_nodes(db_pool, kind, "pending-31", "pending-fresh", health="pending")
    await add_nodes(db_pool, kind, "draining-300", health="draining")
    await add_nodes(db_pool, kind, "unhealthy-300", health="unhealthy")
    await backdate(db_pool, kind, 31, "age-31", "degraded-31", "pending-31")
    await backdate(db_pool, kind, 300, "age-300", "draining-300", "unhealthy-300")
    before = await health_by_id(db_pool, kind)
    marked_before = sample("gc_nodes_marked_unhealthy_total", kind=kind)

    hc = db_checker(db_pool, kind)
    grace = await ticks(hc, mock_clock, GRACE_TICKS)
    assert outcomes(grace) == ["grace"] * GRACE_TICKS
    assert await health_by_id(db_pool, kind) == before  # nothing touched in grace
    # 1 s below the threshold on the database clock, so set just before the sweep.
    await backdate(db_pool, kind, STALE_AFTER - 1, "age-29")
    mock_clock.jump(INTERVAL)
    swept = await hc.tick()

    changed = ("age-300", "age-31", "degraded-31", "pending-31")
    assert (swept.outcome, swept.marked) == ("swept", changed)
    logged = [r for r in caplog.records if r.getMessage() == "nodes_marked_unhealthy"]
    assert [r.fields for r in logged] == [  # type: ignore[attr-defined]
        {"kind": kind, "count": len(changed), "ids": ",".join(changed)}
    ]
    after = await health_by_id(db_pool, kind)
    assert after == before | dict.fromkeys(changed, "unhealthy")
    assert after["draining-300"] == "draining"
    assert sample("gc_nodes_marked_unhealthy_total", kind=kind) == marked_before + len(changed)
    assert sample("gc_registered_nodes", kind=kind, health="unhealthy") == 5
    assert sample("gc_registered_nodes", kind=kind, health="healthy") == 2
    assert sample("gc_registered_nodes", kind=kind, health="pending") == 1
    assert sample("gc_registered_nodes", kind=kind, health="draining") == 1
    assert sample("gc_registered_nodes", kind=kind, health="degraded") == 0

    # Marked once: the next sweep reports no change.
    mock_clock.jump(INTERVAL)
    again = await hc.tick()
    assert (again.outcome, again.marked) == ("swept", ())
    assert sample("gc_nodes_marked_unhealthy_total", kind=kind) == marked_before + len(changed)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_heartbeat_brings_a_marked_node_back(
    db_pool: asyncpg.Pool, mock_clock: trio.testing.MockClock, kind: str
) -> None:
    await add_nodes(db_pool, kind, "node-1", "node-2")
    hc = db_checker(db_pool, kind)
    assert (await past_start_grace(hc, mock_clock)).marked == ()
    await backdate(db_pool, kind, 31, "node-1", "node-2")
    mock_clock.jump(INTERVAL)
    assert (await hc.tick()).marked == ("node-1", "node-2")

    await heartbeat(db_pool, kind, "node-1")
    assert await health_by_id(db_pool, kind) == {"node-1": "healthy", "node-2": "unhealthy"}
    mock_clock.jump(INTERVAL)
    assert (await hc.tick()).marked == ()
    assert await health_by_id(db_pool, kind) == {"node-1": "healthy", "node-2": "unhealthy"}


async def next_round(sweeps: trio.MemoryReceiveChannel[SweepResult]) -> list[SweepResult]:
    """One tick of both of a GC's checkers (MC and MH), at the same time."""
    results = [await sweeps.receive(), await sweeps.receive()]
    assert results[0].at == results[1].at
    return results


async def test_recovery_through_grpc_on_a_running_gc(
    db_pool: asyncpg.Pool,
    database_dsn: str,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    keys = DevKeys.create(tmp_path / "keys")
    environ = gc_environ(
        keys,
        database_dsn,
        GC_HEALTH_CHECK_INTERVAL_S=str(INTERVAL),
        GC_STALE_AFTER_S=str(STALE_AFTER),
        GC_FAST_HEARTBEAT_MS=str(int(GRACE * 1000)),
        GC_LOAD_REPORT_MS=str(int(GRACE * 1000)),
    )
    mc_auth = metadata(keys.mc_token("mc-1"))
    mh_auth = metadata(keys.mh_token("mh-1"))
    async with running_gc(environ) as gc, gc_clients(gc.endpoints.grpc_port) as clients:
        assert outcomes(await next_round(gc.sweeps)) == ["grace", "grace"]
        await run_aio(clients.mc.RegisterMC, mc_registration("mc-1"), metadata=mc_auth)
        await run_aio(clients.mh.RegisterMH, mh_registration("mh-1"), metadata=mh_auth)
        await backdate(db_pool, "mc", 31, "mc-1")
        await backdate(db_pool, "mh", 31, "mh-1")
        for _ in range(GRACE_TICKS - 1):
            mock_clock.jump(INTERVAL)
            assert outcomes(await next_round(gc.sweeps)) == ["grace", "grace"]
        mock_clock.jump(INTERVAL)
        swept = await next_round(gc.sweeps)
        assert outcomes(swept) == ["swept", "swept"]
        assert sorted(m for r in swept for m in r.marked) == ["mc-1", "mh-1"]
        assert await health_by_id(db_pool, "mc") == {"mc-1": "unhealthy"}
        assert await health_by_id(db_pool, "mh") == {"mh-1": "unhealthy"}

        capacity = pb.ControllerCapacity(max_meetings=100, max_participants=1000)
        reply = await run_aio(
            clients.mc.FastHeartbeat,
            pb.FastHeartbeatRequest(controller_id="mc-1", capacity=capacity, health=pb.HEALTHY),
            metadata=mc_auth,
        )
        assert reply is not None
        assert reply.acknowledged
        load = await run_aio(
            clients.mh.SendLoadReport,
            pb.MHLoadReportRequest(handler_id="mh-1", current_streams=1, health=pb.HEALTHY),
            metadata=mh_auth,
        )
        assert load is not None
        assert load.acknowledged
        assert await health_by_id(db_pool, "mc") == {"mc-1": "healthy"}
        assert await health_by_id(db_pool, "mh") == {"mh-1": "healthy"}
        mock_clock.jump(INTERVAL)
        assert [r.marked for r in await next_round(gc.sweeps)] == [(), ()]


# --- against PostgreSQL: grace ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_start_after_downtime_grants_grace_before_marking(
    db_pool: asyncpg.Pool, mock_clock: trio.testing.MockClock, kind: str
) -> None:
    """The GC was down: every heartbeat looks 31 s old. Nodes that are heard
    within GRACE of the start - or just after, as a heartbeat sent at its
    very end - survive; the silent ones are marked on the first tick at or
    after GRACE and a tick."""
    fleet = [f"node-{i}" for i in range(6)]
    await add_nodes(db_pool, kind, *fleet)
    await backdate(db_pool, kind, 31, *fleet)
    async with running_checker(_STORE[kind](db_pool)) as results:
        first = await results.receive()
        assert first.outcome == "grace"
        await heartbeat(db_pool, kind, "node-0")
        mock_clock.jump(INTERVAL)
        second = await results.receive()
        assert (second.at - first.at, second.outcome) == (INTERVAL, "grace")
        await heartbeat(db_pool, kind, "node-1")
        assert set((await health_by_id(db_pool, kind)).values()) == {"healthy"}
        mock_clock.jump(GRACE - INTERVAL)
        nominal_end = await results.receive()
        assert (nominal_end.at - first.at, nominal_end.outcome) == (GRACE, "grace")
        # Sent at the very end of the grace, written after that tick.
        await heartbeat(db_pool, kind, "node-2")
        assert set((await health_by_id(db_pool, kind)).values()) == {"healthy"}
        mock_clock.jump(INTERVAL)
        swept = await results.receive()
    assert (swept.at - first.at, swept.outcome) == (GRACE_SPAN, "swept")
    assert swept.marked == ("node-3", "node-4", "node-5")
    health = await health_by_id(db_pool, kind)
    assert health == dict.fromkeys(("node-0", "node-1", "node-2"), "healthy") | dict.fromkeys(
        swept.marked, "unhealthy"
    )


async def test_a_pause_longer_than_staleness_grants_grace(
    db_pool: asyncpg.Pool, mock_clock: trio.testing.MockClock
) -> None:
    fleet = [f"mc-{i}" for i in range(4)]
    await add_nodes(db_pool, "mc", *fleet)
    async with running_checker(mc_node_store(db_pool)) as results:
        seen = [await results.receive()]
        for _ in range(GRACE_TICKS):
            mock_clock.jump(INTERVAL)
            seen.append(await results.receive())
        assert outcomes(seen) == ["grace"] * GRACE_TICKS + ["swept"]
        # SIGSTOP for stale_after + 10 s: no tick ran, nobody was heard.
        await backdate(db_pool, "mc", STALE_AFTER + 10, *fleet)
        mock_clock.jump(STALE_AFTER + 10)
        resumed = await results.receive()
        assert (resumed.at - seen[-1].at, resumed.outcome) == (STALE_AFTER + 10, "grace")
        await trio.testing.wait_all_tasks_blocked()
        assert drain(results) == []  # one tick, not a burst of missed ones
        assert set((await health_by_id(db_pool, "mc")).values()) == {"healthy"}
        await heartbeat(db_pool, "mc", "mc-0")
        await heartbeat(db_pool, "mc", "mc-1")
        for _ in range(GRACE_TICKS - 1):
            mock_clock.jump(INTERVAL)
            assert (await results.receive()).outcome == "grace"
        mock_clock.jump(INTERVAL)
        swept = await results.receive()
    assert (swept.at - resumed.at, swept.outcome) == (GRACE_SPAN, "swept")
    assert swept.marked == ("mc-2", "mc-3")


async def test_a_long_database_outage_grants_grace_after_recovery(
    db_pool: asyncpg.Pool, mock_clock: trio.testing.MockClock
) -> None:
    fleet = [f"mc-{i}" for i in range(4)]
    await add_nodes(db_pool, "mc", *fleet)
    flaky = FlakyStore(mc_node_store(db_pool))
    hc = checker(flaky.store())
    await past_start_grace(hc, mock_clock)

    flaky.down = True
    mock_clock.jump(INTERVAL)
    # Unreachable for 25 s (> stale_after - grace - interval = 15 s): the nodes'
    # heartbeats failed against the same outage.
    assert outcomes(await ticks(hc, mock_clock, 5)) == ["failed"] * 5
    await backdate(db_pool, "mc", STALE_AFTER + 5, *fleet)
    flaky.down = False

    mock_clock.jump(INTERVAL)
    after = await ticks(hc, mock_clock, GRACE_TICKS)
    assert outcomes(after) == ["grace"] * GRACE_TICKS
    assert set((await health_by_id(db_pool, "mc")).values()) == {"healthy"}
    await heartbeat(db_pool, "mc", "mc-0")
    await heartbeat(db_pool, "mc", "mc-3")
    mock_clock.jump(INTERVAL)
    swept = await hc.tick()
    assert (swept.at - after[0].at, swept.outcome) == (GRACE_SPAN, "swept")
    assert swept.marked == ("mc-1", "mc-2")


async def test_a_short_database_outage_does_not_grant_grace(
    db_pool: asyncpg.Pool, mock_clock: trio.testing.MockClock
) -> None:
    """A failed tick leaves a 10 s gap (< 15 s): sweeping resumes at once,
    and a node that really is stale is marked on the first tick back."""
    await add_nodes(db_pool, "mc", "mc-live", "mc-dead")
    flaky = FlakyStore(mc_node_store(db_pool))
    hc = checker(flaky.store())
    await past_start_grace(hc, mock_clock)

    flaky.down = True
    mock_clock.jump(INTERVAL)
    assert outcomes(await ticks(hc, mock_clock, 1)) == ["failed"]
    flaky.down = False
    await backdate(db_pool, "mc", STALE_AFTER + 1, "mc-dead")
    mock_clock.jump(INTERVAL)
    back = await hc.tick()
    assert (back.outcome, back.marked) == ("swept", ("mc-dead",))
    assert await health_by_id(db_pool, "mc") == {"mc-live": "healthy", "mc-dead": "unhealthy"}
