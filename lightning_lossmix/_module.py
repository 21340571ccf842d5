"""LossMixModule: a LightningModule whose loss is a declared mix of terms."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lossmix._clock import CHECKPOINT_KEY, ScheduleClock, load_state, save_state
from lightning_lossmix._compat import (
    attached_trainer,
    batches_that_stepped,
    current_dataloader_idx,
    epoch_batches_done,
    trainer_callback,
)
from lightning_lossmix._errors import LossMixError, check_int
from lightning_lossmix._eval_means import EvalMeans
from lightning_lossmix._mix import LossMix, LossMixOutput
from lightning_lossmix._nonfinite import CheckedClosure, NonFinite, NonFinitePolicy, zero_loss
from lightning_lossmix._player import Player
from lightning_lossmix._players_loop import PlayersLoop, check_players
from lightning_lossmix._term import LossTerm
from lightning_lossmix._train_log import TrainLog
from lightning_lossmix.balancing._base import Balancer
from lightning_lossmix.balancing._in_module import (
    BalancerArgument,
    KeepSavedTensors,
    PlayersEvaluation,
    balancer_specs,
    balancers_by_player,
    check_optimized,
    loss_scale,
    warn_changed_balancers,
)

Stage = Literal["train", "val", "test"]


class LossMixModule(pl.LightningModule):
    """A LightningModule whose loss is the signed weighted sum of declared terms.

    Subclasses implement `compute_losses` (term name to scalar tensor) and
    `configure_optimizers`; this class provides `training_step`, `validation_step` and
    `test_step`, which validate the terms, assemble the total and log:

    - ``train/loss`` (also on the progress bar) and ``train/loss/<term>`` (raw values) through
      ``self.log`` every step; ``train/weight/<term>`` (signed effective weights) straight to
      the loggers on the steps Lightning writes, and into ``trainer.callback_metrics``;
    - ``val/loss``, ``val/loss/<term>``, ``test/loss``, ``test/loss/<term>``: epoch means over
      samples, accumulated with torchmetrics so that they are global means under DDP; with
      several dataloaders, one set per dataloader (``val/loss/dataloader_idx_1``, ...).

    Any hook can be overridden (call ``super()`` in ``on_train_batch_start``,
    ``optimizer_step``, ``on_before_optimizer_step``, ``configure_callbacks``,
    ``on_train_batch_end`` and ``on_train_epoch_end``); an overridden step can call `mix`.
    ``class Port(LossMixModule, YourModel)`` passes the arguments it does not know on to
    ``YourModel.__init__``; in the other order, declare ``loss_terms`` (and ``loss_players``) as
    class attributes.

    Args:
        terms: the declared loss terms (or None, with a class attribute ``loss_terms``).
        *args: passed on to the next class's ``__init__`` in the method resolution order.
        players: optional `Player`s, each optimizing its own terms with its own optimizer
            (``configure_optimizers`` returns one per player, in the same order). The base
            class then alternates them on each batch with manual optimization, logs
            ``train/<player>/loss``, and schedules advance one step per batch. Default: the
            class attribute ``loss_players``, if any.
        nonfinite: what to do when a term, or a gradient about to be applied, is NaN or
            infinite during training. ``"raise"`` stops with an error naming the term (or the
            parameter) and the step. ``"skip"`` skips that optimizer step (parameters and
            optimizer state untouched), warns once per term and counts the skips in
            ``train/skipped_steps``. Either way all DDP ranks take the same decision.
        progress_bar_terms: also show each term's value (``train/loss/<term>``) on the
            progress bar.
        plateau_monitor: with players, the metric a ``ReduceLROnPlateau`` returned by
            ``configure_optimizers`` follows (Lightning ignores the scheduler's ``"monitor"``
            key under the manual optimization that players use), e.g. ``"val/loss"``.
        balancer: a `lightning_lossmix.balancing.Balancer` that sets the multipliers of the
            terms it balances (effective weight = declared weight x multiplier, logged as
            ``train/weight/<term>``; its state under ``balance/...``). With players, a mapping
            of player name to balancer: a balancer works within one player's terms (evaluation
            uses each player's last training weights). A balancer with learnable parameters must
            be in an optimizer (with players, its player's): the first training step checks it.
        **kwargs: passed on to the next class's ``__init__`` in the method resolution order.

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
        terms: Sequence[LossTerm] | None = None,
        *args: Any,
        players: Sequence[Player] | None = None,
        nonfinite: NonFinite = "raise",
        progress_bar_terms: bool = False,
        plateau_monitor: str | None = None,
        balancer: BalancerArgument = None,
        **kwargs: Any,
    ) -> None:
        _refuse_unknown_arguments(type(self), args, kwargs)
        policy = NonFinitePolicy(nonfinite, self._step_key)
        super().__init__(*args, **kwargs)
        self.loss_mix = LossMix(_declared_terms(type(self), terms))
        given = players if players is not None else getattr(type(self), "loss_players", None)
        self.players: tuple[Player, ...] = check_players(given or (), self.loss_mix)
        names = [p.name for p in self.players]
        balancers = balancers_by_player(balancer, names, type(self).__name__)
        if None in balancers:
            self.loss_mix = LossMix(self.loss_mix.terms, balancer=balancers[None])
        by_name = {term.name: term for term in self.loss_mix.terms}
        self.player_mixes = nn.ModuleDict(
            {
                p.name: LossMix([by_name[t] for t in p.terms], balancer=balancers.get(p.name))
                for p in self.players
            }
        )
        if self.players and balancers:  # evaluation: each player's last training weights
            self.loss_mix = LossMix(self.loss_mix.terms, balancer=PlayersEvaluation(balancers))
        self._players_loop = PlayersLoop(self.players, plateau_monitor) if self.players else None
        if self._players_loop is not None:
            self._players_loop.check_compute_losses(self)
            self.automatic_optimization = False
        self.nonfinite_policy = policy
        self._train_log = TrainLog(progress_bar_terms)
        steps_after = self._players_loop.steps_after if self._players_loop else None
        self.schedule_clock = ScheduleClock(steps_after)
        self.schedule_clock.given_total_steps = self.__dict__.pop("_given_total_steps", None)
        self._eval_means = EvalMeans(self.loss_mix.names, "_eval_means")
        # The balancer of the current training call, its step and player (`_undo_decision`).
        self._decision: tuple[Balancer, int, str | None] | None = None
        for mix in (self.loss_mix, *self.player_mixes.values()):
            if isinstance(mix, LossMix) and mix.balancer is not None:
                mix.balancer.keep_undo(policy.mode == "skip")

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

    # -- the clock and the policy ------------------------------------------------------------

    @property
    def schedule_step(self) -> int:
        """The step schedules are evaluated at: the optimizer step, or the checkpoint's.

        With players and under manual optimization, the batch count (one schedule step per
        batch, whatever the number of optimizers). Without a Trainer (a unit test, Lightning
        Fabric), the number of training calls so far. Outside `fit`
        (``trainer.validate(ckpt_path=...)``, ``trainer.test``), Lightning does not restore the
        loop's step; the weights are then those of the checkpoint's step.
        """
        return self.schedule_clock.step(attached_trainer(self))

    @property
    def total_steps(self) -> int | None:
        """The fit's number of schedule steps, or None if unknown (see `ScheduleClock`).

        Setting it (``self.total_steps = 10_000``, as a parent class that sizes a OneCycleLR
        may do) fixes the length that schedules see instead of the trainer's estimate; None
        gives the estimate back.
        """
        return self.schedule_clock.total_steps(attached_trainer(self))

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None:
            value = check_int(value, "total_steps", type(self).__name__, minimum=1)
        clock = self.__dict__.get("schedule_clock")
        if clock is None:  # a parent's __init__, before LossMixModule's own state exists
            object.__setattr__(self, "_given_total_steps", value)
        else:
            clock.given_total_steps = value

    @property
    def nonfinite(self) -> NonFinite:
        """The non-finite policy, ``"raise"`` or ``"skip"``."""
        return self.nonfinite_policy.mode

    @property
    def skipped_steps(self) -> int:
        """The number of optimizer steps (player turns, with players) skipped so far."""
        return self.nonfinite_policy.skipped_steps

    @property
    def skipping_step(self) -> bool:
        """Whether the current optimizer step (or batch, under manual optimization) is dropped."""
        return self.nonfinite_policy.skipping()

    def _step_key(self) -> int:
        # The step a skip applies to, and the step errors name: the optimizer step under
        # automatic optimization (a skip drops all its micro-batches), else the logged batch.
        if self.automatic_optimization:
            return self.global_step
        trainer = attached_trainer(self)
        return 0 if trainer is None else batches_that_stepped(trainer)

    # -- steps ----------------------------------------------------------------------------------

    def mix(
        self,
        losses: Mapping[str, Tensor],
        stage: Stage,
        batch: Any = None,
        player: str | None = None,
    ) -> Tensor | None:
        """Validate and assemble `losses`, apply the `nonfinite` policy, log, return the total.

        The `stage` decides whether this is training (graph checks, `opposed_by`, a balancer's
        decision), whatever the module's train/eval mode.

        Args:
            losses: term name to scalar tensor: all terms, or `player`'s terms.
            stage: ``"train"``, ``"val"`` or ``"test"``; sets the log prefix.
            batch: the batch, for the batch size of the evaluation means.
            player: the player whose terms these are (training with players only).

        Returns:
            The total. For a training step skipped for a non-finite term: None under manual
            optimization (skip your backward and optimizer step); under automatic optimization
            a loss of value 0 reaching every trainable parameter (Lightning refuses None under
            DDP), whose gradients the module then drops with the rest of the optimizer step.
        """
        mix = self._mix_for(stage, player)
        training = stage == "train"
        if mix.training != training:  # the stage decides, not `self.eval()` in a training step
            mix.train(training)
        trainer = attached_trainer(self)
        if training and mix.needs_binding:
            mix.bind(self)
            if mix.balancer is not None and trainer is not None:
                check_optimized(mix.balancer, trainer, player, self.players)
        # Only schedules that need it make the trainer estimate the fit's length.
        total_steps = self.total_steps if mix.needs_total_steps else None
        step = self.schedule_clock.step(trainer)
        scale = loss_scale(trainer) if training and mix.balancer is not None else 1.0
        output: LossMixOutput = mix(
            losses, step=step, total_steps=total_steps, check_finite=False, loss_scale=scale
        )
        if not training:
            batch_size = extract_batch_size(batch) if batch is not None else 1
            index = 0 if trainer is None else current_dataloader_idx(trainer)
            self._eval_means.log(self, output, stage, batch_size, index)  # type: ignore[arg-type]
            return output.total
        self.schedule_clock.advance(step, total_steps)
        # This call's balancer alone may be taken back: with players, an earlier turn of the
        # same batch has stepped already, its decision stands.
        self._decision = None if mix.balancer is None else (mix.balancer, step, player)
        policy = self.nonfinite_policy
        skipped = policy.check_terms(output, trainer)
        # Logged even when skipped, so the step shows its NaN (and the weights and balancer
        # state it had) rather than the last values; under DDP, rank 0's values, as any
        # `self.log` without sync_dist: there `train/skipped_steps` tells a skip elsewhere.
        skips = policy.skipped_steps if policy.mode == "skip" else None
        self._train_log.log(self, output, player, skips, mix.balancer)
        if not skipped:
            return output.total
        self._undo_decision()
        return zero_loss(self) if self.automatic_optimization else None

    def _mix_for(self, stage: str, player: str | None) -> LossMix:
        """Return the mix of `player`'s terms (all terms for None); refuse a bad stage or player."""
        if stage not in ("train", "val", "test"):
            raise LossMixError(
                f"LossMixModule.mix: `stage` should be 'train', 'val' or 'test'. "
                f"Found `stage = {stage!r}`."
            )
        if player is None:
            return self.loss_mix
        if player not in self.player_mixes:
            raise LossMixError(
                f"LossMixModule.mix: `player` should be one of {list(self.player_mixes)} (or "
                f"None without players). Found `player = {player!r}`."
            )
        mix = self.player_mixes[player]
        assert isinstance(mix, LossMix)
        return mix

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:  # type: ignore[override]
        """Compute, validate, assemble and log the terms; return the total.

        With players, update each player in turn (manual optimization) and return None.
        """
        if self._players_loop is not None:
            self._players_loop.play(self, batch, batch_idx)
            return None
        return self.mix(self.compute_losses(batch, batch_idx), "train", batch)

    @override
    def validation_step(  # type: ignore[override]
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor | None:
        """Compute the terms and accumulate ``val/loss`` and ``val/loss/<term>``."""
        return self.mix(self._all_losses(batch, batch_idx), "val", batch)

    @override
    def test_step(  # type: ignore[override]
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> Tensor | None:
        """Compute the terms and accumulate ``test/loss`` and ``test/loss/<term>``."""
        return self.mix(self._all_losses(batch, batch_idx), "test", batch)

    def _all_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        if not self.players:
            return self.compute_losses(batch, batch_idx)
        losses: dict[str, Tensor] = {}
        for player in self.players:
            losses.update(self.compute_losses(batch, batch_idx, player=player.name))
        return losses

    # -- hooks ------------------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Set the step of every `GradientReversal` layer, for their scheduled scales.

        An override of this hook should call ``super().on_train_batch_start(batch, batch_idx)``.
        """
        self.schedule_clock.set_reversal_steps(self)

    def gradients_dropped(self, optimizer: Optimizer | LightningOptimizer) -> bool:
        """Apply the `nonfinite` policy to the gradients `optimizer` is about to apply.

        Returns whether the step is dropped (see `NonFinitePolicy.gradients_dropped`); a
        dropped step's balancer decision is taken back.
        """
        dropped = self.nonfinite_policy.gradients_dropped(self, optimizer)
        if dropped:
            self._undo_decision()
        elif self._decision is not None:  # a step went through: the decision stands, for a
            self._decision[0].commit()  # second optimizer and for the next fit alike
            self._decision = None
        return dropped

    def _undo_decision(self) -> None:
        """Take back the balancer's decision of a dropped step (see `Balancer.undo`).

        The logs of the step show the state it had: `TrainLog` keeps it first.
        """
        if self._decision is not None:
            balancer, step, player = self._decision
            self._decision = None  # once: the gradient check of the same step comes next
            self._train_log.keep_balance(player)
            balancer.undo(step)

    @override
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step, applying the `nonfinite` policy to the gradients right after the backward.

        The optimizer gets a `CheckedClosure`. A dropped step still goes through
        ``optimizer.step`` (so that every hook and callback sees it, with `skipping_step` True)
        with no gradients, which leaves the parameters and the optimizer's state (Adam's step
        count and moments) untouched. An override should call ``super().optimizer_step(...)``.
        """
        if optimizer_closure is not None:
            optimizer_closure = CheckedClosure(optimizer_closure, self, optimizer)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Drop a skipped step's gradients; with players, clip them as the Trainer asks.

        An override of this hook should call ``super().on_before_optimizer_step(optimizer)``.
        """
        if self._players_loop is not None:
            self._players_loop.clip_gradients(self, optimizer)
        elif not self.automatic_optimization:
            if self.gradients_dropped(optimizer):  # a subclass's own manual optimization
                optimizer.zero_grad(set_to_none=True)
        elif self.nonfinite_policy.skipping():
            optimizer.zero_grad(set_to_none=True)  # also when `optimizer_step` is overridden

    @override
    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """Step `scheduler`; a plateau on a training loss of ours reads it across processes.

        Lightning passes each process its own ``callback_metrics[monitor]``. The totals and
        term values (``train/loss``, ``train/loss/<term>``) are logged per process (a
        ``sync_dist`` would cost a collective every step), so under DDP a ``ReduceLROnPlateau``
        monitoring one of them would set a different learning rate on each process and the
        replicas would part: the value is averaged over processes first, one small collective
        per scheduler step. With players, `PlayersLoop.plateau_metric` does it. An override
        should call ``super().lr_scheduler_step(scheduler, metric)``.
        """
        if metric is not None and self._players_loop is None:
            metric = self._plateau_metric(scheduler, metric)
        super().lr_scheduler_step(scheduler, metric)

    def _plateau_metric(self, scheduler: Any, metric: Any) -> Any:
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size == 1:
            return metric
        configs = trainer.lr_scheduler_configs
        monitor = next((c.monitor for c in configs if c.scheduler is scheduler), None)
        if monitor != "train/loss" and not str(monitor).startswith("train/loss/"):
            return metric
        value = torch.as_tensor(metric, dtype=torch.float32, device=self.device).clone()
        return trainer.strategy.reduce(value, reduce_op="mean")

    @override
    def configure_callbacks(self) -> Sequence[pl.Callback] | pl.Callback:
        """Keep compiled graphs for a gradient-based balancer; with players, take clipping over.

        A balancer with per-term gradients (`GradientBalance`, `GradNorm`) differentiates the
        step's graph twice, which torch.compile's donated buffers forbid: `KeepSavedTensors`
        turns them off for the fit. Lightning keeps a module's callback on the Trainer for its
        later runs; the one an earlier run left there is set for this run (active or not)
        rather than replaced, which Lightning would announce. With players,
        ``Trainer(gradient_clip_val=...)`` is taken over (see `PlayersLoop`).
        """
        found = super().configure_callbacks()
        callbacks = [] if not found else [found] if isinstance(found, pl.Callback) else list(found)
        mixes = (self.loss_mix, *self.player_mixes.values())
        needed = any(getattr(mix.balancer, "per_term_gradients", False) for mix in mixes)
        trainer = attached_trainer(self)
        kept = None if trainer is None else trainer_callback(trainer, KeepSavedTensors)
        if kept is None:
            callbacks.append(KeepSavedTensors(active=needed))
        else:
            kept.active = needed
        if self._players_loop is None:
            return callbacks
        return self._players_loop.configure_callbacks(trainer, callbacks)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Write the weights if the fit stops here.

        Lightning writes a batch's metrics when a callback (``Timer``) stopped the fit after
        the training step; the weights follow (`TrainLog.end_of_batch`). An override of this
        hook should call ``super().on_train_batch_end(outputs, batch, batch_idx)``.
        """
        self._train_log.end_of_batch(self)

    @override
    def on_train_epoch_end(self) -> None:
        """With players, step the ``ReduceLROnPlateau`` schedulers left to the epoch's end.

        Those of interval "step" of the last batch (after its validation), then those of
        interval "epoch", unless `max_steps` cut the epoch short; the others stepped at the
        epoch's last batch, as automatic optimization steps them (`PlayersLoop.end_batch`).
        """
        loop = self._players_loop
        if loop is None:
            return
        loop.flush_plateau(self)
        if epoch_batches_done(self.trainer):
            loop.step_schedulers(self, "epoch", True, lambda _: self.current_epoch + 1)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the schedule clock, the skip counter, the terms and the balancers' names.

        The balancers' state is in the state dict; their constructor calls are kept here, so
        that loading the checkpoint with other balancers says which ones wrote it.
        """
        trainer = attached_trainer(self)
        checkpoint[CHECKPOINT_KEY] = save_state(
            self.schedule_clock, self.nonfinite_policy, self.loss_mix.terms, trainer
        )
        checkpoint[CHECKPOINT_KEY]["balancers"] = balancer_specs(self._mixes())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the clock and the skip counter; warn if the terms or the balancers changed."""
        load_state(self.schedule_clock, self.nonfinite_policy, self.loss_mix.terms, checkpoint)
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("balancers")
        warn_changed_balancers(saved, balancer_specs(self._mixes()), type(self).__name__)

    def _mixes(self) -> dict[str | None, LossMix]:
        """Return the mixes that train: the module's (key None), or each player's."""
        if self.players:
            return {n: m for n, m in self.player_mixes.items() if isinstance(m, LossMix)}
        return {None: self.loss_mix}


def _declared_terms(cls: type, terms: Sequence[LossTerm] | None) -> Sequence[LossTerm]:
    """Return the terms given, or the class's ``loss_terms`` (when after a parent)."""
    declared = terms if terms is not None else getattr(cls, "loss_terms", None)
    if declared is None:
        raise LossMixError(
            f"{cls.__name__}: LossMixModule needs its terms. Found none: pass them as the first "
            "argument, `super().__init__([LossTerm('fit'), ...])`, or, when LossMixModule comes "
            "after a parent class whose __init__ calls super().__init__() without arguments, "
            "declare them as a class attribute `loss_terms = [LossTerm('fit'), ...]`."
        )
    return declared


def _refuse_unknown_arguments(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse extra arguments when no parent class after LossMixModule can take them."""
    mro = cls.__mro__
    after = mro[mro.index(LossMixModule) + 1]
    if (args or kwargs) and after is pl.LightningModule:
        found = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
        raise LossMixError(
            f"{cls.__name__}: LossMixModule takes `terms` and the keyword options `players`, "
            "`nonfinite`, `progress_bar_terms`, `plateau_monitor` and `balancer`. Found the extra "
            f"arguments {', '.join(found)}, and no parent class after LossMixModule to pass them "
            "to. Check their names, or list your own LightningModule after LossMixModule: "
            f"class {cls.__name__}(LossMixModule, YourModel)."
        )
