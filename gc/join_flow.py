"""The assignment flow of a join (SPEC §6.3), asyncio-flavoured.

A join crosses the trio/asyncio seam once: the HTTP handler hands
:meth:`JoinService.join` to ``run_aio`` and everything below - the lookups,
the MC call, the record statement - runs on the asyncio side, where asyncpg
and grpclib live.

Why a lease. SPEC §6.3 lets concurrent first joins each call an MC and race
at the record statement, the losers leaving orphan meetings on their MCs. With
fencing (SPEC §7.3) that is worse than a leak: an orphan holding a *newer*
generation than the recorded winner takes the meeting's Redis keys over and
fences the winner out. So one join per meeting and region holds a lease
(``meeting_assignment_leases``) while it draws generations and calls MCs;
concurrent joins of that meeting wait for its result instead of calling MCs
of their own. Every generation of a meeting is drawn by the lease holder, so
the recorded assignment always carries the newest one. The record statement
still refuses to replace a live assignment (other than the one the attempt
judged gone, should its MC come back meanwhile: the newer generation's claim
fences it out of Redis) and requires the lease, so even a holder whose lease expired
mid-flight (a stalled GC) cannot win against a newer holder; its MC's
meeting has the older generation and is fenced out or ends as empty
(``MC_EMPTY_MEETING_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from darktower.gc.join_errors import (
    MAX_ATTEMPTS,
    GuestsNotAllowed,
    MeetingNotFound,
    ServiceUnavailable,
)
from darktower.gc.mc_client import McClient
from darktower.gc.metrics import ASSIGNMENT_RETRIES, MC_RPCS
from darktower.gc.repositories import assignments, meetings
from darktower.gc.repositories.assignments import ActiveAssignment
from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meetings import MeetingRow
from darktower.gc.selection import choose_controller, choose_media_handlers
from darktower.protos import internal_pb2 as pb
from darktower.shared.db import FAIL_FAST_TIMEOUT_S
from darktower.shared.logging import get_logger

log = get_logger(__name__)

#: How often a join waiting for another GC's lease first looks for its
#: result; the interval doubles (with jitter) up to the maximum.
LEASE_POLL_INTERVAL_S = 0.02
_MAX_POLL_INTERVAL_S = 0.32
#: Meetings remembered as assigned (:meth:`JoinService.join`), a few MB at
#: most; one forgotten costs its next join 0.2 ms of PostgreSQL's time.
_SEEN_ASSIGNED_MAX = 20_000


class _LeaseLost(Exception):
    """Our lease expired and another GC took it over: its result is ours."""


@dataclass(frozen=True, slots=True)
class JoinResult:
    meeting: MeetingRow
    assignment: ActiveAssignment
    #: True when this join made the assignment (a first join), False when it
    #: found one (a re-join, or another join's result).
    assigned: bool = False


class JoinService:
    """Joins for one region, on behalf of one GC (``gc_id``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        mc_client: McClient,
        *,
        gc_id: str,
        region: str,
        stale_after_s: float,
        lease_ttl_s: float,
        rng: random.Random | None = None,
        poll_interval_s: float = LEASE_POLL_INTERVAL_S,
        staleness: Callable[[], float] | None = None,
        statement_timeout_s: float = FAIL_FAST_TIMEOUT_S,
    ) -> None:
        """``staleness``, when given, is asked for the heartbeat age past
        which an MC counts as gone each time one is judged, instead of the
        fixed ``stale_after_s``: the GC widens it while it recovers from its
        own blindness (:meth:`~darktower.gc.health_checker.HealthChecker.liveness_threshold_s`),
        so that a database outage does not move meetings off MCs that were
        merely unheard.

        ``statement_timeout_s`` bounds each statement of a join (the pool
        bounds waiting for a connection): a database that hangs costs a join
        that much, then :class:`~darktower.shared.db.DatabaseUnavailable`
        (503), not the pool's longer statement timeout."""
        self._pool = pool
        self._statement_timeout_s = statement_timeout_s
        self._mc_client = mc_client
        self._gc_id = gc_id
        self._region = region
        self._staleness = staleness if staleness is not None else lambda: stale_after_s
        self._lease_ttl_s = lease_ttl_s
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._poll_interval_s = poll_interval_s
        self._in_flight: dict[uuid.UUID, asyncio.Future[JoinResult]] = {}
        #: Meetings (code, org) this GC last saw with a live assignment.
        self._seen_assigned: OrderedDict[tuple[str, uuid.UUID | None], None] = OrderedDict()

    async def join(self, code: str, org_id: uuid.UUID | None) -> JoinResult:
        """The meeting ``code`` of ``org_id`` (``None``: a guest, who may
        join any org's meeting that admits guests) and its assignment here.

        A meeting not known here to have a live assignment is looked up with
        a lease request (:func:`meetings.find_for_join`): when it has no live
        assignment, the lookup also begins the first attempt of one - lease,
        generation, candidates - so a first join spends no round trip of its
        own on that. A meeting this GC last saw assigned (a re-join, most
        joins) is looked up without: the lease request makes the statement
        dearer for PostgreSQL (about 0.2 ms, measured) and a re-join does not
        need it. The guess only picks the statement: either is correct for
        any meeting, a wrong guess costs one round trip or 0.2 ms."""
        key = (code, org_id)
        # This join's lease holder, should it try for the lease.
        holder = uuid.uuid4() if key not in self._seen_assigned else None
        lease = None
        if holder is not None:
            lease = meetings.LeaseRequest(holder, self._gc_id, self._lease_ttl_s)
        lookup = await meetings.find_for_join(
            self._pool,
            code=code,
            org_id=org_id,
            region=self._region,
            stale_after_s=self._staleness(),
            lease=lease,
            timeout_s=self._statement_timeout_s,
        )
        if lookup is None:
            self._seen_assigned.pop(key, None)
            raise MeetingNotFound("meeting not found")
        meeting = lookup.meeting
        # Unreachable: neither lookup statement shows a guest a members-only
        # meeting (kept as a safety net; answered like a missing meeting).
        if org_id is None and not meeting.allow_guests:
            raise GuestsNotAllowed("this meeting does not admit guests")
        if lookup.assignment is None or not lookup.assignment.mc_live:
            self._seen_assigned.pop(key, None)
            if holder is None:
                holder = uuid.uuid4()
            result = await self._assign(meeting, holder, lookup.attempt)
        else:
            result = JoinResult(meeting, lookup.assignment, assigned=False)
        self._remember_assigned(key)
        return result

    def _remember_assigned(self, key: tuple[str, uuid.UUID | None]) -> None:
        """Note that the meeting ``key`` names had a live assignment just
        now (bounded: the least recently joined are forgotten first)."""
        seen = self._seen_assigned
        seen[key] = None
        seen.move_to_end(key)
        if len(seen) > _SEEN_ASSIGNED_MAX:
            seen.popitem(last=False)

    async def _assign(
        self, meeting: MeetingRow, holder: uuid.UUID, start: assignments.AttemptStart | None
    ) -> JoinResult:
        """Single flight per meeting in this process: concurrent joins of a
        meeting being assigned here await that one attempt (its result or its
        failure) instead of each polling the database and asking MCs.

        ``start`` is the attempt the lookup began. A join whose lookup took
        the lease assigns at once, whoever else waits (they learn its result
        from the database); one that did not waits for the join in flight
        here, if any, else polls for the holder's result."""
        key = meeting.meeting_id
        if start is None or not start.taken:
            while (pending := self._in_flight.get(key)) is not None:
                try:
                    found = await asyncio.shield(pending)
                except asyncio.CancelledError:
                    if pending.cancelled():  # its request went away: try ourselves
                        start = None
                        continue
                    raise
                return JoinResult(meeting, found.assignment, assigned=False)
        elif key in self._in_flight:
            # Another join here is polling for a lease that is ours now.
            return await self._assign_across_gcs(meeting, holder, start)
        attempt = asyncio.get_running_loop().create_future()
        # A failure nobody else awaited must not be reported as "never retrieved".
        attempt.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._in_flight[key] = attempt
        try:
            result = await self._assign_across_gcs(meeting, holder, start)
        except Exception as exc:
            attempt.set_exception(exc)
            raise
        except BaseException:
            attempt.cancel()
            raise
        finally:
            del self._in_flight[key]
        attempt.set_result(result)
        return result

    async def _assign_across_gcs(
        self, meeting: MeetingRow, holder: uuid.UUID, start: assignments.AttemptStart | None
    ) -> JoinResult:
        """Take the meeting's lease and assign it, or wait for the GC holding
        the lease to record its assignment (polling with backoff and jitter).
        ``start``, when given, is the first attempt, already begun."""
        poll_s = self._poll_interval_s
        while True:
            if start is None:
                start = await self._begin_attempt(meeting, holder, excluded=())
            if start.taken:
                won = False
                try:
                    result = await self._assign_holding_lease(meeting, holder, start)
                    won = result.assigned
                    return result
                except _LeaseLost:
                    pass  # another GC holds it now: wait for its result
                finally:
                    if not won:  # a win consumed the lease already
                        await self._release_lease(meeting, holder)
            start = None
            await asyncio.sleep(poll_s * (0.5 + self._rng.random()))
            poll_s = min(poll_s * 2, _MAX_POLL_INTERVAL_S)
            existing = await self._live_assignment(meeting)
            if existing is not None:
                return JoinResult(meeting, existing, assigned=False)

    async def _begin_attempt(
        self, meeting: MeetingRow, holder: uuid.UUID, *, excluded: Sequence[str]
    ) -> assignments.AttemptStart:
        """Take or renew the lease and read what an attempt needs (one
        statement: :func:`assignments.begin_attempt`)."""
        return await assignments.begin_attempt(
            self._pool,
            meeting_id=meeting.meeting_id,
            region=self._region,
            holder=holder,
            gc_id=self._gc_id,
            ttl_s=self._lease_ttl_s,
            stale_after_s=self._staleness(),
            exclude=excluded,
            timeout_s=self._statement_timeout_s,
        )

    async def _current_active(self, meeting: MeetingRow) -> ActiveAssignment | None:
        """The active assignment (live or not), read now."""
        return await assignments.find_active(
            self._pool,
            meeting_id=meeting.meeting_id,
            region=self._region,
            stale_after_s=self._staleness(),
            timeout_s=self._statement_timeout_s,
        )

    async def _live_assignment(self, meeting: MeetingRow) -> ActiveAssignment | None:
        existing = await self._current_active(meeting)
        return existing if existing is not None and existing.mc_live else None

    async def _active_at_start(
        self, meeting: MeetingRow, start: assignments.AttemptStart
    ) -> ActiveAssignment | None:
        """The active assignment (live or not) when the attempt began - a
        live one another holder may have recorded before we took the lease;
        read again when the attempt's snapshot missed it."""
        if not start.snapshot_current:
            return await self._current_active(meeting)
        return start.active

    async def _release_lease(self, meeting: MeetingRow, holder: uuid.UUID) -> None:
        """Bounded and best effort: lets the waiting joins try at once instead
        of at the lease's expiry."""
        try:
            await assignments.release_lease(
                self._pool,
                meeting_id=meeting.meeting_id,
                region=self._region,
                holder=holder,
                timeout_s=self._statement_timeout_s,
            )
        except Exception as exc:  # the lease expires by itself
            log.warning("lease_release_failed", meeting_id=str(meeting.meeting_id), error=str(exc))

    async def _assign_holding_lease(
        self, meeting: MeetingRow, holder: uuid.UUID, start: assignments.AttemptStart
    ) -> JoinResult:
        # Another holder may have recorded between our lookup and our lease.
        active = await self._active_at_start(meeting, start)
        if active is not None and active.mc_live:
            return JoinResult(meeting, active, assigned=False)
        chosen_mhs = choose_media_handlers(start.mh_candidates)
        if chosen_mhs is None:
            raise ServiceUnavailable(
                "no_media_handler", "no media handler is available", retry_after_s=5
            )
        primary, backup = chosen_mhs
        excluded: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            if attempt > 0:
                ASSIGNMENT_RETRIES.inc()
                # Renew before each further call: the lease covers one attempt
                # (``lease_ttl_s``), not the worst case of all three. The same
                # statement draws the attempt's generation and candidates.
                start = await self._begin_attempt(meeting, holder, excluded=excluded)
                if not start.taken:
                    raise _LeaseLost
                active = await self._active_at_start(meeting, start)
                if active is not None and active.mc_live:
                    return JoinResult(meeting, active, assigned=False)
            controller = choose_controller(start.mc_candidates, self._rng)
            if controller is None:
                if attempt == 0:
                    raise ServiceUnavailable(
                        "no_controller", "no meeting controller is available", retry_after_s=5
                    )
                break
            generation = start.generation
            outcome = await self._mc_client.assign(
                controller_id=controller.controller_id,
                endpoint=controller.grpc_endpoint,
                request=self._request(meeting, generation, primary, backup),
            )
            MC_RPCS.labels(outcome.status, outcome.reason).inc()
            if not outcome.accepted:
                log.info(
                    "mc_assignment_refused",
                    meeting_id=str(meeting.meeting_id),
                    controller_id=controller.controller_id,
                    status=outcome.status,
                    reason=outcome.reason,
                    attempt=attempt + 1,
                )
                excluded.append(controller.controller_id)
                continue
            recorded = await assignments.record(
                self._pool,
                meeting_id=meeting.meeting_id,
                region=self._region,
                controller_id=controller.controller_id,
                generation=generation,
                gc_id=self._gc_id,
                primary_mh_id=primary.handler_id,
                backup_mh_id=backup.handler_id if backup is not None else None,
                holder=holder,
                stale_after_s=self._staleness(),
                # The assignment judged gone (its MC may come back while we
                # call ours: our MC's claim fences it out, the row follows).
                replaces=active.generation if active is not None else None,
                timeout_s=self._statement_timeout_s,
            )
            if recorded.won and recorded.assignment is not None:
                log.info(
                    "meeting_assigned",
                    meeting_id=str(meeting.meeting_id),
                    controller_id=controller.controller_id,
                    generation=generation,
                    attempt=attempt + 1,
                )
                return JoinResult(meeting, recorded.assignment, assigned=True)
            # Our lease expired and another holder took over: its assignment
            # (newer generation) stands; the meeting our MC accepted is
            # fenced out there or ends as empty.
            log.warning(
                "assignment_race_lost",
                meeting_id=str(meeting.meeting_id),
                controller_id=controller.controller_id,
                generation=generation,
            )
            if recorded.assignment is not None and recorded.assignment.mc_live:
                return JoinResult(meeting, recorded.assignment, assigned=False)
            raise _LeaseLost
        raise ServiceUnavailable(
            "assignment_failed", "no meeting controller accepted the meeting", retry_after_s=2
        )

    def _request(
        self,
        meeting: MeetingRow,
        generation: int,
        primary: MhCandidate,
        backup: MhCandidate | None,
    ) -> pb.AssignMeetingWithMhRequest:
        mhs = [
            pb.MhAssignment(
                mh_id=primary.handler_id,
                webtransport_endpoint=primary.webtransport_endpoint,
                role=pb.MH_ROLE_PRIMARY,
            )
        ]
        if backup is not None:
            mhs.append(
                pb.MhAssignment(
                    mh_id=backup.handler_id,
                    webtransport_endpoint=backup.webtransport_endpoint,
                    role=pb.MH_ROLE_BACKUP,
                )
            )
        return pb.AssignMeetingWithMhRequest(
            meeting_id=str(meeting.meeting_id),
            mh_assignments=mhs,
            requesting_gc_id=self._gc_id,
            generation=generation,
        )
