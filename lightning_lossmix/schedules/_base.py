"""The schedule contract and the constant schedule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float
from lightning_lossmix._safe_globals import allow_loading


class Schedule(ABC):
    """A loss weight (or any coefficient) that changes with the optimizer step.

    A schedule is a small picklable object called as ``schedule(step, total_steps=None)``; `step`
    is the optimizer step (``trainer.global_step``) and `total_steps` the number of optimizer
    steps of the whole fit, which the schedules that need it (`Cyclical` without `period`,
    `DANN`) ask for. Subclasses implement `__call__` and `_arguments`; `repr` rebuilds the
    constructor call from `_arguments`, and two schedules with the same arguments are equal.

    Examples:
        A schedule of one's own: a step function, with the bounds that let `LossTerm` check
        its range when it is declared.

        >>> class Halving(Schedule):
        ...     def __init__(self, every: int) -> None:
        ...         self.every = every
        ...     def __call__(self, step, total_steps=None):
        ...         return 0.5 ** (step // self.every)
        ...     def bounds(self):
        ...         return (0.0, 1.0)
        ...     def _arguments(self):
        ...         return {"every": self.every}
        >>> Halving(every=100)(250), Halving(every=100)
        (0.25, Halving(every=100))
    """

    #: Whether `__call__` needs `total_steps`.
    needs_total_steps: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every schedule class, the package's and the user's, loads from a checkpoint under
        # torch.load(weights_only=True): LossTerms in `save_hyperparameters()` carry them.
        super().__init_subclass__(**kwargs)
        allow_loading(cls)

    @abstractmethod
    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return the value at optimizer step `step`."""

    @abstractmethod
    def _arguments(self) -> dict[str, Any]:
        """Return the constructor arguments, in order, so that `repr` rebuilds the object."""

    def bounds(self) -> tuple[float, float] | None:
        """Return the (lowest, highest) value the schedule can take, or None if unknown.

        `LossTerm` uses it to reject a schedule that would go negative when it is declared,
        not thousands of steps later; schedules that return None are checked at every step.
        """
        return None

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self._arguments().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Schedule)
        return self._arguments() == other._arguments()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._arguments().items())))

    def _require_total_steps(self, total_steps: int | None) -> int:
        if total_steps is None:
            raise LossMixError(
                f"{self!r} needs `total_steps`, the number of optimizer steps of the whole fit. "
                "Found `total_steps = None`. LossMixModule passes the trainer's "
                "`estimated_stepping_batches`, which is infinite when the fit has no end "
                "(`max_epochs=-1` and `max_steps=-1`) and unknown for an iterable dataset "
                "without a length: give the Trainer a length (`max_steps`), or the schedule an "
                "explicit one."
            )
        return total_steps


class Constant(Schedule):
    """A constant weight: ``Constant(2.0)(step) == 2.0`` at every step.

    A plain float weight behaves the same; `Constant` exists so that configuration files can
    always name a schedule.

    Args:
        value: the weight.

    Examples:
        >>> Constant(0.5)(step=1000)
        0.5
    """

    def __init__(self, value: float) -> None:
        self.value = check_finite_float(value, "value", "Constant")

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """Return `value`."""
        return self.value

    def _arguments(self) -> dict[str, Any]:
        return {"value": self.value}

    def bounds(self) -> tuple[float, float]:
        """Return ``(value, value)``."""
        return (self.value, self.value)
