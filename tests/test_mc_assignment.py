"""``AssignMeetingWithMh`` over real gRPC into a real MC core: capacity
ledger, fenced claim in real Redis, meeting actors (SPEC §7.2, §7.3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import pytest
import trio
from gc_harness import DevKeys, grpc_channel, metadata
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from darktower.mc.actors import MeetingControllerActor
from darktower.mc.assignment import Assigner
from darktower.mc.assignment_service import POLICY, MeetingControllerService
from darktower.mc.capacity import CapacityLedger
from darktower.mc.metrics import GRPC_RPCS
from darktower.mc.repositories.meeting_state import MeetingStateStore
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import HostPort
from darktower.shared.grpc_server import GrpcServer
from darktower.shared.jwks import KeyStore
from darktower.shared.seam import run_aio
from darktower.shared.tokens import TokenValidator

pytest_plugins = ("gc_fixtures",)  # keys

MC_ID = "mc-under-test"
GC_ID = "gc-1"


@dataclass
class RunningMc:
    ledger: CapacityLedger
    store: MeetingStateStore
    stub: internal_grpc.MeetingControllerServiceStub
    token: str
    ended: list[tuple[str, str]]


def mhs() -> list[pb.MhAssignment]:
    return [
        pb.MhAssignment(
            mh_id="mh-a", webtransport_endpoint="https://mh-a:4434", role=pb.MH_ROLE_PRIMARY
        ),
        pb.MhAssignment(
            mh_id="mh-b", webtransport_endpoint="https://mh-b:4434", role=pb.MH_ROLE_BACKUP
        ),
    ]


def request(meeting_id: str, generation: int, gc_id: str = GC_ID) -> pb.AssignMeetingWithMhRequest:
    return pb.AssignMeetingWithMhRequest(
        meeting_id=meeting_id, mh_assignments=mhs(), requesting_gc_id=gc_id, generation=generation
    )


@pytest.fixture
async def mc(
    aio_loop: None, keys: DevKeys, redis_server_url: str, redis_key_prefix: str
) -> AsyncIterator[RunningMc]:
    async with running_mc(keys, redis_server_url, redis_key_prefix) as running:
        yield running


@asynccontextmanager
async def running_mc(
    keys: DevKeys,
    redis_url: str,
    key_prefix: str,
    *,
    max_meetings: int = 100,
    max_participants: int = 10_000,
) -> AsyncIterator[RunningMc]:
    ended: list[tuple[str, str]] = []

    async def on_meeting_ended(meeting_id: str, generation: int, reason: str) -> None:
        ended.append((meeting_id, reason))

    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with client, trio.open_nursery() as nursery:
        ledger = CapacityLedger(max_meetings, max_participants)
        store = MeetingStateStore(client, key_prefix=key_prefix)
        await store.load_scripts()
        await nursery.start(store.run)
        controller = MeetingControllerActor(
            ledger, on_meeting_ended=on_meeting_ended, empty_meeting_timeout_s=300
        )
        await nursery.start(controller.run)
        assigner = Assigner(mc_id=MC_ID, ledger=ledger, store=store, controller=controller)
        server = GrpcServer(
            [MeetingControllerService(assigner)],
            validator=TokenValidator(KeyStore([str(keys.jwks_path)])),
            policy=POLICY,
            rpc_counter=GRPC_RPCS,
            drain_timeout_s=1,
        )
        port = await nursery.start(server.run, HostPort("127.0.0.1", 0))
        async with grpc_channel(port) as channel:
            stub = internal_grpc.MeetingControllerServiceStub(channel)
            yield RunningMc(ledger, store, stub, keys.gc_token(GC_ID), ended)
        nursery.cancel_scope.cancel()


async def assign(
    mc: RunningMc, req: pb.AssignMeetingWithMhRequest, token: str | None = None
) -> pb.AssignMeetingWithMhResponse:
    reply = await run_aio(mc.stub.AssignMeetingWithMh, req, metadata=metadata(token or mc.token))
    assert reply is not None
    return reply


async def test_an_accepted_assignment_is_stored_under_its_generation(mc: RunningMc) -> None:
    reply = await assign(mc, request("m-1", 7))
    assert (reply.accepted, reply.rejection_reason) == (True, pb.REJECTION_REASON_UNSPECIFIED)
    state = await mc.store.read("m-1")
    assert (state.generation, state.owner) == (7, MC_ID)
    payload = state.mh_assignments_json()
    assert isinstance(payload, list)
    assert [mh["mh_id"] for mh in payload] == ["mh-a", "mh-b"]
    assert mc.ledger.snapshot().meetings == 1


async def test_a_repeat_is_idempotent_and_a_newer_generation_updates(mc: RunningMc) -> None:
    assert (await assign(mc, request("m-1", 7))).accepted
    assert (await assign(mc, request("m-1", 7))).accepted  # a GC retry
    assert mc.ledger.snapshot().meetings == 1  # no second slot
    assert (await assign(mc, request("m-1", 9))).accepted
    assert (await mc.store.read("m-1")).generation == 9
    assert mc.ledger.snapshot().meetings == 1


async def test_an_older_generation_is_fenced_out_and_its_slot_released(mc: RunningMc) -> None:
    # Another MC holds the meeting at generation 5 already.
    await mc.store.claim("m-2", 5, "mc-other", [])
    reply = await assign(mc, request("m-2", 4))
    assert (reply.accepted, reply.rejection_reason) == (False, pb.REJECTION_REASON_UNSPECIFIED)
    reply = await assign(mc, request("m-2", 5))  # same generation, other owner
    assert not reply.accepted
    assert mc.ledger.snapshot().meetings == 0
    assert (await mc.store.read("m-2")).owner == "mc-other"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("draining", pb.REJECTION_REASON_DRAINING),
        ("unhealthy", pb.REJECTION_REASON_UNHEALTHY),
        ("meetings_full", pb.REJECTION_REASON_AT_CAPACITY),
        ("participants_full", pb.REJECTION_REASON_AT_CAPACITY),
    ],
)
async def test_each_rejection_reason(
    aio_loop: None,
    keys: DevKeys,
    redis_server_url: str,
    redis_key_prefix: str,
    setup: str,
    reason: int,
) -> None:
    max_meetings = 1 if setup == "meetings_full" else 100
    async with running_mc(
        keys, redis_server_url, redis_key_prefix, max_meetings=max_meetings, max_participants=15
    ) as mc:
        if setup == "draining":
            mc.ledger.set_draining()
        elif setup == "unhealthy":
            mc.ledger.set_health(False)
        else:
            assert (await assign(mc, request("m-first", 1))).accepted
            if setup == "participants_full":
                for _ in range(6):  # 6 + the 10 a new meeting is estimated at > 15
                    mc.ledger.add_participant("m-first")
        reply = await assign(mc, request("m-next", 2))
        assert (reply.accepted, reply.rejection_reason) == (False, reason)
        assert (await mc.store.read("m-next")).owner is None  # nothing claimed


async def test_100_concurrent_assignments_against_capacity_10_accept_exactly_10(
    aio_loop: None, keys: DevKeys, redis_server_url: str, redis_key_prefix: str
) -> None:
    async with running_mc(keys, redis_server_url, redis_key_prefix, max_meetings=10) as mc:
        accepted: list[str] = []

        async def one(n: int) -> None:
            reply = await assign(mc, request(f"m-{n:03d}", 1))
            if reply.accepted:
                accepted.append(f"m-{n:03d}")
            else:
                assert reply.rejection_reason == pb.REJECTION_REASON_AT_CAPACITY

        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(one, n)
        assert len(accepted) == 10
        assert mc.ledger.snapshot().meetings == 10
        owners = [(await mc.store.read(m)).owner for m in accepted]
        assert owners == [MC_ID] * 10


async def test_only_a_gc_acting_as_itself_may_assign(mc: RunningMc, keys: DevKeys) -> None:
    with pytest.raises(GRPCError) as wrong_kind:
        await assign(mc, request("m-3", 1), token=keys.mc_token("mc-x"))
    assert wrong_kind.value.status is Status.PERMISSION_DENIED
    with pytest.raises(GRPCError) as other_gc:
        await assign(mc, request("m-3", 1, gc_id="gc-2"))
    assert other_gc.value.status is Status.PERMISSION_DENIED
    with pytest.raises(GRPCError) as bad_id:
        await assign(mc, request("{m-3}", 1))
    assert bad_id.value.status is Status.INVALID_ARGUMENT
    assert "meeting_id" in (bad_id.value.message or "")
    with pytest.raises(GRPCError) as zero:
        await assign(mc, request("m-3", 0))
    assert zero.value.status is Status.INVALID_ARGUMENT
    assert mc.ledger.snapshot().meetings == 0
