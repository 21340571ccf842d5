"""What `LossMixModule` does for a balancer: its argument, the loss scale, logs and checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl

from lightning_lossmix._compat import attached_trainer, batches_that_stepped
from lightning_lossmix._errors import LossMixError
from lightning_lossmix.balancing._base import Balancer

BalancerArgument = Balancer | Mapping[str, Balancer] | None


def balancers_by_player(
    balancer: BalancerArgument, players: Sequence[str], owner: str
) -> dict[str | None, Balancer]:
    """Return the balancer of each mix: key None for the module's mix, else a player's name.

    Without players, `balancer` is one `Balancer`. With players, a balancer works within one
    player's terms, so `balancer` maps player names to balancers (players left out have none).

    Raises:
        LossMixError: for a mapping without players, a single balancer with players, an unknown
            player, or a value that is not a `Balancer`.
    """
    if balancer is None:
        return {}
    if not players:
        if not isinstance(balancer, Balancer):
            raise LossMixError(
                f"{owner}: `balancer` should be a Balancer, e.g. GradientBalance(). Found "
                f"{balancer!r} of type {type(balancer).__name__} (a mapping is for players)."
            )
        return {None: balancer}
    if isinstance(balancer, Balancer) or not isinstance(balancer, Mapping):
        raise LossMixError(
            f"{owner}: with players, `balancer` should map player names to balancers, e.g. "
            f"{{{players[0]!r}: GradientBalance()}}: a balancer works within one player's "
            f"terms. Found {balancer!r}."
        )
    unknown = [name for name in balancer if name not in players]
    if unknown:
        raise LossMixError(
            f"{owner}: `balancer` names the players {unknown}, which are not among {list(players)}."
        )
    for name, value in balancer.items():
        if not isinstance(value, Balancer):
            raise LossMixError(
                f"{owner}: `balancer[{name!r}]` should be a Balancer. Found {value!r} of type "
                f"{type(value).__name__}."
            )
    return {name: value for name, value in balancer.items()}


def loss_scale(trainer: pl.Trainer | None) -> float:
    """Return the GradScaler's current scale under 16-bit mixed precision, else 1.0."""
    if trainer is None:
        return 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def log_balance(module: pl.LightningModule, balancer: Balancer, player: str | None) -> None:
    """Log the balancer's state under ``balance/...`` (``balance/<player>/...`` with players).

    Only on the steps the logger writes (``Trainer(log_every_n_steps=...)``, as Lightning
    decides it): reading the state costs a device sync and each ``self.log`` call some tens of
    microseconds, which the other steps do not pay.
    """
    trainer = attached_trainer(module)
    if trainer is not None and not _logger_writes(trainer):
        return
    prefix = "balance/" if player is None else f"balance/{player}/"
    for key, value in balancer.logged().items():
        module.log(prefix + key, value, on_step=True, on_epoch=False)


def _logger_writes(trainer: pl.Trainer) -> bool:
    """Whether the logger writes this training step (Lightning's ``should_update_logs``)."""
    every = int(getattr(trainer, "log_every_n_steps", 1))  # set by the Trainer's __init__
    if every == 0:
        return False
    return (batches_that_stepped(trainer) + 1) % every == 0 or trainer.should_stop
