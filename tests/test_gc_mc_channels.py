"""The GC drops its cached channel to an MC that is no longer live, or that
moved (SPEC §6.3: MC channels are cached per endpoint and "dropped when an MC
is unhealthy or its endpoint changes") - through the app's own wiring.

A whole GC runs in-process (:func:`gc_harness.running_gc`); its
:class:`McClient` is private to :func:`darktower.gc.app.run_gc`, so the
channels are observed from the MC side: a fake MC (:mod:`mc_fakes`) counts the
TCP connections it accepted and has open, and a channel the GC drops is a
connection the fake sees closed. Joins go over HTTP, as a client's do.

Time. The pruning runs every ``GC_HEALTH_CHECK_INTERVAL_S`` on trio's clock,
so the tests use ``mock_clock`` (no autojump) and jump to the tick: nothing
in the GC fires unless the test moves time, and nothing it waits for (HTTP,
gRPC, PostgreSQL on loopback) needs time to move. Liveness itself is judged
on the database clock, so MCs are made unhealthy or stale by writing their
rows. A channel the GC fails to drop at the tick fails the test within
seconds (:func:`gc_fleet.virtually_within`), not at the harness's limit.
"""

from __future__ import annotations

import uuid
from functools import partial

import asyncpg
import httpx
import pytest
import trio
import trio.testing
from gc_fleet import ORG, add_mc, add_mh, fakes, jump_and_settle, new_meeting, virtually_within
from gc_harness import DevKeys, gc_environ, running_gc
from mc_fakes import ACCEPT

from darktower.shared import tokens
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys

#: The GC's health-check interval, which is also its channel-pruning interval.
INTERVAL_S = 2.0


def user_headers(keys: DevKeys, org: uuid.UUID = ORG) -> dict[str, str]:
    token = tokens.mint_user_token(
        keys.private_key, kid=keys.kid, user_id="user-1", org_id=str(org)
    )
    return {"Authorization": f"Bearer {token}"}


async def http_join(http: httpx.AsyncClient, keys: DevKeys, code: str) -> str:
    """Join over HTTP; the id of the MC the GC answered with."""
    response = await http.get(f"/api/v1/meetings/{code}", headers=user_headers(keys))
    assert response.status_code == 200, response.text
    mc_id: str = response.json()["mc"]["id"]
    return mc_id


def gc_env(keys: DevKeys, database_dsn: str) -> dict[str, str]:
    return gc_environ(keys, database_dsn, GC_HEALTH_CHECK_INTERVAL_S=str(INTERVAL_S))


def http_client(port: int) -> httpx.AsyncClient:
    """A connection per request: no idle keep-alive connection meets a
    server-side timer the clock jumps past."""
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_keepalive_connections=0)
    )


@pytest.mark.dt_timeout(30)
async def test_channels_of_mcs_no_longer_live_are_dropped_at_the_next_tick(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    """Three MCs, each with a cached channel after one join; one turns
    unhealthy, one stops heartbeating. At the next health-check tick (not
    before) the GC closes exactly those two channels; the live MC's channel
    stays and carries its next call (no new connection)."""
    async with fakes(None, ACCEPT, ACCEPT, ACCEPT) as (live, sick, stale):
        by_id = {"mc-live": live, "mc-sick": sick, "mc-stale": stale}
        start = trio.current_time()
        async with (
            running_gc(gc_env(keys, database_dsn)) as gc,
            http_client(gc.endpoints.http_port) as http,
        ):
            # The GC started without any timer firing: its ticks fall at
            # start + k * INTERVAL_S.
            assert trio.current_time() == start
            for mc_id, fake in by_id.items():
                # Room for one meeting: the load bump of a join fills it, so
                # three joins reach three different MCs.
                await add_mc(db_pool, mc_id, fake.endpoint, max_meetings=1)
            await add_mh(db_pool, "mh-a")
            told = [await http_join(http, keys, await new_meeting(db_pool)) for _ in by_id]
            assert sorted(told) == sorted(by_id)
            assert [(f.connections, f.open_connections) for f in by_id.values()] == [(1, 1)] * 3

            await run_aio(
                db_pool.execute,
                "UPDATE meeting_controllers SET health_status = 'unhealthy'"
                " WHERE controller_id = 'mc-sick'",
            )
            # GC_STALE_AFTER_S is 30 s by default (database clock).
            await run_aio(
                db_pool.execute,
                "UPDATE meeting_controllers SET last_heartbeat_at = now() - interval '31 seconds'"
                " WHERE controller_id = 'mc-stale'",
            )

            await jump_and_settle(mock_clock, INTERVAL_S - 0.001)
            assert [f.open_connections for f in by_id.values()] == [1, 1, 1]  # not yet
            mock_clock.jump(0.001)  # the tick

            async def both_closed() -> None:
                await sick.wait_for_open_connections(0)
                await stale.wait_for_open_connections(0)

            await virtually_within(mock_clock, INTERVAL_S / 2, both_closed)

            # The live MC's channel survived: with room again (a heartbeat),
            # it takes the next meeting over the same connection.
            await add_mc(db_pool, "mc-live", live.endpoint, max_meetings=1)
            assert await http_join(http, keys, await new_meeting(db_pool)) == "mc-live"
            assert (live.connections, live.open_connections, len(live.requests)) == (1, 1, 2)
            assert (sick.connections, stale.connections) == (1, 1)
            assert trio.current_time() - start == pytest.approx(INTERVAL_S)


@pytest.mark.dt_timeout(30)
async def test_channel_to_an_mc_that_moved_is_dropped_at_the_next_tick(
    db_pool: asyncpg.Pool, keys: DevKeys, database_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    """An MC re-registers at another endpoint (a restart on a new port): the
    GC closes the channel to the old endpoint at the next tick, without
    waiting for a call to notice, and calls the MC at its new endpoint."""
    async with (
        fakes(None, ACCEPT, ACCEPT) as (old, new),
        running_gc(gc_env(keys, database_dsn)) as gc,
        http_client(gc.endpoints.http_port) as http,
    ):
        await add_mc(db_pool, "mc-1", old.endpoint)
        await add_mh(db_pool, "mh-a")
        assert await http_join(http, keys, await new_meeting(db_pool)) == "mc-1"
        assert old.open_connections == 1

        await add_mc(db_pool, "mc-1", new.endpoint)  # registered again, elsewhere
        await jump_and_settle(mock_clock, INTERVAL_S - 0.001)
        assert old.open_connections == 1  # not yet
        mock_clock.jump(0.001)  # the tick
        await virtually_within(
            mock_clock, INTERVAL_S / 2, partial(old.wait_for_open_connections, 0)
        )
        assert new.connections == 0  # dropped by the pruning, not by a call

        assert await http_join(http, keys, await new_meeting(db_pool)) == "mc-1"
        assert (len(old.requests), len(new.requests)) == (1, 1)
        assert (old.connections, new.connections) == (1, 1)
