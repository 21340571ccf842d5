"""Piecewise-constant schedules: switch a term on, off or to another weight at given steps."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float, check_int
from lightning_lossmix.schedules._base import Schedule


class Piecewise(Schedule):
    """A piecewise-constant weight: ``values[i]`` from ``boundaries[i - 1]`` to ``boundaries[i]``.

    ``values`` has one more entry than ``boundaries``: ``values[0]`` holds before the first
    boundary and ``values[-1]`` from the last one on. A typical use switches an auxiliary term
    on after a warm-up.

    Args:
        boundaries: strictly increasing optimizer steps at which the value changes.
        values: the values, ``len(boundaries) + 1`` of them.

    Examples:
        >>> late = Piecewise(boundaries=[1000], values=[0.0, 1.0])
        >>> late(999), late(1000)
        (0.0, 1.0)
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]) -> None:
        self.boundaries = [
            check_int(b, f"boundaries[{i}]", "Piecewise", minimum=0)
            for i, b in enumerate(boundaries)
        ]
        self.values = [
            check_finite_float(v, f"values[{i}]", "Piecewise") for i, v in enumerate(values)
        ]
        if len(self.values) != len(self.boundaries) + 1:
            raise LossMixError(
                "Piecewise: `values` should have one more entry than `boundaries`. Found "
                f"`len(boundaries) = {len(self.boundaries)}` and "
                f"`len(values) = {len(self.values)}`."
            )
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise LossMixError(
                "Piecewise: `boundaries` should be strictly increasing. "
                f"Found `boundaries = {self.boundaries}`."
            )

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return the value at optimizer step `step`."""
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def bounds(self) -> tuple[float, float]:
        """Return ``(min(values), max(values))``."""
        return (min(self.values), max(self.values))

    def _arguments(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries, "values": self.values}

    def __hash__(self) -> int:
        return hash((tuple(self.boundaries), tuple(self.values)))
