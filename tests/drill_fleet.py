"""A running fleet for the failure drills (issue 5, SPEC §10): GCs (one, or
several on one database), MCs and simulated MHs as real processes on
loopback over real PostgreSQL and Redis (the session's, or a drill's private
servers), open-loop join load over HTTP, and a watch over the GC's tables.

Shortened intervals. A drill must see detection, reassignment and recovery
in seconds, so :class:`DrillTiming` hands every process short staleness,
health-check, heartbeat and fencing intervals through the services' own
configuration variables - the same code paths as production, only faster.

Clocks. Everything a drill compares with the database is taken with
``time.time()``: PostgreSQL runs on this host, and its ``now()`` reads the
same system clock, so "this join was sent after the MC was marked unhealthy"
is a comparison on one clock. Durations inside the test process use it too
(a drill lasts seconds; the clock is not stepped meanwhile).

Open loop. :class:`JoinLoad` sends joins on a fixed schedule whatever the
answers do (each join is its own task), so a slow or failing GC shows up as
latency and errors instead of silently lowering the offered load.

One address for the GCs. An MC (and an MH) knows one GC address; in
production it is a load-balanced name in front of the region's GCs. A fleet
started with ``front=True`` gives them that: a :class:`GcFront` in the test
process, in front of every GC of the fleet.

Every wait here is a bounded poll of what the processes publish (database
rows, ``/metrics``, Redis, :func:`process_harness.eventually`), never a
sleep standing in for synchronisation.
"""

from __future__ import annotations

import functools
import itertools
import json
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import coredis
import httpx
import pytest
import trio
from gc_harness import DevKeys, gc_environ
from process_harness import (
    POLL_STEP_S,
    READY_WITHIN_S,
    GcProcess,
    child_environ,
    eventually,
    gc_process,
    mc_process,
    wait_all_ready,
)

from darktower.cli import mh_sim_cmd
from darktower.mc.repositories.meeting_state import MeetingStateStore
from darktower.shared import tokens
from darktower.shared.db import open_pool
from darktower.shared.seam import run_aio

#: The organisation and user the drills' meetings belong to.
ORG = uuid.UUID("55555555-5555-4555-8555-555555555555")
USER = "drill-user"
#: The GC of a fleet with one, and the MCs it has by default.
GC_ID = "gc-drill"
MC_IDS = ("mc-1", "mc-2", "mc-3")
MH_ID_PREFIX = "mh-drill-"
#: Bound on a fleet's start (processes ready, every node healthy): Python
#: imports of five processes on a shared 2-core machine.
START_WITHIN_S = 30.0
#: Bound on one join as the load generator waits for it (the GC's own
#: request deadline, ``GC_JOIN_TIMEOUT_S``, is shorter).
JOIN_CLIENT_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class DrillTiming:
    """Intervals for a drill, passed to the processes as configuration.

    The defaults satisfy the GC's own guard (``GcConfig.from_env``): one
    heartbeat interval plus 1.5 health-check ticks fit in the staleness
    threshold, so a live node is never marked; and the join deadline covers
    three MC attempts. A live MC's heartbeat is at most 0.5 s old, 2.5 s
    short of the threshold: room for a busy machine.
    """

    stale_after_s: float = 3.0
    health_check_interval_s: float = 0.5
    fast_heartbeat_ms: int = 500
    comprehensive_heartbeat_ms: int = 1500
    load_report_ms: int = 500
    #: How often an MC writes every hosted meeting through the fence.
    fence_check_interval_s: float = 0.5
    #: A stopped MC holds a join's call this long before the GC tries another.
    mc_rpc_timeout_s: float = 2.0
    join_timeout_s: float = 10.0
    #: Long enough that no meeting ends as empty during a drill (its end
    #: would be reported to the GC and change the assignments under test).
    empty_meeting_timeout_s: float = 600.0
    mc_max_meetings: int = 500

    @property
    def fast_heartbeat_s(self) -> float:
        return self.fast_heartbeat_ms / 1000

    def gc_overrides(self) -> dict[str, str]:
        return {
            "GC_STALE_AFTER_S": str(self.stale_after_s),
            "GC_HEALTH_CHECK_INTERVAL_S": str(self.health_check_interval_s),
            "GC_FAST_HEARTBEAT_MS": str(self.fast_heartbeat_ms),
            "GC_COMPREHENSIVE_HEARTBEAT_MS": str(self.comprehensive_heartbeat_ms),
            "GC_LOAD_REPORT_MS": str(self.load_report_ms),
            "GC_MC_RPC_TIMEOUT_S": str(self.mc_rpc_timeout_s),
            "GC_JOIN_TIMEOUT_S": str(self.join_timeout_s),
            # The drills create meetings as one user, as fast as they can.
            "GC_CREATES_PER_MINUTE": "1000000",
        }

    def mc_overrides(self) -> dict[str, str]:
        return {
            "MC_EMPTY_MEETING_TIMEOUT_S": str(self.empty_meeting_timeout_s),
            "MC_FENCE_CHECK_INTERVAL_S": str(self.fence_check_interval_s),
            "MC_DRAIN_TIMEOUT_S": "1",
            "MC_MAX_MEETINGS": str(self.mc_max_meetings),
        }


# --------------------------------------------------------------------------
# Rows, as the drills read them


@dataclass(frozen=True, slots=True)
class ControllerRow:
    controller_id: str
    health_status: str
    #: Database clock, as ``time.time()`` seconds.
    last_heartbeat_at: float
    updated_at: float
    current_meetings: int


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    meeting_id: str
    region: str
    controller_id: str
    generation: int
    ended: bool


_CONTROLLERS_SQL = """
SELECT controller_id, health_status, last_heartbeat_at, updated_at, current_meetings
FROM meeting_controllers
"""
_HANDLERS_SQL = "SELECT handler_id, health_status FROM media_handlers"
_ASSIGNMENTS_SQL = """
SELECT meeting_id, region, meeting_controller_id, generation, ended_at IS NOT NULL AS ended
FROM meeting_assignments
"""


@dataclass(frozen=True, slots=True)
class Meeting:
    meeting_id: str
    code: str


@dataclass(frozen=True, slots=True)
class JoinRecord:
    """One join as the client saw it. ``status`` 0: no HTTP answer
    (transport error or client timeout, named in ``error``)."""

    code: str
    meeting_id: str
    #: ``time.time()`` when the request was sent and when its answer (or
    #: failure) arrived: comparable with the database's timestamps.
    sent_at: float
    answered_at: float
    status: int
    mc_id: str | None
    #: The meeting's first join (it was created by the load just before).
    first: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


# --------------------------------------------------------------------------
# The fleet


class CreateFailed(Exception):
    """The GC did not create the meeting (its status and body)."""


@dataclass
class Fleet:
    """Running GCs, MCs (by id) and simulated MHs, with an HTTP client on
    the first GC and a database pool; trio-flavoured (inside ``aio_loop``)."""

    keys: DevKeys
    dsn: str
    redis_url: str
    timing: DrillTiming
    workdir: Path
    #: In the order they were given; the MHs report to the first.
    gcs: list[GcProcess]
    mcs: dict[str, GcProcess]
    mh_ids: tuple[str, ...]
    http: httpx.AsyncClient
    db: asyncpg.Pool
    #: Every meeting created through :meth:`create_meeting` (their Redis
    #: keys are deleted when the fleet stops).
    meetings: list[Meeting] = field(default_factory=list)
    #: What the MCs and MHs reach the GCs through, in a fleet started with
    #: ``front=True`` (else each MC reaches its own GC directly).
    front: GcFront | None = None

    @property
    def gc(self) -> GcProcess:
        """The first GC (the only one, in most drills)."""
        return self.gcs[0]

    def restarted_gc(self, gc: GcProcess) -> AbstractAsyncContextManager[GcProcess]:
        """GC ``gc`` (stopped) started again as it was: same id,
        configuration and ports, so its MCs and MHs reach it where they did."""
        environ = fleet_gc_environ(self.keys, self.dsn, gc.name, self.timing)
        return gc_process(environ, self.workdir, gc.name, ports=(gc.http_port, gc.grpc_port))

    def assert_all_running(self) -> None:
        """No GC or MC process has exited."""
        for process in [*self.gcs, *self.mcs.values()]:
            assert process.process.returncode is None, process.stderr()

    @functools.cached_property
    def user_token(self) -> str:
        """One user token for the whole drill (valid for an hour), as a client has."""
        return tokens.mint_user_token(
            self.keys.private_key, kid=self.keys.kid, user_id=USER, org_id=str(ORG)
        )

    def user_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.user_token}"}

    async def create_meeting(self, display_name: str = "Drill") -> Meeting:
        """Create a meeting over HTTP (:class:`CreateFailed` unless 201)."""
        response = await self.http.post(
            "/api/v1/meetings", json={"display_name": display_name}, headers=self.user_headers()
        )
        if response.status_code != 201:
            raise CreateFailed(f"{response.status_code} {response.text[:200]}")
        body = response.json()
        meeting = Meeting(body["meeting_id"], body["meeting_code"])
        self.meetings.append(meeting)
        return meeting

    async def join(self, meeting: Meeting, *, first: bool = False) -> JoinRecord:
        """One join over HTTP; never raises for what the GC answers."""
        sent = time.time()
        try:
            with trio.fail_after(JOIN_CLIENT_TIMEOUT_S):
                response = await self.http.get(
                    f"/api/v1/meetings/{meeting.code}", headers=self.user_headers()
                )
        except (httpx.TransportError, trio.TooSlowError) as exc:
            return JoinRecord(
                meeting.code, meeting.meeting_id, sent, time.time(), 0, None, first,
                type(exc).__name__,
            )  # fmt: skip
        answered = time.time()
        mc_id = None
        error = ""
        if response.status_code == 200:
            mc_id = response.json()["mc"]["id"]
        else:
            error = response.text[:200]
        return JoinRecord(
            meeting.code, meeting.meeting_id, sent, answered, response.status_code, mc_id, first,
            error,
        )  # fmt: skip

    async def controllers(self) -> dict[str, ControllerRow]:
        rows = await run_aio(self.db.fetch, _CONTROLLERS_SQL)
        return {
            row[0]: ControllerRow(row[0], row[1], row[2].timestamp(), row[3].timestamp(), row[4])
            for row in rows
        }

    async def handlers(self) -> dict[str, str]:
        return {row[0]: row[1] for row in await run_aio(self.db.fetch, _HANDLERS_SQL)}

    async def assignments(self) -> list[AssignmentRow]:
        rows = await run_aio(self.db.fetch, _ASSIGNMENTS_SQL)
        return [AssignmentRow(str(row[0]), row[1], row[2], row[3], row[4]) for row in rows]

    async def active_owners(self) -> dict[str, tuple[str, int]]:
        """meeting id → (MC, generation) of its active assignment."""
        return {
            row.meeting_id: (row.controller_id, row.generation)
            for row in await self.assignments()
            if not row.ended
        }

    async def fences(self, meeting_ids: Iterable[str]) -> dict[str, tuple[int | None, str | None]]:
        """Each meeting's generation and owner in Redis, as the MCs' fencing
        script left them (the MCs use no key prefix)."""
        redis: coredis.Redis[Any] = coredis.Redis.from_url(self.redis_url)
        async with redis:
            store = MeetingStateStore(redis)
            states = {meeting_id: await store.read(meeting_id) for meeting_id in meeting_ids}
        return {m: (state.generation, state.owner) for m, state in states.items()}

    async def hosting_problems(self, mc_ids: Iterable[str]) -> list[str]:
        """Where what the MCs hold disagrees with the GC's active assignments:
        each of ``mc_ids`` hosts exactly as many meetings as are assigned to
        it, and every active assignment's meeting is fenced in Redis under
        that MC and generation. Empty when one MC, and only one, holds each
        meeting."""
        owners = await self.active_owners()
        problems = []
        for mc_id in mc_ids:
            hosted = await self.mcs[mc_id].metric("mc_meetings")
            assigned = sum(1 for owner, _ in owners.values() if owner == mc_id)
            if hosted != assigned:
                problems.append(f"{mc_id} hosts {hosted:g} meetings, {assigned} assigned to it")
        fences = await self.fences(owners)
        for meeting_id, (owner, generation) in owners.items():
            fenced = fences[meeting_id]
            if fenced != (generation, owner):
                problems.append(
                    f"meeting {meeting_id}: assigned to {owner} at {generation}, Redis has {fenced}"
                )
        return problems


def fleet_gc_environ(keys: DevKeys, dsn: str, gc_id: str, timing: DrillTiming) -> dict[str, str]:
    return gc_environ(keys, dsn, GC_ID=gc_id, **timing.gc_overrides())


def grpc_url(gc: GcProcess) -> str:
    """Where ``gc``'s gRPC services are, as an MC or MH is told."""
    return f"http://127.0.0.1:{gc.grpc_port}"


def mc_environ(
    keys: DevKeys, gc_url: str, redis_url: str, mc_id: str, timing: DrillTiming
) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "GC_GRPC_URL": gc_url,
        "AUTH_JWKS": str(keys.jwks_path),
        "MC_SERVICE_TOKEN": keys.mc_token(mc_id),
        "MC_LOG_LEVEL": "INFO",
    } | timing.mc_overrides()


@asynccontextmanager
async def mh_sim_process(
    keys: DevKeys, gc_url: str, workdir: Path, count: int
) -> AsyncIterator[tuple[str, ...]]:
    """``dt mh-sim`` (its module, as ``dt up`` starts it) with ``count`` MHs
    ``mh-drill-1`` ... (zones round-robin) reporting to the GC at
    ``gc_url``; yields their ids once its ready line says the GC took every
    MH's first report. Stopped with SIGTERM (killed if it lingers)."""
    argv = mh_sim_cmd.command(
        gc_url=gc_url,
        count=count,
        keys_dir=keys.directory,
        id_prefix=MH_ID_PREFIX,
        log_level="WARNING",
    )
    stderr_path = workdir / "mh-sim.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            argv,
            env=child_environ({}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        line = b""
        with trio.move_on_after(READY_WITHIN_S):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                line += chunk
        if not line.endswith(b"\n"):
            pytest.fail(f"mh-sim not ready within {READY_WITHIN_S} s:\n{stderr_path.read_text()}")
        ready = json.loads(line.splitlines()[0])
        assert ready["event"] == "ready", ready
        yield tuple(ready["mh_ids"])
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(5, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()


#: Bytes read at once by :class:`GcFront` (heartbeats are far smaller).
_FRONT_CHUNK = 65536


class GcFront:
    """One address in front of several GCs, as a load-balanced name is in
    production: a TCP forwarder on loopback, run by the test process.

    Each connection made to :attr:`port` goes to the next GC in turn
    (round-robin over ``grpc_ports``) that accepts a connection, and its bytes
    are copied both ways unchanged (gRPC passes through); when the GC hangs
    up, so does the front. With no GC accepting, the connection is reset at
    once - a balancer with no live backend - so the caller's call fails
    (``GcUnavailable``, transport) and its next call tries again. A GC that
    comes back is reached by the first connection made after it listens.
    Trio-flavoured; serves until cancelled (:func:`gc_front`).
    """

    def __init__(self, grpc_ports: Sequence[int]) -> None:
        if not grpc_ports:
            raise ValueError("a front needs GCs behind it")
        self._ports = tuple(grpc_ports)
        self._turn = itertools.count()
        self.port = 0
        #: Connections handed to each GC port, and those reset for want of one.
        self.forwarded: Counter[int] = Counter()
        self.reset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._forward, listeners)
            task_status.started(self.port)

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client:
            upstream = await self._connect()
            if upstream is None:
                self.reset += 1
                # Linger 0: closing sends RST, not FIN.
                client.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)

    async def _connect(self) -> trio.SocketStream | None:
        first = next(self._turn)
        for n in range(len(self._ports)):
            port = self._ports[(first + n) % len(self._ports)]
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                continue
            self.forwarded[port] += 1
            return stream
        return None


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until either ends or breaks; then end both
    directions (``both`` is the connection's scope)."""
    try:
        while data := await source.receive_some(_FRONT_CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        both.cancel()


@asynccontextmanager
async def gc_front(grpc_ports: Sequence[int]) -> AsyncIterator[GcFront]:
    """A :class:`GcFront` over ``grpc_ports``, serving for the block."""
    front = GcFront(grpc_ports)
    async with trio.open_nursery() as nursery:
        await nursery.start(front.run)
        yield front
        nursery.cancel_scope.cancel()


async def _forget_meetings(redis_url: str, meeting_ids: Sequence[str]) -> None:
    redis: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with redis:
        store = MeetingStateStore(redis)
        for meeting_id in meeting_ids:
            await redis.delete(store.keys(meeting_id))


@asynccontextmanager
async def running_fleet(
    keys: DevKeys,
    dsn: str,
    redis_url: str,
    workdir: Path,
    *,
    mcs_by_gc: Mapping[str, Sequence[str]] | None = None,
    mh_count: int = 2,
    timing: DrillTiming = DrillTiming(),
    front: bool = False,
) -> AsyncIterator[Fleet]:
    """A GC for each id of ``mcs_by_gc`` (all on ``dsn``; by default
    :data:`GC_ID` alone, with :data:`MC_IDS`) and the MCs named there,
    pointing at it; ``mh_count`` simulated MHs (none: no simulator)
    reporting to the first GC. With ``front``, every MC and MH points at a
    :class:`GcFront` over all the GCs instead (:attr:`Fleet.front`; the
    grouping of ``mcs_by_gc`` then only orders the MCs' start, and the front
    spreads their connections). Each is a process; every MC and MH is
    ``healthy`` in the GC's database when the block begins. Processes still
    running at the end are killed; the Redis keys of the meetings created
    through :meth:`Fleet.create_meeting` are deleted once no MC is left to
    write them. Call inside ``aio_loop``; ``dsn`` an emptied database."""
    if mcs_by_gc is None:
        mcs_by_gc = {GC_ID: MC_IDS}
    created: list[Meeting] = []
    async with AsyncExitStack() as stack:

        async def forget() -> None:
            if created:
                with trio.move_on_after(10, shield=True):
                    await _forget_meetings(redis_url, [m.meeting_id for m in created])

        # First in, last out: runs after every process is gone.
        stack.push_async_callback(forget)
        gcs = [
            await stack.enter_async_context(
                gc_process(fleet_gc_environ(keys, dsn, gc_id, timing), workdir, gc_id)
            )
            for gc_id in mcs_by_gc
        ]
        await wait_all_ready(gcs)
        # Entered before the MCs: it still serves while they are stopped.
        the_front = (
            await stack.enter_async_context(gc_front([gc.grpc_port for gc in gcs]))
            if front
            else None
        )
        mcs: dict[str, GcProcess] = {}
        for gc, mc_ids in zip(gcs, mcs_by_gc.values(), strict=True):
            gc_url = the_front.url if the_front is not None else grpc_url(gc)
            for mc_id in mc_ids:
                environ = mc_environ(keys, gc_url, redis_url, mc_id, timing)
                mcs[mc_id] = await stack.enter_async_context(mc_process(environ, workdir, mc_id))
        await wait_all_ready(mcs.values())
        mh_ids: tuple[str, ...] = ()
        if mh_count:
            mh_url = the_front.url if the_front is not None else grpc_url(gcs[0])
            mh_ids = await stack.enter_async_context(
                mh_sim_process(keys, mh_url, workdir, mh_count)
            )
        # No connection floor: a drill that stops PostgreSQL must not have
        # this pool reconnecting (and logging) through the outage.
        db = await stack.enter_async_context(open_pool(dsn, min_size=0, max_size=4))
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gcs[0].http_port}",
                timeout=JOIN_CLIENT_TIMEOUT_S,
                # Open loop: a request must never queue for a connection.
                limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
            )
        )
        fleet = Fleet(
            keys, dsn, redis_url, timing, workdir, gcs, mcs, mh_ids, http, db, created, the_front
        )

        async def all_healthy() -> bool:
            controllers = await fleet.controllers()
            handlers = await fleet.handlers()
            return {c: r.health_status for c, r in controllers.items()} == dict.fromkeys(
                mcs, "healthy"
            ) and handlers == dict.fromkeys(mh_ids, "healthy")

        await eventually(all_healthy, "every MC and MH healthy", within_s=START_WITHIN_S)
        yield fleet


async def assign_meetings(fleet: Fleet, count: int) -> dict[str, list[Meeting]]:
    """Create ``count`` meetings and join each once (its first join assigns
    it); the meetings by the MC each landed on."""
    by_mc: dict[str, list[Meeting]] = defaultdict(list)
    for n in range(count):
        meeting = await fleet.create_meeting(f"Drill {n}")
        record = await fleet.join(meeting, first=True)
        assert record.ok, record
        assert record.mc_id is not None
        by_mc[record.mc_id].append(meeting)
    return dict(by_mc)


# --------------------------------------------------------------------------
# Load


class JoinLoad:
    """Open-loop joins: ``rate_per_s`` joins a second, round-robin over a
    rotation of meetings, each join its own task (the schedule never waits
    for an answer). With ``new_meetings_per_s`` it also creates meetings at
    that rate, joins each at once (a first join: the GC assigns it) and adds
    it to the rotation - so the load always includes assignments, not only
    re-joins of assigned meetings. Every join is kept in :attr:`records`.
    """

    def __init__(
        self,
        fleet: Fleet,
        rotation: Sequence[Meeting],
        *,
        rate_per_s: float,
        new_meetings_per_s: float = 0.0,
    ) -> None:
        if not rotation or rate_per_s <= 0:
            raise ValueError("need meetings and a positive rate")
        self._fleet = fleet
        self.rotation = list(rotation)
        self._rate_per_s = rate_per_s
        self._new_meetings_per_s = new_meetings_per_s
        self.records: list[JoinRecord] = []
        #: Failures to create a meeting (status and body).
        self.create_errors: list[str] = []
        self._schedules = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Trio-flavoured: send until :meth:`stop`, then wait for the joins
        still in flight (each bounded by the client timeout) and return."""
        async with trio.open_nursery() as requests:
            task_status.started()
            with self._schedules:
                async with trio.open_nursery() as schedules:
                    schedules.start_soon(self._rejoins, requests)
                    if self._new_meetings_per_s > 0:
                        schedules.start_soon(self._first_joins, requests)

    def stop(self) -> None:
        """Send nothing more (joins in flight still finish)."""
        self._schedules.cancel()

    async def _rejoins(self, requests: trio.Nursery) -> None:
        start = trio.current_time()
        cursor = 0
        for n in itertools.count():
            # Missed slots (a stalled test process) are sent at once: the
            # schedule, not the answers, sets the offered load.
            await trio.sleep_until(start + n / self._rate_per_s)
            requests.start_soon(self._join, self.rotation[cursor])
            # A cursor, not n modulo the length: meetings appended meanwhile
            # are reached at the end of the round, and none is skipped.
            cursor = (cursor + 1) % len(self.rotation)

    async def _first_joins(self, requests: trio.Nursery) -> None:
        start = trio.current_time()
        for n in itertools.count(1):
            await trio.sleep_until(start + n / self._new_meetings_per_s)
            requests.start_soon(self._create_and_join, n)

    async def _join(self, meeting: Meeting, *, first: bool = False) -> None:
        self.records.append(await self._fleet.join(meeting, first=first))

    async def _create_and_join(self, n: int) -> None:
        try:
            meeting = await self._fleet.create_meeting(f"Drill load {n}")
        except (CreateFailed, httpx.TransportError) as exc:
            self.create_errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        await self._join(meeting, first=True)
        self.rotation.append(meeting)

    # -- reading the records ---------------------------------------------------

    def errors(self) -> list[JoinRecord]:
        return [r for r in self.records if not r.ok]

    def by_meeting(self) -> dict[str, list[JoinRecord]]:
        """Each meeting's joins in the order they were sent."""
        joins: dict[str, list[JoinRecord]] = defaultdict(list)
        for record in sorted(self.records, key=lambda r: r.sent_at):
            joins[record.meeting_id].append(record)
        return dict(joins)


@asynccontextmanager
async def open_loop_joins(
    fleet: Fleet,
    rotation: Sequence[Meeting],
    *,
    rate_per_s: float,
    new_meetings_per_s: float = 0.0,
) -> AsyncIterator[JoinLoad]:
    """A :class:`JoinLoad` running for the duration of the block; at its end
    the schedule stops and the joins in flight are awaited."""
    load = JoinLoad(fleet, rotation, rate_per_s=rate_per_s, new_meetings_per_s=new_meetings_per_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        try:
            yield load
        finally:
            load.stop()


def answers_going_back(joins: Sequence[JoinRecord], owners: Sequence[str]) -> list[str]:
    """Joins of one meeting that went back in time: ``owners`` are the MCs
    the meeting was assigned to, in order (:attr:`FleetWatch.history`); a
    join sent after another was answered with ``owners[i]`` must be answered
    with ``owners[i]`` or a later one. (Joins that overlap in time may see
    either side of a reassignment; a join that starts after an answer may
    not see the assignment before it.) An answer naming an MC the watch
    never saw assigned - an assignment replaced within one poll - cannot be
    placed in the order and is left out."""
    rank = {mc_id: n for n, mc_id in reversed(list(enumerate(owners)))}
    answered = [(r, r.mc_id) for r in joins if r.ok and r.mc_id in rank]
    problems = []
    for later, mc_id in answered:
        earlier = [(r, m) for r, m in answered if r.answered_at < later.sent_at]
        if not earlier:
            continue
        newest, newest_mc = max(earlier, key=lambda pair: rank[pair[1]])
        if rank[mc_id] < rank[newest_mc]:
            problems.append(
                f"meeting {later.meeting_id}: join sent at {later.sent_at:.3f} answered"
                f" {mc_id} after {newest_mc} had been answered at {newest.answered_at:.3f}"
            )
    return problems


# --------------------------------------------------------------------------
# Watching the tables


class FleetWatch:
    """Polls the GC's tables every ``step_s`` while a drill runs, and checks
    at every poll that no meeting has two active assignments, that a
    meeting's assignment is never ended or lost under the drill (``tracked``
    meetings, once assigned), and that a meeting only ever moves to a newer
    generation. Remembers when each MC was first seen in each health state.
    """

    def __init__(self, fleet: Fleet, *, step_s: float = POLL_STEP_S) -> None:
        self._fleet = fleet
        self._step_s = step_s
        self.polls = 0
        self.violations: list[str] = []
        #: (mc id, health) → (when this process first saw it, the row then).
        self.first_seen: dict[tuple[str, str], tuple[float, ControllerRow]] = {}
        #: Every change of an MC's health between polls: (when seen, the row).
        self.health_changes: list[tuple[float, ControllerRow]] = []
        self._health: dict[str, str] = {}
        #: meeting id → the (MC, generation) pairs it had, in order.
        self.history: dict[str, list[tuple[str, int]]] = defaultdict(list)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.poll()
        task_status.started()
        while True:
            await trio.sleep(self._step_s)
            await self.poll()

    @property
    def step_s(self) -> float:
        return self._step_s

    def seen(self, mc_id: str, health: str) -> tuple[float, ControllerRow] | None:
        """When this watch first saw ``mc_id`` in ``health``, and the row."""
        return self.first_seen.get((mc_id, health))

    def became(
        self, mc_id: str, health: str, *, after: float
    ) -> tuple[float, ControllerRow] | None:
        """The first change of ``mc_id`` to ``health`` seen after ``after``
        (this process's clock), and the row then: its ``updated_at`` is when
        the change was written (the sweep, or the heartbeat that made it)."""
        for seen_at, row in self.health_changes:
            if seen_at > after and row.controller_id == mc_id and row.health_status == health:
                return seen_at, row
        return None

    def meetings_of(self, mc_id: str) -> set[str]:
        """Meetings ever seen assigned to ``mc_id``."""
        return {m for m, owners in self.history.items() if any(o == mc_id for o, _ in owners)}

    async def poll(self) -> None:
        controllers = await self._fleet.controllers()
        rows = await self._fleet.assignments()
        now = time.time()
        self.polls += 1
        for controller in controllers.values():
            key = (controller.controller_id, controller.health_status)
            self.first_seen.setdefault(key, (now, controller))
            if self._health.get(controller.controller_id) != controller.health_status:
                self.health_changes.append((now, controller))
                self._health[controller.controller_id] = controller.health_status
        active: dict[str, list[AssignmentRow]] = defaultdict(list)
        for row in rows:
            if not row.ended:
                active[row.meeting_id].append(row)
            elif row.meeting_id in self.history:
                self.violations.append(f"assignment of {row.meeting_id} ended: {row}")
        for meeting_id, current in active.items():
            if len(current) > 1:
                self.violations.append(f"{meeting_id} has {len(current)} active assignments")
            row = current[0]
            owners = self.history[meeting_id]
            current_owner = (row.controller_id, row.generation)
            if owners and owners[-1] != current_owner and row.generation <= owners[-1][1]:
                self.violations.append(f"{meeting_id} went from {owners[-1]} to {current_owner}")
            if not owners or owners[-1] != current_owner:
                owners.append(current_owner)
        for meeting_id in self.history.keys() - active.keys():
            self.violations.append(f"{meeting_id} lost its active assignment")


@asynccontextmanager
async def watching(fleet: Fleet, *, step_s: float = POLL_STEP_S) -> AsyncIterator[FleetWatch]:
    """A :class:`FleetWatch` polling for the duration of the block, and once
    more at its end."""
    watch = FleetWatch(fleet, step_s=step_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        yield watch
        nursery.cancel_scope.cancel()
    await watch.poll()
