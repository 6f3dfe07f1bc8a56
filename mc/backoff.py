"""Exponential backoff with jitter (pure: no I/O, no clock, no global RNG).

The MC retries its registration with the GC *forever* (SPEC §7.1): an MC
never exits because the GC is unreachable, it protects the meetings it hosts.
The schedule is the nominal 1 s, 2 s, 4 s, ... capped at 30 s, with *equal
jitter*: the delay before retry ``n`` (0-based) is drawn uniformly from

    [nominal(n) * (1 - jitter), nominal(n)]       nominal(n) = min(cap, initial * multiplier**n)

With the defaults (``jitter=0.5``) that is [0.5, 1] s, [1, 2] s, [2, 4] s, ...,
and [15, 30] s once capped. Why equal rather than full jitter (``[0,
nominal]``): full jitter can draw ~0 s and hammer a GC that is just coming
back, while the lower bound of equal jitter keeps the exponential spacing;
the upper bound never exceeds the nominal value, so the 30 s cap is a hard
bound - after a GC outage every MC is back within 30 s of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Backoff", "Rng"]

#: Exponents beyond this already exceed any sensible cap; clamping keeps
#: ``multiplier ** n`` from overflowing after days of retries.
_MAX_EXPONENT = 64


class Rng(Protocol):
    """What the backoff needs from a random source (``random.Random`` fits)."""

    def random(self) -> float:
        """A float uniformly drawn from [0, 1)."""
        ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """An exponential backoff schedule; see the module docstring for bounds."""

    initial: float = 1.0
    multiplier: float = 2.0
    cap: float = 30.0
    #: Fraction of the nominal delay that jitter may remove (0 = no jitter,
    #: 1 = full jitter).
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.cap):
            raise ValueError("need 0 < initial <= cap")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not (0 <= self.jitter <= 1):
            raise ValueError("jitter must be within [0, 1]")

    def nominal(self, attempt: int) -> float:
        """The un-jittered delay before retry ``attempt`` (0-based)."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        exponent = min(attempt, _MAX_EXPONENT)
        return min(self.cap, self.initial * self.multiplier**exponent)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The closed interval :meth:`delay` draws from for ``attempt``."""
        nominal = self.nominal(attempt)
        return nominal * (1 - self.jitter), nominal

    def delay(self, attempt: int, rng: Rng) -> float:
        """The jittered delay before retry ``attempt`` (0-based), within
        :meth:`bounds`."""
        low, high = self.bounds(attempt)
        return low + (high - low) * rng.random()
