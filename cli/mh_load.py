"""Load patterns of the simulated MHs (``dt mh-sim --load``): the load
fraction over the simulator's own time.

No I/O and no clock of its own: :meth:`LoadPattern.at` takes the elapsed
time, so :mod:`darktower.cli.mh_sim` drives it with ``trio.current_time()``
and tests with ``MockClock``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LoadPattern"]

_PATTERN_USAGE = {
    "constant": "constant:LOAD",
    "sine": "sine:MIN,MAX,PERIOD_S",
    "ramp": "ramp:FROM,TO,SECONDS",
}


@dataclass(frozen=True, slots=True)
class LoadPattern:
    """The load fraction (0..1) over time since the simulator started.

    ``constant:V``; ``sine:MIN,MAX,PERIOD_S`` (starts at MIN, peaks at MAX
    after half a period); ``ramp:FROM,TO,SECONDS`` (linear, then holds TO).
    """

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> LoadPattern:
        """Raises :class:`ValueError` with a message naming the rule broken."""
        kind, _, rest = text.strip().partition(":")
        usage = _PATTERN_USAGE.get(kind)
        if usage is None:
            raise ValueError(f"load pattern must be one of {', '.join(_PATTERN_USAGE.values())}")
        try:
            params = tuple(float(part) for part in rest.split(","))
        except ValueError:
            raise ValueError(f"expected {usage} (numbers)") from None
        if len(params) != usage.count(",") + 1 or not all(math.isfinite(p) for p in params):
            raise ValueError(f"expected {usage} (finite numbers)")
        loads = params if kind == "constant" else params[:2]
        if not all(0.0 <= load <= 1.0 for load in loads):
            raise ValueError(f"{kind}: loads are fractions of capacity, 0 to 1")
        if kind != "constant" and params[2] <= 0:
            raise ValueError(f"{kind}: the period or duration must be positive seconds")
        return cls(kind, params)

    def at(self, elapsed_s: float) -> float:
        """The load ``elapsed_s`` seconds after the start (clamped to 0..1)."""
        if self.kind == "constant":
            load = self.params[0]
        elif self.kind == "sine":
            low, high, period = self.params
            load = low + (high - low) * (1 - math.cos(2 * math.pi * elapsed_s / period)) / 2
        else:
            start, end, seconds = self.params
            load = start + (end - start) * min(max(elapsed_s, 0.0) / seconds, 1.0)
        return min(max(load, 0.0), 1.0)

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{p:g}' for p in self.params)}"
