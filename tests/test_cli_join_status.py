"""``dt status`` against a populated database and ``dt join`` against a real
in-process GC (with a fake MC where the join must assign), run as a user runs
them: ``dt``'s own ``main`` in a worker thread (it blocks, and ``dt status``
runs its own ``trio.run``), output captured."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import trio
from gc_harness import DevKeys, RunningGc
from mc_fakes import ACCEPT, fake_mc, refused_endpoint, silent_endpoint

from darktower.cli import join_cmd
from darktower.cli.__main__ import main as dt_main
from darktower.gc.registry_requests import McHeartbeat, McRegistration, MhLoadReport, MhRegistration
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers, meetings
from darktower.shared.jwks import KeyStore
from darktower.shared.seam import run_aio
from darktower.shared.tokens import (
    AUD_MC,
    SCOPE_MEETING_PARTICIPANT,
    TokenValidator,
    mint_user_token,
)

pytest_plugins = ("gc_fixtures",)  # keys, gc

ORG = uuid.UUID("6f1c1f0e-8d2a-4c55-9a39-0b4cfc1e2d11")
OTHER_ORG = uuid.UUID("0b7e3c55-1111-4a2b-8c3d-5e6f7a8b9c0d")


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own environment must not steer the commands."""
    for name in ("DATABASE_URL", "GC_STALE_AFTER_S", "DT_GC_URL", "DT_TOKEN"):
        monkeypatch.delenv(name, raising=False)


async def dt(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``dt ARGV`` in a worker thread: (exit status, stdout, stderr)."""
    status = await trio.to_thread.run_sync(dt_main, list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------
# Fleet set-up through the GC's repositories (back-dating is test-only SQL)


async def add_mc(
    pool: asyncpg.Pool,
    mc_id: str,
    *,
    health: str = "healthy",
    meetings_now: int = 0,
    participants: int = 0,
    grpc_endpoint: str = "http://127.0.0.1:50052",
) -> None:
    await run_aio(
        meeting_controllers.register,
        pool,
        McRegistration(mc_id, "local", grpc_endpoint, "https://127.0.0.1:4433", 100, 1000),
    )
    heartbeat = McHeartbeat(mc_id, meetings_now, participants, health, 12.0, 34.0)
    await run_aio(meeting_controllers.heartbeat_batch, pool, [heartbeat])


async def add_mh(pool: asyncpg.Pool, mh_id: str, zone: str, *, streams: int = 0) -> None:
    registration = MhRegistration(
        mh_id, "local", zone, f"https://{mh_id}.example:4434", "http://127.0.0.1:50060", 500
    )
    await run_aio(media_handlers.register, pool, registration)
    report = MhLoadReport(mh_id, streams, "healthy", 10.0, 20.0, 30.0)
    assert await run_aio(media_handlers.load_report, pool, report) is not None


async def backdate(pool: asyncpg.Pool, table: str, key: str, value: object, seconds: float) -> None:
    column = "assigned_at" if table == "meeting_assignments" else "last_heartbeat_at"
    status = await run_aio(
        pool.execute,
        f"UPDATE {table} SET {column} = now() - make_interval(secs => $2) WHERE {key} = $1",  # noqa: S608
        value,
        seconds,
    )
    assert status == "UPDATE 1"


async def add_assignment(
    pool: asyncpg.Pool, controller_id: str, primary: str, backup: str | None, generation: int
) -> uuid.UUID:
    """A meeting and its recorded assignment, the way the join flow makes them."""
    meeting = await run_aio(
        meetings.create,
        pool,
        org_id=ORG,
        created_by="u-1",
        display_name="Standup",
        allow_guests=False,
        max_participants=10,
    )
    holder = uuid.uuid4()
    # The lease, taken by an attempt's statement as the join flow takes it.
    start = await run_aio(
        assignments.begin_attempt,
        pool,
        meeting_id=meeting.meeting_id,
        region="local",
        holder=holder,
        gc_id="gc-test",
        ttl_s=30,
        stale_after_s=30,
    )
    assert start.taken
    outcome = await run_aio(
        assignments.record,
        pool,
        meeting_id=meeting.meeting_id,
        region="local",
        controller_id=controller_id,
        generation=generation,
        gc_id="gc-test",
        primary_mh_id=primary,
        backup_mh_id=backup,
        holder=holder,
        replaces=None,
        stale_after_s=30,
    )
    assert outcome.won
    return meeting.meeting_id


def row_of(lines: Sequence[str], first_cell: str) -> str:
    [line] = [line for line in lines if line.split() and line.split()[0] == first_cell]
    return line


def by_id(items: list[dict[str, Any]], key: str = "id") -> dict[str, dict[str, Any]]:
    return {item[key]: item for item in items}


# --------------------------------------------------------------------------
# dt status


async def test_status_shows_the_fleet_and_assignments(
    db_pool: asyncpg.Pool, database_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_mc(db_pool, "mc-1", meetings_now=2, participants=9)
    await add_mc(db_pool, "mc-2", health="unhealthy")
    await backdate(db_pool, "meeting_controllers", "controller_id", "mc-2", 120)
    await add_mh(db_pool, "mh-a", "zone-a", streams=4)
    await add_mh(db_pool, "mh-b", "zone-b")
    await backdate(db_pool, "media_handlers", "handler_id", "mh-b", 45)
    meeting_id = await add_assignment(db_pool, "mc-1", "mh-a", "mh-b", generation=7)
    await backdate(db_pool, "meeting_assignments", "meeting_id", meeting_id, 300)

    status, out, err = await dt(capsys, "status", "--database-url", database_dsn, "--json")
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["stale_after_s"] == 30
    mcs = by_id(doc["meeting_controllers"])
    assert set(mcs) == {"mc-1", "mc-2"}
    # The record bumped mc-1's meeting count (SPEC §6.3 step 7).
    assert mcs["mc-1"] | {"heartbeat_age_s": None, "last_heartbeat_at": None} == {
        "id": "mc-1",
        "region": "local",
        "health": "healthy",
        "current_meetings": 3,
        "max_meetings": 100,
        "current_participants": 9,
        "max_participants": 1000,
        "cpu_usage_percent": 12.0,
        "memory_usage_percent": 34.0,
        "grpc_endpoint": "http://127.0.0.1:50052",
        "webtransport_endpoint": "https://127.0.0.1:4433",
        "heartbeat_age_s": None,
        "last_heartbeat_at": None,
        "stale": False,
    }
    assert 0 <= mcs["mc-1"]["heartbeat_age_s"] < 10
    assert mcs["mc-2"]["health"] == "unhealthy"
    assert 119 <= mcs["mc-2"]["heartbeat_age_s"] < 130
    assert mcs["mc-2"]["stale"] is True
    mhs = by_id(doc["media_handlers"])
    assert (mhs["mh-a"]["zone"], mhs["mh-a"]["health"]) == ("zone-a", "healthy")
    assert (mhs["mh-a"]["current_streams"], mhs["mh-a"]["max_streams"]) == (5, 500)
    assert mhs["mh-a"]["stale"] is False
    assert 44 <= mhs["mh-b"]["heartbeat_age_s"] < 55
    assert mhs["mh-b"]["stale"] is True
    [assignment] = doc["assignments"]
    code = await run_aio(
        db_pool.fetchval, "SELECT meeting_code FROM meetings WHERE meeting_id = $1", meeting_id
    )
    assert assignment | {"assigned_at": None, "age_s": None} == {
        "meeting_id": str(meeting_id),
        "meeting_code": code,
        "region": "local",
        "controller_id": "mc-1",
        "generation": 7,
        "primary_mh_id": "mh-a",
        "backup_mh_id": "mh-b",
        "assigned_by_gc_id": "gc-test",
        "assigned_at": None,
        "age_s": None,
    }
    assert 299 <= assignment["age_s"] < 310
    assert doc["assignments_truncated"] is False
    datetime.fromisoformat(doc["now"]).astimezone(UTC)  # parses

    status, out, err = await dt(capsys, "status", "--database-url", database_dsn)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert "Meeting controllers: 2 (1 healthy, 1 unhealthy)" in lines
    assert "Media handlers: 2 (2 healthy)" in lines
    assert "Active assignments: 1" in lines
    mc_header = lines[lines.index("Meeting controllers: 2 (1 healthy, 1 unhealthy)") + 1]
    assert mc_header.split() == [
        "ID", "REGION", "HEALTH", "MEETINGS", "PARTICIPANTS", "CPU%", "MEM%", "HEARTBEAT",
    ]  # fmt: skip
    mc1, mc2 = row_of(lines, "mc-1"), row_of(lines, "mc-2")
    assert mc1.split()[:7] == ["mc-1", "local", "healthy", "3/100", "9/1000", "12", "34"]
    assert "STALE" not in mc1
    assert mc2.split()[2] == "unhealthy"
    assert mc2.endswith("s ago STALE")
    assert 119 <= int(mc2.split()[-3].rstrip("s")) < 130
    # Aligned: each column starts where its header does (numbers end there).
    assert mc1.index("healthy") == mc2.index("unhealthy") == mc_header.index("HEALTH")
    assert mc1.index("3/100") + len("3/100") == mc_header.index("MEETINGS") + len("MEETINGS")
    mha = row_of(lines, "mh-a")
    assert mha.split()[:5] == ["mh-a", "local", "zone-a", "healthy", "5/500"]
    assert row_of(lines, "mh-b").endswith("STALE")
    arow = row_of(lines, str(meeting_id))
    assert arow.split()[1:6] == [code, "local", "mc-1", "7", "mh-a,"]
    assert "mh-b" in arow
    assert "gc-test" in arow
    assert 299 <= int(arow.split()[-1].rstrip("s")) < 310

    # A looser threshold: nothing is stale any more.
    status, out, _ = await dt(
        capsys, "status", "--database-url", database_dsn, "--stale-after", "600"
    )
    assert status == 0
    assert "STALE" not in out


async def test_status_of_an_empty_fleet(
    db_pool: asyncpg.Pool,
    database_dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_dsn)  # the default source of the DSN
    status, out, err = await dt(capsys, "status")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "Meeting controllers: 0 (none)",
        "",
        "Media handlers: 0 (none)",
        "",
        "Active assignments: 0",
    ]
    status, out, _ = await dt(capsys, "status", "--json")
    assert status == 0
    doc = json.loads(out)
    assert (doc["meeting_controllers"], doc["media_handlers"], doc["assignments"]) == ([], [], [])


async def test_status_limits_the_assignment_list(
    db_pool: asyncpg.Pool,
    database_dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GC_STALE_AFTER_S", "5")
    await add_mc(db_pool, "mc-1")
    await add_mh(db_pool, "mh-a", "zone-a")
    ids = [await add_assignment(db_pool, "mc-1", "mh-a", None, generation=g) for g in (1, 2, 3)]
    for age, meeting_id in zip((30, 20, 10), ids, strict=True):
        await backdate(db_pool, "meeting_assignments", "meeting_id", meeting_id, age)

    status, out, _ = await dt(
        capsys, "status", "--database-url", database_dsn, "--limit", "2", "--json"
    )
    assert status == 0
    doc = json.loads(out)
    assert doc["stale_after_s"] == 5
    assert [a["generation"] for a in doc["assignments"]] == [3, 2]  # newest first
    assert doc["assignments"][0]["backup_mh_id"] is None
    assert doc["assignments_truncated"] is True
    status, out, _ = await dt(capsys, "status", "--database-url", database_dsn, "--limit", "2")
    assert "Active assignments: 2+ (newest 2 shown)" in out.splitlines()


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],  # no DSN at all
        ["status", "--database-url", "mysql://nope"],
    ],
)
def test_status_needs_a_postgresql_url(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert dt_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "postgresql://" in err


@pytest.mark.parametrize(
    "argv",
    [["--stale-after", "0"], ["--stale-after", "nan"], ["--limit", "0"], ["--limit", "x"]],
)
def test_status_option_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        dt_main(["status", "--database-url", "postgresql://x@127.0.0.1:1/x", *argv])
    assert excinfo.value.code == 2
    assert capsys.readouterr().out == ""


def test_status_bad_stale_after_in_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GC_STALE_AFTER_S", "-1")
    assert dt_main(["status", "--database-url", "postgresql://x@127.0.0.1:1/x"]) == 2
    assert "GC_STALE_AFTER_S" in capsys.readouterr().err


def test_status_reports_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    assert dt_main(["status", "--database-url", "postgresql://postgres@127.0.0.1:1/x"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: PostgreSQL is unreachable\n"


def test_status_of_a_database_without_the_schema_says_so(
    capsys: pytest.CaptureFixture[str], empty_database: str
) -> None:
    assert dt_main(["status", "--database-url", empty_database]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: the schema is not applied (run `dt db init`)\n"


# --------------------------------------------------------------------------
# dt join against a real GC


def gc_url(gc: RunningGc) -> str:
    return f"http://127.0.0.1:{gc.endpoints.http_port}"


def user_token(keys: DevKeys, org: uuid.UUID = ORG, sub: str = "u-1") -> str:
    return mint_user_token(keys.private_key, kid=keys.kid, user_id=sub, org_id=str(org))


async def test_join_creates_assigns_and_rejoins(
    gc: RunningGc,
    db_pool: asyncpg.Pool,
    keys: DevKeys,
    database_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fake_mc(ACCEPT) as mc:
        await add_mc(db_pool, "mc-1", grpc_endpoint=mc.endpoint)
        await add_mh(db_pool, "mh-a", "zone-a")
        await add_mh(db_pool, "mh-b", "zone-b", streams=100)

        status, out, err = await dt(
            capsys, "join", "--create", "Weekly sync", "--gc-url", gc_url(gc),
            "--keys", str(keys.directory), "--org", str(ORG), "--user", "u-1",
        )  # fmt: skip
        assert (status, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith("created meeting Weekly sync with code ")
        code = lines[0].rsplit(" ", 1)[1]
        assert lines[1] == "meeting         Weekly sync"
        assert lines[2] == f"  code          {code}"
        assert "controller      mc-1" in lines
        assert f"  grpc          {mc.endpoint}" in lines
        assert "  webtransport  https://127.0.0.1:4433" in lines
        assert "  primary  mh-a  https://mh-a.example:4434" in lines
        assert "  backup   mh-b  https://mh-b.example:4434" in lines
        assert any(line.startswith("meeting token   expires in 600 s (") for line in lines)
        assert "eyJ" not in out  # no token, neither the user's nor the meeting's
        assert len(mc.requests) == 1
        assert mc.requests[0].meeting_id == lines[3].split()[-1]

        # Again, by code, as JSON, with a token from $DT_TOKEN: the same assignment.
        token = user_token(keys, sub="u-2")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DT_TOKEN", token)
            env.setenv("DT_GC_URL", gc_url(gc) + "/")
            status, out, err = await dt(capsys, "join", code.upper(), "--json")
        assert (status, err) == (0, "")
        doc = json.loads(out)
        assert doc["meeting_code"] == code.upper()
        assert doc["display_name"] == "Weekly sync"
        assert doc["mc"]["id"] == "mc-1"
        assert [(m["id"], m["role"]) for m in doc["media_handlers"]] == [
            ("mh-a", "primary"),
            ("mh-b", "backup"),
        ]
        assert doc["expires_in"] == 600
        assert len(mc.requests) == 1  # reused, no second MC call
        validator = TokenValidator(KeyStore([str(keys.jwks_path)]))
        claims = validator.validate(doc["token"], audience=AUD_MC, scope=SCOPE_MEETING_PARTICIPANT)
        assert (claims.sub, claims.meeting_id) == ("u-2", doc["meeting_id"])
        assert token not in out

        status, out, _ = await dt(
            capsys, "join", code, "--gc-url", gc_url(gc), "--token", token, "--show-token"
        )
        assert status == 0
        [shown] = [line.split()[-1] for line in out.splitlines() if line.startswith("  token ")]
        meeting = validator.validate(shown, audience=AUD_MC, scope=SCOPE_MEETING_PARTICIPANT)
        assert meeting.meeting_id == doc["meeting_id"]

    # ... and dt status sees it.
    status, out, _ = await dt(capsys, "status", "--database-url", database_dsn, "--json")
    assert status == 0
    [assignment] = json.loads(out)["assignments"]
    assert (assignment["meeting_id"], assignment["controller_id"]) == (doc["meeting_id"], "mc-1")
    assert assignment["primary_mh_id"] == "mh-a"


async def test_join_of_an_unknown_meeting_is_exit_1_with_the_error_code(
    gc: RunningGc, keys: DevKeys, capsys: pytest.CaptureFixture[str]
) -> None:
    token = user_token(keys)
    status, out, err = await dt(capsys, "join", "abc-defg-hij", "--gc-url", gc_url(gc),
                                "--token", token)  # fmt: skip
    assert (status, out) == (1, "")
    assert err == "error: join failed: NOT_FOUND (HTTP 404): meeting not found\n"


async def test_join_of_another_orgs_meeting_is_not_found(
    gc: RunningGc, db_pool: asyncpg.Pool, keys: DevKeys, capsys: pytest.CaptureFixture[str]
) -> None:
    meeting = await run_aio(
        meetings.create, db_pool, org_id=OTHER_ORG, created_by="u-9", display_name="Theirs",
        allow_guests=False, max_participants=10,
    )  # fmt: skip
    status, _, err = await dt(capsys, "join", meeting.meeting_code, "--gc-url", gc_url(gc),
                              "--token", user_token(keys))  # fmt: skip
    assert status == 1
    assert "NOT_FOUND (HTTP 404)" in err


async def test_join_with_a_bad_token_is_unauthorized(
    gc: RunningGc, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = DevKeys.create(tmp_path / "stranger")  # a key the GC does not trust
    for token in ("not-a-jwt", user_token(stranger)):
        status, out, err = await dt(capsys, "join", "abc-defg-hij", "--gc-url", gc_url(gc),
                                    "--token", token)  # fmt: skip
        assert (status, out) == (1, "")
        assert err.startswith("error: join failed: UNAUTHORIZED (HTTP 401): ")
        assert token not in err
        assert err.count("\n") == 1


async def test_join_without_capacity_prints_retry_after(
    gc: RunningGc, keys: DevKeys, capsys: pytest.CaptureFixture[str]
) -> None:
    # The meeting is created, but there is no MH or MC to put it on: 503.
    status, out, err = await dt(
        capsys, "join", "--create", "Nobody home", "--gc-url", gc_url(gc),
        "--token", user_token(keys),
    )  # fmt: skip
    assert status == 1
    assert out.startswith("created meeting Nobody home with code ")
    assert err.startswith("error: join failed: SERVICE_UNAVAILABLE (HTTP 503): ")
    assert err.rstrip().endswith(" s")
    assert "; retry after " in err

    # With --json stdout stays empty (no document), and the new code is on stderr.
    status, out, err = await dt(
        capsys, "join", "--create", "Nobody home", "--gc-url", gc_url(gc),
        "--token", user_token(keys), "--json",
    )  # fmt: skip
    assert (status, out) == (1, "")
    created, error = err.splitlines()
    assert created.startswith("created meeting Nobody home with code ")
    assert error.startswith("error: join failed: SERVICE_UNAVAILABLE (HTTP 503): ")


async def test_join_create_errors_are_reported(
    gc: RunningGc, keys: DevKeys, capsys: pytest.CaptureFixture[str]
) -> None:
    join_only = mint_user_token(
        keys.private_key, kid=keys.kid, user_id="u-1", org_id=str(ORG), scopes=["meeting.join"]
    )
    status, out, err = await dt(capsys, "join", "--create", "X", "--gc-url", gc_url(gc),
                                "--token", join_only)  # fmt: skip
    assert (status, out) == (1, "")
    assert err.startswith("error: creating the meeting failed: FORBIDDEN (HTTP 403): ")


# --------------------------------------------------------------------------
# dt join: the network edge and usage errors (no GC needed)


async def test_join_refuses_to_follow_redirects(
    keys: DevKeys, capsys: pytest.CaptureFixture[str]
) -> None:
    """A redirect would carry the user token to wherever it points."""
    requests: list[bytes] = []

    async def redirect(stream: trio.SocketStream) -> None:
        requests.append(await stream.receive_some(65536))
        await stream.send_all(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/steal\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, redirect, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        status, out, err = await dt(capsys, "join", "abc-defg-hij", "--gc-url",
                                    f"http://127.0.0.1:{port}", "--token", "t0ken")  # fmt: skip
        nursery.cancel_scope.cancel()
    assert (status, out) == (1, "")
    assert err.startswith("error: join failed: HTTP_307 (HTTP 307): ")
    assert len(requests) == 1
    assert b"Authorization: Bearer t0ken" in requests[0]
    assert b"/api/v1/meetings/abc-defg-hij " in requests[0]


async def test_join_reports_an_unreachable_gc(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with refused_endpoint() as url:
        monkeypatch.setenv("DT_GC_URL", url)
        status, out, err = await dt(capsys, "join", "abc-defg-hij", "--token", "secret-token")
    assert (status, out) == (1, "")
    assert err.startswith(f"error: cannot reach the GC at {url}/api/v1/meetings/abc-defg-hij: ")
    assert "secret-token" not in err


async def test_join_gives_up_on_a_silent_gc(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(join_cmd, "JOIN_TIMEOUT_S", 0.2)
    with silent_endpoint() as url:
        status, _, err = await dt(capsys, "join", "abc-defg-hij", "--gc-url", url, "--token", "t")
        assert status == 1
        assert err.rstrip().endswith("no answer within 0.2 s")
        status, _, err = await dt(
            capsys, "join", "abc-defg-hij", "--gc-url", url, "--token", "t", "--timeout", "0.1"
        )
        assert status == 1
        assert err.rstrip().endswith("no answer within 0.1 s")


async def test_join_deadline_bounds_a_trickling_gc(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that keeps sending a byte now and then never trips a
    per-read timeout; the deadline covers the whole exchange."""
    monkeypatch.setattr(join_cmd, "JOIN_TIMEOUT_S", 0.3)

    async def trickle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n")
        while True:
            await stream.send_all(b"X")
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, trickle, 0, host="127.0.0.1")
        )
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        started = trio.current_time()
        status, _, err = await dt(capsys, "join", "abc-defg-hij", "--gc-url", url, "--token", "t")
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert status == 1
    assert err.rstrip().endswith("no answer within 0.3 s")
    assert elapsed < 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token", "t"], "give a meeting CODE or --create NAME"),
        (["abc-defg-hij", "--create", "X", "--token", "t"], "give a meeting CODE or --create"),
        (["  ", "--token", "t"], "the meeting code is empty"),
        (["--create", " ", "--token", "t"], "--create needs a non-empty meeting name"),
        (["abc-defg-hij"], "no user token"),
        (["abc-defg-hij", "--token", " "], "--token is empty"),
        (["abc-defg-hij", "--org", str(ORG), "--token", "t"], "--org and --user go with --keys"),
        (["abc-defg-hij", "--keys", "KEYS", "--org", str(ORG)], "--keys needs --org"),
        (["abc-defg-hij", "--keys", "KEYS", "--org", "acme", "--user", "u"], "--org must be a"),
        (["abc-defg-hij", "--keys", "NOKEYS", "--org", str(ORG), "--user", "u"], "dt keys init"),
        (["abc-defg-hij", "--gc-url", "ftp://gc", "--token", "t"], "--gc-url must be an http"),
        (["abc-defg-hij", "--gc-url", "http://gc/?a=1", "--token", "t"], "no query"),
    ],
)
def test_join_usage_errors_exit_2(
    keys: DevKeys,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    argv = [{"KEYS": str(keys.directory), "NOKEYS": str(tmp_path / "none")}.get(a, a) for a in argv]
    assert dt_main(["join", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [["--token", "t", "--keys", "d"], ["--timeout", "0"], ["--timeout", "inf"]],
)
def test_join_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        dt_main(["join", "abc-defg-hij", *argv])
    assert excinfo.value.code == 2
    assert capsys.readouterr().out == ""


def test_rendering_neutralises_terminal_escapes() -> None:
    view = join_cmd.JoinView.parse(
        {
            "meeting_id": "m-1",
            "display_name": "evil\x1b]0;owned\x07name",
            "token": "eyJ.secret",
            "expires_in": 600,
            "mc": {"id": "mc-1", "grpc_endpoint": "http://a", "webtransport_endpoint": "https://b"},
            "media_handlers": [],
        }
    )
    text = join_cmd.render(view, code="abc", show_token=False, now=datetime(2025, 1, 1, tzinfo=UTC))
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "evil\\x1b]0;owned\\x07name" in text
    assert "media handlers  (none)" in text
    assert "expires in 600 s (2025-01-01 00:10:00 UTC)" in text
    assert "eyJ" not in text


_VALID_JOIN: dict[str, Any] = {
    "meeting_id": "m-1",
    "display_name": "d",
    "token": "t",
    "expires_in": 600,
    "mc": {"id": "mc-1", "grpc_endpoint": "http://a", "webtransport_endpoint": "https://b"},
    "media_handlers": [{"id": "mh-1", "webtransport_endpoint": "https://c", "role": "primary"}],
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mc": None}, "mc"),
        ({"meeting_id": None}, "meeting_id"),
        ({"mc": {**_VALID_JOIN["mc"], "id": 1}}, "mc.id"),
        ({"expires_in": True}, "expires_in"),
        ({"expires_in": "600"}, "expires_in"),
        ({"media_handlers": {}}, "media_handlers"),
        ({"media_handlers": [{"id": "h", "role": "p"}]}, r"media_handlers\[0\]\.web"),
    ],
)
def test_a_malformed_join_response_is_a_service_error(change: dict[str, Any], field: str) -> None:
    assert join_cmd.JoinView.parse(_VALID_JOIN).media_handlers[0].role == "primary"
    document = {k: v for k, v in (_VALID_JOIN | change).items() if v is not None}
    with pytest.raises(join_cmd.ServiceError, match=rf"\({field}"):
        join_cmd.JoinView.parse(document)
