"""A `LossMixModule`'s schedule clock: the step its weights are evaluated at; the fit's length."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_lossmix._compat import attached_trainer, batches_that_stepped
from lightning_lossmix._nonfinite import NonFinitePolicy
from lightning_lossmix._term import LossTerm
from lightning_lossmix.nn import GradientReversal

__all__ = ["CHECKPOINT_KEY", "ScheduleClock", "load_state", "save_state"]

CHECKPOINT_KEY = "lightning_lossmix"  # where a checkpoint keeps the state below


class ScheduleClock:
    """Tells a module's schedules which step it is and how long the fit is, and remembers both.

    During a fit the step is the trainer's optimizer step (``global_step``), or, in a game with
    players and under manual optimization, the number of batches (one schedule step per batch,
    whatever the number of optimizers: ``global_step`` counts each optimizer's steps, while the
    fit's length, ``estimated_stepping_batches``, counts batches). Outside a fit
    (``trainer.validate(ckpt_path=...)``, ``trainer.test``), Lightning does not restore the
    loop's step: the clock then returns the step after the last training step it saw, or the
    loaded checkpoint's.

    Args:
        steps_per_batch: with players, the number of optimizer steps the module takes after
            ``b`` batches, as a function of ``b`` (for the fit's length under ``max_steps``);
            None without players.
    """

    def __init__(self, steps_per_batch: Callable[[int], int] | None = None) -> None:
        self.steps_after = steps_per_batch
        # The step and length that evaluation outside a fit uses.
        self.resume_step = 0
        self.resume_total_steps: int | None = None
        self._total_steps: int | None = None
        self._total_steps_key: tuple[Any, ...] | None = None
        self._reversal_layers: list[GradientReversal] | None = None
        # A length the module was given (`LossMixModule.total_steps = n`), used instead.
        self.given_total_steps: int | None = None
        # See `_batch_start`: the first training call of this fit's first and current batches
        # (trainer id, batches, global_step), and the rate measured between them.
        self._first: tuple[int, int, int] | None = None
        self._current: tuple[int, int, int] | None = None
        self._rate: tuple[int, int] | None = None
        self._rate_owner: int | None = None  # the trainer's id, or `_LOADED`

    def step(self, trainer: pl.Trainer | None) -> int:
        """Return the step schedules are evaluated at (see the class docstring)."""
        if not _fitting(trainer):
            return self.resume_step
        assert trainer is not None
        # Lightning's global_step counts every player's (every optimizer's) step.
        if self.steps_after is not None or not trainer.lightning_module.automatic_optimization:
            count = batches_that_stepped(trainer)
            # A validation inside the fit runs before Lightning counts the batch just played:
            # the step after it, as `global_step` (and the checkpoint's step) already is.
            if trainer.validating and not trainer.sanity_checking:
                count += 1
            return count
        return trainer.global_step

    def total_steps(self, trainer: pl.Trainer | None) -> int | None:
        """Return the fit's number of schedule steps, or None if unknown.

        While fitting, the trainer's `estimated_stepping_batches`, recomputed whenever the
        trainer or its length changes (a tuner's short fit, then the real one). Outside a fit,
        the length saved in the checkpoint, if any.
        """
        if self.given_total_steps is not None:
            return self.given_total_steps
        if not _fitting(trainer):
            return self.resume_total_steps
        assert trainer is not None
        # Under manual optimization, `max_steps` counts every optimizer's steps: the length in
        # batches is known once a batch has stepped (see `_manual_batches`).
        measured = None
        manual = self.steps_after is None and not trainer.lightning_module.automatic_optimization
        if manual and trainer.max_steps > 0:
            measured = self._batch_start(trainer)
        key = (
            id(trainer),
            trainer.max_steps,
            trainer.max_epochs,
            trainer.num_training_batches,
            trainer.accumulate_grad_batches,
            measured is not None,
        )
        if self._total_steps_key != key:
            estimate = trainer.estimated_stepping_batches
            if self.steps_after is not None and trainer.max_steps > 0:
                estimate = min(estimate, self._batches_for(trainer.max_steps))
            elif measured is not None:
                estimate = _manual_batches(trainer, *measured)
            # Infinite without an end; -1 (`max_steps`) for an iterable dataset without a length
            known = math.isfinite(estimate) and estimate > 0
            self._total_steps = int(estimate) if known else None
            self._total_steps_key = key
        return self._total_steps

    def _batch_start(self, trainer: pl.Trainer) -> tuple[int, int] | None:
        """Return ``(batches, steps)``: optimizer steps taken over a number of batches played.

        Measured between the first training calls of two batches of this fit, so that the
        steps an optimizer takes in a batch before the mix is called (a discriminator stepped
        first) count once per batch on both sides. Kept for the rest of the fit and in the
        checkpoint, so that a resumed fit gets the same length; None until measured.
        """
        key = id(trainer)
        if self._rate is not None and self._rate_owner in (key, _LOADED):
            self._rate_owner = key
            return self._rate
        if trainer.validating or trainer.sanity_checking:
            return None
        batches = batches_that_stepped(trainer)
        current = self._current
        if current is None or current[0] != key or current[1] != batches:
            current = self._current = (key, batches, trainer.global_step)
            if self._first is None or self._first[0] != key:
                self._first = current
        first = self._first
        assert first is not None
        played, steps = current[1] - first[1], current[2] - first[2]
        if played <= 0 or steps <= 0:
            return None
        self._rate, self._rate_owner = (played, steps), key
        return self._rate

    def _batches_for(self, max_steps: int) -> int:
        """Return the number of batches after which the players have taken `max_steps` steps."""
        assert self.steps_after is not None
        low, high = 0, max_steps  # every player steps at least once per `max_steps` batches...
        while self.steps_after(high) < max_steps:  # ...unless one steps rarely: widen
            high *= 2
        while low < high:
            middle = (low + high) // 2
            if self.steps_after(middle) >= max_steps:
                high = middle
            else:
                low = middle + 1
        return low

    def set_reversal_steps(self, module: pl.LightningModule) -> None:
        """Set the step of every `GradientReversal` layer of `module`, for scheduled scales.

        The fit's length is passed to the scales that need it.
        """
        if self._reversal_layers is None:
            self._reversal_layers = [m for m in module.modules() if isinstance(m, GradientReversal)]
        if not self._reversal_layers:
            return
        trainer = attached_trainer(module)
        for layer in self._reversal_layers:
            needs_total = getattr(layer.scale, "needs_total_steps", False)
            layer.set_step(self.step(trainer), self.total_steps(trainer) if needs_total else None)

    def advance(self, step: int, total_steps: int | None) -> None:
        """Remember a training step, for evaluation after the fit."""
        self.resume_step = step + 1
        self.resume_total_steps = total_steps or self.resume_total_steps

    def state_dict(self, trainer: pl.Trainer | None) -> dict[str, Any]:
        """Return the clock's part of the checkpoint."""
        total = self.total_steps(trainer) if _fitting(trainer) else self.resume_total_steps
        state: dict[str, Any] = {"total_steps": total, "schedule_step": self.resume_step}
        if self._rate is not None:  # manual optimization under max_steps (`_batch_start`)
            state["steps_per_batches"] = list(self._rate)
        return state

    def load_state_dict(self, state: dict[str, Any] | None, global_step: int) -> None:
        """Restore the clock from a checkpoint (`state` is None for one written without it)."""
        self.resume_step = global_step
        if state is not None:
            self.resume_total_steps = state.get("total_steps")
            self.resume_step = int(state.get("schedule_step", global_step))
            rate = state.get("steps_per_batches")
            if rate is not None:
                self._rate, self._rate_owner = (int(rate[0]), int(rate[1])), _LOADED


def save_state(
    clock: ScheduleClock,
    policy: NonFinitePolicy,
    terms: Sequence[LossTerm],
    trainer: pl.Trainer | None,
) -> dict[str, Any]:
    """Return what a `LossMixModule` stores under `CHECKPOINT_KEY`.

    That is the clock, the skip counter, the terms already warned about, and the declared terms
    (their `repr`, compared on load).
    """
    return {
        **policy.state_dict(),
        **clock.state_dict(trainer),
        "terms": [repr(term) for term in terms],
    }


def load_state(
    clock: ScheduleClock,
    policy: NonFinitePolicy,
    terms: Sequence[LossTerm],
    checkpoint: dict[str, Any],
) -> None:
    """Restore `save_state`'s state from `checkpoint`; warn if the declared terms changed."""
    state = checkpoint.get(CHECKPOINT_KEY)
    clock.load_state_dict(state, int(checkpoint.get("global_step", 0)))
    if state is None:
        return
    policy.load_state_dict(state)
    current = [repr(term) for term in terms]
    if state["terms"] != current:
        rank_zero_warn(
            "The loss terms differ from the checkpoint's: resuming with "
            f"{current} instead of {state['terms']}. If this is not intended, declare the "
            "same terms as the run that wrote the checkpoint."
        )


_LOADED = -1  # `ScheduleClock._rate_owner` of a rate read from a checkpoint


def _manual_batches(trainer: pl.Trainer, batches: int, steps: int) -> int:
    """Return the number of batches of a fit under manual optimization that `max_steps` may end.

    ``max_steps`` counts the optimizer steps of every optimizer, the schedules' clock batches:
    the batches it allows follow from the `steps` taken over `batches` batches, assuming the
    fit goes on at that rate. The epochs may end it earlier.
    """
    per_batch = steps / batches
    batches = math.ceil(trainer.max_steps / per_batch)
    epochs, per_epoch = trainer.max_epochs, trainer.num_training_batches
    if epochs is not None and epochs >= 0 and math.isfinite(per_epoch):
        batches = min(batches, int(per_epoch) * max(epochs, 1))
    return batches


def _fitting(trainer: pl.Trainer | None) -> bool:
    # `is`, not ``== "fit"``: LightningEnum's case-insensitive `==` costs several calls, per step.
    return trainer is not None and trainer.state.fn is TrainerFn.FITTING
