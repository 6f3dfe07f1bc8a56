"""The GC's MC client (gc/mc_client.py) against fake MCs over loopback.

Time. Inside trio-asyncio the asyncio loop's clock *is* trio's
(``trio_asyncio`` ``BaseTrioEventLoop.time`` reads the runner's clock), so
grpclib's deadline timer and our connect/RPC timeouts all follow a
``MockClock``. The timing tests use ``mock_clock`` without autojump and move
time by explicit jumps once the call is known to be waiting (the fake has the
request, or every task is blocked): autojump would also jump while loopback
I/O is merely in flight. That gives exact assertions ("not at 9.999 s, at
10 s") and no wall-clock sleeps. Tests on the real clock carry a trio-clock
guard; mock-clock tests rely on the harness's wall-clock limit.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import asyncpg
import pytest
import trio
import trio.testing
from gc_fleet import add_mc, add_mh
from grpclib.const import Status
from grpclib.protocol import Connection
from mc_fakes import (
    ACCEPT,
    DISCONNECT,
    STALL,
    Delay,
    Fail,
    FakeMc,
    HugePrefix,
    Oversize,
    Reject,
    Script,
    fake_mc,
    refused_endpoint,
    silent_endpoint,
    unanswered_endpoint,
)

from darktower.gc import mc_client
from darktower.gc.join_flow import JoinService
from darktower.gc.mc_client import MAX_REPLY_BYTES, AssignOutcome, McClient
from darktower.gc.metrics import MC_RPCS
from darktower.gc.repositories import meetings
from darktower.protos import internal_pb2 as pb
from darktower.shared.config import Secret
from darktower.shared.gc_calls import is_closed_connection
from darktower.shared.seam import run_aio

TOKEN = "gc-service-token-for-tests"
GUARD_S = 20
#: Calls against a resetting peer: with about a quarter of them hitting
#: grpclib's closed connection, a regression shows with certainty.
RESET_CALLS = 50
REQUEST = pb.AssignMeetingWithMhRequest(
    meeting_id="0b5c7a4e-0000-4000-8000-000000000001",
    mh_assignments=[
        pb.MhAssignment(
            mh_id="mh-1", webtransport_endpoint="https://127.0.0.1:4434", role=pb.MH_ROLE_PRIMARY
        ),
        pb.MhAssignment(
            mh_id="mh-2", webtransport_endpoint="https://127.0.0.1:4435", role=pb.MH_ROLE_BACKUP
        ),
    ],
    requesting_gc_id="gc-test",
    generation=42,
)


@asynccontextmanager
async def open_client(token: str | Secret = TOKEN, **timeouts: float) -> AsyncIterator[McClient]:
    client = McClient(token, **timeouts)
    try:
        yield client
    finally:

        async def close() -> None:
            client.close()

        with trio.move_on_after(2, shield=True):
            await run_aio(close)


@pytest.fixture
async def client(aio_loop: None) -> AsyncIterator[McClient]:
    async with open_client() as client:
        yield client


async def assign(client: McClient, endpoint: str, controller_id: str = "mc-1") -> AssignOutcome:
    return await run_aio(
        client.assign, controller_id=controller_id, endpoint=endpoint, request=REQUEST
    )


async def started_call(
    nursery: trio.Nursery, client: McClient, endpoint: str
) -> list[AssignOutcome]:
    """Start ``assign`` in the background; its outcome lands in the list."""
    outcomes: list[AssignOutcome] = []

    async def call() -> None:
        outcomes.append(await assign(client, endpoint))

    nursery.start_soon(call)
    return outcomes


# --- answers ---------------------------------------------------------------------------------


async def test_accepted_call_carries_request_token_and_deadline(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(ACCEPT, expected_token=TOKEN) as mc:
            outcome = await assign(client, mc.endpoint)
    assert outcome == AssignOutcome(accepted=True, reason="", status="ok")
    assert mc.requests == [REQUEST]
    assert mc.authorizations == [f"Bearer {TOKEN}"]
    # grpc-timeout tells the MC how long the GC waits (SPEC §6.3: 10 s).
    (timeout,) = mc.timeouts
    assert timeout is not None
    assert 9.0 < timeout <= 10.0


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (pb.REJECTION_REASON_AT_CAPACITY, "at_capacity"),
        (pb.REJECTION_REASON_DRAINING, "draining"),
        (pb.REJECTION_REASON_UNHEALTHY, "unhealthy"),
        (pb.REJECTION_REASON_UNSPECIFIED, "unspecified"),
    ],
)
async def test_rejection_is_an_outcome_with_its_reason(
    client: McClient, reason: pb.RejectionReason.ValueType, expected: str
) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(Reject(reason)) as mc:
            outcome = await assign(client, mc.endpoint)
    assert outcome == AssignOutcome(accepted=False, reason=expected, status="rejected")


@pytest.mark.parametrize(
    "status",
    [Status.UNAVAILABLE, Status.INTERNAL, Status.PERMISSION_DENIED, Status.RESOURCE_EXHAUSTED],
)
async def test_grpc_error_is_its_status_name_and_keeps_the_channel(
    client: McClient, status: Status
) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(Script(Fail(status), ACCEPT)) as mc:
            outcome = await assign(client, mc.endpoint)
            assert outcome == AssignOutcome(accepted=False, reason="", status=status.name.lower())
            # The MC answered over a healthy connection: nothing to drop.
            assert client.channel_count() == 1
            assert (await assign(client, mc.endpoint)).accepted
    assert mc.connections == 1


async def test_wrong_token_is_unauthenticated(aio_loop: None) -> None:
    with trio.fail_after(GUARD_S):
        async with open_client("another-token") as client, fake_mc(expected_token=TOKEN) as mc:
            outcome = await assign(client, mc.endpoint)
    assert outcome.status == "unauthenticated"
    assert mc.authorizations == ["Bearer another-token"]


async def test_token_never_shows(aio_loop: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="darktower")
    async with open_client(Secret(TOKEN)) as client, fake_mc(expected_token=TOKEN) as mc:
        with trio.fail_after(GUARD_S):
            assert (await assign(client, mc.endpoint)).accepted
            with refused_endpoint() as refused:
                await assign(client, refused, controller_id="mc-2")
            await assign(client, "http://[::1", controller_id="mc-3")
        assert TOKEN not in repr(client)
    assert caplog.records  # the bad endpoint was logged...
    assert TOKEN not in caplog.text  # ...without the token
    assert mc.authorizations == [f"Bearer {TOKEN}"]


# --- channels --------------------------------------------------------------------------------


async def test_calls_to_one_controller_reuse_one_connection(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(expected_token=TOKEN) as mc:
            for _ in range(3):
                assert (await assign(client, mc.endpoint)).accepted
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(assign, client, mc.endpoint)
            await mc.wait_for_requests(13)
    assert mc.connections == 1
    assert client.channel_count() == 1
    # The token goes with every call, not only the first on a connection.
    assert mc.authorizations == [f"Bearer {TOKEN}"] * 13


async def test_one_channel_per_controller(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc() as mc1, fake_mc() as mc2:
            for _ in range(2):
                assert (await assign(client, mc1.endpoint, "mc-1")).accepted
                assert (await assign(client, mc2.endpoint, "mc-2")).accepted
            assert client.channel_count() == 2
    assert (mc1.connections, mc2.connections) == (1, 1)
    assert (len(mc1.requests), len(mc2.requests)) == (2, 2)


async def test_endpoint_change_replaces_the_channel(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc() as old, fake_mc() as new:
            assert (await assign(client, old.endpoint)).accepted
            # mc-1 re-registered somewhere else.
            assert (await assign(client, new.endpoint)).accepted
            assert client.channel_count() == 1
            await old.wait_for_open_connections(0)  # the old channel was closed
            assert (await assign(client, new.endpoint)).accepted
    assert (len(old.requests), len(new.requests)) == (1, 2)
    assert (old.connections, new.connections) == (1, 1)


async def test_transport_failure_drops_the_channel(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(Script(DISCONNECT, ACCEPT)) as mc:
            outcome = await assign(client, mc.endpoint)
            assert outcome == AssignOutcome(accepted=False, reason="", status="unavailable")
            assert client.channel_count() == 0
            assert (await assign(client, mc.endpoint)).accepted
            assert client.channel_count() == 1
    assert mc.connections == 2


async def test_a_peer_that_accepts_and_resets_is_unavailable(client: McClient) -> None:
    """An MC (or what answers at its address) that accepts and at once
    resets. Some of those resets land between grpclib's connect and its
    request, where grpclib 0.4 fails with an ``AttributeError`` of its closed
    connection: transport trouble like a refused or reset connection, never
    an ``unknown`` answer (how many take that path depends on timing: the
    mapping itself is pinned by the next test)."""

    async def reset(stream: trio.SocketStream) -> None:
        # Linger 0: closing sends RST.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, reset, 0, host="127.0.0.1"))
        endpoint = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        with trio.fail_after(GUARD_S):
            for _ in range(RESET_CALLS):
                outcome = await assign(client, endpoint)
                assert outcome == AssignOutcome(accepted=False, reason="", status="unavailable")
                assert client.channel_count() == 0  # dropped, as after any transport failure
        nursery.cancel_scope.cancel()


def closed_connection_error(name: str = "_transport", obj: object | None = None) -> AttributeError:
    """What grpclib 0.4 raises for a stream opened on a closed connection."""
    if obj is None:
        obj = object.__new__(Connection)
    return AttributeError(f"object has no attribute {name!r}", name=name, obj=obj)


def test_only_grpclibs_closed_connection_error_is_unavailable() -> None:
    unavailable = AssignOutcome(accepted=False, reason="", status="unavailable")
    unknown = AssignOutcome(accepted=False, reason="", status="unknown")
    assert is_closed_connection(closed_connection_error())
    assert mc_client._failure(closed_connection_error(), connecting=False) == unavailable
    assert mc_client._failure(closed_connection_error(), connecting=True) == unavailable
    # Another attribute, or another object's: a bug, not transport trouble.
    assert mc_client._failure(closed_connection_error(name="_h2"), connecting=False) == unknown
    assert mc_client._failure(closed_connection_error(obj=object()), connecting=False) == unknown


async def test_mc_back_on_the_same_port_is_reached_by_the_next_call(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc() as mc:
            assert (await assign(client, mc.endpoint)).accepted
            port = mc.port
        assert (await assign(client, mc.endpoint)).status == "unavailable"  # MC down
        async with fake_mc(port=port) as back:
            assert (await assign(client, back.endpoint)).accepted


async def test_retain_closes_channels_of_controllers_not_live(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc() as mc1, fake_mc() as mc2:
            await assign(client, mc1.endpoint, "mc-1")
            await assign(client, mc2.endpoint, "mc-2")
            client.retain({"mc-1": mc1.endpoint, "mc-3": "http://127.0.0.1:1"})
            assert client.channel_count() == 1
            await mc2.wait_for_open_connections(0)
            assert mc1.open_connections == 1
            # Live, but at another endpoint now: the cached channel is stale.
            client.retain({"mc-1": "http://127.0.0.1:1"})
            assert client.channel_count() == 0
            await mc1.wait_for_open_connections(0)


async def test_dropped_channel_lets_calls_in_flight_finish(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    async with fake_mc(Delay(3, ACCEPT)) as mc:
        async with trio.open_nursery() as nursery:
            outcomes = await started_call(nursery, client, mc.endpoint)
            await mc.wait_for_requests(1)
            client.retain({})
            assert client.channel_count() == 0
            assert mc.open_connections == 1  # still carrying the call
            mock_clock.jump(3)
        assert outcomes == [AssignOutcome(accepted=True, reason="", status="ok")]
        await mc.wait_for_open_connections(0)  # the last call out closed the channel


async def test_close_closes_every_channel_and_refuses_later_calls(aio_loop: None) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc() as mc:
            async with open_client() as client:
                await assign(client, mc.endpoint)
            await mc.wait_for_open_connections(0)
            assert client.channel_count() == 0
            assert (await assign(client, mc.endpoint)).status == "unavailable"
    assert len(mc.requests) == 1


async def test_close_ends_calls_in_flight(
    aio_loop: None, mock_clock: trio.testing.MockClock
) -> None:
    async with fake_mc(STALL) as mc:
        async with open_client() as client, trio.open_nursery() as nursery:
            outcomes = await started_call(nursery, client, mc.endpoint)
            await mc.wait_for_requests(1)

            async def close() -> None:
                client.close()

            await run_aio(close)
        # No clock jump: the call ended because its connection was closed.
        assert outcomes == [AssignOutcome(accepted=False, reason="", status="unavailable")]
        await mc.wait_for_open_connections(0)


# --- time bounds -----------------------------------------------------------------------------


async def jump_and_settle(clock: trio.testing.MockClock, seconds: float) -> None:
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def test_stalling_mc_ends_at_the_rpc_deadline(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    async with fake_mc(STALL) as mc, trio.open_nursery() as nursery:
        start = trio.current_time()
        outcomes = await started_call(nursery, client, mc.endpoint)
        await mc.wait_for_requests(1)
        # The fake (grpclib) also enforces the grpc-timeout it received,
        # floored to the millisecond: whichever side ends the call first, it
        # is over at 10 s and not before 9.99 s.
        await jump_and_settle(mock_clock, 9.99)
        assert outcomes == []
        await jump_and_settle(mock_clock, 0.01)
    assert outcomes == [AssignOutcome(accepted=False, reason="", status="deadline_exceeded")]
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_silent_peer_ends_at_the_rpc_deadline(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    """TCP connects (so the connect timeout does not apply), HTTP/2 never answers."""
    with silent_endpoint() as endpoint:
        async with trio.open_nursery() as nursery:
            outcomes = await started_call(nursery, client, endpoint)
            await trio.testing.wait_all_tasks_blocked()
            await jump_and_settle(mock_clock, 9.999)
            assert outcomes == []
            await jump_and_settle(mock_clock, 0.001)
    assert outcomes == [AssignOutcome(accepted=False, reason="", status="deadline_exceeded")]
    assert client.channel_count() == 0  # a stalled MC and a dead link look alike


async def test_connect_that_never_completes_ends_at_the_connect_timeout(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    # Far from the clock's origin, so a deadline taken for a delay (or the
    # reverse) cannot pass for the right one.
    mock_clock.jump(100_000)
    with unanswered_endpoint() as endpoint:
        async with trio.open_nursery() as nursery:
            outcomes = await started_call(nursery, client, endpoint)
            await trio.testing.wait_all_tasks_blocked()
            await jump_and_settle(mock_clock, 4.999)
            assert outcomes == []
            await jump_and_settle(mock_clock, 0.001)
        assert outcomes == [AssignOutcome(accepted=False, reason="", status="unavailable")]
        assert client.channel_count() == 0


async def test_connect_is_bounded_by_the_rpc_deadline_too(
    aio_loop: None, mock_clock: trio.testing.MockClock
) -> None:
    async with open_client(rpc_timeout_s=2.0, connect_timeout_s=5.0) as client:
        with unanswered_endpoint() as endpoint:
            async with trio.open_nursery() as nursery:
                outcomes = await started_call(nursery, client, endpoint)
                await trio.testing.wait_all_tasks_blocked()
                await jump_and_settle(mock_clock, 1.999)
                assert outcomes == []
                await jump_and_settle(mock_clock, 0.001)
    assert outcomes == [AssignOutcome(accepted=False, reason="", status="deadline_exceeded")]


async def test_refused_connection_is_unavailable_at_once(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with refused_endpoint() as endpoint:
        for _ in range(3):  # and again: no backoff hidden anywhere
            outcome = await assign(client, endpoint)
            assert outcome == AssignOutcome(accepted=False, reason="", status="unavailable")
            assert client.channel_count() == 0
    assert trio.current_time() == start  # no timer had to fire


@pytest.mark.parametrize(
    "endpoint", ["ftp://127.0.0.1:1", "http://", "http://127.0.0.1:99999", "http://[::1", ""]
)
async def test_malformed_endpoint_is_unavailable(client: McClient, endpoint: str) -> None:
    outcome = await assign(client, endpoint)
    assert outcome == AssignOutcome(accepted=False, reason="", status="unavailable")
    assert client.channel_count() == 0


async def test_cancelling_the_caller_is_not_an_outcome(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    """Cancellation propagates (the join was abandoned); the channel stays."""
    async with fake_mc(STALL) as mc:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(assign, client, mc.endpoint)
                await mc.wait_for_requests(1)
                scope.cancel()
        assert scope.cancelled_caught
        assert client.channel_count() == 1
        mc.behaviour = ACCEPT
        assert (await assign(client, mc.endpoint)).accepted
    assert mc.connections == 1


async def test_fake_mc_is_what_it_claims(aio_loop: None) -> None:
    """The fake itself: scripts advance per call and their last step repeats."""
    script = Script(Reject(pb.REJECTION_REASON_DRAINING), ACCEPT)
    with trio.fail_after(GUARD_S):
        async with open_client() as client, fake_mc(script) as mc:
            statuses = [(await assign(client, mc.endpoint)).status for _ in range(3)]
    assert statuses == ["rejected", "ok", "ok"]
    assert script.used == 3
    assert isinstance(mc, FakeMc)


# --- reply size ------------------------------------------------------------------------------

_REPLY_TOO_LARGE = AssignOutcome(accepted=False, reason="", status="resource_exhausted")


async def test_a_reply_of_the_maximum_size_is_accepted(client: McClient) -> None:
    """64 KiB is more than the (minimum) HTTP/2 stream window the client
    opens: the window is reopened as the reply is read."""
    with trio.fail_after(GUARD_S):
        async with fake_mc(Oversize(MAX_REPLY_BYTES)) as mc:
            assert (await assign(client, mc.endpoint)).accepted
            assert client.channel_count() == 1


async def test_an_oversize_reply_is_a_failure_and_drops_the_channel(client: McClient) -> None:
    with trio.fail_after(GUARD_S):
        async with fake_mc(Script(Oversize(MAX_REPLY_BYTES + 1), ACCEPT)) as mc:
            assert await assign(client, mc.endpoint) == _REPLY_TOO_LARGE
            assert client.channel_count() == 0
            await mc.wait_for_open_connections(0)
            # The next call starts afresh.
            assert (await assign(client, mc.endpoint)).accepted
    assert mc.connections == 2


async def test_a_huge_announced_reply_is_refused_from_its_prefix(
    client: McClient, mock_clock: trio.testing.MockClock
) -> None:
    """The MC announces 4 GiB and sends a few bytes: the call ends at once,
    without reading (or waiting for) the body - no timer has to fire."""
    async with fake_mc(HugePrefix()) as mc:
        start = trio.current_time()
        assert await assign(client, mc.endpoint) == _REPLY_TOO_LARGE
        assert trio.current_time() == start
        assert client.channel_count() == 0
        await mc.wait_for_open_connections(0)


class _FirstChoice(random.Random):
    """Always draws the first (least loaded) candidate."""

    def random(self) -> float:
        return 0.0


async def test_a_join_excludes_an_mc_with_an_oversize_reply(
    db_pool: asyncpg.Pool, client: McClient
) -> None:
    """The join flow's view: an oversize reply is an MC failure like any
    other - that MC is excluded and the next one asked."""
    org = uuid.UUID("11111111-1111-4111-8111-111111111111")
    service = JoinService(
        db_pool,
        client,
        gc_id="gc-test",
        region="local",
        stale_after_s=30,
        lease_ttl_s=35,
        rng=_FirstChoice(),
    )
    with trio.fail_after(GUARD_S):
        async with fake_mc(Oversize(MAX_REPLY_BYTES + 1)) as bad, fake_mc(ACCEPT) as good:
            await add_mc(db_pool, "mc-bad", bad.endpoint, meetings_now=0)  # asked first
            await add_mc(db_pool, "mc-good", good.endpoint, meetings_now=10)
            await add_mh(db_pool, "mh-a")
            meeting = await run_aio(
                meetings.create,
                db_pool,
                org_id=org,
                created_by="user-1",
                display_name="Standup",
                allow_guests=False,
                max_participants=100,
            )
            refused = MC_RPCS.labels("resource_exhausted", "")._value.get()

            result = await run_aio(service.join, meeting.meeting_code, org)

    assert result.assignment.controller_id == "mc-good"
    assert (len(bad.requests), len(good.requests)) == (1, 1)
    assert MC_RPCS.labels("resource_exhausted", "")._value.get() == refused + 1
