"""SQL for the ``meeting_assignments`` table and its leases (asyncio-flavoured).

Why a lease. Concurrent first joins of one meeting would each call an MC and
race at the record; a loser whose MC claimed a *higher* generation than the
recorded winner would then fence the winner out of Redis (SPEC §7.3). So a GC
takes the meeting's lease (``meeting_assignment_leases``) before it draws a
generation and calls an MC, and :func:`record` consumes that lease: every
generation of a meeting is drawn by a lease holder, and the recorded
assignment always carries the newest one. A GC that takes over a lease must
look for an active assignment again (:func:`find_active`) before it draws a
generation: the previous holder may have recorded in between.

:func:`record` still keeps SPEC §6.3 step 7's rule on its own: it never
replaces a live active assignment - except the very one the caller's attempt
judged gone, should its MC come back before the record (``replaces``; the
newer generation's MC fences it out of Redis, so the row follows the fence) -
and a loser gets the winner's.

There is one row per (meeting, region): a replacement overwrites the old
assignment in place - the old one ends by being overwritten, no history is
kept. Staleness is always judged on the database clock.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from darktower.gc.metrics import DB_QUERY_SECONDS
from darktower.gc.repositories import media_handlers, meeting_controllers
from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meeting_controllers import McCandidate
from darktower.shared.db import translate_errors
from darktower.shared.metrics import timed


class EndOutcome(enum.StrEnum):
    """What an MC's report of a meeting's end did (:func:`end_by_owner`)."""

    ENDED = "ended"
    #: The MC owns no active assignment of the meeting here.
    NOT_OWNER = "not_owner"
    #: It owns one under a newer generation than it reported: a late report.
    STALE_GENERATION = "stale_generation"


@dataclass(frozen=True, slots=True)
class AssignedMh:
    handler_id: str
    webtransport_endpoint: str
    role: str  # "primary" | "backup"


@dataclass(frozen=True, slots=True)
class ActiveAssignment:
    meeting_id: uuid.UUID
    region: str
    controller_id: str
    mc_grpc_endpoint: str
    mc_webtransport_endpoint: str
    generation: int
    mc_live: bool
    media_handlers: tuple[AssignedMh, ...]


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What :func:`record` did: ``won`` when the caller's assignment is now
    the active one. ``assignment`` is the active assignment after the record
    (the caller's when won, the winner's when lost), or ``None`` when lost
    and none is active (e.g. the caller's lease had been taken over)."""

    won: bool
    assignment: ActiveAssignment | None


@dataclass(frozen=True, slots=True)
class AttemptStart:
    """What :func:`begin_attempt` found. ``taken`` is false while another
    holder's lease is live; then nothing else was read or drawn."""

    taken: bool
    #: The active assignment (live or not), if the snapshot is current.
    active: ActiveAssignment | None = None
    #: False when a record committed after this statement's snapshot: read
    #: the assignment again (:func:`find_active`) before calling any MC.
    snapshot_current: bool = True
    generation: int = 0
    mc_candidates: tuple[McCandidate, ...] = ()
    mh_candidates: tuple[MhCandidate, ...] = ()


@dataclass(frozen=True, slots=True)
class AssignmentSummary:
    """One active assignment as ``dt status`` lists it."""

    meeting_id: uuid.UUID
    meeting_code: str | None  # None: the meeting row is gone
    region: str
    controller_id: str
    generation: int
    assigned_at: datetime
    assigned_by_gc_id: str
    primary_mh_id: str
    backup_mh_id: str | None


def assignment_from_row(row: asyncpg.Record) -> ActiveAssignment | None:
    """Build an :class:`ActiveAssignment` from a row that carries the columns
    ``a_meeting_id, a_region, a_controller_id, a_mc_grpc_endpoint,
    a_mc_webtransport_endpoint, a_generation, a_mc_live, a_primary_mh_id,
    a_primary_wt, a_backup_mh_id, a_backup_wt`` (all NULL: no assignment).

    Shared with :mod:`darktower.gc.repositories.meetings`, whose join lookup
    reads the same columns in the same statement as the meeting."""
    if row["a_controller_id"] is None:
        return None
    mhs = [AssignedMh(row["a_primary_mh_id"], row["a_primary_wt"], "primary")]
    if row["a_backup_mh_id"] is not None:
        mhs.append(AssignedMh(row["a_backup_mh_id"], row["a_backup_wt"], "backup"))
    return ActiveAssignment(
        meeting_id=row["a_meeting_id"],
        region=row["a_region"],
        controller_id=row["a_controller_id"],
        mc_grpc_endpoint=row["a_mc_grpc_endpoint"],
        mc_webtransport_endpoint=row["a_mc_webtransport_endpoint"],
        generation=row["a_generation"],
        mc_live=row["a_mc_live"],
        media_handlers=tuple(mhs),
    )


def attempt_from_row(row: asyncpg.Record, *, active: ActiveAssignment | None) -> AttemptStart:
    """The :class:`AttemptStart` in a row with the columns of
    :func:`attempt_columns_sql`; ``active`` is the assignment the same
    statement read (kept only when the snapshot is current)."""
    if not row["lease_taken"]:
        return AttemptStart(taken=False)
    mcs = json.loads(row["mc_candidates"]) if row["mc_candidates"] is not None else []
    mhs = json.loads(row["mh_candidates"]) if row["mh_candidates"] is not None else []
    return AttemptStart(
        taken=True,
        active=active if row["snapshot_current"] else None,
        snapshot_current=row["snapshot_current"],
        generation=row["generation"],
        mc_candidates=tuple(
            McCandidate(
                controller_id=c["controller_id"],
                grpc_endpoint=c["grpc_endpoint"],
                webtransport_endpoint=c["webtransport_endpoint"],
                current_meetings=c["current_meetings"],
                max_meetings=c["max_meetings"],
            )
            for c in mcs
        ),
        mh_candidates=tuple(MhCandidate(**m) for m in mhs),
    )


def _active_sql(*, meeting_id: int, region: int, stale_after_s: int) -> str:
    """The active assignment of a meeting with its MC's endpoints and
    liveness, in the columns :func:`assignment_from_row` reads (placeholders
    only are substituted)."""
    # Only placeholder numbers (ints) are interpolated, never values.
    return f"""
SELECT a.meeting_id AS a_meeting_id, a.region AS a_region,
       a.meeting_controller_id AS a_controller_id,
       mc.grpc_endpoint AS a_mc_grpc_endpoint,
       mc.webtransport_endpoint AS a_mc_webtransport_endpoint,
       a.generation AS a_generation,
       (mc.health_status = 'healthy'
        AND mc.last_heartbeat_at > now() - make_interval(secs => ${stale_after_s})) AS a_mc_live,
       a.primary_mh_id AS a_primary_mh_id, pmh.webtransport_endpoint AS a_primary_wt,
       a.backup_mh_id AS a_backup_mh_id, bmh.webtransport_endpoint AS a_backup_wt
FROM meeting_assignments AS a
JOIN meeting_controllers AS mc ON mc.controller_id = a.meeting_controller_id
JOIN media_handlers AS pmh ON pmh.handler_id = a.primary_mh_id
LEFT JOIN media_handlers AS bmh ON bmh.handler_id = a.backup_mh_id
WHERE a.meeting_id = ${meeting_id} AND a.region = ${region} AND a.ended_at IS NULL
"""  # noqa: S608 - only placeholder numbers are interpolated


_FIND_ACTIVE = _active_sql(meeting_id=1, region=2, stale_after_s=3)


def lease_upsert_sql(
    *,
    meeting_id: str,
    region: int,
    holder: int,
    gc_id: int,
    ttl_s: int,
    source: str = "",
    condition: str = "true",
) -> str:
    """The statement that takes or renews a meeting's lease, over the given
    placeholders (parameter numbers: ``3`` for ``$3``); ``meeting_id`` is an
    SQL expression (a placeholder, or a column of ``source``, a ``FROM``
    clause the candidate row is selected from) and the lease is only tried
    where ``condition`` (an SQL expression) holds. Shared by
    :data:`_BEGIN_ATTEMPT` (as :data:`_LEASE_UPSERT`) and the join's lookup
    (:mod:`darktower.gc.repositories.meetings`), so all take leases alike.

    The lease is taken when free (no row, or consumed by a record: ``holder``
    NULL), expired (database clock), or already the caller's (renewal).
    ON CONFLICT decides on the newest committed row, so two GCs never both
    win. The NOT EXISTS pre-check only saves work: while another holder's
    lease is visibly live, nothing is inserted and so nothing locked or
    written (ON CONFLICT DO UPDATE locks the row even when its WHERE is
    false), which keeps joins waiting on a busy meeting from queueing on the
    lease row."""
    # Only placeholder numbers and fixed SQL fragments are interpolated, never values.
    return f"""
INSERT INTO meeting_assignment_leases AS l (meeting_id, region, holder, gc_id, expires_at)
SELECT {meeting_id}, ${region}::text, ${holder}::uuid, ${gc_id}::text,
       now() + make_interval(secs => ${ttl_s})
{source}
WHERE {condition} AND NOT EXISTS (
    SELECT 1 FROM meeting_assignment_leases AS busy
    WHERE busy.meeting_id = {meeting_id} AND busy.region = ${region}
      AND busy.holder <> ${holder} AND busy.expires_at >= now())
ON CONFLICT (meeting_id, region) DO UPDATE SET
    holder = EXCLUDED.holder, gc_id = EXCLUDED.gc_id, expires_at = EXCLUDED.expires_at
WHERE l.holder IS NULL OR l.expires_at < now() OR l.holder = EXCLUDED.holder
"""  # noqa: S608 - only placeholder numbers and fixed fragments are interpolated


_LEASE_UPSERT = lease_upsert_sql(meeting_id="$1::uuid", region=2, holder=3, gc_id=4, ttl_s=5)

# Releasing frees the row rather than deleting it: the row carries the mark
# (``recorded_generation``) of the last record, which a concurrent
# :data:`_BEGIN_ATTEMPT` whose snapshot predates that record relies on. A
# deleted row would be re-inserted unmarked and the stale snapshot trusted.
# Free rows are removed by :func:`delete_expired_leases` minutes later.
_RELEASE_LEASE = """
UPDATE meeting_assignment_leases SET holder = NULL, expires_at = now()
WHERE meeting_id = $1 AND region = $2 AND holder = $3
"""


# One attempt of a first join (SPEC §6.3 steps 1-5), one statement:
# * ``lease`` takes or renews the meeting's lease (:func:`lease_upsert_sql`);
#   every other part runs only when it was taken (they all read ``lease``).
# * ``recorded_generation`` of the lease row is read in its *newest* version
#   (ON CONFLICT locks and uses it), while ``active`` is read in this
#   statement's snapshot. A record that committed between the two (its lease
#   was expired, so this statement could take it over) is therefore seen by
#   the lease but missed by ``active``: ``snapshot_current`` is then false and
#   the caller must read the assignment again (:func:`find_active`) before it
#   calls any MC - otherwise it would draw a newer generation for a meeting
#   that already has a live assignment, and its MC would fence the winner out.
# * the generation is drawn after the lease is held (``generation`` reads
#   ``lease``), so it is newer than every generation drawn by earlier holders.
# * the MC and MH candidates, as their modules define them, as JSON arrays.
def attempt_columns_sql(
    *, meeting_id: str, region: int, stale_after_s: int, exclude: int, mc_limit: int, mh_limit: int
) -> str:
    """The select-list columns :func:`attempt_from_row` reads, for a statement
    with CTEs ``lease`` (the upsert's ``RETURNING l.recorded_generation``)
    and ``generation`` (``nextval`` once per ``lease`` row): ``lease_taken``,
    ``generation``, ``snapshot_current`` and the candidates as JSON arrays,
    which are only computed when the lease was taken (a CASE branch's
    subqueries run only when it is chosen). ``meeting_id`` is an SQL
    expression; the rest are placeholder numbers.

    ``recorded_generation`` of the lease row is read in its *newest* version
    (ON CONFLICT locks and uses it), while the assignment is read in the
    statement's snapshot. A record that committed between the two (its lease
    was expired, so this statement could take it over) is therefore seen by
    the lease but missed by the snapshot: ``snapshot_current`` is then false
    and the caller must read the assignment again (:func:`find_active`)
    before it calls any MC - otherwise it would draw a newer generation for a
    meeting that already has a live assignment, and its MC would fence the
    winner out. The generation is drawn after the lease is held, so it is
    newer than every generation drawn by earlier holders."""
    # Only placeholder numbers and fixed SQL fragments are interpolated, never values.
    mc_candidates = meeting_controllers.candidates_sql(
        region=region, stale_after_s=stale_after_s, exclude=exclude, limit=mc_limit
    )
    mh_candidates = media_handlers.candidates_sql(
        region=region, stale_after_s=stale_after_s, limit=mh_limit
    )
    return f"""
       EXISTS (SELECT 1 FROM lease) AS lease_taken,
       (SELECT generation FROM generation) AS generation,
       (SELECT lease.recorded_generation IS NULL
               OR lease.recorded_generation <= coalesce(
                   (SELECT seen.generation FROM meeting_assignments AS seen
                    WHERE seen.meeting_id = {meeting_id} AND seen.region = ${region}), 0)
        FROM lease) AS snapshot_current,
       CASE WHEN EXISTS (SELECT 1 FROM lease) THEN (SELECT json_agg(c ORDER BY c.rank) FROM (
           {mc_candidates}
       ) AS c) END AS mc_candidates,
       CASE WHEN EXISTS (SELECT 1 FROM lease) THEN (SELECT json_agg(m) FROM (
           {mh_candidates}
       ) AS m) END AS mh_candidates
"""  # noqa: S608 - only placeholder numbers and fixed fragments are interpolated


# One attempt of a first join (SPEC §6.3 steps 1-5), one statement:
# * ``lease`` takes or renews the meeting's lease (:func:`lease_upsert_sql`);
#   every other part runs only when it was taken (they all read ``lease``).
# * ``active`` is the assignment in this statement's snapshot, with
#   ``snapshot_current`` saying whether the snapshot can be trusted, and the
#   generation and candidates: see :func:`attempt_columns_sql`.
# The join's first attempt is begun by its lookup instead
# (:func:`darktower.gc.repositories.meetings.find_for_join`), in the same
# round trip as the meeting; this statement begins the later ones.
_BEGIN_ATTEMPT_COLUMNS = attempt_columns_sql(
    meeting_id="$1", region=2, stale_after_s=6, exclude=7, mc_limit=8, mh_limit=9
)
_BEGIN_ATTEMPT = f"""
WITH lease AS (
{_LEASE_UPSERT}    RETURNING l.recorded_generation
), generation AS (
    SELECT nextval('meeting_generation_seq') AS generation FROM lease
)
SELECT active.*,
{_BEGIN_ATTEMPT_COLUMNS}
FROM lease
LEFT JOIN ({_active_sql(meeting_id=1, region=2, stale_after_s=6)}) AS active ON true
"""  # noqa: S608 - only placeholder numbers are interpolated


# The record (SPEC §6.3 step 7), one statement:
# * ``lease`` consumes the caller's lease. UPDATE locks the row and re-checks
#   ``holder`` on its newest version, so a lease taken over by another GC (even
#   one committed after this statement's snapshot) yields no row - and then
#   nothing is written. An expired lease nobody took over is still the
#   caller's: no other holder can have drawn a newer generation. The row is
#   kept, free (``holder`` NULL), marked with this attempt's generation: the
#   mark :func:`begin_attempt` needs to notice a record its snapshot missed
#   (it is deleted with the other old leases, five minutes later). A record
#   that loses marks it too; that only costs a later joiner one extra read
#   (:func:`find_active`), never a wrong answer.
# * ``won`` inserts, or replaces an ended row, an active row whose MC is not
#   live, or the very row the caller's attempt judged gone (``$10``, its
#   generation; NULL when it saw none): if that MC came back to life since (a
#   heartbeat during the attempt's MC call), the MC that accepted the newer
#   generation has claimed the meeting in Redis, and the old MC drops it at
#   its next fenced write (its fence check runs every few seconds), so
#   keeping it would send joins to an MC about to drop the meeting - the row
#   follows the fence. ON CONFLICT ... DO UPDATE ... WHERE judges the
#   conflicting row in its newest committed version (not this statement's
#   snapshot), so a live row a concurrent record just committed is never
#   replaced. A generation never goes backwards (an MC holding an older one
#   would be fenced out anyway).
# * On a win, the MC's ``current_meetings`` and each MH's ``current_streams``
#   go up by one in the same transaction, so joins before the next heartbeat
#   see the new load; the heartbeat replaces the estimate with the truth.
# * Rows are locked in one global order - lease, assignment, MC, then MHs by
#   id (``mh_locked`` waits for ``mc_load`` and sorts before it locks) - so
#   concurrent records of meetings sharing MCs and MHs never deadlock.
# The final SELECT returns a row only on a win. The winner's assignment after
# a loss is read by a *second* statement: this one's snapshot may predate the
# winner's commit.
_RECORD = """
WITH lease AS (
    UPDATE meeting_assignment_leases
    SET holder = NULL, expires_at = now(), recorded_generation = $5
    WHERE meeting_id = $1 AND region = $2 AND holder = $3
    RETURNING meeting_id
), won AS (
    INSERT INTO meeting_assignments AS a (
        meeting_id, region, meeting_controller_id, generation, assigned_at,
        assigned_by_gc_id, ended_at, primary_mh_id, backup_mh_id)
    SELECT $1::uuid, $2::text, $4::text, $5::bigint, now(), $6::text, NULL, $7::text, $8::text
    FROM lease
    ON CONFLICT (meeting_id, region) DO UPDATE SET
        meeting_controller_id = EXCLUDED.meeting_controller_id,
        generation = EXCLUDED.generation,
        assigned_at = EXCLUDED.assigned_at,
        assigned_by_gc_id = EXCLUDED.assigned_by_gc_id,
        ended_at = NULL,
        primary_mh_id = EXCLUDED.primary_mh_id,
        backup_mh_id = EXCLUDED.backup_mh_id
    WHERE a.generation < EXCLUDED.generation
      AND (a.ended_at IS NOT NULL
           OR a.generation = $10::bigint
           OR NOT EXISTS (
               SELECT 1 FROM meeting_controllers AS cur
               WHERE cur.controller_id = a.meeting_controller_id
                 AND cur.health_status = 'healthy'
                 AND cur.last_heartbeat_at > now() - make_interval(secs => $9)))
    RETURNING a.meeting_id, a.region, a.meeting_controller_id, a.generation,
              a.primary_mh_id, a.backup_mh_id
), mc_load AS (
    UPDATE meeting_controllers AS mc SET current_meetings = mc.current_meetings + 1
    FROM won WHERE mc.controller_id = won.meeting_controller_id
    RETURNING mc.grpc_endpoint, mc.webtransport_endpoint,
              (mc.health_status = 'healthy'
               AND mc.last_heartbeat_at > now() - make_interval(secs => $9)) AS live
), mh_locked AS (
    SELECT mh.handler_id FROM media_handlers AS mh
    WHERE mh.handler_id IN ($7::text, $8::text) AND EXISTS (SELECT 1 FROM mc_load)
    ORDER BY mh.handler_id
    FOR NO KEY UPDATE
), mh_load AS (
    UPDATE media_handlers AS mh SET current_streams = mh.current_streams + 1
    FROM mh_locked WHERE mh.handler_id = mh_locked.handler_id
    RETURNING mh.handler_id, mh.webtransport_endpoint
)
SELECT won.meeting_id AS a_meeting_id, won.region AS a_region,
       won.meeting_controller_id AS a_controller_id,
       mc_load.grpc_endpoint AS a_mc_grpc_endpoint,
       mc_load.webtransport_endpoint AS a_mc_webtransport_endpoint,
       won.generation AS a_generation, mc_load.live AS a_mc_live,
       won.primary_mh_id AS a_primary_mh_id,
       (SELECT webtransport_endpoint FROM mh_load
        WHERE handler_id = won.primary_mh_id) AS a_primary_wt,
       won.backup_mh_id AS a_backup_mh_id,
       (SELECT webtransport_endpoint FROM mh_load
        WHERE handler_id = won.backup_mh_id) AS a_backup_wt
FROM won CROSS JOIN mc_load
"""

# Ends the assignment only when the reporting MC ($3) owns it and the
# generation it hosted the meeting under ($4) is not older than the recorded
# one: a late report of an earlier assignment of the same MC (fenced out,
# then the meeting assigned to it again) must not end the later one. Not
# older rather than equal: an MC re-assigned a meeting it hosts under a newer
# generation reports that one, also when that assignment lost its record to
# this row - which then still names an MC that no longer hosts the meeting.
# $4 = 0 is a report without a generation (a sender without the field),
# accepted unfenced; no stored generation is 0. The MC's load estimate goes
# down with it (floored: the heartbeat may already have reported the meeting
# gone).
_END_BY_OWNER = """
WITH ended AS (
    UPDATE meeting_assignments SET ended_at = now()
    WHERE meeting_id = $1 AND region = $2 AND meeting_controller_id = $3
      AND ($4::bigint = 0 OR generation <= $4::bigint)
      AND ended_at IS NULL
    RETURNING meeting_controller_id
), mc_load AS (
    UPDATE meeting_controllers AS mc
    SET current_meetings = greatest(mc.current_meetings - 1, 0)
    FROM ended WHERE mc.controller_id = ended.meeting_controller_id
)
SELECT count(*) FROM ended
"""

# Who holds the meeting's active assignment now: read by a statement of its
# own after a report that ended nothing, because the end statement's snapshot
# may predate a concurrent record or end its UPDATE waited for (the UPDATE
# judged the newest row; a read in its snapshot would not).
_ACTIVE_OWNER = """
SELECT meeting_controller_id FROM meeting_assignments
WHERE meeting_id = $1 AND region = $2 AND ended_at IS NULL
"""

# Bounded, oldest first, by key. FOR UPDATE re-checks ``ended_at`` on the
# newest version, so a row a concurrent record has just made active again is
# left alone; SKIP LOCKED never waits for a record in flight.
_DELETE_ENDED_BEFORE = """
DELETE FROM meeting_assignments AS a
WHERE (a.meeting_id, a.region) IN (
        SELECT meeting_id, region FROM meeting_assignments
        WHERE ended_at IS NOT NULL AND ended_at < now() - make_interval(secs => $1)
        ORDER BY ended_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED)
  AND a.ended_at IS NOT NULL
"""

# Only assignments whose MC is not live: a live MC ends its own empty
# meetings and reports them; ending one under its participants would split
# the meeting. "Inactive" counts from the later of the meeting's last join
# and the assignment itself, so a fresh re-assignment is never ended. A
# concurrent record that replaces a candidate row is re-checked against the
# new row (new MC, new ``assigned_at``) and left alone. The dead MC's load
# is not touched: its next heartbeat, if any, reports the truth.
_END_INACTIVE = """
UPDATE meeting_assignments AS a SET ended_at = now()
WHERE (a.meeting_id, a.region) IN (
        SELECT x.meeting_id, x.region
        FROM meeting_assignments AS x
        JOIN meeting_controllers AS mc ON mc.controller_id = x.meeting_controller_id
        LEFT JOIN meetings AS m ON m.meeting_id = x.meeting_id
        WHERE x.ended_at IS NULL
          AND greatest(m.last_active_at, x.assigned_at) < now() - make_interval(secs => $1)
          AND NOT (mc.health_status = 'healthy'
                   AND mc.last_heartbeat_at > now() - make_interval(secs => $2))
        LIMIT $3
        FOR UPDATE OF x SKIP LOCKED)
  AND a.ended_at IS NULL
"""

# Long expired only: an expired lease nobody took over still lets its slow
# holder record (no newer generation exists), so it is not swept at once.
_DELETE_EXPIRED_LEASES = """
DELETE FROM meeting_assignment_leases WHERE expires_at < now() - interval '5 minutes'
"""

_LIST_ACTIVE = """
SELECT a.meeting_id, m.meeting_code, a.region, a.meeting_controller_id AS controller_id,
       a.generation, a.assigned_at, a.assigned_by_gc_id, a.primary_mh_id, a.backup_mh_id
FROM meeting_assignments AS a
LEFT JOIN meetings AS m USING (meeting_id)
WHERE a.ended_at IS NULL
ORDER BY a.assigned_at DESC, a.meeting_id, a.region
LIMIT $1
"""


def _count(status: str) -> int:
    """The row count of an asyncpg command status (``"DELETE 3"``)."""
    return int(status.rsplit(" ", 1)[-1])


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_find_active")
async def find_active(
    pool: asyncpg.Pool,
    *,
    meeting_id: uuid.UUID,
    region: str,
    stale_after_s: float,
    timeout_s: float | None = None,
) -> ActiveAssignment | None:
    """The meeting's active assignment in ``region`` with its MC's endpoints
    and liveness (``healthy`` and heartbeating within ``stale_after_s``).
    ``timeout_s`` bounds the statement (the pool's statement timeout when
    ``None``; see :data:`darktower.shared.db.FAIL_FAST_TIMEOUT_S`)."""
    row = await pool.fetchrow(_FIND_ACTIVE, meeting_id, region, stale_after_s, timeout=timeout_s)
    return None if row is None else assignment_from_row(row)


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_begin_attempt")
async def begin_attempt(
    pool: asyncpg.Pool,
    *,
    meeting_id: uuid.UUID,
    region: str,
    holder: uuid.UUID,
    gc_id: str,
    ttl_s: float,
    stale_after_s: float,
    exclude: Sequence[str] = (),
    mc_limit: int = 5,
    mh_limit: int = 20,
    timeout_s: float | None = None,
) -> AttemptStart:
    """Take (or renew) the meeting's lease for ``ttl_s`` and, when taken,
    read everything an attempt needs in the same round trip: the active
    assignment, a fresh generation, the MC candidates (top ``mc_limit``, not
    in ``exclude``; see :func:`meeting_controllers.candidates_sql`)
    and the MH candidates (:func:`media_handlers.candidates_sql`).
    ``timeout_s`` bounds the statement (as for :func:`find_active`)."""
    row = await pool.fetchrow(
        _BEGIN_ATTEMPT, meeting_id, region, holder, gc_id, ttl_s, stale_after_s,
        list(exclude), mc_limit, mh_limit, timeout=timeout_s,
    )  # fmt: skip
    if row is None:
        return AttemptStart(taken=False)
    return attempt_from_row(row, active=assignment_from_row(row))


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_release_lease")
async def release_lease(
    pool: asyncpg.Pool,
    *,
    meeting_id: uuid.UUID,
    region: str,
    holder: uuid.UUID,
    timeout_s: float | None = None,
) -> None:
    """Give the lease back (only ``holder``'s own; a lease taken over since is
    left to its new holder), keeping the row's record mark. Harmless after
    :func:`record`, which frees it. ``timeout_s`` bounds the statement (as
    for :func:`find_active`)."""
    await pool.execute(_RELEASE_LEASE, meeting_id, region, holder, timeout=timeout_s)


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_record")
async def record(
    pool: asyncpg.Pool,
    *,
    meeting_id: uuid.UUID,
    region: str,
    controller_id: str,
    generation: int,
    gc_id: str,
    primary_mh_id: str,
    backup_mh_id: str | None,
    holder: uuid.UUID,
    stale_after_s: float,
    replaces: int | None,
    timeout_s: float | None = None,
) -> RecordOutcome:
    """Record the caller's assignment if it may: the caller must hold the
    lease, and an active assignment whose MC is live is never replaced
    unless it is the one the caller's attempt judged gone (``replaces``: its
    generation, ``None`` if the attempt saw no active assignment); an ended
    one, or one whose MC is not live, is overwritten in place.

    The lease is consumed whatever the outcome (it has no use after a record).
    On a win the MC's and the MHs' load estimates go up by one in the same
    statement. Under any concurrency a meeting has at most one active
    assignment per region, and every loser is handed the winner's.
    ``timeout_s`` bounds each statement (as for :func:`find_active`).
    """
    args = (meeting_id, region, holder, controller_id, generation, gc_id, primary_mh_id,
            backup_mh_id, stale_after_s, replaces)  # fmt: skip
    row = await pool.fetchrow(_RECORD, *args, timeout=timeout_s)
    if row is not None:
        return RecordOutcome(won=True, assignment=assignment_from_row(row))
    # A separate statement, so it sees a winner committed after the record's
    # snapshot was taken.
    row = await pool.fetchrow(_FIND_ACTIVE, meeting_id, region, stale_after_s, timeout=timeout_s)
    return RecordOutcome(won=False, assignment=None if row is None else assignment_from_row(row))


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_end_by_owner")
async def end_by_owner(
    pool: asyncpg.Pool, *, meeting_id: uuid.UUID, region: str, controller_id: str, generation: int
) -> EndOutcome:
    """Soft-delete the active assignment if ``controller_id`` owns it at a
    generation not newer than ``generation`` (the one it hosted the meeting
    under; SPEC §6.4 ``NotifyMeetingEnded``, §7.3) and lower that MC's
    meeting count. Otherwise nothing changes: another MC's assignment, or a
    newer one of its own (:attr:`EndOutcome.STALE_GENERATION`), is kept.
    ``generation`` 0 means the MC did not say (see :data:`_END_BY_OWNER`) and
    skips the generation check."""
    ended: int = await pool.fetchval(_END_BY_OWNER, meeting_id, region, controller_id, generation)
    if ended:
        return EndOutcome.ENDED
    owner: str | None = await pool.fetchval(_ACTIVE_OWNER, meeting_id, region)
    return EndOutcome.STALE_GENERATION if owner == controller_id else EndOutcome.NOT_OWNER


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_delete_ended")
async def delete_ended_before(pool: asyncpg.Pool, *, older_than_s: float, batch: int) -> int:
    """Hard-delete at most ``batch`` assignments ended more than
    ``older_than_s`` ago (oldest first); how many. Call again while it
    returns ``batch``."""
    return _count(await pool.execute(_DELETE_ENDED_BEFORE, older_than_s, batch))


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_end_inactive")
async def end_inactive(
    pool: asyncpg.Pool, *, inactive_s: float, stale_after_s: float, batch: int
) -> int:
    """End at most ``batch`` active assignments with no join for
    ``inactive_s`` whose MC is not live; how many."""
    return _count(await pool.execute(_END_INACTIVE, inactive_s, stale_after_s, batch))


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_delete_expired_leases")
async def delete_expired_leases(pool: asyncpg.Pool) -> int:
    """Housekeeping: drop leases past their expiry (a GC that died holding
    one); how many."""
    return _count(await pool.execute(_DELETE_EXPIRED_LEASES))


@translate_errors
@timed(DB_QUERY_SECONDS, "assignment_list_active")
async def list_active(pool: asyncpg.Pool, *, limit: int) -> list[AssignmentSummary]:
    """Up to ``limit`` active assignments, newest first (``dt status``)."""
    return [AssignmentSummary(**dict(row)) for row in await pool.fetch(_LIST_ACTIVE, limit)]
