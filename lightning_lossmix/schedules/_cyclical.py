"""The cyclical annealing schedule of Fu et al. (2019)."""

from __future__ import annotations

import math
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float, check_int
from lightning_lossmix.schedules._base import Schedule


class Cyclical(Schedule):
    """Cyclical annealing: the fit is cut into cycles; each one ramps up, then holds.

    Within each cycle of ``period`` steps, the value rises linearly from `start` to `end` over
    the first ``ratio * period`` steps and holds `end` for the rest. Without `period`, cycles
    follow Fu et al.'s eq. (4): ``tau = mod(step, ceil(T / M)) / (T / M)`` with ``T`` the
    total steps and ``M`` the cycles, and the value is
    ``start + (end - start) * min(tau / ratio, 1)``. Fu et al. (2019) found that
    re-annealing the KL weight this way several times (they use ``cycles=4, ratio=0.5``) mitigates
    KL vanishing in VAEs.

    Args:
        start: value at the beginning of each cycle.
        end: value held after the ramp of each cycle.
        cycles: number of cycles over the whole fit; used when `period` is None, in which case
            the schedule needs `total_steps` (LossMixModule passes it).
        ratio: fraction of each cycle spent ramping, in (0, 1].
        period: length of a cycle in optimizer steps; overrides `cycles`, and then the
            schedule repeats forever and needs no `total_steps`.

    Examples:
        >>> beta = Cyclical(cycles=4, ratio=0.5)
        >>> [beta(step, total_steps=800) for step in (0, 50, 100, 150, 200)]
        [0.0, 0.5, 1.0, 1.0, 0.0]
        >>> Cyclical(period=10)(15)
        1.0

    Paper: "Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing",
    https://arxiv.org/abs/1903.10145
    """

    def __init__(
        self,
        start: float = 0.0,
        end: float = 1.0,
        cycles: int = 4,
        ratio: float = 0.5,
        period: int | None = None,
    ) -> None:
        self.start = check_finite_float(start, "start", "Cyclical")
        self.end = check_finite_float(end, "end", "Cyclical")
        self.cycles = check_int(cycles, "cycles", "Cyclical", minimum=1)
        self.ratio = check_finite_float(ratio, "ratio", "Cyclical")
        if not 0.0 < self.ratio <= 1.0:
            raise LossMixError(f"Cyclical: `ratio` should be in (0, 1]. Found `ratio = {ratio}`.")
        self.period = None if period is None else check_int(period, "period", "Cyclical", 1)
        self.needs_total_steps = period is None

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return the value at optimizer step `step`."""
        if step <= 0:  # the start of a cycle, whatever the fit's length
            return self.start
        if self.period is None:
            # Fu et al.'s eq. (4): tau = mod(t, ceil(T / M)) / (T / M).
            cycle = self._require_total_steps(total_steps) / self.cycles
            tau = (step % math.ceil(cycle)) / cycle
        else:
            tau = (step % self.period) / self.period
        if tau >= self.ratio:
            return self.end
        return self.start + (self.end - self.start) * tau / self.ratio

    def bounds(self) -> tuple[float, float]:
        """Return ``(min(start, end), max(start, end))``."""
        return (min(self.start, self.end), max(self.start, self.end))

    def _arguments(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "cycles": self.cycles,
            "ratio": self.ratio,
            "period": self.period,
        }
