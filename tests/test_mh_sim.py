"""The MH simulator (``dt mh-sim``, :mod:`darktower.cli.mh_sim`).

Timing under trio's autojump ``MockClock`` against a fake GC registry (the
:class:`~darktower.cli.mh_sim.MhRegistry` protocol, recording every call
with ``trio.current_time()``): virtual minutes in milliseconds, times
asserted exactly. Then ``dt mh-sim`` as a real process against a real GC
process and PostgreSQL: registration, reports at the returned interval,
re-registration after its row is deleted, surviving a GC outage, SIGINT.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
from gc_harness import DevKeys, gc_environ
from printed_output import PrintingRun
from process_harness import GcProcess, child_environ, fetch, free_port, gc_process

from darktower.cli.__main__ import main as dt_main
from darktower.cli.mh_load import LoadPattern
from darktower.cli.mh_sim import (
    DEFAULT_REPORT_INTERVAL_S,
    REPORT_TIMEOUT_S,
    GcUnavailable,
    MhFleet,
    NotRegistered,
    fleet_specs,
    load_report,
)
from darktower.cli.mh_tokens import MintedTokens
from darktower.mc.backoff import Backoff
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret, token_subject

pytest_plugins = ("gc_fixtures",)  # keys

#: No jitter: retry times are exact.
EXACT = Backoff(initial=1.0, multiplier=2.0, cap=30.0, jitter=0.0)


@dataclass
class Call:
    kind: str  # register | report
    at: float
    handler_id: str
    token: str
    request: pb.RegisterMHRequest | pb.MHLoadReportRequest


@dataclass
class FakeRegistry:
    """A scripted GC registry: ``down`` fails every call at once, ``hang``
    never answers, ``accept`` false refuses registrations; reports from an
    MH it does not know fail with ``NOT_FOUND``."""

    interval_ms: int = 2000
    down: bool = False
    hang: bool = False
    accept: bool = True
    known: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)

    def times(self, kind: str, handler_id: str) -> list[float]:
        return [c.at for c in self.calls if c.kind == kind and c.handler_id == handler_id]

    async def _arrive(self, kind: str, handler_id: str, token: Secret, request: object) -> None:
        assert isinstance(request, pb.RegisterMHRequest | pb.MHLoadReportRequest)
        self.calls.append(Call(kind, trio.current_time(), handler_id, token.reveal(), request))
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise GcUnavailable(f"{kind}: connection refused", code="TRANSPORT")

    async def register(self, request: pb.RegisterMHRequest, token: Secret) -> pb.RegisterMHResponse:
        await self._arrive("register", request.handler_id, token, request)
        if not self.accept:
            return pb.RegisterMHResponse(accepted=False, message="no")
        self.known.add(request.handler_id)
        return pb.RegisterMHResponse(accepted=True, load_report_interval_ms=self.interval_ms)

    async def report(
        self, request: pb.MHLoadReportRequest, token: Secret
    ) -> pb.MHLoadReportResponse:
        await self._arrive("report", request.handler_id, token, request)
        if request.handler_id not in self.known:
            raise NotRegistered("SendLoadReport: NOT_FOUND")
        return pb.MHLoadReportResponse(acknowledged=True, timestamp=1)


def fake_token(handler_id: str) -> Secret:
    return Secret(f"token-of-{handler_id}")


def fleet(registry: FakeRegistry, count: int = 2, pattern: str = "constant:0.25") -> MhFleet:
    return MhFleet(
        fleet_specs(count),
        registry,
        fake_token,
        LoadPattern.parse(pattern),
        backoff=EXACT,
    )


@asynccontextmanager
async def running(sim: MhFleet) -> AsyncIterator[None]:
    """The fleet runs (started) for the block; cancelled after it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        yield
        nursery.cancel_scope.cancel()


async def run_for(sim: MhFleet, seconds: float) -> None:
    """Run the fleet for ``seconds`` of virtual time, then cancel it."""
    async with running(sim):
        await trio.sleep(seconds)


async def run_with_outage(
    sim: MhFleet,
    registry: FakeRegistry,
    how: Literal["down", "hang"],
    *,
    at: float,
    lasting: float,
    then: float,
) -> None:
    """Run the fleet; ``at`` s in, the GC fails every call at once
    (``down``) or never answers (``hang``) for ``lasting`` s; cancel the
    fleet ``then`` s after it is back."""
    async with running(sim):
        await trio.sleep(at)
        setattr(registry, how, True)
        await trio.sleep(lasting)
        setattr(registry, how, False)
        await trio.sleep(then)


# --------------------------------------------------------------------------
# Timing (MockClock)


async def test_registers_then_reports_at_the_interval_the_gc_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=2000)
    sim = fleet(registry)
    ready_at: list[float] = []
    async with running(sim):
        await sim.wait_ready()
        ready_at.append(trio.current_time())
        await trio.sleep(10.5)
    assert ready_at == [0.0]
    for mh_id in ("mh-sim-1", "mh-sim-2"):
        assert registry.times("register", mh_id) == [0.0]
        # The first report right after registering, then every 2 s.
        assert registry.times("report", mh_id) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    # Each MH presents its own token.
    assert {(c.handler_id, c.token) for c in registry.calls} == {
        ("mh-sim-1", "token-of-mh-sim-1"),
        ("mh-sim-2", "token-of-mh-sim-2"),
    }
    assert sim.interval_s == 2.0
    assert sim.totals() == {
        "registrations": 2,
        "registration_failures": 0,
        "reports": 12,
        "report_failures": 0,
        "not_found": 0,
    }


async def test_an_interval_of_zero_means_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=0)
    await run_for(fleet(registry, count=1), 25)
    assert registry.times("report", "mh-sim-1") == [0.0, 10.0, 20.0]
    assert DEFAULT_REPORT_INTERVAL_S == 10.0


async def test_not_found_registers_again_at_once_and_reports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=2000)
    sim = fleet(registry, count=1)
    async with running(sim):
        await trio.sleep(3)
        registry.known.clear()  # the GC's row was deleted
        await trio.sleep(5.5)
    assert registry.times("register", "mh-sim-1") == [0.0, 4.0]
    # t=4: NOT_FOUND, registered again, reported at once; then the schedule.
    assert registry.times("report", "mh-sim-1") == [0.0, 2.0, 4.0, 4.0, 6.0, 8.0]
    assert sim.totals()["not_found"] == 1


async def test_registration_is_retried_with_bounded_backoff_until_the_gc_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=2000, down=True)
    sim = fleet(registry, count=1)
    async with running(sim):
        await trio.sleep(100)
        assert not sim.mhs[0].reported
        registry.down = False
        await sim.wait_ready()
        assert trio.current_time() == 121.0
    # 1, 2, 4, 8, 16 s apart, then never more than 30 s.
    assert registry.times("register", "mh-sim-1") == [0, 1, 3, 7, 15, 31, 61, 91, 121]
    assert registry.times("report", "mh-sim-1") == [121.0]


async def test_failed_reports_are_retried_and_never_end_the_simulator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=4000)
    sim = fleet(registry, count=1)
    await run_with_outage(sim, registry, "down", at=5, lasting=12, then=8.5)
    # t=8 fails; retries 1, 2, then every 4 s (never later than the interval);
    # back at t=19: the regular schedule again. Registered only once: the
    # GC still knew the MH.
    assert registry.times("report", "mh-sim-1") == [0, 4, 8, 9, 11, 15, 19, 23]
    assert registry.times("register", "mh-sim-1") == [0.0]
    assert sim.totals()["report_failures"] == 4


async def test_a_gc_that_never_answers_costs_a_bounded_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=10_000)
    sim = fleet(registry, count=1)
    await run_with_outage(sim, registry, "hang", at=5, lasting=19, then=10.5)
    # t=10 hangs until its bound (deadline + 1 s slack) and is retried 1 s
    # later, hangs again, is retried 2 s later: answered.
    bound = REPORT_TIMEOUT_S + 1
    assert registry.times("report", "mh-sim-1") == [0, 10, 11 + bound, 13 + 2 * bound]
    assert sim.totals()["report_failures"] == 2


async def test_a_refused_registration_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(accept=False)
    sim = fleet(registry, count=1)
    async with running(sim):
        await trio.sleep(2)
        registry.accept = True
        await sim.wait_ready()
    assert registry.times("register", "mh-sim-1") == [0, 1, 3]
    assert sim.totals()["registration_failures"] == 2


async def test_ready_waits_for_every_mh(autojump_clock: trio.testing.MockClock) -> None:
    registry = FakeRegistry()
    sim = fleet(registry, count=2)
    registry.accept = False
    async with running(sim):
        with trio.move_on_after(10):
            await sim.wait_ready()
            pytest.fail("ready without any MH registered")
        registry.accept = True
        await sim.wait_ready()


async def test_the_reported_load_follows_the_pattern(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry(interval_ms=5000)
    await run_for(fleet(registry, count=1, pattern="ramp:0,1,20"), 26)
    reports = [c.request for c in registry.calls if c.kind == "report"]
    assert all(isinstance(r, pb.MHLoadReportRequest) for r in reports)
    streams = [r.current_streams for r in reports if isinstance(r, pb.MHLoadReportRequest)]
    assert streams == [0, 250, 500, 750, 1000, 1000]


# --------------------------------------------------------------------------
# Pure parts


def test_load_patterns() -> None:
    assert LoadPattern.parse("constant:0.2").at(123.0) == 0.2
    sine = LoadPattern.parse("sine:0.1,0.5,60")
    assert sine.at(0) == pytest.approx(0.1)
    assert sine.at(30) == pytest.approx(0.5)
    assert sine.at(15) == pytest.approx(0.3)
    assert sine.at(60) == pytest.approx(0.1)
    ramp = LoadPattern.parse("ramp:0.8,0.2,10")
    assert [ramp.at(t) for t in (0, 5, 10, 1000)] == pytest.approx([0.8, 0.5, 0.2, 0.2])
    assert str(ramp) == "ramp:0.8,0.2,10"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus:1", "one of constant:LOAD"),
        ("constant", "constant:LOAD"),
        ("constant:1.5", "fractions"),
        ("constant:nan", "finite"),
        ("sine:0.1,0.5", "sine:MIN,MAX,PERIOD_S"),
        ("sine:0.1,0.5,0", "positive"),
        ("ramp:0,1,x", "ramp:FROM,TO,SECONDS"),
        ("ramp:-0.1,1,10", "fractions"),
    ],
)
def test_bad_load_patterns_are_refused_with_the_rule(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadPattern.parse(text)


def test_fleet_specs_round_robin_zones_and_distinct_endpoints() -> None:
    specs = fleet_specs(3, id_prefix="mh-x-", zones=["a", "b"], max_streams=500, base_port=6000)
    assert [s.handler_id for s in specs] == ["mh-x-1", "mh-x-2", "mh-x-3"]
    assert [s.zone for s in specs] == ["a", "b", "a"]
    assert len({s.webtransport_endpoint for s in specs}) == 3
    assert specs[1].webtransport_endpoint == "https://127.0.0.1:6001"
    registration = specs[2].registration()
    assert (registration.max_streams, registration.zone, registration.region) == (500, "a", "local")
    report = load_report(specs[0], 0.5)
    assert (report.current_streams, report.health) == (250, pb.HEALTHY)
    assert report.cpu_usage_percent == pytest.approx(50.0)
    assert 0 <= report.memory_usage_percent <= 100


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"id_prefix": "mh sim "}, "id"),
        ({"zones": ["zone a"]}, "zone"),
        ({"region": ""}, "region"),
        ({"base_port": 65500}, "port"),
    ],
)
def test_fleet_specs_refuse_what_the_gc_would(kwargs: dict[str, object], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        fleet_specs(2, **kwargs)  # type: ignore[arg-type]


def test_minted_tokens_name_the_mh_and_are_renewed_at_half_life(keys: DevKeys) -> None:
    now = [1_000_000.0]
    minted = MintedTokens(keys.private_key, keys.kid, ttl_s=3600, clock=lambda: now[0])
    first = minted("mh-sim-1")
    assert token_subject(first) == "mh-sim-1"
    assert token_subject(minted("mh-sim-2")) == "mh-sim-2"
    now[0] += 1799
    assert minted("mh-sim-1") == first
    now[0] += 1
    assert minted("mh-sim-1") != first
    assert "eyJ" not in repr(minted)


# --------------------------------------------------------------------------
# Usage errors: one line, status 2, no token shown


def test_no_tokens_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .dt/keys here
    monkeypatch.delenv("DT_MH_TOKENS", raising=False)
    assert dt_main(["mh-sim"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "dt keys init" in err
    assert "DT_MH_TOKENS" in err


def test_env_tokens_must_be_one_per_mh_and_for_that_mh(
    keys: DevKeys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = keys.mh_token("mh-sim-1")
    monkeypatch.setenv("DT_MH_TOKENS", good)
    assert dt_main(["mh-sim", "--count", "2"]) == 2
    assert "1 tokens for 2 MHs" in capsys.readouterr().err
    monkeypatch.setenv("DT_MH_TOKENS", f"{good}, {keys.mh_token('mh-other')}")
    assert dt_main(["mh-sim", "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert "token 2 is not for mh-sim-2" in err
    assert "eyJ" not in err
    monkeypatch.setenv("DT_MH_TOKENS", "not-a-jwt")
    assert dt_main(["mh-sim"]) == 2
    assert "token 1 is not a JWT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--load", "spiky"], ["--count", "0"], ["--gc-url", "grpc://x:1"], ["--zones", ","]],
)
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        dt_main(["mh-sim", *argv])
    assert exited.value.code == 2


# --------------------------------------------------------------------------
# A real process against a real GC process

#: The interval the GC hands out in these tests (ms): short, to keep the
#: waits short.
REPORT_MS = 200
WAIT_S = 20.0
#: In the simulator's environment (:class:`PrintingRun`'s marker).
_MARKER_VARIABLE = "DT_TEST_MH_SIM_RUN"


@dataclass
class SimProcess(PrintingRun):
    """``dt mh-sim`` as a child process (:class:`PrintingRun`): its stdout,
    one JSON event a line, read in order; its log (stderr) waited on line
    by line as the reader thread takes it from the pipe."""

    @classmethod
    def start(cls, argv: list[str]) -> SimProcess:
        return cls.spawn(argv, child_environ({}), _MARKER_VARIABLE, name="mh-sim")

    def next_event(self, timeout: float = WAIT_S) -> dict[str, object]:
        """The next stdout line (bounded wait), which must be a JSON object."""
        line = self.read_until(r"^", timeout).string  # whatever the next line is
        event = json.loads(line)
        assert isinstance(event, dict), line
        return event

    def wait_log(self, event: str, fields: str = "") -> str:
        """The first log line of ``event`` (among those logged so far, or
        else the next ones) whose text also matches the regex ``fields``:
        a bounded wait on the pipe's reader, failing if the log ends first."""
        named = re.compile(rf"\bevent={re.escape(event)}\s")

        def matches(line: str) -> bool:
            return named.search(line) is not None and re.search(fields, line) is not None

        return self.wait_for_stderr(matches, f"event={event} {fields}".strip(), WAIT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for reader in self.readers:
            reader.join(timeout=10)


async def _rows(dsn: str) -> dict[str, tuple[str, str, int, object]]:
    rows = await fetch(
        dsn,
        "SELECT handler_id, health_status, zone, current_streams, registered_at"
        " FROM media_handlers",
    )
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until true, bounded."""
    with trio.move_on_after(WAIT_S):
        while True:
            if await check():
                return
            await trio.sleep(0.05)
    pytest.fail(f"{what} within {WAIT_S} s")


@pytest.mark.slow
@pytest.mark.dt_timeout(120)
async def test_dt_mh_sim_against_a_real_gc(
    clean_database: str, aio_loop: None, keys: DevKeys, tmp_path: Path
) -> None:
    environ = gc_environ(keys, clean_database, GC_LOAD_REPORT_MS=str(REPORT_MS))
    argv = [sys.executable, "-m", "darktower.cli", "mh-sim", "--count", "2", "--json"]
    argv += ["--id-prefix", "mh-t-", "--zones", "z1,z2", "--keys", str(keys.directory)]
    async with gc_process(environ, tmp_path, "gc") as gc:
        await gc.wait_ready()
        ports = (gc.http_port, gc.grpc_port)
        argv += ["--gc-url", f"http://127.0.0.1:{gc.grpc_port}", "--load", "constant:0.3"]
        sim = SimProcess.start(argv)
        try:
            await _run_scenario(sim, gc, clean_database, environ, tmp_path, ports)
        finally:
            sim.stop()


async def _run_scenario(
    sim: SimProcess,
    gc: GcProcess,
    dsn: str,
    environ: dict[str, str],
    tmp_path: Path,
    ports: tuple[int, int],
) -> None:
    # Registered, first reports taken: one ready line, with the GC's interval.
    ready = await trio.to_thread.run_sync(sim.next_event)
    assert ready["event"] == "ready"
    assert ready["mh_ids"] == ["mh-t-1", "mh-t-2"]
    assert ready["interval_s"] == REPORT_MS / 1000
    rows = await _rows(dsn)
    assert {k: v[:3] for k, v in rows.items()} == {
        "mh-t-1": ("healthy", "z1", 300),
        "mh-t-2": ("healthy", "z2", 300),
    }

    # Reports at the returned interval: over a window, about one per MH per
    # 200 ms (generous bounds: the machine is shared).
    metric = ("gc_heartbeats_total", {"kind": "mh_load_report", "result": "ok"})
    before, t0 = await gc.metric(metric[0], **metric[1]), time.monotonic()
    await trio.sleep(2.0)
    after, t1 = await gc.metric(metric[0], **metric[1]), time.monotonic()
    expected = 2 * (t1 - t0) / (REPORT_MS / 1000)
    assert 0.3 * expected <= after - before <= 1.2 * expected + 2

    # The GC forgets an MH: its next report is NOT_FOUND, it registers again.
    first_registered = rows["mh-t-1"][3]
    await fetch(dsn, "DELETE FROM media_handlers WHERE handler_id = 'mh-t-1'")

    async def registered_again() -> bool:
        row = (await _rows(dsn)).get("mh-t-1")
        return row is not None and row[0] == "healthy" and row[3] != first_registered

    await _eventually(registered_again, "mh-t-1 not registered again")
    # Logged before it registered again (read from the pipe: maybe not yet).
    await trio.to_thread.run_sync(sim.wait_log, "mh_not_registered", r"\shandler_id=mh-t-1\s")

    # The GC goes away: the simulator logs, retries and keeps running (a
    # fifth failed attempt in a row, about a second on); when a GC is back
    # on the same address, reports are taken again.
    assert await gc.stop() == 0
    await trio.to_thread.run_sync(sim.wait_log, "mh_load_report_failed", r"\sfailures=5\b")
    assert sim.proc.poll() is None
    async with gc_process(environ, tmp_path, "gc", ports=ports) as again:
        await again.wait_ready()

        async def reports_taken() -> bool:
            return await again.metric(metric[0], **metric[1]) >= 4

        await _eventually(reports_taken, "no reports after the GC came back")

        # SIGINT: exit 0 with a last line; no token anywhere in the output.
        sim.proc.send_signal(signal.SIGINT)
        status = await trio.to_thread.run_sync(lambda: sim.proc.wait(timeout=10))
        assert status == 0, sim.text()
        stopped = await trio.to_thread.run_sync(sim.next_event)
        assert stopped["event"] == "stopped"
        assert isinstance(stopped["reports"], int)
        assert stopped["reports"] > 10
        text = await trio.to_thread.run_sync(sim.rest)  # all of stdout and stderr
        assert "eyJ" not in text
        assert "Traceback" not in text
        await again.stop()


@pytest.mark.slow
@pytest.mark.dt_timeout(90)
@pytest.mark.parametrize("when", ["at once", "while registering"])
def test_sigterm_during_the_start_exits_0_without_a_traceback(keys: DevKeys, when: str) -> None:
    """SIGTERM from ``dt up`` may arrive while the simulator is still starting
    (imports, or retrying registration with a GC that is not there): it must
    end like Ctrl-C, never with an exception out of trio's internals."""
    argv = [sys.executable, "-m", "darktower.cli", "mh-sim", "--count", "1", "--json"]
    argv += ["--keys", str(keys.directory), "--gc-url", f"http://127.0.0.1:{free_port()}"]
    sim = SimProcess.start(argv)
    try:
        if when == "while registering":
            sim.wait_log("mh_registration_failed")
        sim.proc.send_signal(signal.SIGTERM)
        status = sim.proc.wait(timeout=20)
        text = sim.rest()  # all of stdout and stderr
        # Before the handler is installed (still importing) the default
        # action ends it: nothing had started, so nothing is left behind.
        expected = (0, -signal.SIGTERM) if when == "at once" else (0,)
        assert status in expected, text
        assert "Traceback" not in text
    finally:
        sim.stop()
