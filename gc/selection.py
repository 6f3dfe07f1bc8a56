"""Choosing where a meeting goes (SPEC §6.3 steps 3 and 5): pure, no I/O.

The queries (``repositories.media_handlers.candidates_sql`` and
``repositories.meeting_controllers.candidates_sql``, read by each attempt's
statement) decide who may be chosen - healthy, fresh, in the region, with
room, top 5 MCs by load; this module only decides among those, so it can be
tested exhaustively without a database.

Media handlers are chosen deterministically (best score, ties by id), so the
same candidates always give the same pair. Controllers are drawn at random,
weighted towards the less loaded: every GC sees the same "least loaded" MC
until the next heartbeat, and a deterministic choice would herd concurrent
first joins onto it. The draw uses a CSPRNG by default (SPEC §6.3), so which
MC a meeting lands on cannot be predicted from earlier choices.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from fractions import Fraction

from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meeting_controllers import McCandidate

__all__ = ["choose_controller", "choose_media_handlers", "controller_weight", "mh_score"]

#: The default source of the controller draw: the OS CSPRNG (stateless, so
#: one shared instance is fine).
_CSPRNG: random.Random = secrets.SystemRandom()

#: A controller's load ratio counts at most this much, so even a nearly full
#: candidate keeps a small chance (weight 0.01) rather than none.
_MAX_LOAD_RATIO = 0.99


def mh_score(candidate: MhCandidate) -> Fraction:
    """Free share of the MH's streams, halved when it is ``degraded``.

    Exact (a :class:`~fractions.Fraction`): in floats, a degraded MH at 10 %
    load (0.5 x 0.9) would beat a healthy one at 55 % (1 - 0.55) by a
    rounding error instead of tying and going to the id tie-break.
    """
    if candidate.max_streams <= 0:
        return Fraction(0)
    free = 1 - Fraction(candidate.current_streams, candidate.max_streams)
    score = max(free, Fraction(0))
    return score / 2 if candidate.health_status == "degraded" else score


def _zone_separation(primary: MhCandidate, candidate: MhCandidate) -> int:
    """0: known to be in another zone than the primary; 1: unknown (a zone
    is empty); 2: known to share the primary's zone."""
    if not primary.zone or not candidate.zone:
        return 1
    return 0 if candidate.zone != primary.zone else 2


def choose_media_handlers(
    candidates: Sequence[MhCandidate],
) -> tuple[MhCandidate, MhCandidate | None] | None:
    """The primary and backup MHs for a meeting, or ``None`` without any
    candidate (the join answers 503). The backup is ``None`` when there is
    only one candidate.

    Primary: the best :func:`mh_score` (ties: smallest ``handler_id``).
    Backup: among the others, one in a different zone than the primary when
    there is one - a zone outage should not take out both - then one whose
    zone is unknown, then the rest; within each, best score, then id.
    Deterministic and independent of the order of ``candidates``.
    """
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: (-mh_score(c), c.handler_id))
    primary, others = ranked[0], ranked[1:]
    if not others:
        return primary, None
    # ``min`` keeps the first of the best tier, and ``others`` is in score/id order.
    backup = min(others, key=lambda c: _zone_separation(primary, c))
    return primary, backup


def controller_weight(candidate: McCandidate) -> float:
    """``1 - min(load_ratio, 0.99)`` (SPEC §6.3): always in [0.01, 1]."""
    if candidate.max_meetings <= 0:
        ratio = 1.0
    else:
        ratio = max(candidate.current_meetings / candidate.max_meetings, 0.0)
    return 1.0 - min(ratio, _MAX_LOAD_RATIO)


def choose_controller(
    candidates: Sequence[McCandidate], rng: random.Random = _CSPRNG
) -> McCandidate | None:
    """One of ``candidates``, drawn with probability proportional to
    :func:`controller_weight`; ``None`` when there is none.

    ``rng`` defaults to the OS CSPRNG (:class:`secrets.SystemRandom`); tests
    pass a seeded :class:`random.Random`.
    """
    if not candidates:
        return None
    weights = [controller_weight(c) for c in candidates]
    return rng.choices(candidates, weights=weights)[0]
