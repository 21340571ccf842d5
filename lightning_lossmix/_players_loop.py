"""The players of a `LossMixModule`: their checks, their turns on each batch, their schedulers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lightning_lossmix._compat import batches_that_stepped, epoch_batches_done, trainer_callback
from lightning_lossmix._errors import LossMixError
from lightning_lossmix._mix import LossMix
from lightning_lossmix._player import Player

if TYPE_CHECKING:
    from lightning_lossmix._module import LossMixModule

__all__ = ["GiveClippingBack", "PlayersLoop", "check_players"]


class PlayersLoop:
    """Plays the players in turn on each batch, with manual optimization.

    It follows Lightning's GAN template, and does what automatic optimization would do: step the
    learning-rate schedulers (``ReduceLROnPlateau`` with its monitored metric) and clip the
    gradients as ``Trainer(gradient_clip_val=...)`` asks.

    Args:
        players: the checked players, in the order they play.
    """

    def __init__(self, players: Sequence[Player], plateau_monitor: str | None = None) -> None:
        self.players = tuple(players)
        self.plateau_monitor = plateau_monitor
        # Taken from the Trainer at the start of a fit (see `take_clipping`).
        self.clip: tuple[float, str | None] | None = None
        self.checked = False  # the optimizers and schedulers, at a fit's first batch
        # The last batch's count and index, for its "step" plateau schedulers (`end_batch`).
        self.pending_plateau: tuple[int, int] | None = None

    def steps_after(self, batches: int) -> int:
        """Return the number of optimizer steps the players take in `batches` batches."""
        return sum(batches // player.every_n_batches for player in self.players)

    def check_compute_losses(self, module: LossMixModule) -> None:
        """Refuse a `compute_losses` that cannot be told which player it computes for."""
        parameters = inspect.signature(module.compute_losses).parameters.values()
        if not any(p.name == "player" or p.kind is p.VAR_KEYWORD for p in parameters):
            raise LossMixError(
                f"{type(module).__name__}.compute_losses takes no `player` argument, but the "
                f"module declares players {[p.name for p in self.players]}: it is called once per "
                "player with `player=<name>` and returns that player's terms. Write "
                "`def compute_losses(self, batch, batch_idx, player=None)`."
            )

    def play(self, module: LossMixModule, batch: Any, batch_idx: int) -> None:
        """One batch of the game: each player whose turn it is computes its terms and steps."""
        optimizers = module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if len(optimizers) != len(self.players):
            raise LossMixError(
                f"{type(module).__name__} declares {len(self.players)} players "
                f"{[p.name for p in self.players]} but configure_optimizers returned "
                f"{len(optimizers)} optimizer(s): return one per player, in the same order."
            )
        if not self.checked:  # also when a fit resumes in the middle of an epoch
            self.check_schedulers(module.trainer)
            self.check_optimizers(module)
            self.checked = True
        self.flush_plateau(module)  # the last batch's, after its validation
        batch_number = batches_that_stepped(module.trainer)
        for index, (player, optimizer) in enumerate(zip(self.players, optimizers, strict=True)):
            if (batch_number + 1) % player.every_n_batches != 0:
                continue  # e.g. a generator that steps once per n_critic critic steps
            # Toggling freezes the other players' parameters, so that this player's terms
            # train only this player.
            module.toggle_optimizer(optimizer)
            try:
                losses = module.compute_losses(batch, batch_idx, player=player.name)
                self.check_losses(module, player, index, losses)
                total = module.mix(losses, "train", batch, player=player.name)
                if total is not None:
                    optimizer.zero_grad()
                    module.manual_backward(total)
                    if module.gradients_dropped(optimizer):
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        optimizer.step()
            finally:
                module.nonfinite_policy.clear()  # only this player's turn is skipped
                module.untoggle_optimizer(optimizer)
        self.end_batch(module, batch_idx)

    def check_optimizers(self, module: pl.LightningModule) -> None:
        """Refuse players whose optimizers share parameters: each would move the other's."""
        names = {id(p): name for name, p in module.named_parameters()}
        owner: dict[int, str] = {}
        for player, optimizer in zip(self.players, module.trainer.optimizers, strict=False):
            shared: dict[str, list[str]] = {}
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    other = owner.setdefault(id(parameter), player.name)
                    if other != player.name:
                        shared.setdefault(other, []).append(names.get(id(parameter), "?"))
            for other, parameters in shared.items():
                raise LossMixError(
                    f"The optimizers of players {other!r} and {player.name!r} both hold the "
                    f"parameters {parameters[:3]} ({len(parameters)} in all): each player's "
                    "turn would move the other's parameters too, so the game is not played. "
                    "Give each player an optimizer over its own parameters, e.g. "
                    "torch.optim.Adam(self.generator.parameters()), returned in the players' "
                    f"order {[p.name for p in self.players]}."
                )

    def check_losses(
        self, module: pl.LightningModule, player: Player, index: int, losses: Any
    ) -> None:
        """Refuse a term of another player, and terms that reach none of the player's weights.

        The second usually means that configure_optimizers returned the optimizers in another
        order than the players: during a turn only the player's own optimizer's parameters
        are trainable (toggled), and the detached side of its terms reaches nothing else.
        """
        if not isinstance(losses, Mapping):
            return  # LossMix names the type it expects
        for name in losses:
            if name in player.terms:
                continue  # every turn: the common case costs one lookup per term
            owner = next((p.name for p in self.players if name in p.terms), None)
            if owner is not None and owner != player.name:
                raise LossMixError(
                    f"compute_losses(..., player={player.name!r}) returned {name!r}, a term of "
                    f"player {owner!r}. Called with `player=name`, compute_losses should "
                    f"return that player's terms only: {list(player.terms)}; branch on "
                    "`player`."
                )
        values = list(losses.values())
        if not values or not torch.is_grad_enabled():
            return
        if any(not isinstance(v, Tensor) or v.requires_grad for v in values):
            return  # LossMix checks each term
        names = {id(p): name for name, p in module.named_parameters()}
        optimizer = module.trainer.optimizers[index]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        modules = sorted({names[i].split(".")[0] for i in held if i in names})
        raise LossMixError(
            f"The terms {list(losses)} of player {player.name!r} reach none of the parameters "
            f"its optimizer trains (optimizer {index}, which holds parameters of {modules}): "
            "during a player's turn only its own optimizer's parameters are trainable. "
            "Return the optimizers from configure_optimizers in the players' order "
            f"{[p.name for p in self.players]}; or, if they are in order, the terms are cut "
            "off the graph (built with torch.tensor([...]), .item(), .detach() or under "
            "torch.no_grad()): build them from the model's tensors."
        )

    def configure_callbacks(
        self, trainer: pl.Trainer | None, callbacks: Sequence[pl.Callback] | pl.Callback
    ) -> Sequence[pl.Callback] | pl.Callback:
        """At the start of a fit, take the Trainer's clipping over; add what gives it back."""
        if trainer is None or trainer.state.fn != "fit":
            return callbacks
        self.checked, self.pending_plateau = False, None
        self.take_clipping(trainer)
        if self.clip is None:
            return callbacks
        left = trainer_callback(trainer, GiveClippingBack)  # by an earlier fit
        if left is not None:
            left.loop = self
            return callbacks
        given = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks)
        return [*given, GiveClippingBack(self)]

    def take_clipping(self, trainer: pl.Trainer) -> None:
        """Take ``Trainer(gradient_clip_val=...)`` over, so that Lightning accepts it.

        Lightning 2.x refuses a clipping value with manual optimization (in
        ``_verify_loop_configurations``, after ``configure_callbacks`` and before ``setup``);
        the players honour it instead, clipping each player's gradients before its step. The
        Trainer's value is put back at the end of the fit (`give_clipping_back`).
        """
        value = trainer.gradient_clip_val
        if value is None or value <= 0:
            return
        self.clip = (float(value), trainer.gradient_clip_algorithm)
        trainer.gradient_clip_val = None

    def give_clipping_back(self, trainer: pl.Trainer) -> None:
        """Put the Trainer's clipping value back (see `take_clipping`)."""
        if self.clip is not None:
            trainer.gradient_clip_val = self.clip[0]
            self.clip = None

    def clip_gradients(self, module: pl.LightningModule, optimizer: Any) -> None:
        """Clip a player's gradients as automatic optimization would (after AMP's unscale)."""
        if self.clip is not None:
            value, algorithm = self.clip
            module.configure_gradient_clipping(optimizer, value, algorithm)

    def check_schedulers(self, trainer: pl.Trainer) -> None:
        """Refuse a ``ReduceLROnPlateau`` whose monitored metric the players cannot know.

        Lightning drops the ``"monitor"`` key of a scheduler's configuration under manual
        optimization, which players use; the metric is given to `LossMixModule` instead.
        """
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau) and self.plateau_monitor is None:
                raise LossMixError(
                    "configure_optimizers returned a ReduceLROnPlateau, which needs a monitored "
                    "metric; with players Lightning ignores the scheduler's 'monitor' key (manual "
                    "optimization). Found `plateau_monitor = None`: pass the metric to the module, "
                    "e.g. LossMixModule(..., players=[...], plateau_monitor='val/loss')."
                )

    def every_n_batches_of(self, trainer: pl.Trainer, scheduler: Any) -> int:
        """Return how often the player whose optimizer `scheduler` drives plays (1 if none)."""
        optimizer = getattr(scheduler, "optimizer", None)
        for player, candidate in zip(self.players, trainer.optimizers, strict=False):
            if candidate is optimizer:
                return player.every_n_batches
        return 1

    def end_batch(self, module: pl.LightningModule, batch_idx: int) -> None:
        """Step the schedulers where automatic optimization does, after a batch's turns.

        Before the callbacks' ``on_train_batch_end`` and the validation that may follow, so
        that a checkpoint saved there holds the step: the ``"step"`` schedulers, and at the
        epoch's last batch the ``"epoch"`` ones. A ``ReduceLROnPlateau`` of interval
        ``"step"`` waits for that validation's metrics (`flush_plateau`).
        """
        trainer = module.trainer
        batches = batches_that_stepped(trainer) + 1
        self.step_schedulers(module, "step", False, self._step_index(trainer, batches, batch_idx))
        if epoch_batches_done(trainer):
            self.step_schedulers(module, "epoch", False, lambda _: module.current_epoch + 1)
        self.pending_plateau = (batches, batch_idx)

    def flush_plateau(self, module: pl.LightningModule) -> None:
        """Step the ``"step"`` plateau schedulers of the last batch, after its validation.

        Called when the next batch starts, or the epoch ends: automatic optimization steps
        them right after the validation that follows a batch, before the next one.
        """
        if self.pending_plateau is not None:
            batches, batch_idx = self.pending_plateau
            self.pending_plateau = None
            index = self._step_index(module.trainer, batches, batch_idx)
            self.step_schedulers(module, "step", True, index)

    def _step_index(
        self, trainer: pl.Trainer, batches: int, batch_idx: int
    ) -> Callable[[Any], int | None]:
        """Count a scheduler's player's steps in the epoch, as Lightning counts ``batch_idx``.

        None where the player did not play the batch (`batches` counts them from the start).
        """

        def index(scheduler: Any) -> int | None:
            every = self.every_n_batches_of(trainer, scheduler)
            if batches % every != 0:
                return None
            return batches // every - (batches - batch_idx - 1) // every

        return index

    def step_schedulers(
        self,
        module: pl.LightningModule,
        interval: str,
        plateau: bool,
        index: Callable[[Any], int | None],
    ) -> None:
        """Step the schedulers of `interval` (plateau or not) whose frequency divides `index`.

        Manual optimization leaves the schedulers to the module; players step them as automatic
        optimization would, which counts ``"step"`` ones by the batch's index in the epoch and
        ``"epoch"`` ones by the epoch: here a scheduler counts the steps of its own player in
        the epoch (`index` of the scheduler; None when its player did not play the batch).
        A ``ReduceLROnPlateau`` steps with the monitored metric averaged over processes, so
        that under DDP every process takes the same decision.
        """
        trainer = module.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            if plateau != isinstance(config.scheduler, ReduceLROnPlateau):
                continue
            found = index(config.scheduler)
            if found is None or found % config.frequency != 0:
                continue
            metric = self.plateau_metric(module, interval) if plateau else None
            module.lr_scheduler_step(config.scheduler, metric)

    def plateau_metric(self, module: pl.LightningModule, interval: str) -> Tensor:
        """Return `plateau_monitor`'s value, averaged over processes; raise if it is missing.

        Lightning drops a scheduler's ``"monitor"`` and ``"strict"`` keys under manual
        optimization, so the metric is the module's `plateau_monitor`, and always required.
        """
        trainer = module.trainer
        monitor = self.plateau_monitor
        metric = trainer.callback_metrics.get(str(monitor))
        if metric is None:
            raise LossMixError(
                f"ReduceLROnPlateau monitors {monitor!r} (`plateau_monitor`), which is not "
                f"logged at this {interval}'s end. Logged: {sorted(trainer.callback_metrics)}. "
                "Pass one of these as `plateau_monitor` (each player's total is "
                "'train/<player>/loss'; validation metrics exist after a validation: at an "
                "epoch's end, or every `val_check_interval` batches)."
            )
        # A copy: the reduction works in place, and callback_metrics keeps this process's value.
        value = torch.as_tensor(metric, dtype=torch.float32, device=module.device).clone()
        reduced: Tensor = trainer.strategy.reduce(value, reduce_op="mean")
        return reduced


class GiveClippingBack(pl.Callback):
    """Puts ``Trainer(gradient_clip_val=...)`` back when a fit with players ends or fails."""

    def __init__(self, loop: PlayersLoop) -> None:
        self.loop = loop

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.loop.give_clipping_back(trainer)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.loop.give_clipping_back(trainer)


def check_players(players: Sequence[Player], mix: LossMix) -> tuple[Player, ...]:
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
            f"The terms {opposed} have `opposed_by`, which players do not support: another "
            "player's parameters are frozen during this player's turn, so reversing their "
            "gradient would do nothing; give the opposing side its own term in its own player. "
            "To oppose a part of the same player, place "
            "lightning_lossmix.nn.GradientReversal in its forward instead."
        )
    unplayed = [name for name in mix.names if name not in owner]
    if unplayed:
        raise LossMixError(
            f"The terms {unplayed} belong to no player: with players, every term is optimized "
            "by one of them. Add each to a player's `terms`."
        )
    return players
