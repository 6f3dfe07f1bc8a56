"""The meetings repository (SPEC §5, §6.3 step 1-2, §6.5) against real
PostgreSQL: creation with random human-typable codes, and the join's
one-statement lookup (meeting by code within an org or for a guest, its
touch, and its active assignment in the region).

Ages are produced by back-dating rows on the database clock, never by waiting.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import cast

import asyncpg
import pytest
import trio
from gc_fleet import wait_until_blocked_by

from darktower.gc.registry_requests import (
    McHeartbeat,
    McRegistration,
    MhLoadReport,
    MhRegistration,
)
from darktower.gc.repositories import assignments, media_handlers, meeting_controllers, meetings
from darktower.gc.repositories.assignments import ActiveAssignment, AssignedMh
from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meeting_controllers import McCandidate
from darktower.gc.repositories.meetings import JoinLookup, MeetingRow
from darktower.shared.seam import run_aio

REGION = "local"
STALE = 30.0
ORG = uuid.UUID("00000000-0000-4000-8000-00000000000a")
OTHER_ORG = uuid.UUID("00000000-0000-4000-8000-00000000000b")
CODE_RE = re.compile(r"[a-hjkmnp-z]{3}-[a-hjkmnp-z]{4}-[a-hjkmnp-z]{3}")


async def create(
    pool: asyncpg.Pool,
    *,
    org_id: uuid.UUID = ORG,
    display_name: str = "Standup",
    allow_guests: bool = False,
) -> MeetingRow:
    return await run_aio(meetings.create, pool, org_id=org_id, created_by="user-1",
                         display_name=display_name, allow_guests=allow_guests,
                         max_participants=25)  # fmt: skip


async def find(
    pool: asyncpg.Pool, code: str, org_id: uuid.UUID | None = ORG, *, region: str = REGION
) -> JoinLookup | None:
    return await run_aio(meetings.find_for_join, pool, code=code, org_id=org_id, region=region,
                         stale_after_s=STALE)  # fmt: skip


async def meeting_times(pool: asyncpg.Pool, meeting_id: uuid.UUID) -> asyncpg.Record:
    """The meeting's status and how long ago (database clock) it was last
    joined and updated."""
    row = await run_aio(
        pool.fetchrow,
        "SELECT status, now() - last_active_at AS active_ago, now() - updated_at AS updated_ago "
        "FROM meetings WHERE meeting_id = $1",
        meeting_id,
    )
    assert row is not None
    return row


async def age_meeting(pool: asyncpg.Pool, meeting_id: uuid.UUID, seconds: float) -> None:
    """As if the last join and update were ``seconds`` ago (database clock)."""
    await run_aio(
        pool.execute,
        "UPDATE meetings SET last_active_at = now() - make_interval(secs => $2), "
        "updated_at = now() - make_interval(secs => $2) WHERE meeting_id = $1",
        meeting_id,
        seconds,
    )


# --- codes ---------------------------------------------------------------------------------------


def test_new_codes_are_human_typable_and_random() -> None:
    codes = [meetings.new_meeting_code() for _ in range(500)]
    assert all(CODE_RE.fullmatch(code) for code in codes), codes
    assert all(meetings.is_meeting_code(code) for code in codes)
    assert len(set(codes)) == len(codes)
    # Every letter of the alphabet shows up; no look-alikes ever do.
    letters = set("".join(codes).replace("-", ""))
    assert letters == set(meetings.CODE_ALPHABET)
    assert not letters & set("ilo0123456789")


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("abc-defg-hij", True),
        ("abc", True),
        ("a" * 32, True),
        ("0-9", True),
        ("ab", False),
        ("a" * 33, False),
        ("ABC-defg-hij", False),
        ("abc-defg-hij\n", False),
        ("abc_defg", False),
        ("abc defg", False),
        ("abc/../x", False),
        ("äbc-defg", False),
        ("", False),
    ],
)
def test_is_meeting_code_matches_the_schema_rule(text: str, valid: bool) -> None:
    assert meetings.is_meeting_code(text) is valid


# --- create --------------------------------------------------------------------------------------


async def test_create_stores_a_scheduled_meeting(db_pool: asyncpg.Pool) -> None:
    meeting = await create(db_pool, allow_guests=True)
    assert CODE_RE.fullmatch(meeting.meeting_code)
    assert meeting == MeetingRow(meeting.meeting_id, ORG, meeting.meeting_code, "Standup",
                                 "user-1", True, 25, "scheduled")  # fmt: skip
    row = await run_aio(db_pool.fetchrow, "SELECT * FROM meetings")
    assert row is not None
    assert (row["meeting_id"], row["meeting_code"], row["last_active_at"]) == (
        meeting.meeting_id,
        meeting.meeting_code,
        None,
    )
    other = await create(db_pool)
    assert other.meeting_id != meeting.meeting_id
    assert other.meeting_code != meeting.meeting_code


def scripted_codes(monkeypatch: pytest.MonkeyPatch, codes: list[str]) -> Iterator[str]:
    """Make :func:`meetings.new_meeting_code` return ``codes`` in order; the
    iterator shows how many were drawn."""
    it = iter(codes)
    monkeypatch.setattr(meetings, "new_meeting_code", lambda: next(it))
    return it


async def test_create_draws_again_when_a_code_is_taken(
    db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken by another org: codes are unique across orgs.
    scripted_codes(monkeypatch, ["aaa-aaaa-aaa"])
    await create(db_pool, org_id=OTHER_ORG)
    # ... and within the org.
    scripted_codes(monkeypatch, ["bbb-bbbb-bbb"])
    await create(db_pool)
    drawn = scripted_codes(monkeypatch, ["aaa-aaaa-aaa", "bbb-bbbb-bbb", "ccc-cccc-ccc", "left"])
    meeting = await create(db_pool)
    assert meeting.meeting_code == "ccc-cccc-ccc"
    assert list(drawn) == ["left"]
    count = await run_aio(db_pool.fetchval, "SELECT count(*) FROM meetings")
    assert count == 3


async def test_create_gives_up_after_five_taken_codes(
    db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_codes(monkeypatch, ["aaa-aaaa-aaa"])
    await create(db_pool)
    drawn = scripted_codes(monkeypatch, ["aaa-aaaa-aaa"] * 5 + ["never"])
    with pytest.raises(meetings.MeetingCodeExhausted):
        await create(db_pool)
    assert list(drawn) == ["never"]
    assert await run_aio(db_pool.fetchval, "SELECT count(*) FROM meetings") == 1


async def test_create_does_not_hide_other_errors(db_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await create(db_pool, display_name="")


# --- find_for_join: the meeting ------------------------------------------------------------------


async def test_find_for_join_is_scoped_to_the_org(db_pool: asyncpg.Pool) -> None:
    mine = await create(db_pool)
    theirs = await create(db_pool, org_id=OTHER_ORG)
    lookup = await find(db_pool, mine.meeting_code)
    assert lookup == JoinLookup(
        MeetingRow(mine.meeting_id, ORG, mine.meeting_code, "Standup", "user-1", False, 25,
                   "active"),
        None,
    )  # fmt: skip
    assert await find(db_pool, theirs.meeting_code) is None
    assert await find(db_pool, "zzz-zzzz-zzz") is None
    # Looking up another org's code changes nothing of it.
    assert (await meeting_times(db_pool, theirs.meeting_id))["status"] == "scheduled"


async def test_guest_lookup_is_by_code_alone(db_pool: asyncpg.Pool) -> None:
    meeting = await create(db_pool, org_id=OTHER_ORG, allow_guests=True)
    lookup = await find(db_pool, meeting.meeting_code, None)
    assert lookup is not None
    assert (lookup.meeting.meeting_id, lookup.meeting.org_id) == (meeting.meeting_id, OTHER_ORG)
    assert lookup.meeting.allow_guests is True
    assert await find(db_pool, "zzz-zzzz-zzz", None) is None


async def test_guests_do_not_see_or_touch_members_only_meetings(db_pool: asyncpg.Pool) -> None:
    meeting = await create(db_pool, allow_guests=False)
    assert await find(db_pool, meeting.meeting_code, None) is None
    times = await meeting_times(db_pool, meeting.meeting_id)
    assert (times["status"], times["active_ago"]) == ("scheduled", None)
    assert await find(db_pool, meeting.meeting_code, ORG) is not None


@pytest.mark.parametrize("status", ["ended", "cancelled"])
async def test_find_for_join_skips_finished_meetings(db_pool: asyncpg.Pool, status: str) -> None:
    meeting = await create(db_pool)
    await run_aio(db_pool.execute, "UPDATE meetings SET status = $1", status)
    assert await find(db_pool, meeting.meeting_code) is None
    assert await find(db_pool, meeting.meeting_code, None) is None
    times = await meeting_times(db_pool, meeting.meeting_id)
    assert (times["status"], times["active_ago"]) == (status, None)


async def test_join_touches_the_meeting_at_most_once_a_minute(db_pool: asyncpg.Pool) -> None:
    meeting = await create(db_pool, allow_guests=True)
    await age_meeting(db_pool, meeting.meeting_id, 3600)  # created an hour ago
    await run_aio(db_pool.execute, "UPDATE meetings SET last_active_at = NULL")

    # First join: scheduled → active, joined now (updated_at follows the status).
    lookup = await find(db_pool, meeting.meeting_code)
    assert lookup is not None
    assert lookup.meeting.status == "active"
    times = await meeting_times(db_pool, meeting.meeting_id)
    assert times["status"] == "active"
    assert times["active_ago"] < timedelta(seconds=5)
    assert times["updated_ago"] < timedelta(seconds=5)

    # A re-join within a minute writes nothing.
    await age_meeting(db_pool, meeting.meeting_id, 50)
    assert await find(db_pool, meeting.meeting_code, None) is not None
    times = await meeting_times(db_pool, meeting.meeting_id)
    assert timedelta(seconds=50) <= times["active_ago"] < timedelta(seconds=55)

    # Past a minute, the join is recorded again (the status is unchanged, so
    # updated_at is left alone).
    await age_meeting(db_pool, meeting.meeting_id, 61)
    lookup = await find(db_pool, meeting.meeting_code)
    assert lookup is not None
    assert lookup.meeting.status == "active"
    times = await meeting_times(db_pool, meeting.meeting_id)
    assert times["active_ago"] < timedelta(seconds=5)
    assert times["updated_ago"] >= timedelta(seconds=61)


# --- find_for_join: the assignment ---------------------------------------------------------------


async def add_fleet(pool: asyncpg.Pool) -> None:
    """A healthy MC ``mc-1`` and MHs ``mh-1``/``mh-2`` in the region."""
    reg = McRegistration("mc-1", REGION, "http://mc-1.test:50052", "https://mc-1.test:4433",
                         100, 1000)  # fmt: skip
    await run_aio(meeting_controllers.register, pool, reg)
    await run_aio(meeting_controllers.heartbeat_batch, pool, [McHeartbeat("mc-1", 0, 0, "healthy")])
    for handler_id, zone in (("mh-1", "zone-a"), ("mh-2", "zone-b")):
        mh = MhRegistration(handler_id, REGION, zone, f"https://{handler_id}.test:4434",
                            f"http://{handler_id}.test:50060", 500)  # fmt: skip
        await run_aio(media_handlers.register, pool, mh)


async def take_lease(
    pool: asyncpg.Pool, meeting_id: uuid.UUID, holder: uuid.UUID, gc_id: str = "gc-1"
) -> None:
    """Take the meeting's lease as a GC's later attempt does (its statement
    also draws a generation and reads the candidates)."""
    start = await run_aio(assignments.begin_attempt, pool, meeting_id=meeting_id, region=REGION,
                          holder=holder, gc_id=gc_id, ttl_s=10.0,
                          stale_after_s=STALE)  # fmt: skip
    assert start.taken


async def assign(pool: asyncpg.Pool, meeting_id: uuid.UUID, generation: int) -> None:
    holder = uuid.uuid4()
    await take_lease(pool, meeting_id, holder)
    outcome = await run_aio(
        assignments.record, pool, meeting_id=meeting_id, region=REGION, controller_id="mc-1",
        generation=generation, gc_id="gc-1", primary_mh_id="mh-1", backup_mh_id="mh-2",
        holder=holder, stale_after_s=STALE, replaces=None,
    )  # fmt: skip
    assert outcome.won


def assignment(meeting_id: uuid.UUID, generation: int, *, live: bool) -> ActiveAssignment:
    return ActiveAssignment(
        meeting_id, REGION, "mc-1", "http://mc-1.test:50052", "https://mc-1.test:4433",
        generation, live,
        (AssignedMh("mh-1", "https://mh-1.test:4434", "primary"),
         AssignedMh("mh-2", "https://mh-2.test:4434", "backup")),
    )  # fmt: skip


async def test_find_for_join_returns_the_active_assignment_in_the_region(
    db_pool: asyncpg.Pool,
) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool, allow_guests=True)
    await assign(db_pool, meeting.meeting_id, 42)
    for org_id in (ORG, None):
        lookup = await find(db_pool, meeting.meeting_code, org_id)
        assert lookup is not None
        assert lookup.meeting.meeting_id == meeting.meeting_id
        assert lookup.assignment == assignment(meeting.meeting_id, 42, live=True)
    # Not in another region.
    lookup = await find(db_pool, meeting.meeting_code, region="elsewhere")
    assert lookup is not None
    assert lookup.assignment is None


async def test_find_for_join_reports_an_mc_that_is_not_live(db_pool: asyncpg.Pool) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    await assign(db_pool, meeting.meeting_id, 7)
    await run_aio(
        db_pool.execute,
        "UPDATE meeting_controllers SET last_heartbeat_at = now() - make_interval(secs => $1)",
        STALE + 1,
    )
    lookup = await find(db_pool, meeting.meeting_code)
    assert lookup is not None
    assert lookup.assignment == assignment(meeting.meeting_id, 7, live=False)
    await run_aio(meeting_controllers.heartbeat_batch, db_pool,
                  [McHeartbeat("mc-1", 1, 0, "unhealthy")])  # fmt: skip
    lookup = await find(db_pool, meeting.meeting_code)
    assert lookup is not None
    assert lookup.assignment == assignment(meeting.meeting_id, 7, live=False)


async def test_find_for_join_ignores_an_ended_assignment(db_pool: asyncpg.Pool) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    await assign(db_pool, meeting.meeting_id, 3)
    ended = await run_aio(assignments.end_by_owner, db_pool, meeting_id=meeting.meeting_id,
                          region=REGION, controller_id="mc-1", generation=3)  # fmt: skip
    assert ended is assignments.EndOutcome.ENDED
    lookup = await find(db_pool, meeting.meeting_code)
    assert lookup is not None
    assert lookup.assignment is None


# --- find_for_join: the first attempt of an assignment (a lease request) -------------------------

GC_ID = "gc-1"


async def find_leasing(
    pool: asyncpg.Pool, code: str, holder: uuid.UUID, org_id: uuid.UUID | None = ORG
) -> JoinLookup | None:
    lease = meetings.LeaseRequest(holder, GC_ID, 10.0)
    return await run_aio(meetings.find_for_join, pool, code=code, org_id=org_id, region=REGION,
                         stale_after_s=STALE, lease=lease)  # fmt: skip


async def lease_holders(pool: asyncpg.Pool) -> list[uuid.UUID | None]:
    rows = await run_aio(pool.fetch, "SELECT holder FROM meeting_assignment_leases")
    return [row["holder"] for row in rows]


async def next_generation(pool: asyncpg.Pool) -> int:
    value: int = await run_aio(pool.fetchval, "SELECT nextval('meeting_generation_seq')")
    return value


async def test_find_for_join_begins_the_first_attempt_of_an_unassigned_meeting(
    db_pool: asyncpg.Pool,
) -> None:
    """What ``assignments.begin_attempt`` would read, in the lookup itself."""
    await add_fleet(db_pool)
    # Reporting MHs are candidates (mh-2 half full).
    for handler_id, streams in (("mh-1", 0), ("mh-2", 250)):
        report = MhLoadReport(handler_id, streams, "healthy", 1.0, 2.0, 3.0)
        assert await run_aio(media_handlers.load_report, db_pool, report) is not None
    meeting = await create(db_pool)
    holder = uuid.uuid4()
    before = await next_generation(db_pool)
    lookup = await find_leasing(db_pool, meeting.meeting_code, holder)
    assert lookup is not None
    assert lookup.meeting.meeting_id == meeting.meeting_id
    assert lookup.meeting.status == "active"
    assert lookup.assignment is None
    attempt = lookup.attempt
    assert attempt is not None
    assert attempt.taken
    assert attempt.snapshot_current
    assert attempt.active is None
    assert attempt.generation == before + 1
    # Every field of the candidates.
    assert attempt.mc_candidates == (
        McCandidate("mc-1", "http://mc-1.test:50052", "https://mc-1.test:4433", 0, 100),
    )
    assert sorted(attempt.mh_candidates, key=lambda c: c.handler_id) == [
        MhCandidate("mh-1", "zone-a", "https://mh-1.test:4434", 0, 500, "healthy"),
        MhCandidate("mh-2", "zone-b", "https://mh-2.test:4434", 250, 500, "healthy"),
    ]
    assert await lease_holders(db_pool) == [holder]
    # The holder's own lease: a second lookup renews it and draws anew.
    again = await find_leasing(db_pool, meeting.meeting_code, holder)
    assert again is not None
    assert again.attempt is not None
    assert again.attempt.taken
    assert again.attempt.generation > attempt.generation
    # The same candidates as a later attempt's statement reads.
    later = await run_aio(assignments.begin_attempt, db_pool, meeting_id=meeting.meeting_id,
                          region=REGION, holder=holder, gc_id=GC_ID, ttl_s=10.0,
                          stale_after_s=STALE)  # fmt: skip
    assert later.taken
    assert later.generation > again.attempt.generation
    assert later.mc_candidates == attempt.mc_candidates
    assert sorted(later.mh_candidates, key=lambda c: c.handler_id) == sorted(
        attempt.mh_candidates, key=lambda c: c.handler_id
    )


async def test_find_for_join_takes_no_lease_for_a_live_assignment(db_pool: asyncpg.Pool) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    await assign(db_pool, meeting.meeting_id, 42)
    holders_before = await lease_holders(db_pool)
    before = await next_generation(db_pool)
    lookup = await find_leasing(db_pool, meeting.meeting_code, uuid.uuid4())
    assert lookup == JoinLookup(
        meeting=lookup.meeting if lookup else None,  # type: ignore[arg-type]
        assignment=assignment(meeting.meeting_id, 42, live=True),
        attempt=None,
    )
    # Nothing written or drawn: the re-join path stays read-only.
    assert await lease_holders(db_pool) == holders_before == [None]
    assert await next_generation(db_pool) == before + 1


async def test_find_for_join_begins_a_replacement_when_the_mc_is_not_live(
    db_pool: asyncpg.Pool,
) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    await assign(db_pool, meeting.meeting_id, 7)
    await run_aio(
        db_pool.execute,
        "UPDATE meeting_controllers SET last_heartbeat_at = now() - make_interval(secs => $1)",
        STALE + 1,
    )
    holder = uuid.uuid4()
    lookup = await find_leasing(db_pool, meeting.meeting_code, holder)
    assert lookup is not None
    assert lookup.assignment == assignment(meeting.meeting_id, 7, live=False)
    assert lookup.attempt is not None
    assert lookup.attempt.taken
    assert lookup.attempt.active == assignment(meeting.meeting_id, 7, live=False)
    assert lookup.attempt.generation > 0
    assert lookup.attempt.mc_candidates == ()  # the only MC is the stale one
    assert await lease_holders(db_pool) == [holder]


async def test_find_for_join_leaves_another_holders_lease_alone(db_pool: asyncpg.Pool) -> None:
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    theirs = uuid.uuid4()
    await take_lease(db_pool, meeting.meeting_id, theirs, "gc-2")
    before = await next_generation(db_pool)
    lookup = await find_leasing(db_pool, meeting.meeting_code, uuid.uuid4())
    assert lookup is not None
    assert lookup.assignment is None
    assert lookup.attempt == assignments.AttemptStart(taken=False)
    assert await lease_holders(db_pool) == [theirs]
    assert await next_generation(db_pool) == before + 1  # nothing drawn


async def test_find_for_join_takes_no_lease_for_a_meeting_it_does_not_find(
    db_pool: asyncpg.Pool,
) -> None:
    await add_fleet(db_pool)
    members_only = await create(db_pool)
    assert await find_leasing(db_pool, members_only.meeting_code, uuid.uuid4(), OTHER_ORG) is None
    assert await find_leasing(db_pool, members_only.meeting_code, uuid.uuid4(), None) is None
    assert await find_leasing(db_pool, "no-such-code", uuid.uuid4()) is None
    assert await lease_holders(db_pool) == []


async def test_find_for_join_notices_a_record_its_snapshot_missed(
    db_pool: asyncpg.Pool, database_dsn: str
) -> None:
    """As ``begin_attempt`` (tests/test_gc_assignments_repo.py): holder A's
    lease expired and A records while B's lookup runs. B's snapshot predates
    A's commit, so B sees no assignment and tries the lease; it blocks on
    the row A is consuming and takes it once A commits - and must be told
    that its snapshot missed a record (``snapshot_current`` false), or it
    would call an MC with a newer generation and fence A's live assignment
    out. Deterministic: B is observed blocked (pg_locks) before A commits."""
    await add_fleet(db_pool)
    meeting = await create(db_pool)
    a_holder = uuid.uuid4()
    await take_lease(db_pool, meeting.meeting_id, a_holder, "gc-a")
    await run_aio(db_pool.execute, "UPDATE meeting_assignment_leases SET expires_at = now() - "
                  "interval '1 second'")  # fmt: skip
    generation = await next_generation(db_pool)
    a_con = await run_aio(asyncpg.connect, database_dsn)
    try:
        a_tx = a_con.transaction()
        await run_aio(a_tx.start)
        a_pid = a_con.get_server_pid()
        outcome = await run_aio(
            assignments.record, cast(asyncpg.Pool, a_con), meeting_id=meeting.meeting_id,
            region=REGION, controller_id="mc-1", generation=generation, gc_id="gc-a",
            primary_mh_id="mh-1", backup_mh_id="mh-2", holder=a_holder, stale_after_s=STALE,
            replaces=None,
        )  # fmt: skip
        assert outcome.won
        result: list[JoinLookup | None] = []

        async def lookup_b() -> None:
            result.append(await find_leasing(db_pool, meeting.meeting_code, uuid.uuid4()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup_b)
            await wait_until_blocked_by(db_pool, a_pid)  # B blocks on A's row lock at once
            await run_aio(a_tx.commit)
        [b] = result
    finally:
        await run_aio(a_con.close)
    assert b is not None
    assert b.assignment is None  # B's snapshot
    assert b.attempt is not None
    assert b.attempt.taken
    assert not b.attempt.snapshot_current
    assert b.attempt.active is None
    assert b.attempt.generation > generation
    # What the flow then does: read again, and find A's live assignment.
    found = await run_aio(assignments.find_active, db_pool, meeting_id=meeting.meeting_id,
                          region=REGION, stale_after_s=STALE)  # fmt: skip
    assert found == assignment(meeting.meeting_id, generation, live=True)
