"""Ramps: schedules that go from `start` to `end` over `steps` optimizer steps after `delay`."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float, check_int
from lightning_lossmix.schedules._base import Schedule


class _Ramp(Schedule):
    """`start` until `delay`, then a `_shape`-d path to `end` over `steps` steps, then `end`."""

    def __init__(self, start: float, end: float, steps: int, delay: int = 0) -> None:
        owner = type(self).__name__
        self.start = check_finite_float(start, "start", owner)
        self.end = check_finite_float(end, "end", owner)
        self.steps = check_int(steps, "steps", owner, minimum=1)
        self.delay = check_int(delay, "delay", owner, minimum=0)

    @abstractmethod
    def _shape(self, progress: float) -> float:
        """Map progress in [0, 1] to the fraction of the way from `start` to `end`."""

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return the value at optimizer step `step`."""
        progress = min(max((step - self.delay) / self.steps, 0.0), 1.0)
        if progress == 0.0:
            return self.start
        if progress == 1.0:
            return self.end
        return self.start + (self.end - self.start) * self._shape(progress)

    def _arguments(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps": self.steps, "delay": self.delay}

    def bounds(self) -> tuple[float, float]:
        """Return ``(min(start, end), max(start, end))``: every ramp stays between its ends."""
        return (min(self.start, self.end), max(self.start, self.end))


class Linear(_Ramp):
    """A linear ramp: `start` until `delay`, linear to `end` over `steps` steps, then `end`.

    The usual KL warm-up of VAEs (Bowman et al., 2016, https://arxiv.org/abs/1511.06349) is
    ``Linear(0.0, 1.0, steps=10_000)``.

    Args:
        start: value before and at `delay`.
        end: value from ``delay + steps`` on.
        steps: length of the ramp in optimizer steps (>= 1).
        delay: optimizer steps to hold `start` before the ramp begins.

    Examples:
        >>> warmup = Linear(0.0, 1.0, steps=100, delay=10)
        >>> warmup(0), warmup(60), warmup(500)
        (0.0, 0.5, 1.0)
        >>> warmup
        Linear(start=0.0, end=1.0, steps=100, delay=10)
    """

    def _shape(self, progress: float) -> float:
        return progress


class Cosine(_Ramp):
    """A half-cosine ramp from `start` to `end`: flat at both ends, steepest in the middle.

    Args:
        start: value before and at `delay`.
        end: value from ``delay + steps`` on.
        steps: length of the ramp in optimizer steps (>= 1).
        delay: optimizer steps to hold `start` before the ramp begins.

    Examples:
        >>> decay = Cosine(1.0, 0.0, steps=100)
        >>> decay(0), decay(50), decay(100)
        (1.0, 0.5, 0.0)
    """

    def _shape(self, progress: float) -> float:
        return (1.0 - math.cos(math.pi * progress)) / 2.0


class Sigmoid(_Ramp):
    """A logistic ramp from `start` to `end`, as in the KL annealing of Bowman et al. (2016).

    The logistic curve ``1 / (1 + exp(-sharpness * (progress - 0.5)))`` is rescaled so that the
    ramp starts exactly at `start` and ends exactly at `end`.

    Args:
        start: value before and at `delay`.
        end: value from ``delay + steps`` on.
        steps: length of the ramp in optimizer steps (>= 1).
        delay: optimizer steps to hold `start` before the ramp begins.
        sharpness: how abrupt the middle of the ramp is (> 0); 10 is a gentle S.

    Examples:
        >>> anneal = Sigmoid(0.0, 1.0, steps=100)
        >>> anneal(0), round(anneal(50), 6), anneal(100)
        (0.0, 0.5, 1.0)
        >>> switch = Sigmoid(0.0, 1.0, steps=100, sharpness=2000.0)  # nearly a step: no overflow
        >>> switch(40), switch(50), switch(60)
        (0.0, 0.5, 1.0)

    Paper: "Generating Sentences from a Continuous Space", https://arxiv.org/abs/1511.06349
    """

    def __init__(
        self, start: float, end: float, steps: int, delay: int = 0, sharpness: float = 10.0
    ) -> None:
        super().__init__(start, end, steps, delay)
        self.sharpness = check_finite_float(sharpness, "sharpness", "Sigmoid")
        if self.sharpness <= 0:
            raise LossMixError(
                f"Sigmoid: `sharpness` should be > 0. Found `sharpness = {sharpness}`."
            )

    def _shape(self, progress: float) -> float:
        # With sigma(z) = (1 + tanh(z / 2)) / 2, the rescaled logistic is a ratio of tanh,
        # which never overflows (exp did past sharpness ~1420) and keeps its precision for a
        # small sharpness (the difference of two logistics near 0.5 did not).
        half = math.tanh(self.sharpness / 4.0)
        if half == 0.0:  # sharpness so small that the curve is a straight line
            return progress
        shape = (math.tanh(self.sharpness * (progress - 0.5) / 2.0) + half) / (2.0 * half)
        return min(max(shape, 0.0), 1.0)

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "sharpness": self.sharpness}
