"""The MC's GC task under a virtual clock (SPEC §7.1), against a fake GC.

Every test runs with trio's autojump ``MockClock``: virtual hours take
milliseconds, and times are asserted exactly. The fake implements the
:class:`~darktower.mc.gc_client.GcClient` protocol and records every call
with ``trio.current_time()``; no network.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from darktower.mc.backoff import Backoff
from darktower.mc.gc_client import GcClient, GcUnavailable, NotRegistered
from darktower.mc.gc_task import GcTask, GcTaskMetrics
from darktower.protos import internal_pb2 as pb

MC_ID = "mc-test"


def registration() -> pb.RegisterMCRequest:
    return pb.RegisterMCRequest(
        id=MC_ID,
        region="local",
        grpc_endpoint="http://127.0.0.1:50052",
        webtransport_endpoint="https://127.0.0.1:4433",
        max_meetings=100,
        max_participants=1000,
    )


@dataclass(frozen=True)
class Load:
    meetings: int = 3
    participants: int = 17


@dataclass
class Call:
    kind: str  # register | fast | comprehensive | ended
    at: float  # trio.current_time() when the call arrived
    request: object


@dataclass
class FakeGc:
    """A scripted GC: up or down, knows the MC or not, can hang or stall.

    * ``down``: every call fails with :class:`GcUnavailable` at once;
    * ``hang``: every call blocks until cancelled (a GC that accepts the
      connection and never answers);
    * ``stall_next``: the next heartbeat blocks for that many seconds,
      shielded from cancellation, then succeeds (a client stuck regardless
      of deadlines);
    * ``known``: whether the MC is registered; heartbeats from an unknown MC
      fail with :class:`NotRegistered`.
    """

    fast_ms: int = 10_000
    comprehensive_ms: int = 30_000
    down: bool = False
    hang: bool = False
    stall_next: float = 0.0
    known: bool = False
    accept: bool = True
    fail_registrations: int = 0
    calls: list[Call] = field(default_factory=list)

    def times(self, kind: str, *, ok_only: bool = False) -> list[float]:
        return [c.at for c in self.calls if c.kind == kind and (not ok_only or c.request)]

    async def _arrive(self, kind: str, request: object) -> None:
        self.calls.append(Call(kind, trio.current_time(), request))
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise GcUnavailable(f"{kind}: connection refused", code="TRANSPORT")

    async def _heartbeat(self, kind: str, request: object) -> pb.HeartbeatResponse:
        await self._arrive(kind, request)
        if self.stall_next:
            stall, self.stall_next = self.stall_next, 0.0
            with trio.CancelScope(shield=True):
                await trio.sleep(stall)
        if not self.known:
            raise NotRegistered(f"{kind}: NOT_FOUND")
        return pb.HeartbeatResponse(acknowledged=True)

    async def register(self, request: pb.RegisterMCRequest) -> pb.RegisterMCResponse:
        await self._arrive("register", request)
        if self.fail_registrations:
            self.fail_registrations -= 1
            raise GcUnavailable("register: UNAVAILABLE", code="UNAVAILABLE")
        if not self.accept:
            return pb.RegisterMCResponse(accepted=False, message="no")
        self.known = True
        return pb.RegisterMCResponse(
            accepted=True,
            fast_heartbeat_interval_ms=self.fast_ms,
            comprehensive_heartbeat_interval_ms=self.comprehensive_ms,
        )

    async def fast_heartbeat(self, request: pb.FastHeartbeatRequest) -> pb.HeartbeatResponse:
        return await self._heartbeat("fast", request)

    async def comprehensive_heartbeat(
        self, request: pb.ComprehensiveHeartbeatRequest
    ) -> pb.HeartbeatResponse:
        return await self._heartbeat("comprehensive", request)

    async def notify_meeting_ended(
        self, request: pb.NotifyMeetingEndedRequest
    ) -> pb.NotifyMeetingEndedResponse:
        await self._arrive("ended", request)
        return pb.NotifyMeetingEndedResponse(acknowledged=True)


class FixedRng:
    """An RNG that always draws ``value`` (to hit the jitter bounds)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def make_task(fake: FakeGc, **kwargs: object) -> GcTask:
    client: GcClient = fake  # the fake implements the protocol
    kwargs.setdefault("rng", random.Random(4))
    return GcTask(
        client,
        registration(),
        Load,
        lambda: pb.HEALTHY,
        lambda: (12.5, 40.0),
        **kwargs,  # type: ignore[arg-type]
    )


def relative(times: list[float], t0: float) -> list[float]:
    return [round(t - t0, 6) for t in times]


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------- backoff


def test_backoff_bounds_double_up_to_the_cap() -> None:
    backoff = Backoff()
    assert [backoff.bounds(n) for n in range(8)] == [
        (0.5, 1.0),
        (1.0, 2.0),
        (2.0, 4.0),
        (4.0, 8.0),
        (8.0, 16.0),
        (15.0, 30.0),
        (15.0, 30.0),
        (15.0, 30.0),
    ]
    assert backoff.bounds(100_000) == (15.0, 30.0)  # no overflow after days
    rng = random.Random(1)
    for n in range(50):
        low, high = backoff.bounds(n)
        assert low <= backoff.delay(n, rng) <= high


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="cap"):
        Backoff(initial=60.0, cap=30.0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)
    with pytest.raises(ValueError, match="attempt"):
        Backoff().nominal(-1)


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.0, [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]),
        (1.0, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]),
    ],
)
async def test_registration_backoff_schedule_at_jitter_extremes(
    autojump_clock: trio.testing.MockClock, draw: float, expected: list[float]
) -> None:
    fake = FakeGc(down=True)
    task = make_task(fake, rng=FixedRng(draw))
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(sum(expected) + 0.1)
        nursery.cancel_scope.cancel()
    assert gaps(fake.times("register")) == expected


async def test_registration_backoff_with_real_jitter_stays_within_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc(down=True)
    task = make_task(fake, rng=random.Random(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    observed = gaps(fake.times("register"))
    backoff = Backoff()
    for n, gap in enumerate(observed):
        low, high = backoff.bounds(n)
        assert low <= gap <= high, (n, gap)
    assert max(observed) <= 30.0
    assert len(set(observed[5:])) > 1  # jittered, not lockstep
    # 600 s: the first five retries take [15.5, 31] s, the rest [15, 30] s each.
    assert 20 <= len(observed) <= 40


# ------------------------------------------------------------ registration


async def test_started_at_once_and_registration_retries_for_hours(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc(down=True)
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        # started() does not wait for the GC.
        assert trio.current_time() == t0
        assert not task.registered

        await trio.sleep(3 * 3600)  # the GC is gone for three virtual hours
        assert not task.registered
        attempts = len(fake.times("register"))
        assert 3 * 3600 / 30 <= attempts <= 3 * 3600 / 15 + 5

        fake.down = False  # the GC appears
        appeared = trio.current_time()
        await task.wait_registered()
        assert task.statistics().registered
        assert trio.current_time() - appeared <= 30.0  # within the cap
        # The first heartbeat follows the registration at once (once the
        # task, woken with us, has had its turn).
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - appeared <= 30.0
        registered_at = fake.times("register")[-1]
        assert fake.times("comprehensive") == [registered_at]
        nursery.cancel_scope.cancel()
    stats = task.statistics()
    assert stats.registrations == 1
    assert stats.registration_attempts == attempts + 1


async def test_refused_registration_is_retried_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc(accept=False)
    task = make_task(fake, rng=FixedRng(1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(7.5)
        assert gaps(fake.times("register")) == [1.0, 2.0, 4.0]
        fake.accept = True
        await task.wait_registered()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------- cadence


def expected_schedule(
    fast: float, comprehensive: float, horizon: float
) -> tuple[list[float], list[float]]:
    """The documented schedule, computed independently: comprehensive at 0,
    c, 2c, ...; fast every ``fast`` after the previous heartbeat of either
    kind, a comprehensive one winning a tie."""
    fasts: list[float] = []
    comps: list[float] = []
    last = 0.0
    next_comp = 0.0
    while True:
        t = min(last + fast, next_comp) if comps else 0.0
        if t > horizon:
            return fasts, comps
        if t >= next_comp:
            comps.append(t)
            next_comp = t + comprehensive
        else:
            fasts.append(t)
        last = t


@pytest.mark.parametrize(
    ("fast_ms", "comprehensive_ms", "horizon", "n_fast", "n_comp"),
    [
        (10_000, 30_000, 600.0, 40, 21),  # the defaults over 10 virtual minutes
        (5_000, 12_000, 60.0, 10, 6),  # intervals that are not multiples
        (2_000, 60_000, 3600.0, 1740, 61),  # an hour
    ],
)
async def test_heartbeat_cadence_uses_the_gc_intervals(
    autojump_clock: trio.testing.MockClock,
    fast_ms: int,
    comprehensive_ms: int,
    horizon: float,
    n_fast: int,
    n_comp: int,
) -> None:
    fake = FakeGc(fast_ms=fast_ms, comprehensive_ms=comprehensive_ms)
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(horizon + 0.5)
        nursery.cancel_scope.cancel()

    fasts = relative(fake.times("fast"), t0)
    comps = relative(fake.times("comprehensive"), t0)
    assert (len(fasts), len(comps)) == (n_fast, n_comp)
    assert (fasts, comps) == expected_schedule(fast_ms / 1000, comprehensive_ms / 1000, horizon)
    assert fake.times("register") == [t0]
    stats = task.statistics()
    assert (stats.fast_heartbeats, stats.comprehensive_heartbeats) == (n_fast, n_comp)
    assert stats.heartbeat_failures == 0
    assert (stats.fast_interval_s, stats.comprehensive_interval_s) == (
        fast_ms / 1000,
        comprehensive_ms / 1000,
    )


async def test_zero_intervals_from_the_gc_fall_back_to_defaults(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc(fast_ms=0, comprehensive_ms=0)
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(60.5)
        nursery.cancel_scope.cancel()
    assert relative(fake.times("fast"), t0) == [10.0, 20.0, 40.0, 50.0]
    assert relative(fake.times("comprehensive"), t0) == [0.0, 30.0, 60.0]


async def test_heartbeats_carry_load_health_and_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc()
    health = [pb.HEALTHY]
    task = GcTask(
        fake,
        registration(),
        Load,
        lambda: health[0],
        lambda: (math.nan, 250.0),  # a failed probe and a nonsense reading
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(5)
        health[0] = pb.DRAINING
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    comprehensive, fast = (c.request for c in fake.calls[1:3])
    assert isinstance(comprehensive, pb.ComprehensiveHeartbeatRequest)
    assert isinstance(fast, pb.FastHeartbeatRequest)
    assert comprehensive.controller_id == fast.controller_id == MC_ID
    assert comprehensive.health == pb.HEALTHY
    assert fast.health == pb.DRAINING
    assert (comprehensive.cpu_usage_percent, comprehensive.memory_usage_percent) == (0.0, 100.0)
    assert fast.capacity == pb.ControllerCapacity(
        max_meetings=100, current_meetings=3, max_participants=1000, current_participants=17
    )


# ------------------------------------------------------ re-registration


@pytest.mark.parametrize(("forget_at", "kind"), [(95.0, "fast"), (85.0, "comprehensive")])
async def test_not_found_triggers_reregistration_then_heartbeats_resume(
    autojump_clock: trio.testing.MockClock, forget_at: float, kind: str
) -> None:
    fake = FakeGc()
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(forget_at)
        fake.known = False  # the GC lost this MC's row (restore from backup, ...)
        lost_at = math.ceil(forget_at / 10) * 10  # the next tick
        await trio.sleep_until(t0 + lost_at + 0.5)
        assert task.registered
        await trio.sleep(100)
        nursery.cancel_scope.cancel()

    lost = [c for c in fake.calls if c.at == t0 + lost_at]
    # The tick gets NOT_FOUND, registration follows at once, then the
    # schedule restarts from the new registration (comprehensive first).
    assert [c.kind for c in lost] == [kind, "register", "comprehensive"]
    assert relative(fake.times("register"), t0) == [0.0, lost_at]
    after = [round(c.at - t0 - lost_at, 6) for c in fake.calls if c.at > t0 + lost_at]
    assert after[:4] == [10.0, 20.0, 30.0, 40.0]
    stats = task.statistics()
    assert stats.registrations == 2
    assert stats.heartbeat_failures == 1


async def test_reregistration_after_not_found_backs_off_while_the_gc_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc()
    task = make_task(fake, rng=FixedRng(1.0))
    t0 = trio.current_time()
    woke: list[float] = []

    async def waiter() -> None:
        await task.wait_registered()
        woke.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await task.wait_registered()
        await trio.sleep(5)
        fake.known = False
        fake.fail_registrations = 4  # the GC is struggling as well
        await trio.sleep(5.5)  # the tick at 10 gets NOT_FOUND
        assert not task.registered
        nursery.start_soon(waiter)
        await trio.sleep(20)
        assert task.statistics().registered
        nursery.cancel_scope.cancel()
    # At 10 at once, then 1, 2, 4, 8 s of backoff: registered at 25.
    assert relative(fake.times("register"), t0) == [0.0, 10.0, 11.0, 13.0, 17.0, 25.0]
    assert woke == [25.0]
    assert relative(fake.times("comprehensive"), t0)[-1] == 25.0
    assert relative(fake.times("fast"), t0) == [10.0]


# ----------------------------------------------------- outages and stalls


@pytest.mark.parametrize("mode", ["refused", "hanging"])
async def test_gc_outage_of_minutes_then_back_within_one_fast_interval(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    fake = FakeGc()
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(35)
        setattr(fake, "down" if mode == "refused" else "hang", True)
        await trio.sleep(300)  # five virtual minutes of outage
        assert task.registered  # the GC still has the row; only NOT_FOUND clears it
        before = len(fake.calls)
        setattr(fake, "down" if mode == "refused" else "hang", False)
        recovered = trio.current_time()
        await trio.sleep(60)
        nursery.cancel_scope.cancel()

    # Every tick of the outage was tried once (no retry storm, no gap).
    during = [c.at - t0 for c in fake.calls[:before] if c.at - t0 > 35]
    assert gaps(during) == [10.0] * (len(during) - 1)
    assert len(during) == 30
    # The first heartbeat after the GC's return lands within one fast interval.
    first_ok = min(c.at for c in fake.calls[before:])
    assert first_ok - recovered <= 10.0
    assert task.statistics().heartbeat_failures == 30
    # Comprehensive was due during the outage: the first tick back sends it.
    assert fake.calls[before].kind == "comprehensive"
    assert fake.times("register") == [t0]


async def test_no_burst_after_a_stalled_fast_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc()
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(35)
        fake.stall_next = 60.0  # the fast heartbeat at 40 returns at 100
        await trio.sleep(134)
        nursery.cancel_scope.cancel()
    starts = [(c.kind[0], round(c.at - t0, 6)) for c in fake.calls if c.at - t0 >= 40]
    # No replay of the ticks at 50..90: the comprehensive heartbeat that fell
    # due meanwhile goes once, when the stall ends; fast resumes a full
    # interval later.
    assert starts == [
        ("f", 40.0),
        ("c", 100.0),
        ("f", 110.0),
        ("f", 120.0),
        ("c", 130.0),
        ("f", 140.0),
        ("f", 150.0),
        ("c", 160.0),
    ]


async def test_no_burst_after_a_stalled_comprehensive_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc()
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(25)
        fake.stall_next = 60.0  # the comprehensive heartbeat at 30 returns at 90
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    starts = [(c.kind[0], round(c.at - t0, 6)) for c in fake.calls if c.at - t0 >= 30]
    assert starts == [("c", 30.0), ("f", 100.0), ("f", 110.0), ("c", 120.0)]


async def test_failed_comprehensive_is_retried_at_the_next_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc()
    task = make_task(fake)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(29)
        fake.down = True
        await trio.sleep(2)  # the comprehensive heartbeat at 30 fails
        fake.down = False
        await trio.sleep(40)
        nursery.cancel_scope.cancel()
    starts = [(c.kind[0], round(c.at - t0, 6)) for c in fake.calls if c.at - t0 >= 30]
    assert starts == [("c", 30.0), ("c", 40.0), ("f", 50.0), ("f", 60.0), ("c", 70.0)]


# ---------------------------------------------------------- cancellation


@pytest.mark.parametrize("phase", ["backoff", "hung_registration", "hung_heartbeat", "idle"])
async def test_cancellation_exits_promptly(
    autojump_clock: trio.testing.MockClock, phase: str
) -> None:
    fake = FakeGc(down=phase == "backoff", hang=phase == "hung_registration")
    task = make_task(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(3)
        if phase == "hung_heartbeat":
            fake.hang = True
            await trio.sleep(8)  # the tick at 10 is hanging
        cancelled_at = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == cancelled_at


# ---------------------------------------------------------------- metrics


async def test_metrics_follow_registration_and_heartbeats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    fake = FakeGc(down=True)
    task = make_task(fake, metrics=GcTaskMetrics(registry), rng=FixedRng(1.0))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(3.5)  # attempts at 0, 1, 3
        assert value("mc_gc_registrations_total", outcome="failed") == 3
        fake.down = False
        await task.wait_registered()
        assert value("mc_gc_registered") == 1
        await trio.sleep(30.5)
        fake.known = False
        fake.down = True
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert value("mc_gc_registrations_total", outcome="ok") == 1
    assert value("mc_gc_heartbeats_total", kind="comprehensive", outcome="ok") == 2
    assert value("mc_gc_heartbeats_total", kind="fast", outcome="ok") == 2
    assert value("mc_gc_heartbeats_total", kind="fast", outcome="failed") == 1
    assert value("mc_gc_registered") == 1


async def test_report_now_sends_a_heartbeat_outside_the_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeGc(down=True)
    health = [pb.HEALTHY]
    task = GcTask(fake, registration(), Load, lambda: health[0], lambda: (1.0, 2.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        assert not await task.report_now()  # not registered: nothing sent
        assert fake.times("fast") == []
        fake.down = False
        await task.wait_registered()
        await trio.sleep(3)  # between scheduled ticks
        health[0] = pb.DRAINING
        sent_at = trio.current_time()
        assert await task.report_now()
        fast = [c for c in fake.calls if c.kind == "fast"]
        assert [c.at for c in fast] == [sent_at]
        assert isinstance(fast[0].request, pb.FastHeartbeatRequest)
        assert fast[0].request.health == pb.DRAINING
        fake.down = True
        assert not await task.report_now()  # GC trouble: reported, never raised
        nursery.cancel_scope.cancel()
