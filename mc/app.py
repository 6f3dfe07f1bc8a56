"""The Meeting Controller as one trio nursery tree (SPEC §7.1).

Start order: Redis (fail fast: the fencing script is loaded, so an
unreachable Redis stops the start), the meeting state store's batcher (every
fenced write goes through it), the actor tree, the gRPC server (so an
assignment arriving the moment the MC is registered finds it listening), the
HTTP endpoints, then the GC task. ``stop`` begins the drain of SPEC §7.5:
refuse new assignments (``DRAINING``, also in the next heartbeat), let hosted
meetings end within ``MC_DRAIN_TIMEOUT_S``, then cancel the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import coredis
import psutil
import trio

from darktower.mc.actors import EndReason, MeetingControllerActor, OnMeetingEnded
from darktower.mc.assignment import Assigner
from darktower.mc.assignment_service import POLICY, MeetingControllerService
from darktower.mc.capacity import CapacityLedger
from darktower.mc.config import McConfig
from darktower.mc.fencing_watch import FencingWatch
from darktower.mc.gc_client import GcClient, GcError, open_gc_client
from darktower.mc.gc_task import GcTask, GcTaskMetrics
from darktower.mc.http_app import create_app
from darktower.mc.metrics import (
    FENCED_OUT,
    GRPC_RPCS,
    MEETING_FAILURES,
    MEETING_STATE,
    MEETINGS,
    PARTICIPANTS,
    REGISTRY,
)
from darktower.mc.repositories.meeting_state import (
    MeetingStateError,
    MeetingStateStore,
    RedisUnavailable,
)
from darktower.protos import internal_pb2 as pb
from darktower.shared.grpc_server import GrpcServer
from darktower.shared.http_server import run_http
from darktower.shared.jwks import load_key_store, refresh_keys_periodically
from darktower.shared.logging import get_logger
from darktower.shared.seam import asyncio_loop
from darktower.shared.tokens import TokenValidator

log = get_logger(__name__)

_REDIS_PING_TIMEOUT_S = 2.0
_REDIS_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class McEndpoints:
    grpc_port: int
    http_port: int


def _health(ledger: CapacityLedger) -> int:
    if ledger.draining:
        return pb.DRAINING
    return pb.HEALTHY if ledger.healthy else pb.UNHEALTHY


def _system_usage() -> tuple[float, float]:
    """Host CPU (since the previous call) and memory, in percent."""
    return psutil.cpu_percent(interval=None), psutil.virtual_memory().percent


async def run_mc(
    config: McConfig,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[McEndpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Trio-flavoured: run the MC until cancelled, or until ``stop`` is set
    (then drain, bounded, and return)."""
    key_store = await load_key_store(config.auth_jwks)
    validator = TokenValidator(key_store)
    # Bounded connects and replies: a blackholed Redis fails the start, and a
    # half-open connection cannot stall a claim or the fencing watch.
    redis: coredis.Redis[Any] = coredis.Redis.from_url(
        config.redis_url.reveal(),
        connect_timeout=_REDIS_TIMEOUT_S,
        stream_timeout=_REDIS_TIMEOUT_S,
    )
    async with redis:
        store = MeetingStateStore(redis)
        await store.load_scripts()
        MEETING_STATE.source = store.statistics
        ledger = CapacityLedger(config.max_meetings, config.max_participants)
        MEETINGS.set_function(lambda: ledger.snapshot().meetings)
        PARTICIPANTS.set_function(lambda: ledger.snapshot().participants)
        async with (
            asyncio_loop(),
            open_gc_client(config.gc_grpc_url, config.service_token) as gc_client,
            trio.open_nursery() as nursery,
        ):
            # First: the assignments, the fencing watch and ending meetings
            # all write through its batcher.
            await nursery.start(store.run)
            controller = MeetingControllerActor(
                ledger,
                on_meeting_ended=_meeting_ended(store, gc_client, config.region, config.mc_id),
                empty_meeting_timeout_s=config.empty_meeting_timeout_s,
                count_meeting_failed=MEETING_FAILURES.inc,
                count_fenced_out=FENCED_OUT.inc,
            )
            await nursery.start(controller.run)
            assigner = Assigner(
                mc_id=config.mc_id, ledger=ledger, store=store, controller=controller
            )
            grpc = GrpcServer(
                [MeetingControllerService(assigner)],
                validator=validator,
                policy=POLICY,
                rpc_counter=GRPC_RPCS,
            )
            grpc_port = await nursery.start(grpc.run, config.grpc_addr)
            gc_task = GcTask(
                gc_client,
                pb.RegisterMCRequest(
                    id=config.mc_id,
                    region=config.region,
                    grpc_endpoint=config.grpc_endpoint,
                    webtransport_endpoint=config.webtransport_endpoint,
                    max_meetings=config.max_meetings,
                    max_participants=config.max_participants,
                ),
                load=ledger.snapshot,
                health=lambda: _health(ledger),
                system_usage=_system_usage,
                metrics=GcTaskMetrics(REGISTRY),
            )

            async def redis_ping() -> bool:
                with trio.move_on_after(_REDIS_PING_TIMEOUT_S):
                    try:
                        return bool(await redis.ping())
                    except coredis.exceptions.RedisError:
                        return False
                return False

            http_port = await nursery.start(
                run_http,
                create_app(
                    redis_ping=redis_ping,
                    registered=lambda: gc_task.registered,
                    draining=lambda: ledger.draining,
                ),
                config.http_addr,
            )
            await nursery.start(gc_task.run)
            watch = FencingWatch(
                mc_id=config.mc_id,
                store=store,
                controller=controller,
                interval_s=config.fence_check_interval_s,
            )
            await nursery.start(watch.run)
            nursery.start_soon(refresh_keys_periodically, key_store)
            log.info(
                "mc_started",
                mc_id=config.mc_id,
                region=config.region,
                grpc_port=grpc_port,
                http_port=http_port,
            )
            task_status.started(McEndpoints(grpc_port, http_port))
            if stop is not None:
                await stop.wait()
                controller.drain()
                log.info("mc_draining", meetings=ledger.snapshot().meetings)
                # Tell the GC now (SPEC §7.5), not at the next tick.
                await gc_task.report_now()
                ended = await controller.wait_all_ended(config.drain_timeout_s)
                log.info("mc_drained", all_meetings_ended=ended)
                nursery.cancel_scope.cancel()


def _meeting_ended(
    store: MeetingStateStore, gc_client: GcClient, region: str, mc_id: str
) -> OnMeetingEnded:
    async def meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        """Release the meeting's Redis state (fenced: a newer owner's state is
        untouched; the generation stays as a tombstone) and tell the GC it
        ended here, under ``generation`` (SPEC §7.4; the GC ends only an
        assignment not newer than that, so a late report cannot end a later
        assignment of the meeting to this MC). Failures are logged: the
        tombstone's absence only leaves keys a newer claim takes over, and
        the GC's cleanup ends stale assignments anyway. A meeting fenced out
        is not released: its state is the new owner's (the fenced release
        would be refused anyway; skipping it saves a Redis round trip per
        fenced-out meeting)."""
        if reason != EndReason.FENCED_OUT:
            try:
                released = await store.release(meeting_id, generation, mc_id)
                log.info(
                    "meeting_state_released",
                    meeting_id=meeting_id,
                    outcome=released.outcome.value,
                )
            except (RedisUnavailable, MeetingStateError) as exc:
                log.warning("meeting_state_release_failed", meeting_id=meeting_id, error=str(exc))
        try:
            await gc_client.notify_meeting_ended(
                pb.NotifyMeetingEndedRequest(
                    meeting_id=meeting_id, region=region, generation=generation
                )
            )
        except GcError as exc:
            log.warning("notify_meeting_ended_failed", meeting_id=meeting_id, error=str(exc))

    return meeting_ended
