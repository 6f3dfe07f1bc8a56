"""SQL for the ``meetings`` table (asyncio-flavoured).

Meeting codes are unique across orgs (a guest names a meeting by its code
alone), short and human-typable: ``abc-defg-hij`` from an alphabet without
look-alike letters.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

import asyncpg

from darktower.gc.metrics import DB_QUERY_SECONDS
from darktower.gc.repositories import assignments
from darktower.gc.repositories.assignments import (
    ActiveAssignment,
    AttemptStart,
    assignment_from_row,
    attempt_from_row,
)
from darktower.shared.db import translate_errors
from darktower.shared.metrics import timed


@dataclass(frozen=True, slots=True)
class MeetingRow:
    meeting_id: uuid.UUID
    org_id: uuid.UUID
    meeting_code: str
    display_name: str
    created_by: str
    allow_guests: bool
    max_participants: int
    status: str


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Who asks :func:`find_for_join` to begin an assignment when the meeting
    has no live one: the lease ``holder`` (unique per join attempt) of GC
    ``gc_id``, for ``ttl_s`` seconds."""

    holder: uuid.UUID
    gc_id: str
    ttl_s: float


@dataclass(frozen=True, slots=True)
class JoinLookup:
    """A meeting and its active assignment in the asking region, if any.

    ``attempt`` is what the lookup's own assignment attempt found (see
    :func:`find_for_join`): ``None`` without a :class:`LeaseRequest` or when
    the assignment is live (no attempt was made); else whether the lease was
    taken and, if so, the attempt's generation and candidates exactly as
    :func:`darktower.gc.repositories.assignments.begin_attempt` returns them.
    """

    meeting: MeetingRow
    assignment: ActiveAssignment | None
    attempt: AttemptStart | None = None


class MeetingCodeExhausted(Exception):
    """Every code drawn for a new meeting was taken (``CREATE_ATTEMPTS`` in a
    row): with ~45 bits per code this means the table is absurdly full or the
    random source is broken - not something a retry fixes."""


#: Lower-case letters without the look-alikes i, l and o (23 letters; a code
#: of 10 carries ~45 bits).
CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz"
#: Group lengths of a code: ``abc-defg-hij``.
CODE_GROUPS = (3, 4, 3)
#: Codes drawn per :func:`create` before it gives up.
CREATE_ATTEMPTS = 5
#: A re-join writes ``last_active_at`` only when it is older than this, so a
#: busy meeting costs no write per join (inactivity is judged in hours).
TOUCH_EVERY_S = 60.0

# The schema's CHECK on meeting_code: what a path parameter must look like.
_CODE_RE = re.compile(r"[a-z0-9-]{3,32}")
_CODE_CONSTRAINTS = frozenset({"meetings_code_unique", "meetings_org_code_unique"})

_CREATE = """
INSERT INTO meetings (
    meeting_id, org_id, meeting_code, display_name, created_by, allow_guests, max_participants)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING meeting_id, org_id, meeting_code, display_name, created_by, allow_guests,
          max_participants, status
"""

# One statement for the whole lookup of a join: the meeting (in the caller's
# org, or by code alone for a guest: $2 NULL), its touch (``scheduled`` →
# ``active``, ``last_active_at`` at most once a minute; re-checked on the
# newest row, so a meeting ended meanwhile is not revived) and its active
# assignment in the region with the MC's liveness and the MHs.
_MEETING_CTES = """
WITH m AS (
    SELECT meeting_id, org_id, meeting_code, display_name, created_by, allow_guests,
           max_participants, status
    FROM meetings
    WHERE meeting_code = $1 AND ($2::uuid IS NULL OR org_id = $2::uuid)
      AND status IN ('scheduled', 'active')
      -- a guest sees only meetings that admit guests: a members-only
      -- meeting's code is neither confirmed to exist nor touched
      AND ($2::uuid IS NOT NULL OR allow_guests)
), touched AS (
    UPDATE meetings AS t SET
        status = 'active',
        last_active_at = now(),
        updated_at = CASE WHEN t.status = 'active' THEN t.updated_at ELSE now() END
    FROM m
    WHERE t.meeting_id = m.meeting_id
      AND t.status IN ('scheduled', 'active')
      AND (t.status = 'scheduled' OR t.last_active_at IS NULL
           OR t.last_active_at < now() - make_interval(secs => $5))
    RETURNING t.status
)"""
_MEETING_COLUMNS = """
SELECT m.meeting_id, m.org_id, m.meeting_code, m.display_name, m.created_by, m.allow_guests,
       m.max_participants, coalesce((SELECT status FROM touched), m.status) AS status,"""
_ASSIGNMENT_COLUMNS = """
       a.meeting_id AS a_meeting_id, a.region AS a_region,
       a.meeting_controller_id AS a_controller_id,
       mc.grpc_endpoint AS a_mc_grpc_endpoint,
       mc.webtransport_endpoint AS a_mc_webtransport_endpoint,
       a.generation AS a_generation,
       (mc.health_status = 'healthy'
        AND mc.last_heartbeat_at > now() - make_interval(secs => $4)) AS a_mc_live,
       a.primary_mh_id AS a_primary_mh_id, pmh.webtransport_endpoint AS a_primary_wt,
       a.backup_mh_id AS a_backup_mh_id, bmh.webtransport_endpoint AS a_backup_wt"""
_ASSIGNMENT_JOINS = """
LEFT JOIN meeting_assignments AS a
       ON a.meeting_id = m.meeting_id AND a.region = $3 AND a.ended_at IS NULL
LEFT JOIN meeting_controllers AS mc ON mc.controller_id = a.meeting_controller_id
LEFT JOIN media_handlers AS pmh ON pmh.handler_id = a.primary_mh_id
LEFT JOIN media_handlers AS bmh ON bmh.handler_id = a.backup_mh_id"""

_FIND_FOR_JOIN = f"""{_MEETING_CTES}
{_MEETING_COLUMNS}{_ASSIGNMENT_COLUMNS}
FROM m{_ASSIGNMENT_JOINS}
"""

# The same lookup that, when the meeting has no live assignment, also begins
# the first attempt of one, as ``assignments.begin_attempt`` would: the
# meeting's lease for holder $6, a generation and the candidates. A first
# join thus costs one round trip less. A re-join pays for it too (about
# 0.2 ms more of PostgreSQL's time, measured: the lease CTE is planned and
# set up even when it selects no row), so the join flow asks for it only
# for meetings it does not know to be assigned.
_JOIN_LEASE = assignments.lease_upsert_sql(
    meeting_id="m.meeting_id",
    region=3,
    holder=6,
    gc_id=7,
    ttl_s=8,
    source="FROM m",
    condition="NOT EXISTS (SELECT 1 FROM active WHERE a_mc_live)",
)
_JOIN_ATTEMPT_COLUMNS = assignments.attempt_columns_sql(
    meeting_id="m.meeting_id", region=3, stale_after_s=4, exclude=9, mc_limit=10, mh_limit=11
)
_FIND_FOR_JOIN_AND_BEGIN = f"""{_MEETING_CTES}, active AS (
SELECT {_ASSIGNMENT_COLUMNS}
FROM m{_ASSIGNMENT_JOINS}
WHERE a.meeting_id IS NOT NULL
), lease AS (
{_JOIN_LEASE}    RETURNING l.recorded_generation
), generation AS (
    SELECT nextval('meeting_generation_seq') AS generation FROM lease
)
{_MEETING_COLUMNS}
       active.*,
{_JOIN_ATTEMPT_COLUMNS}
FROM m
LEFT JOIN active ON true
"""  # noqa: S608 - only placeholder numbers and fixed fragments are interpolated


def new_meeting_code() -> str:
    """A fresh random code, ``abc-defg-hij`` (CSPRNG)."""
    return "-".join("".join(secrets.choice(CODE_ALPHABET) for _ in range(n)) for n in CODE_GROUPS)


def is_meeting_code(s: str) -> bool:
    """Whether ``s`` can be a meeting code at all (the schema's CHECK), so a
    malformed path parameter is refused without a query."""
    return _CODE_RE.fullmatch(s) is not None


def _meeting(row: asyncpg.Record) -> MeetingRow:
    return MeetingRow(
        meeting_id=row["meeting_id"],
        org_id=row["org_id"],
        meeting_code=row["meeting_code"],
        display_name=row["display_name"],
        created_by=row["created_by"],
        allow_guests=row["allow_guests"],
        max_participants=row["max_participants"],
        status=row["status"],
    )


@translate_errors
@timed(DB_QUERY_SECONDS, "meeting_create")
async def create(
    pool: asyncpg.Pool,
    *,
    org_id: uuid.UUID,
    created_by: str,
    display_name: str,
    allow_guests: bool,
    max_participants: int,
) -> MeetingRow:
    """Insert a ``scheduled`` meeting under a fresh random code, drawing
    another code when one is taken (at most :data:`CREATE_ATTEMPTS`, then
    :class:`MeetingCodeExhausted`)."""
    for _ in range(CREATE_ATTEMPTS):
        try:
            row = await pool.fetchrow(
                _CREATE, uuid.uuid4(), org_id, new_meeting_code(), display_name, created_by,
                allow_guests, max_participants,
            )  # fmt: skip
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name not in _CODE_CONSTRAINTS:
                raise
            continue
        assert row is not None
        return _meeting(row)
    raise MeetingCodeExhausted(f"{CREATE_ATTEMPTS} meeting codes in a row were taken")


@translate_errors
@timed(DB_QUERY_SECONDS, "meeting_find_for_join")
async def find_for_join(
    pool: asyncpg.Pool,
    *,
    code: str,
    org_id: uuid.UUID | None,
    region: str,
    stale_after_s: float,
    lease: LeaseRequest | None = None,
    mc_limit: int = 5,
    mh_limit: int = 20,
    timeout_s: float | None = None,
) -> JoinLookup | None:
    """The meeting a join names (within ``org_id``; by code alone when
    ``org_id`` is ``None``, a guest), if it is ``scheduled`` or ``active``,
    marked active and recently joined; with its active assignment in
    ``region``, if any. One statement.

    With ``lease``, when the meeting has no live assignment the same
    statement also begins the first attempt of one (SPEC §6.3 steps 3-5): it
    takes the meeting's lease for ``lease.holder`` and, if taken, draws a
    generation and reads the MC and MH candidates (top ``mc_limit`` MCs),
    into :attr:`JoinLookup.attempt` - as
    :func:`darktower.gc.repositories.assignments.begin_attempt` does for the
    later attempts. ``timeout_s`` bounds the statement (the pool's statement
    timeout when ``None``; see :data:`darktower.shared.db.FAIL_FAST_TIMEOUT_S`)."""
    if lease is None:
        row = await pool.fetchrow(
            _FIND_FOR_JOIN, code, org_id, region, stale_after_s, TOUCH_EVERY_S, timeout=timeout_s
        )
    else:
        row = await pool.fetchrow(
            _FIND_FOR_JOIN_AND_BEGIN, code, org_id, region, stale_after_s, TOUCH_EVERY_S,
            lease.holder, lease.gc_id, lease.ttl_s, [], mc_limit, mh_limit, timeout=timeout_s,
        )  # fmt: skip
    if row is None:
        return None
    assignment = assignment_from_row(row)
    attempt = None
    if lease is not None and (assignment is None or not assignment.mc_live):
        attempt = attempt_from_row(row, active=assignment)
    return JoinLookup(meeting=_meeting(row), assignment=assignment, attempt=attempt)
