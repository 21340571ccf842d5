"""The non-finite policy of a `LossMixModule`: what a NaN or infinite term or gradient does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_lossmix._compat import any_nonfinite
from lightning_lossmix._errors import LossMixError
from lightning_lossmix._mix import LossMixOutput, nonfinite_message
from lightning_lossmix._warnings import user_location, warn_at

__all__ = ["NonFinite", "NonFinitePolicy", "ReplayFirst", "zero_loss"]

NonFinite = Literal["raise", "skip"]
_GRADIENT = "(gradient)"  # the key of the gradient warning among the terms' warnings


class NonFinitePolicy:
    """Applies ``nonfinite="raise" | "skip"`` to a training step's terms and gradients.

    A step is identified by a key that the module gives (the optimizer step under automatic
    optimization, the batch under manual optimization): once a step is marked skipped,
    `skipping` says so for that key only, so the next step trains normally. Every decision is
    voted across DDP processes, so that all of them skip or raise together.

    Args:
        mode: ``"raise"`` or ``"skip"``.
    """

    def __init__(self, mode: NonFinite) -> None:
        if mode not in ("raise", "skip"):
            raise LossMixError(
                "LossMixModule: `nonfinite` should be 'raise' or 'skip'. "
                f"Found `nonfinite = {mode!r}`."
            )
        self.mode: NonFinite = mode
        self.skipped_steps = 0
        self.warned: set[str] = set()
        self._skip_at: int | None = None

    def skipping(self, key: int) -> bool:
        """Whether the step `key` is being skipped."""
        return self._skip_at is not None and self._skip_at == key

    def clear(self) -> None:
        """Forget the skipped step (a player's turn is over)."""
        self._skip_at = None

    def check_terms(
        self, output: LossMixOutput, trainer: pl.Trainer, key: int, shown_step: int
    ) -> bool:
        """Apply the policy to a training step's terms; return whether the step is skipped.

        One device sync (and, under DDP, one small all-reduce) per call.

        Raises:
            LossMixError: with ``"raise"``, naming the term, the step and the value.
        """
        if self.skipping(key):  # every process marked it: no new vote needed
            return True
        bad = output.nonfinite()
        # Every rank must take the same decision, or the others would wait forever in the
        # gradient all-reduce; on one device this is free.
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return False
        if self.mode == "raise":
            if not bad:
                raise LossMixError(
                    f"A loss term is NaN or infinite on another process at step {shown_step}; "
                    "see that process's error for the term. Use nonfinite='skip' to skip such "
                    "steps."
                )
            name, value = next(iter(bad.items()))
            raise LossMixError(nonfinite_message(name, value, shown_step))
        for name, value in bad.items():
            self._warn_once(
                trainer,
                name,
                f"Loss term {name!r} is {value} at step {shown_step}: skipping this optimizer "
                "step (parameters untouched). Further skips are counted in "
                "`train/skipped_steps` without a new warning for this term.",
            )
        self._mark(key)
        return True

    def check_gradients(
        self,
        parameters: Sequence[nn.Parameter],
        trainer: pl.Trainer,
        key: int,
        shown_step: int,
        names: Iterable[tuple[str, nn.Parameter]],
    ) -> bool:
        """Apply the policy to the gradients about to be applied; return whether to drop them.

        The check is the fused kernel a GradScaler runs (`_compat.any_nonfinite`) and one
        device sync per optimizer step; the culprit is looked for only when it fails.

        Raises:
            LossMixError: with ``"raise"``, naming the step and the first parameter whose
                gradient is not finite.
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = not any_nonfinite(grads)
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return False
        culprit, value = _first_nonfinite(parameters, names)
        where = f"of parameter {culprit!r} is {value}" if culprit else "is not finite"
        message = (
            f"The gradient {where} at step {shown_step}, though every loss term is finite: a "
            "term's derivative is not finite there (sqrt, a norm or pow(x, p < 1) at 0, log near "
            "0, an exploding activation)."
        )
        if self.mode == "raise":
            raise LossMixError(
                f"{message} Applying it would write NaN into the weights. Find the operation "
                "with torch.autograd.set_detect_anomaly(True), add an epsilon (sqrt(x + 1e-12)), "
                "or use nonfinite='skip' to skip such steps."
            )
        self._warn_once(
            trainer,
            _GRADIENT,
            f"{message} Skipping this optimizer step (parameters and optimizer state untouched). "
            "Further skips are counted in `train/skipped_steps` without a new warning.",
        )
        if not self.skipping(key):
            self._mark(key)
        return True

    def gradients_dropped(
        self, module: pl.LightningModule, parameters: Sequence[nn.Parameter], key: int
    ) -> bool:
        """Return whether step `key` is dropped: a skipped term, or gradients not finite.

        Under a GradScaler (``precision="16-mixed"``) the scaler already skips the steps whose
        gradients are not finite, so only the terms count there.

        Raises:
            LossMixError: under ``"raise"``, for a gradient that is not finite.
        """
        if self.skipping(key):
            return True
        trainer = module.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return False
        if not self.check_gradients(parameters, trainer, key, key, module.named_parameters()):
            return False
        module.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        return True

    def _mark(self, key: int) -> None:
        self._skip_at = key
        self.skipped_steps += 1

    def _warn_once(self, trainer: pl.Trainer, name: str, message: str) -> None:
        if name not in self.warned:
            self.warned.add(name)
            warn_at(message, user_location(trainer.lightning_module))

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's part of the checkpoint."""
        return {"skipped_steps": self.skipped_steps, "warned_nonfinite": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the skip counter and the terms already warned about."""
        self.skipped_steps = int(state["skipped_steps"])
        self.warned = set(state["warned_nonfinite"])


def zero_loss(module: nn.Module) -> Tensor:
    """Return a loss of value 0 whose gradient is 0 on every trainable parameter of `module`.

    Returned instead of None by a skipped step under automatic optimization: Lightning refuses
    None under DDP, and DDP's reducer expects a gradient for every parameter.
    """
    touched = [p.reshape(-1)[:1].sum() for p in module.parameters() if p.requires_grad]
    if not touched:
        return torch.zeros(())
    return torch.stack(touched).sum() * 0.0


class ReplayFirst:
    """A closure already run once: returns its result, then runs it again if asked.

    `LossMixModule.optimizer_step` runs Lightning's closure (training step and backward) itself,
    to decide on the step before the optimizer sees it, then hands the optimizer this stand-in:
    the first call returns the result without a second backward; an optimizer that evaluates
    the closure several times (LBFGS) gets fresh evaluations after that.
    """

    def __init__(self, result: Any, closure: Callable[[], Any]) -> None:
        self.result = result
        self.closure = closure
        self.replayed = False

    def __call__(self) -> Any:
        if self.replayed:
            return self.closure()
        self.replayed = True
        return self.result


def _first_nonfinite(
    parameters: Sequence[nn.Parameter], names: Iterable[tuple[str, nn.Parameter]]
) -> tuple[str | None, float]:
    """Return the name of the first parameter whose gradient is not finite, and one such value."""
    wanted = {id(p) for p in parameters}
    for name, parameter in names:
        grad = parameter.grad
        if id(parameter) in wanted and grad is not None:
            bad = grad[~torch.isfinite(grad)]
            if bad.numel():
                return name, float(bad.reshape(-1)[0])
    return None, float("nan")
