"""The gradient-reversal coefficient schedule of domain-adversarial training (DANN)."""

from __future__ import annotations

import math
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float
from lightning_lossmix.schedules._base import Schedule


class DANN(Schedule):
    """The DANN coefficient ``2 / (1 + exp(-gamma * p)) - 1`` with ``p = step / total_steps``.

    It rises from 0 at the start of the fit towards 1 at its end, so that the adversarial
    signal is weak while the domain classifier is still noise. Ganin et al. (2016) use
    ``gamma = 10``. It needs `total_steps`; `LossMixModule` passes the trainer's estimate.

    Args:
        gamma: how fast the coefficient rises (> 0).

    Examples:
        >>> schedule = DANN()
        >>> schedule(0, total_steps=1000), round(schedule(1000, total_steps=1000), 4)
        (0.0, 0.9999)

    Paper: "Domain-Adversarial Training of Neural Networks", https://arxiv.org/abs/1505.07818
    """

    needs_total_steps = True

    def __init__(self, gamma: float = 10.0) -> None:
        self.gamma = check_finite_float(gamma, "gamma", "DANN")
        if self.gamma <= 0:
            raise LossMixError(f"DANN: `gamma` should be > 0. Found `gamma = {gamma}`.")

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return the coefficient at optimizer step `step`."""
        if step <= 0:  # 0 whatever the fit's length
            return 0.0
        progress = min(max(step / max(self._require_total_steps(total_steps), 1), 0.0), 1.0)
        return 2.0 / (1.0 + math.exp(-self.gamma * progress)) - 1.0

    def bounds(self) -> tuple[float, float]:
        """Return ``(0, 1)``."""
        return (0.0, 1.0)

    def _arguments(self) -> dict[str, Any]:
        return {"gamma": self.gamma}
