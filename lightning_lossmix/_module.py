"""LossMixModule: a LightningModule whose loss is a declared mix of terms."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lossmix._errors import LossMixError
from lightning_lossmix._mean import SampleMean
from lightning_lossmix._mix import LossMix, LossMixOutput, nonfinite_message
from lightning_lossmix._term import LossTerm
from lightning_lossmix.nn import GradientReversal

Stage = Literal["train", "val", "test"]
NonFinite = Literal["raise", "skip"]
_CHECKPOINT_KEY = "lightning_lossmix"


class LossMixModule(pl.LightningModule):
    """A LightningModule whose loss is the signed weighted sum of declared terms.

    Subclasses implement `compute_losses` (term name to scalar tensor) and
    `configure_optimizers`; this class provides `training_step`, `validation_step` and
    `test_step`, which validate the terms, assemble the total and log:

    - ``train/loss`` (also on the progress bar), ``train/loss/<term>`` (raw values) and
      ``train/weight/<term>`` (signed effective weights), every step;
    - ``val/loss``, ``val/loss/<term>``, ``test/loss``, ``test/loss/<term>``: epoch means over
      samples, accumulated with torchmetrics so that they are global means under DDP.

    Any hook can still be overridden; an overridden step can call `mix` to keep the validation
    and logging.

    Args:
        terms: the declared loss terms.
        nonfinite: what to do when a term is NaN or infinite during training. ``"raise"``
            stops with an error naming the term, the step and the value. ``"skip"`` skips that
            optimizer step (no backward, parameters untouched), warns once per term and counts
            the skips in ``train/skipped_steps``. Either way all DDP ranks take the same
            decision.

    Examples:
        ```python
        import torch
        from lightning_lossmix import LossMixModule, LossTerm

        class Model(LossMixModule):
            def __init__(self):
                super().__init__([LossTerm("fit"), LossTerm("smooth", weight=0.1)])
                self.net = torch.nn.Linear(4, 1)

            def compute_losses(self, batch, batch_idx):
                x, y = batch
                pred = self.net(x).squeeze(-1)
                return {"fit": torch.nn.functional.mse_loss(pred, y),
                        "smooth": self.net.weight.pow(2).sum()}

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-2)
        ```
    """

    def __init__(self, terms: Sequence[LossTerm], *, nonfinite: NonFinite = "raise") -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise LossMixError(
                f"LossMixModule: `nonfinite` should be 'raise' or 'skip'. "
                f"Found `nonfinite = {nonfinite!r}`."
            )
        self.loss_mix = LossMix(terms)
        self.nonfinite: NonFinite = nonfinite
        self.skipped_steps = 0
        self._warned_nonfinite: set[str] = set()
        self._total_steps: int | None = None
        self._total_steps_key: tuple[Any, ...] | None = None
        self._checkpoint_step = 0
        self._checkpoint_total_steps: int | None = None
        self._reversal_layers: list[GradientReversal] | None = None
        self._skip_this_step = False
        # One mean for the total and one per term, per evaluation stage. Keys are positions
        # because term names may contain '.', which ModuleDict rejects.
        self._eval_means = nn.ModuleDict(
            {
                stage: nn.ModuleList(SampleMean() for _ in range(len(self.loss_mix.terms) + 1))
                for stage in ("val", "test")
            }
        )

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        """Return each declared term's value on `batch` as a scalar tensor."""
        raise NotImplementedError(
            f"{type(self).__name__} should implement compute_losses(self, batch, batch_idx) "
            f"returning a mapping with the terms {list(self.loss_mix.names)}."
        )

    @property
    def schedule_step(self) -> int:
        """The step schedules are evaluated at: the optimizer step, or the checkpoint's.

        Outside `fit` (``trainer.validate(ckpt_path=...)``, ``trainer.test``), Lightning does
        not restore the loop's step; the weights are then those of the checkpoint's step.
        """
        if self._fitting:
            return self.global_step
        return max(self.global_step, self._checkpoint_step)

    @property
    def total_steps(self) -> int | None:
        """The fit's number of optimizer steps, or None if unknown.

        While fitting, the trainer's `estimated_stepping_batches`, recomputed whenever the
        trainer or its length changes (a tuner's short fit, then the real one). Outside a fit,
        the length saved in the checkpoint, if any.
        """
        if not self._fitting:
            return self._checkpoint_total_steps
        trainer = self.trainer
        key = (
            id(trainer),
            trainer.max_steps,
            trainer.max_epochs,
            trainer.num_training_batches,
            trainer.accumulate_grad_batches,
        )
        if self._total_steps_key != key:
            estimate = trainer.estimated_stepping_batches
            self._total_steps = int(estimate) if math.isfinite(estimate) else None
            self._total_steps_key = key
        return self._total_steps

    @property
    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Set the step of every `GradientReversal` layer, for their scheduled scales.

        An override of this hook should call ``super().on_train_batch_start(batch, batch_idx)``.
        """
        if self._reversal_layers is None:
            self._reversal_layers = [m for m in self.modules() if isinstance(m, GradientReversal)]
        for layer in self._reversal_layers:
            needs_total = getattr(layer.scale, "needs_total_steps", False)
            layer.set_step(self.schedule_step, self.total_steps if needs_total else None)

    def mix(self, losses: Mapping[str, Tensor], stage: Stage, batch: Any = None) -> Tensor | None:
        """Validate and assemble `losses`, apply the `nonfinite` policy, log, return the total.

        Returns None when a training step is skipped for a non-finite term; Lightning then
        skips the backward and the optimizer step.
        """
        training = stage == "train"
        if training and self.loss_mix.needs_binding:
            self.loss_mix.bind(self)
        # Only schedules that need it make the trainer estimate the fit's length.
        total_steps = self.total_steps if self.loss_mix.needs_total_steps else None
        output = self.loss_mix(
            losses, step=self.schedule_step, total_steps=total_steps, check_finite=False
        )
        if training:
            if not self._all_finite(output):
                self._skip_this_step = True
            # Logged even when skipped, so the step shows its NaN rather than the last values.
            self._log_train(output)
            if self._skip_this_step:
                return None
        else:
            self._log_eval(output, stage, batch)
        total: Tensor = output.total
        return total

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute, validate, assemble and log the terms; return the total (None if skipped)."""
        return self.mix(self.compute_losses(batch, batch_idx), "train", batch)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute the terms and accumulate ``val/loss`` and ``val/loss/<term>``."""
        return self.mix(self.compute_losses(batch, batch_idx), "val", batch)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute the terms and accumulate ``test/loss`` and ``test/loss/<term>``."""
        return self.mix(self.compute_losses(batch, batch_idx), "test", batch)

    def _all_finite(self, output: LossMixOutput) -> bool:
        bad = output.nonfinite()
        # Every rank must take the same decision, or the others would wait forever in the
        # gradient all-reduce; on one device this is free.
        if self.trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return True
        where = "on another process" if not bad else ""
        if self.nonfinite == "raise":
            if not bad:
                raise LossMixError(
                    f"A loss term is NaN or infinite {where} at step {self.global_step}; see that "
                    "process's error for the term. Use nonfinite='skip' to skip such steps."
                )
            name, value = next(iter(bad.items()))
            raise LossMixError(nonfinite_message(name, value, self.global_step))
        for name, value in bad.items():
            if name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                rank_zero_warn(
                    f"Loss term {name!r} is {value} at step {self.global_step}: skipping this "
                    "optimizer step (parameters untouched). Further skips are counted in "
                    "`train/skipped_steps` without a new warning for this term."
                )
        return False

    def _log_train(self, output: LossMixOutput) -> None:
        self.log("train/loss", output.total, on_step=True, on_epoch=False, prog_bar=True)
        for name in self.loss_mix.names:
            self.log(f"train/loss/{name}", output.values[name], on_step=True, on_epoch=False)
            self.log(
                f"train/weight/{name}", output.signed_weights[name], on_step=True, on_epoch=False
            )
        if self.nonfinite == "skip":
            skipped = self.skipped_steps + self._skip_this_step  # this step counts already
            self.log("train/skipped_steps", float(skipped), on_step=True)

    def _log_eval(self, output: LossMixOutput, stage: Stage, batch: Any) -> None:
        batch_size = extract_batch_size(batch) if batch is not None else 1
        means: list[SampleMean] = list(self._eval_means[stage])  # type: ignore[call-overload]
        keys = [f"{stage}/loss", *(f"{stage}/loss/{name}" for name in self.loss_mix.names)]
        values = [output.total, *output.values.values()]
        for key, mean, value in zip(keys, means, values, strict=True):
            mean.update(value, weight=batch_size)
            self.log(key, mean, on_step=False, on_epoch=True, batch_size=batch_size)

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Drop the whole optimizer step if any of its micro-batches was skipped.

        Returning None from `training_step` only skips that micro-batch's backward; with
        gradient accumulation the other micro-batches' gradients would still be applied.
        """
        if self._skip_this_step:
            self._skip_this_step = False
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the skip counter and the declared terms next to the weights."""
        checkpoint[_CHECKPOINT_KEY] = {
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps if self._fitting else self._checkpoint_total_steps,
            "warned_nonfinite": sorted(self._warned_nonfinite),
            "terms": [repr(term) for term in self.loss_mix.terms],
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skip counter; warn if the declared terms changed since the checkpoint."""
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            return
        self.skipped_steps = int(state["skipped_steps"])
        self._checkpoint_total_steps = state.get("total_steps")
        self._warned_nonfinite = set(state["warned_nonfinite"])
        current = [repr(term) for term in self.loss_mix.terms]
        if state["terms"] != current:
            rank_zero_warn(
                "The loss terms differ from the checkpoint's: resuming with "
                f"{current} instead of {state['terms']}. If this is not intended, declare the "
                "same terms as the run that wrote the checkpoint."
            )
