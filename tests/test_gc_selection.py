"""Selection of MHs and MCs for a meeting (gc/selection.py): pure functions.

Which candidates exist at all (healthy, fresh, with room, top 5 MCs) is the
queries' job and tested with them; here only the choice among candidates.

The weighted draw is checked statistically with Pearson's chi-square test
over many draws from a *seeded* ``random.Random``: deterministic, so it
cannot flake, while still showing the frequencies match the weights (a
wrong weighting fails it by orders of magnitude, see
``test_chi_square_catches_a_wrong_weighting``). The critical value is for a
significance level of 1e-6, so even an unlucky seed would be a one in a
million event.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import pytest

from darktower.gc.repositories.media_handlers import MhCandidate
from darktower.gc.repositories.meeting_controllers import McCandidate
from darktower.gc.selection import (
    choose_controller,
    choose_media_handlers,
    controller_weight,
    mh_score,
)

# --- helpers ---------------------------------------------------------------------------------


def mh(
    handler_id: str, *, zone: str = "zone-a", load: int = 0, size: int = 100, degraded: bool = False
) -> MhCandidate:
    return MhCandidate(
        handler_id=handler_id,
        zone=zone,
        webtransport_endpoint=f"https://{handler_id}.example:4434",
        current_streams=load,
        max_streams=size,
        health_status="degraded" if degraded else "healthy",
    )


def mc(controller_id: str, *, load: int = 0, size: int = 100) -> McCandidate:
    return McCandidate(
        controller_id=controller_id,
        grpc_endpoint=f"http://{controller_id}.example:50052",
        webtransport_endpoint=f"https://{controller_id}.example:4433",
        current_meetings=load,
        max_meetings=size,
    )


def ids(pair: tuple[MhCandidate, MhCandidate | None] | None) -> tuple[str, str | None] | None:
    if pair is None:
        return None
    primary, backup = pair
    return primary.handler_id, backup.handler_id if backup else None


def chi2_sf_even_df(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable with an even number of degrees of
    freedom (closed form: e^(-x/2) * sum_{i<df/2} (x/2)^i / i!)."""
    assert df % 2 == 0
    half = x / 2
    return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))


def chi_square(observed: Counter[str], expected: dict[str, float]) -> float:
    return sum((observed[key] - e) ** 2 / e for key, e in expected.items())


#: Five candidates → 4 degrees of freedom; P(X > 33.38) < 1e-6.
CRITICAL_DF4 = 33.38
DRAWS = 20_000

#: Load ratios 0, 0.25, 0.5, 0.99 and 1.0 (counted as 0.99): weights 1, 0.75,
#: 0.5, 0.01, 0.01 - including the floor of the weight.
CONTROLLERS = [
    mc("mc-idle", load=0),
    mc("mc-quarter", load=25),
    mc("mc-half", load=500, size=1000),
    mc("mc-almost-full", load=99),
    mc("mc-full", load=100),
]


def draw_counts(candidates: Sequence[McCandidate], rng: random.Random) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(DRAWS):
        chosen = choose_controller(candidates, rng)
        assert chosen is not None
        counts[chosen.controller_id] += 1
    return counts


def expected_counts(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {key: DRAWS * w / total for key, w in weights.items()}


# --- controllers -----------------------------------------------------------------------------


def test_critical_value_is_for_alpha_one_in_a_million() -> None:
    assert chi2_sf_even_df(CRITICAL_DF4, 4) < 1e-6 < chi2_sf_even_df(CRITICAL_DF4 - 0.01, 4)


@pytest.mark.parametrize(
    ("load", "size", "weight"),
    [(0, 100, 1.0), (25, 100, 0.75), (1, 2, 0.5), (99, 100, 0.01), (100, 100, 0.01), (7, 0, 0.01)],
)
def test_controller_weight(load: int, size: int, weight: float) -> None:
    assert controller_weight(mc("mc", load=load, size=size)) == pytest.approx(weight)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_draw_frequencies_match_the_weights(seed: int) -> None:
    counts = draw_counts(CONTROLLERS, random.Random(seed))
    expected = expected_counts({c.controller_id: controller_weight(c) for c in CONTROLLERS})
    assert min(expected.values()) >= 5  # the chi-square approximation holds
    assert chi_square(counts, expected) < CRITICAL_DF4
    assert set(counts) == {c.controller_id for c in CONTROLLERS}  # even the full one


def test_chi_square_catches_a_wrong_weighting() -> None:
    """The test has teeth: the same draws against a uniform choice (or a
    weight of plain ``1 - ratio``, no floor) fail it by far."""
    counts = draw_counts(CONTROLLERS, random.Random(1))
    uniform = expected_counts({c.controller_id: 1.0 for c in CONTROLLERS})
    assert chi_square(counts, uniform) > 100 * CRITICAL_DF4
    no_floor = expected_counts(
        {c.controller_id: 1 - c.current_meetings / c.max_meetings + 1e-9 for c in CONTROLLERS}
    )
    assert chi_square(counts, no_floor) > 100 * CRITICAL_DF4


def test_draw_is_reproducible_with_a_seed() -> None:
    first = [choose_controller(CONTROLLERS, random.Random(7)) for _ in range(5)]
    again = [choose_controller(CONTROLLERS, random.Random(7)) for _ in range(5)]
    assert first == again


def test_default_source_is_the_os_csprng() -> None:
    default = inspect.signature(choose_controller).parameters["rng"].default
    assert isinstance(default, secrets.SystemRandom)
    assert choose_controller(CONTROLLERS) in CONTROLLERS


class FixedRandom(random.Random):
    """``random()`` returns a fixed value: pins where a draw lands."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("u", "expected"),
    # Weights 1, 0.5, 0.5 → intervals [0, 0.5), [0.5, 0.75), [0.75, 1).
    [(0.0, "mc-a"), (0.49, "mc-a"), (0.5, "mc-b"), (0.74, "mc-b"), (0.75, "mc-c"), (0.999, "mc-c")],
)
def test_draw_maps_the_random_number_onto_cumulative_weights(u: float, expected: str) -> None:
    candidates = [mc("mc-a"), mc("mc-b", load=50), mc("mc-c", load=50)]
    chosen = choose_controller(candidates, FixedRandom(u))
    assert chosen is not None
    assert chosen.controller_id == expected


def test_no_controller_candidate_is_none() -> None:
    assert choose_controller([], random.Random(1)) is None


def test_single_controller_candidate_is_chosen_however_loaded() -> None:
    only = mc("mc-only", load=99)
    assert {choose_controller([only], random.Random(s)) for s in range(20)} == {only}


# --- media handlers --------------------------------------------------------------------------


def test_no_media_handler_is_none() -> None:
    assert choose_media_handlers([]) is None


def test_single_media_handler_has_no_backup() -> None:
    assert ids(choose_media_handlers([mh("mh-1", load=90)])) == ("mh-1", None)


def test_least_loaded_is_primary_and_next_is_backup_in_one_zone() -> None:
    candidates = [mh("mh-3", load=30), mh("mh-1", load=10), mh("mh-2", load=20)]
    assert ids(choose_media_handlers(candidates)) == ("mh-1", "mh-2")


def test_backup_goes_to_another_zone_when_there_is_one() -> None:
    candidates = [
        mh("mh-a1", zone="zone-a", load=10),
        mh("mh-a2", zone="zone-a", load=20),
        mh("mh-b1", zone="zone-b", load=90),  # much busier, but elsewhere
        mh("mh-c1", zone="zone-c", load=95),
    ]
    assert ids(choose_media_handlers(candidates)) == ("mh-a1", "mh-b1")


def test_backup_prefers_an_unknown_zone_to_the_primarys_own() -> None:
    candidates = [
        mh("mh-a1", zone="zone-a", load=10),
        mh("mh-a2", zone="zone-a", load=20),
        mh("mh-x", zone="", load=80),
    ]
    assert ids(choose_media_handlers(candidates)) == ("mh-a1", "mh-x")
    # ...but a known other zone beats an unknown one.
    with_b = [*candidates, mh("mh-b1", zone="zone-b", load=90)]
    assert ids(choose_media_handlers(with_b)) == ("mh-a1", "mh-b1")


def test_primary_in_an_unknown_zone_takes_the_best_remaining_backup() -> None:
    candidates = [
        mh("mh-x", zone="", load=0),
        mh("mh-a1", zone="zone-a", load=20),
        mh("mh-b1", zone="zone-b", load=10),
    ]
    assert ids(choose_media_handlers(candidates)) == ("mh-x", "mh-b1")


def test_degraded_halves_the_score_and_changes_the_choice() -> None:
    healthy = mh("mh-healthy", load=40)  # score 0.6
    idle_degraded = mh("mh-degraded", load=0, degraded=True)  # 0.5
    assert ids(choose_media_handlers([idle_degraded, healthy])) == ("mh-healthy", "mh-degraded")
    # Without the halving the idle one (1.0) would have won.
    assert mh_score(idle_degraded) == Fraction(1, 2)
    assert mh_score(mh("mh-degraded", load=0)) == 1
    # A degraded MH still wins over a busier healthy one.
    busy = mh("mh-busy", load=60)  # 0.4
    assert ids(choose_media_handlers([busy, idle_degraded])) == ("mh-degraded", "mh-busy")


def test_exact_ties_go_to_the_smaller_id() -> None:
    """0.5 x (1 - 10/100) == 1 - 55/100 exactly (in floats it is not)."""
    degraded = mh("mh-b", load=10, degraded=True)
    healthy = mh("mh-a", load=55)
    assert mh_score(degraded) == mh_score(healthy)
    assert ids(choose_media_handlers([degraded, healthy])) == ("mh-a", "mh-b")
    # Load ratios, not counts: 50/100 ties with 250/500.
    small, large = mh("mh-z", load=50), mh("mh-y", load=250, size=500)
    assert ids(choose_media_handlers([small, large])) == ("mh-y", "mh-z")


def test_choice_does_not_depend_on_candidate_order() -> None:
    candidates = [
        mh("mh-1", zone="zone-a", load=10),
        mh("mh-2", zone="zone-a", load=10),
        mh("mh-3", zone="zone-b", load=30),
        mh("mh-4", zone="zone-b", load=30),
        mh("mh-5", zone="", load=5, degraded=True),
    ]
    results = {ids(choose_media_handlers(p)) for p in itertools.permutations(candidates)}
    assert results == {("mh-1", "mh-3")}


def test_media_handler_inputs_are_not_filtered_here() -> None:
    """Fullness is the query's filter; a full candidate that reaches the
    selection scores 0 and is only chosen when nothing else is there."""
    full = mh("mh-full", load=100)
    assert mh_score(full) == 0
    assert ids(choose_media_handlers([full])) == ("mh-full", None)
    assert ids(choose_media_handlers([full, mh("mh-ok", load=99)])) == ("mh-ok", "mh-full")
