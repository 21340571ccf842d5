"""The declaration of one loss term."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lightning_lossmix._errors import (
    LossMixError,
    check_finite_float,
    check_name,
    check_schedule_value,
)
from lightning_lossmix._safe_globals import allow_loading
from lightning_lossmix.schedules import Schedule

Mode = Literal["min", "max"]


@dataclass(frozen=True, repr=False)
class LossTerm:
    """One named loss term: its weight (constant or scheduled) and its direction.

    A ``"min"`` term is minimized; a ``"max"`` term is maximized, so its signed contribution to
    the total is ``-weight * value``. Weights are never negative: direction is what `mode` says.

    Args:
        name: the key under which `compute_losses` returns the term, and its name in the logs
            (``train/loss/<name>``); letters, digits, ``_``, ``-`` and ``.``.
        weight: a non-negative finite float, or a `Schedule` of the optimizer step.
        mode: ``"min"`` to minimize the term, ``"max"`` to maximize it.
        opposed_by: names of submodules (``"encoder"``, ``"backbone.layer4"``) whose parameters
            pursue the opposite of `mode`: a game played with one optimizer and one step,
            such as a feature extractor maximizing the loss its domain classifier minimizes.
            All other parameters pursue `mode`.

    Raises:
        LossMixError: for a bad name, a negative or non-finite weight, an unknown mode, or a
            bad `opposed_by`.

    Examples:
        >>> from lightning_lossmix.schedules import Linear
        >>> LossTerm("recon")
        LossTerm(name='recon', weight=1.0, mode='min')
        >>> kl = LossTerm("kl", weight=Linear(0.0, 1.0, steps=100))
        >>> LossTerm("entropy", weight=0.1, mode="max").signed_weight(step=0)
        -0.1
        >>> LossTerm("domain", opposed_by=["features"])
        LossTerm(name='domain', weight=1.0, mode='min', opposed_by=('features',))
    """

    name: str
    weight: float | Schedule = 1.0
    mode: Mode = "min"
    opposed_by: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        opposed = f", opposed_by={self.opposed_by!r}" if self.opposed_by else ""
        return f"LossTerm(name={self.name!r}, weight={self.weight!r}, mode={self.mode!r}{opposed})"

    def __post_init__(self) -> None:
        check_name(self.name, "LossTerm")
        owner = f"LossTerm {self.name!r}"
        if isinstance(self.weight, Schedule):
            bounds = self.weight.bounds()
            if bounds is not None and bounds[0] < 0:
                raise LossMixError(
                    f"{owner}: the schedule {self.weight!r} goes down to {bounds[0]}; weights "
                    "should be >= 0. Give it a non-negative range; to maximize the term, use "
                    "mode='max' with a non-negative schedule."
                )
        else:
            weight = check_finite_float(self.weight, "weight", owner)
            if weight < 0:
                raise LossMixError(
                    f"{owner}: `weight` should be >= 0. Found `weight = {self.weight}`.\n"
                    f"To maximize the term, keep the weight positive and declare the direction: "
                    f"LossTerm({self.name!r}, weight={-weight}, mode='max')."
                )
            object.__setattr__(self, "weight", weight)
        if self.mode not in get_args(Mode):
            raise LossMixError(
                f"{owner}: `mode` should be 'min' or 'max'. Found `mode = {self.mode!r}`."
            )
        given: Any = self.opposed_by
        opposed = (given,) if isinstance(given, str) or not isinstance(given, Iterable) else given
        opposed = tuple(opposed)
        if not all(isinstance(name, str) and name for name in opposed):
            raise LossMixError(
                f"{owner}: `opposed_by` should be submodule names, e.g. ('encoder',). "
                f"Found `opposed_by = {self.opposed_by!r}`."
            )
        object.__setattr__(self, "opposed_by", opposed)

    @property
    def sign(self) -> float:
        """+1.0 for a ``"min"`` term, -1.0 for a ``"max"`` term."""
        return 1.0 if self.mode == "min" else -1.0

    def weight_at(self, step: int, total_steps: int | None = None) -> float:
        """Return the (non-negative) weight at optimizer step `step`.

        Raises:
            LossMixError: if a schedule returns a negative or non-finite value.
        """
        weight = self.weight
        if isinstance(weight, float):  # a constant: `__post_init__` made it a float
            return weight
        value = weight(step, total_steps)
        if type(value) is float and 0.0 <= value < math.inf:  # the usual case, every step
            return value
        return check_schedule_value(value, weight, f"LossTerm {self.name!r}", step)

    def signed_weight(self, step: int, total_steps: int | None = None) -> float:
        """Return the effective weight at `step`, negative for a ``"max"`` term."""
        weight = self.weight_at(step, total_steps)
        if not weight:
            return 0.0  # never -0.0 in the logs
        return -weight if self.mode == "max" else weight


allow_loading(LossTerm)  # it travels in checkpoints' hyperparameters
