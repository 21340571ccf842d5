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
from lightning_lossmix._player import Player
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
        players: optional `Player`s, each optimizing its own terms with its own optimizer
            (``configure_optimizers`` returns one per player, in the same order). The base
            class then alternates them on each batch with manual optimization, logs
            ``train/<player>/loss``, and schedules advance one step per batch.

    Hooks this class uses (``on_train_batch_start``, ``on_before_optimizer_step``, and with
    players ``on_train_batch_end`` and ``on_train_epoch_end``) can be overridden; call
    ``super()`` in the override.

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

    def __init__(
        self,
        terms: Sequence[LossTerm],
        *,
        players: Sequence[Player] | None = None,
        nonfinite: NonFinite = "raise",
    ) -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise LossMixError(
                f"LossMixModule: `nonfinite` should be 'raise' or 'skip'. "
                f"Found `nonfinite = {nonfinite!r}`."
            )
        self.loss_mix = LossMix(terms)
        self.players: tuple[Player, ...] = _check_players(players or (), self.loss_mix)
        by_name = {term.name: term for term in self.loss_mix.terms}
        self.player_mixes = nn.ModuleDict(
            {p.name: LossMix([by_name[t] for t in p.terms]) for p in self.players}
        )
        if self.players:
            self.automatic_optimization = False
        self.nonfinite: NonFinite = nonfinite
        self.skipped_steps = 0
        self._warned_nonfinite: set[str] = set()
        self._total_steps: int | None = None
        self._total_steps_key: tuple[Any, ...] | None = None
        # The step and length that evaluation outside a fit uses: the last training step's
        # (plus one, as Lightning's own step after it), or the loaded checkpoint's.
        self._resume_step = 0
        self._resume_total_steps: int | None = None
        self._skipped_at: int | None = None  # the step being dropped for a non-finite term
        self._reversal_layers: list[GradientReversal] | None = None
        self._train_keys: dict[str | None, tuple[str, list[tuple[str, str, str]]]] = {}
        # One mean for the total and one per term, per evaluation stage. Keys are positions
        # because term names may contain '.', which ModuleDict rejects.
        self._eval_means = nn.ModuleDict(
            {
                stage: nn.ModuleList(SampleMean() for _ in range(len(self.loss_mix.terms) + 1))
                for stage in ("val", "test")
            }
        )

    def compute_losses(
        self, batch: Any, batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        """Return each declared term's value on `batch` as a scalar tensor.

        With players, it is called once per player, with `player` set to its name, and returns
        that player's terms only.
        """
        raise NotImplementedError(
            f"{type(self).__name__} should implement compute_losses(self, batch, batch_idx"
            f"{', player' if self.players else ''}) returning a mapping with the terms "
            f"{list(self.loss_mix.names)}."
        )

    @property
    def schedule_step(self) -> int:
        """The step schedules are evaluated at: the optimizer step, or the checkpoint's.

        Outside `fit` (``trainer.validate(ckpt_path=...)``, ``trainer.test``), Lightning does
        not restore the loop's step; the weights are then those of the checkpoint's step.
        """
        if self._fitting:
            if self.players:  # one step per batch: Lightning counts each player's optimizer step
                return self.trainer.fit_loop.epoch_loop._batches_that_stepped
            return self.global_step
        return self._resume_step

    @property
    def total_steps(self) -> int | None:
        """The fit's number of optimizer steps, or None if unknown.

        While fitting, the trainer's `estimated_stepping_batches`, recomputed whenever the
        trainer or its length changes (a tuner's short fit, then the real one). Outside a fit,
        the length saved in the checkpoint, if any.
        """
        if not self._fitting:
            return self._resume_total_steps
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
            if self.players and trainer.max_steps > 0:  # max_steps counts optimizer steps
                estimate = min(estimate, math.ceil(trainer.max_steps / len(self.players)))
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

    def mix(
        self,
        losses: Mapping[str, Tensor],
        stage: Stage,
        batch: Any = None,
        player: str | None = None,
    ) -> Tensor | None:
        """Validate and assemble `losses`, apply the `nonfinite` policy, log, return the total.

        Args:
            losses: term name to scalar tensor: all terms, or `player`'s terms.
            stage: ``"train"``, ``"val"`` or ``"test"``; sets the log prefix.
            batch: the batch, for the batch size of the evaluation means.
            player: the player whose terms these are (training with players only).

        Returns:
            The total, or None when a training step is skipped for a non-finite term (no
            backward, no optimizer step).
        """
        if stage not in ("train", "val", "test"):
            raise LossMixError(
                f"LossMixModule.mix: `stage` should be 'train', 'val' or 'test'. "
                f"Found `stage = {stage!r}`."
            )
        if player is not None and player not in self.player_mixes:
            raise LossMixError(
                f"LossMixModule.mix: `player` should be one of {list(self.player_mixes)} (or "
                f"None without players). Found `player = {player!r}`."
            )
        training = stage == "train"
        mix = self.loss_mix if player is None else self.player_mixes[player]
        assert isinstance(mix, LossMix)
        if training and mix.needs_binding:
            mix.bind(self)
        # Only schedules that need it make the trainer estimate the fit's length.
        total_steps = self.total_steps if mix.needs_total_steps else None
        step = self.schedule_step
        output = mix(losses, step=step, total_steps=total_steps, check_finite=False)
        if training:
            self._resume_step = step + 1
            self._resume_total_steps = total_steps or self._resume_total_steps
            if not self._all_finite(output) and not self.skipping_step:
                self._skipped_at = self.global_step
                self.skipped_steps += 1
            # Logged even when skipped, so the step shows its NaN rather than the last values.
            self._log_train(output, player)
            if self.skipping_step:
                mix.last_output = None  # no backward will free its graph
                return None
        else:
            self._log_eval(output, stage, batch)
        total: Tensor = output.total
        return total

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute, validate, assemble and log the terms; return the total (None if skipped).

        With players, update each player in turn (manual optimization) and return None.
        """
        if self.players:
            self._play(batch, batch_idx)
            return None
        return self.mix(self.compute_losses(batch, batch_idx), "train", batch)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute the terms and accumulate ``val/loss`` and ``val/loss/<term>``."""
        return self.mix(self._all_losses(batch, batch_idx), "val", batch)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute the terms and accumulate ``test/loss`` and ``test/loss/<term>``."""
        return self.mix(self._all_losses(batch, batch_idx), "test", batch)

    def _all_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        if not self.players:
            return self.compute_losses(batch, batch_idx)
        losses: dict[str, Tensor] = {}
        for player in self.players:
            losses.update(self.compute_losses(batch, batch_idx, player=player.name))
        return losses

    def _play(self, batch: Any, batch_idx: int) -> None:
        """One batch of the game: each player, in turn, computes its terms and steps."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if len(optimizers) != len(self.players):
            raise LossMixError(
                f"{type(self).__name__} declares {len(self.players)} players "
                f"{[p.name for p in self.players]} but configure_optimizers returned "
                f"{len(optimizers)} optimizer(s): return one per player, in the same order."
            )
        for player, optimizer in zip(self.players, optimizers, strict=True):
            # Toggling freezes the other players' parameters, so that this player's terms
            # train only this player.
            self.toggle_optimizer(optimizer)
            try:
                losses = self.compute_losses(batch, batch_idx, player=player.name)
                total = self.mix(losses, "train", batch, player=player.name)
                if total is None:
                    self._skipped_at = None  # only this player's turn is skipped
                else:
                    optimizer.zero_grad()
                    self.manual_backward(total)
                    optimizer.step()
            finally:
                self.untoggle_optimizer(optimizer)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """With players, step the learning-rate schedulers whose interval is "step"."""
        if self.players:
            self._step_schedulers(
                "step", self.trainer.fit_loop.epoch_loop._batches_that_stepped + 1
            )

    @override
    def on_train_epoch_end(self) -> None:
        """With players, step the learning-rate schedulers whose interval is "epoch"."""
        if self.players:
            self._step_schedulers("epoch", self.current_epoch + 1)

    def _step_schedulers(self, interval: str, count: int) -> None:
        # Manual optimization leaves the schedulers to the module; players step them like
        # automatic optimization would.
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and count % config.frequency == 0:
                if config.reduce_on_plateau:
                    raise LossMixError(
                        "ReduceLROnPlateau needs a monitored value, which a game with players "
                        "does not define: step it yourself in a hook, or use another scheduler."
                    )
                config.scheduler.step()  # type: ignore[call-arg]

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

    def _log_train(self, output: LossMixOutput, player: str | None = None) -> None:
        keys = self._train_keys.get(player)
        if keys is None:  # built once: this runs every step
            total_key = "train/loss" if player is None else f"train/{player}/loss"
            keys = (total_key, [(n, f"train/loss/{n}", f"train/weight/{n}") for n in output.values])
            self._train_keys[player] = keys
        total_key, term_keys = keys
        self.log(total_key, output.total, on_step=True, on_epoch=False, prog_bar=True)
        for name, loss_key, weight_key in term_keys:
            self.log(loss_key, output.values[name], on_step=True, on_epoch=False)
            self.log(weight_key, output.signed_weights[name], on_step=True, on_epoch=False)
        if self.nonfinite == "skip":
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def _log_eval(self, output: LossMixOutput, stage: Stage, batch: Any) -> None:
        batch_size = extract_batch_size(batch) if batch is not None else 1
        means: list[SampleMean] = list(self._eval_means[stage])  # type: ignore[call-overload]
        keys = [f"{stage}/loss", *(f"{stage}/loss/{name}" for name in self.loss_mix.names)]
        values = [output.total, *output.values.values()]
        for key, mean, value in zip(keys, means, values, strict=True):
            mean.update(value, weight=batch_size)
            self.log(key, mean, on_step=False, on_epoch=True, batch_size=batch_size)

    @property
    def skipping_step(self) -> bool:
        """Whether the current optimizer step will be dropped for a non-finite term."""
        return self._skipped_at is not None and self._skipped_at == self.global_step

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Drop the whole optimizer step if any of its micro-batches was skipped.

        Returning None from `training_step` only skips that micro-batch's backward; with
        gradient accumulation the other micro-batches' gradients would still be applied. An
        override of this hook should call ``super().on_before_optimizer_step(optimizer)``;
        without it, such a step applies the other micro-batches' gradients.
        """
        if self.skipping_step:
            optimizer.zero_grad(set_to_none=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the skip counter and the declared terms next to the weights."""
        checkpoint[_CHECKPOINT_KEY] = {
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps if self._fitting else self._resume_total_steps,
            "schedule_step": self._resume_step,
            "warned_nonfinite": sorted(self._warned_nonfinite),
            "terms": [repr(term) for term in self.loss_mix.terms],
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the skip counter; warn if the declared terms changed since the checkpoint."""
        self._resume_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            return
        self.skipped_steps = int(state["skipped_steps"])
        self._resume_total_steps = state.get("total_steps")
        self._resume_step = int(state.get("schedule_step", self._resume_step))
        self._warned_nonfinite = set(state["warned_nonfinite"])
        current = [repr(term) for term in self.loss_mix.terms]
        if state["terms"] != current:
            rank_zero_warn(
                "The loss terms differ from the checkpoint's: resuming with "
                f"{current} instead of {state['terms']}. If this is not intended, declare the "
                "same terms as the run that wrote the checkpoint."
            )


def _check_players(players: Sequence[Player], mix: LossMix) -> tuple[Player, ...]:
    """Every player a `Player` with known terms; every term played by exactly one player."""
    players = tuple(players)
    if not players:
        return ()
    owner: dict[str, str] = {}
    for player in players:
        if not isinstance(player, Player):
            raise LossMixError(
                f"LossMixModule: `players` should hold Player objects. Found {player!r}; write "
                "Player('generator', terms=['adversarial'])."
            )
        for term in player.terms:
            if term not in mix.names:
                raise LossMixError(
                    f"Player {player.name!r} names the term {term!r}, which is not declared. "
                    f"Declared terms: {list(mix.names)}."
                )
            if term in owner:
                raise LossMixError(
                    f"The term {term!r} is claimed by two players, {owner[term]!r} and "
                    f"{player.name!r}: each term belongs to one player. To make one player "
                    "maximize what another minimizes, declare two terms (one per player)."
                )
            owner[term] = player.name
    names = [p.name for p in players]
    if len(set(names)) != len(names):
        raise LossMixError(
            f"LossMixModule: player names should be unique. Found {names}; rename the "
            "duplicates, e.g. 'critic_1' and 'critic_2'."
        )
    opposed = [term.name for term in mix.terms if term.opposed_by]
    if opposed:
        raise LossMixError(
            f"The terms {opposed} have `opposed_by`, which has no effect with players: during a "
            "player's turn the other players' parameters are frozen. Give the opposing side "
            "its own term in its own player instead."
        )
    unplayed = [name for name in mix.names if name not in owner]
    if unplayed:
        raise LossMixError(
            f"The terms {unplayed} belong to no player: with players, every term is optimized "
            "by one of them. Add each to a player's `terms`."
        )
    return players
