"""The non-finite policy of a `LossMixModule`: what a NaN or infinite term or gradient does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lossmix._compat import any_nonfinite, dense_values
from lightning_lossmix._errors import LossMixError
from lightning_lossmix._mix import LossMixOutput, nonfinite_message
from lightning_lossmix._warnings import user_location, warn_at

if TYPE_CHECKING:
    from lightning_lossmix._module import LossMixModule

__all__ = ["CheckedClosure", "NonFinite", "NonFinitePolicy", "zero_loss"]

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
        step_key: returns the current step's key. It is called only when a step was marked or
            a value is not finite: reading Lightning's step takes a chain of properties, and
            the checks run every step.
    """

    def __init__(self, mode: NonFinite, step_key: Callable[[], int]) -> None:
        if mode not in ("raise", "skip"):
            raise LossMixError(
                "LossMixModule: `nonfinite` should be 'raise' or 'skip'. "
                f"Found `nonfinite = {mode!r}`."
            )
        self.mode: NonFinite = mode
        self.step_key = step_key
        self.skipped_steps = 0
        self.warned: set[str] = set()
        self._skip_at: int | None = None
        # See `_see`: the trainer last seen, whether it runs several processes and whether it
        # has a GradScaler.
        self._trainer: pl.Trainer | None = None
        self._distributed = False
        self._grad_scaler = False

    def skipping(self) -> bool:
        """Whether the current step is being skipped."""
        return self._skip_at is not None and self._skip_at == self.step_key()

    def clear(self) -> None:
        """Forget the skipped step (a player's turn is over)."""
        self._skip_at = None

    def _see(self, trainer: pl.Trainer | None) -> None:
        """Take a new trainer: note its processes and GradScaler; forget the last one's skip.

        Whether `trainer` runs several processes and whether it has a GradScaler are fixed when
        a Trainer is built and needed at every step, where reading them costs a chain of
        Lightning properties: they are kept for the last trainer seen, which the checks compare
        with theirs. It is held, so that a new Trainer is never taken for it (as an `id` could
        be), and it is not pickled or copied with the module (`__getstate__`). A step marked
        skipped under another trainer is forgotten: a new fit counts its steps from 0 again.
        """
        # None: a step called without a Trainer (a unit test of the module, Lightning Fabric)
        self._distributed = trainer is not None and trainer.world_size > 1
        scaler = None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)
        self._grad_scaler = scaler is not None
        self._trainer = trainer
        self._skip_at = None

    def __getstate__(self) -> dict[str, Any]:
        """Drop the trainer, as a LightningModule does."""
        return {**self.__dict__, "_trainer": None}

    def check_terms(self, output: LossMixOutput, trainer: pl.Trainer | None) -> bool:
        """Apply the policy to a training step's terms; return whether the step is skipped.

        One device sync (and, under DDP, one small all-reduce) per call.

        Raises:
            LossMixError: with ``"raise"``, naming the term, the step and the value.
        """
        if trainer is not self._trainer:
            self._see(trainer)
        if trainer is None:  # no step counter to key a skip by: each call is a step of its own
            self._skip_at = None
        elif self.skipping():  # every process marked it: no new vote needed
            return True
        bad = output.nonfinite()
        finite = not bad
        # Every rank must take the same decision, or the others would wait forever in the
        # gradient all-reduce.
        if self._distributed:
            assert trainer is not None
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return False
        key = self.step_key()
        if self.mode == "raise":
            if not bad:
                raise LossMixError(
                    f"A loss term is NaN or infinite on another process at step {key}; "
                    "see that process's error for the term. Use nonfinite='skip' to skip such "
                    "steps."
                )
            name, value = next(iter(bad.items()))
            raise LossMixError(nonfinite_message(name, value, key))
        for name, value in bad.items():
            self._warn_once(
                trainer,
                name,
                f"Loss term {name!r} is {value} at step {key}: skipping this optimizer "
                "step (parameters untouched). Further skips are counted in "
                "`train/skipped_steps` without a new warning for this term.",
            )
        if self._distributed:  # rank zero warns, and may hold none of the culprits
            assert trainer is not None
            for name in _bad_elsewhere(output, bad, trainer):
                self._warn_once(
                    trainer,
                    name,
                    f"Loss term {name!r} is NaN or infinite on another process at step {key}: "
                    "skipping this optimizer step on every process (parameters untouched). "
                    "Further skips are counted in `train/skipped_steps` without a new warning "
                    "for this term.",
                )
        self._mark(key)
        return True

    def gradients_dropped(
        self, module: pl.LightningModule, optimizer: Optimizer | LightningOptimizer
    ) -> bool:
        """Return whether `optimizer`'s current step is dropped: a term or a gradient not finite.

        The gradients are checked with the fused kernel a GradScaler runs
        (`_compat.any_nonfinite`) and one device sync per optimizer step; the culprit is looked
        for only when it fails. Under a GradScaler (``precision="16-mixed"``) the scaler already
        skips the steps whose gradients are not finite, so only the terms count there.

        Raises:
            LossMixError: under ``"raise"``, naming the step and the first parameter whose
                gradient is not finite.
        """
        trainer = module.trainer
        if trainer is not self._trainer:
            self._see(trainer)
        if self.skipping():
            return True
        if self._grad_scaler:
            return False
        groups = optimizer.param_groups
        grads = [g for group in groups for p in group["params"] if (g := p.grad) is not None]
        finite = not any_nonfinite(grads)
        if self._distributed:
            assert trainer is not None
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return False
        parameters = [p for group in groups for p in group["params"]]
        self._gradients_not_finite(parameters, trainer, module)
        module.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        return True

    def _gradients_not_finite(
        self, parameters: Sequence[nn.Parameter], trainer: pl.Trainer, module: nn.Module
    ) -> None:
        """Raise, or warn once and mark the step skipped, naming the first culprit."""
        culprit, value = _first_nonfinite(parameters, module.named_parameters())
        key = self.step_key()
        where = f"of parameter {culprit!r} is {value}" if culprit else "is not finite"
        message = (
            f"The gradient {where} at step {key}, though every loss term is finite: a "
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
        self._mark(key)

    def _mark(self, key: int) -> None:
        self._skip_at = key
        self.skipped_steps += 1

    def _warn_once(self, trainer: pl.Trainer | None, name: str, message: str) -> None:
        if name not in self.warned:
            self.warned.add(name)
            where = None if trainer is None else user_location(trainer.lightning_module)
            warn_at(message, where)

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's part of the checkpoint."""
        return {"skipped_steps": self.skipped_steps, "warned_nonfinite": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the skip counter and the terms already warned about."""
        self.skipped_steps = int(state["skipped_steps"])
        self.warned = set(state["warned_nonfinite"])


def _bad_elsewhere(output: LossMixOutput, bad: dict[str, float], trainer: pl.Trainer) -> list[str]:
    """Return the terms not finite on some other process but finite here.

    One all-reduce of a flag per term, on a skipped step only (every process gets here).
    """
    names = list(output.values)
    flags = output.total.new_tensor([float(name in bad) for name in names], dtype=torch.float32)
    found = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
    return [name for name, count in zip(names, found, strict=True) if count and name not in bad]


def zero_loss(module: nn.Module) -> Tensor:
    """Return a loss of value 0 whose gradient is 0 on every trainable parameter of `module`.

    Returned instead of None by a skipped step under automatic optimization: Lightning refuses
    None under DDP, and DDP's reducer expects a gradient for every parameter.
    """
    touched = [p.reshape(-1)[:1].sum() for p in module.parameters() if p.requires_grad]
    if not touched:
        return torch.zeros(())
    return torch.stack(touched).sum() * 0.0


class CheckedClosure:
    """Lightning's closure (training step and backward), then the `nonfinite` decision on it.

    `LossMixModule.optimizer_step` hands it to the optimizer in place of Lightning's closure, so
    that the gradients are checked right after the backward, inside ``optimizer.step`` and
    before any ``on_before_optimizer_step`` hook (which sees `skipping_step`). The gradients of a
    dropped step are set to None, which leaves the parameters and the optimizer's state (Adam's
    step count and moments) untouched. Only the first evaluation decides: an optimizer that
    evaluates the closure again (LBFGS) gets its further evaluations as they are.

    Args:
        closure: Lightning's closure.
        module: the module, whose `gradients_dropped` decides.
        optimizer: the optimizer that is stepping.
    """

    def __init__(
        self,
        closure: Callable[[], Any],
        module: LossMixModule,
        optimizer: Optimizer | LightningOptimizer,
    ) -> None:
        self.closure = closure
        self.module = module
        self.optimizer = optimizer
        self.checked = False

    def __call__(self) -> Any:
        if self.checked:  # a further evaluation of the same step (LBFGS): logged once already
            with self.module._train_log.quiet():
                return self.closure()
        result = self.closure()
        self.checked = True
        if not self.module.gradients_dropped(self.optimizer):
            return result
        self.optimizer.zero_grad(set_to_none=True)
        # Under a GradScaler, None makes it skip its step and its scale update, as for a skipped
        # backward. Else a detached 0: optimizers that read the closure's loss (LBFGS) get a
        # number, and with no gradients none of them moves a parameter or its state.
        scaler = getattr(self.module.trainer.precision_plugin, "scaler", None)
        return None if scaler is not None else torch.zeros(())


def _first_nonfinite(
    parameters: Sequence[nn.Parameter], names: Iterable[tuple[str, nn.Parameter]]
) -> tuple[str | None, float]:
    """Return the name of the first parameter whose gradient is not finite, and one such value."""
    wanted = {id(p) for p in parameters}
    for name, parameter in names:
        grad = parameter.grad
        if id(parameter) in wanted and grad is not None:
            grad = dense_values(grad)
            bad = grad[~torch.isfinite(grad)]
            if bad.numel():
                return name, float(bad.reshape(-1)[0])
    return None, float("nan")
