"""What `LossMixModule` does for a balancer: its argument, the loss scale, logs and checks."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossmix._errors import LossMixError
from lightning_lossmix._player import Player
from lightning_lossmix._saved_tensors import SavedTensorsKept
from lightning_lossmix.balancing._base import Balancer, constructor_defaults

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


class PlayersEvaluation(Balancer):
    """The multipliers of a module with players in evaluation: each player's balancer's.

    Evaluation assembles every declared term at once, with the module's own mix; with players,
    the balancers belong to the players' mixes. This balancer gives, for each term a player's
    balancer balances, that balancer's evaluation multiplier (its last training decision, or
    for `UncertaintyWeighting` its current log-variances), and adds their regularizers. It has
    no state of its own, so it adds nothing to checkpoints: the players' balancers are saved
    under ``player_mixes``. It never decides, in training either.

    Args:
        balancers: player name to the balancer of that player's mix.
    """

    def __init__(self, balancers: Mapping[str | None, Balancer]) -> None:
        super().__init__([name for b in balancers.values() for name in b.balanced])
        self._players = tuple(balancers.values())  # a tuple: not registered as submodules
        self._non_persistent_buffers_set.add("last_multipliers")

    # No extra state either: nn.Module's own methods tell `state_dict` that there is none.
    get_extra_state = nn.Module.get_extra_state  # type: ignore[assignment]
    set_extra_state = nn.Module.set_extra_state  # type: ignore[assignment]

    def _fewest_terms(self) -> int:
        return 1

    def _current(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float = 1.0,
    ) -> Tensor:
        return self._evaluation(declared)  # in training too (a step that mixes every term)

    def _evaluation(self, declared: Mapping[str, float]) -> Tensor:
        return torch.cat([balancer._evaluation(declared) for balancer in self._players])

    def regularizer(self) -> Tensor | None:
        """Return the sum of the players' balancers' regularizers (None if none has one)."""
        found = [r for r in (b.regularizer() for b in self._players) if r is not None]
        return None if not found else torch.stack(found).sum()


def balancer_specs(mixes: Mapping[str | None, Any]) -> dict[str, str]:
    """Return each mix's balancer as its constructor call: ``""`` for the module's, else a player.

    `mixes` maps None (the module's mix) or a player's name to a `LossMix`; mixes without a
    balancer are left out. A checkpoint keeps this next to the balancers' state, so that a
    module loading it with another balancer, or none, is told which one wrote it.

    Examples:
        >>> from lightning_lossmix import LossMix, LossTerm
        >>> from lightning_lossmix.balancing import GradientBalance
        >>> mix = LossMix([LossTerm("a"), LossTerm("b")], balancer=GradientBalance(smoothing=0.9))
        >>> balancer_specs({None: mix})
        {'': 'GradientBalance(smoothing=0.9)'}
    """
    return {
        "" if player is None else player: f"{type(b).__name__}({b.extra_repr()})"
        for player, mix in mixes.items()
        if (b := getattr(mix, "balancer", None)) is not None
    }


def warn_changed_balancers(
    saved: Mapping[str, str] | None, current: Mapping[str, str], owner: str
) -> None:
    """Warn, naming the fix, if the balancers differ from those that wrote a checkpoint.

    `saved` is None for a checkpoint written before the balancers were recorded: nothing is
    compared then. `owner` is the module's class name, for the fix. Strict loading of the
    state dict fails next when the balancers' parameters or buffers differ; the warning says
    which balancer wrote the checkpoint and what to do.
    """
    if saved is None or _normalized(saved) == _normalized(current):
        return
    changes = []
    for key in sorted({*saved, *current}):
        where = "the module's balancer" if key == "" else f"player {key!r}'s balancer"
        before, now = saved.get(key), current.get(key)
        if now is None:
            changes.append(f"the checkpoint has {where} {before}, this module none")
        elif before is None:
            changes.append(f"this module has {where} {now}, the checkpoint none")
        elif _normalized_spec(before) != _normalized_spec(now):
            changes.append(f"{where} is {now} here and {before} in the checkpoint")
    if not saved:
        again = "To load the checkpoint as it was written, give the module no balancer."
    else:
        players = [key for key in saved if key]
        given = (
            "{" + ", ".join(f"{key!r}: {saved[key]}" for key in players) + "}"
            if players
            else saved[""]
        )
        again = (
            "If `save_hyperparameters(ignore=['balancer'])` left it out, pass it again: "
            f"`{owner}.load_from_checkpoint(path, balancer={given})`."
        )
    rank_zero_warn(
        "The balancers differ from the checkpoint's: "
        + "; ".join(changes)
        + ". Resuming a fit, or evaluating with the last training weights, needs the balancer "
        "that wrote the checkpoint (loading fails on its state where the parameters or buffers "
        f"differ). {again} To train a new balancer from the checkpoint's weights, load them "
        "with `strict=False` and fit without `ckpt_path` (this warning then tells what changed)."
    )


def _normalized(specs: Mapping[str, str]) -> dict[str, str]:
    return {key: _normalized_spec(spec) for key, spec in specs.items()}


def _normalized_spec(spec: str) -> str:
    """Return a balancer's constructor call without the arguments equal to their defaults.

    Checkpoints written before the balancers' reprs left defaults out hold, for instance,
    ``DWA(temperature=2.0, every_n_steps=100)`` where ``DWA()`` is written now. A spec that
    is not such a call is returned as it is.
    """
    from lightning_lossmix import balancing

    try:
        call = ast.parse(spec, mode="eval").body
    except SyntaxError:
        return spec
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
        return spec
    kind = getattr(balancing, call.func.id, None)
    if not (isinstance(kind, type) and issubclass(kind, Balancer)):
        return spec
    defaults = constructor_defaults(kind)
    kept = []
    for keyword in call.keywords:
        try:
            value = ast.literal_eval(keyword.value)
        except ValueError:
            return spec
        if keyword.arg not in defaults or defaults[keyword.arg] != value:
            kept.append(f"{keyword.arg}={value!r}")
    return f"{call.func.id}({', '.join(kept)})"


def check_optimized(
    balancer: Balancer,
    trainer: pl.Trainer | None,
    player: str | None,
    players: Sequence[Player],
) -> None:
    """Check that the optimizer that trains with the balanced terms holds the balancer's parameters.

    Without players, any of the trainer's optimizers; with players, the optimizer of the player
    whose terms the balancer balances (``configure_optimizers`` returns one per player, in the
    players' order): on a player's turn only its optimizer's parameters train.

    Raises:
        LossMixError: naming the parameters, where they are instead, and the fix.
    """
    if trainer is None:
        return
    optimizers: list[Any] = list(trainer.optimizers)
    if player is None:
        balancer.check_optimized(optimizers)
        return
    names = [p.name for p in players]
    if len(optimizers) != len(names):
        return  # the players' loop refuses this with its own error
    by_player = dict(zip(names, optimizers, strict=True))
    missing = balancer.unoptimized([by_player[player]])
    if not missing:
        return
    holders = [n for n, opt in by_player.items() if set(missing) - set(balancer.unoptimized([opt]))]
    where = f"in the optimizer of player {holders[0]!r}" if holders else "in no optimizer"
    raise LossMixError(
        f"{type(balancer).__name__}: it balances player {player!r}'s terms, but its learnable "
        f"parameters ({', '.join(missing)}) are {where}: they would not learn with "
        f"{player!r}'s terms (on {player!r}'s turn only its optimizer's parameters train; the "
        f"others are frozen). Put them in {player!r}'s optimizer: add "
        f"self.player_mixes[{player!r}].balancer.parameters() to it in configure_optimizers."
    )


def loss_scale(trainer: pl.Trainer | None) -> float:
    """Return the GradScaler's current scale under 16-bit mixed precision, else 1.0.

    Pass it as ``LossMix(...)(losses, step=..., loss_scale=loss_scale(self.trainer))`` in your
    own ``training_step``, as `LossMixModule` does: a balancer that differentiates each term
    (`GradientBalance`, `GradNorm`) then scales the term before its backward pass, so that
    16-bit gradients do not underflow, and unscales the result. 1.0 without a Trainer, in
    other precisions, and with a disabled scaler.

    Examples:
        >>> loss_scale(None)
        1.0
    """
    if trainer is None:
        return 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def balance_metrics(balancer: Balancer, player: str | None) -> dict[str, float]:
    """Return the balancer's state under ``balance/...`` (``balance/<player>/...``).

    Read on the steps the loggers write only (`TrainLog`): reading it costs a device sync,
    which the other steps do not pay.
    """
    prefix = "balance/" if player is None else f"balance/{player}/"
    return {prefix + key: value for key, value in balancer.logged().items()}


class KeepSavedTensors(pl.Callback):
    """Keeps compiled graphs' saved tensors during a fit, for a balancer's per-term gradients.

    `LossMixModule.configure_callbacks` returns one for every run, `active` when a balancer
    has ``per_term_gradients`` (Lightning keeps a module's callback on the Trainer for later
    runs, and replaces it only with one of the same type). Active, it holds `SavedTensorsKept`
    (inductor's donated buffers off) from ``setup`` to ``teardown`` of the fit, or until the
    fit raises.

    Args:
        active: whether to hold during a fit.
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self._kept = SavedTensorsKept()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.active:
            self._kept.hold()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._kept.release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._kept.release()
