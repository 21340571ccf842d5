"""The training tags of a `LossMixModule`: the total, each term's value and signed weight."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_lossmix._compat import attached_trainer, batches_that_stepped, callback_metrics
from lightning_lossmix._mix import LossMixOutput
from lightning_lossmix._step_log import logger_writes, write_step_metrics
from lightning_lossmix.balancing._base import Balancer
from lightning_lossmix.balancing._in_module import balance_metrics

__all__ = ["TrainLog"]


class TrainLog:
    """Logs a training step's total, each term's value and signed weight, and balancer state.

    The total (``train/loss``, ``train/<player>/loss`` with players, on the progress bar), each
    term's value (``train/loss/<term>``) and, under ``nonfinite="skip"``, the skip count
    (``train/skipped_steps``, which the gradient check after the backward may raise again) go
    through ``module.log`` every step, as any logged value. With players, the totals and
    values reach the loggers as the weights do (below), on the steps where their player plays:
    Lightning writes every key its result collection holds at every step it writes, so a
    player of `every_n_batches` > 1 would show its last values again on the batches it sat
    out. The signed weights
    (``train/weight/<term>``) and a balancer's state (``balance/...``) are the package's own
    bookkeeping, final when the terms are assembled: they go straight to every logger on the
    steps Lightning writes (`lightning_lossmix._step_log`; with players, those where the player
    plays), and into ``trainer.callback_metrics`` then; the weights also at every other step.

    Args:
        progress_bar_terms: also show each term's value on the progress bar (the total always
            is).
    """

    def __init__(self, progress_bar_terms: bool = False) -> None:
        self.progress_bar_terms = bool(progress_bar_terms)
        # The tags, built once per player (None without players): this runs every step.
        self._keys: dict[str | None, tuple[str, list[tuple[str, str, str]]]] = {}
        # Per player, the latest signed weights (floats: the output's tensors would keep the
        # step's graph alive) and their tensors for callback_metrics, made again only when the
        # weights change; and the player's balancer.
        self._latest: dict[str | None, tuple[tuple[float, ...], list[tuple[str, Tensor]]]] = {}
        self._balancers: dict[str | None, Balancer | None] = {}
        # A balancer's state as the step logged it, kept before a dropped step's decision is
        # taken back (`keep_balance`), for a write at the end of the batch.
        self._kept: dict[str | None, dict[str, float]] = {}
        # With players, each one's total and term values of its last turn, and the batch of it.
        self._values: dict[str | None, list[tuple[str, Tensor]]] = {}
        self._played_at: dict[str | None, int] = {}
        # The step at which the last call wrote to the loggers, None if it did not.
        self._written_at: int | None = None
        # While set, calls write nothing to the loggers (`quiet`).
        self._quiet = False

    def log(
        self,
        module: pl.LightningModule,
        output: LossMixOutput,
        player: str | None,
        skipped_steps: int | None,
        balancer: Balancer | None = None,
    ) -> None:
        """Log `output`, `skipped_steps` unless it is None, and `balancer`'s state if any."""
        keys = self._keys.get(player)
        if keys is None:
            total_key = "train/loss" if player is None else f"train/{player}/loss"
            keys = (total_key, [(n, f"train/loss/{n}", f"train/weight/{n}") for n in output.values])
            self._keys[player] = keys
        total_key, term_keys = keys
        # With players, written with the weights when the player plays; None is Lightning's
        # default (True would warn when the Trainer has no logger).
        to_loggers = None if player is None else False
        module.log(
            total_key, output.total, on_step=True, on_epoch=False, prog_bar=True, logger=to_loggers
        )
        bar = self.progress_bar_terms
        for name, loss_key, _ in term_keys:
            value = output.values[name]
            module.log(
                loss_key, value, on_step=True, on_epoch=False, prog_bar=bar, logger=to_loggers
            )
        if player is not None:  # detached: the step's graph is freed after its backward
            values = [(total_key, output.total)]
            values += [(loss_key, output.values[name]) for name, loss_key, _ in term_keys]
            self._values[player] = [(key, value.detach()) for key, value in values]
        if skipped_steps is not None:
            module.log("train/skipped_steps", float(skipped_steps), on_step=True)
        if self._quiet:
            return
        weights = tuple(output.signed_weights[name] for name, _, _ in term_keys)
        latest = self._latest.get(player)
        if latest is None or latest[0] != weights:  # constant weights: made once
            scalars = torch.tensor(weights, dtype=torch.float32).unbind()  # one allocation
            latest = (
                weights,
                [(key, t) for (_, _, key), t in zip(term_keys, scalars, strict=True)],
            )
            self._latest[player] = latest
        self._balancers[player] = balancer
        self._kept.pop(player, None)
        trainer = attached_trainer(module)
        if trainer is None:
            return
        callback_metrics(trainer).update(latest[1])
        self._played_at[player] = batches_that_stepped(trainer)
        self._written_at = None
        if logger_writes(trainer):
            write_step_metrics(trainer, self._metrics(player))
            self._written_at = batches_that_stepped(trainer)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Keep the bookkeeping of a step's first closure evaluation (LBFGS evaluates it again).

        A direct write per evaluation would add a point per evaluation. So the weights and
        the balancer state written for such a step, and put in callback_metrics, are those of
        its first evaluation (the one the gradient check also reads), while ``self.log``'s
        values are the last evaluation's.
        """
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def end_of_batch(self, module: pl.LightningModule) -> None:
        """Write the bookkeeping if the trainer decided to stop after it was logged.

        Lightning writes a batch's metrics when ``trainer.should_stop`` is set, which a callback
        (``Timer``, ``EarlyStopping`` on a training metric) may do after the training step.
        """
        trainer = attached_trainer(module)
        if trainer is None or not trainer.should_stop or not self._latest:
            return
        batch = batches_that_stepped(trainer)
        if self._written_at == batch or not logger_writes(trainer):
            return
        for player in self._latest:
            if self._played_at.get(player) == batch:  # with players, those that played
                write_step_metrics(trainer, self._metrics(player))
        self._written_at = batch

    def keep_balance(self, player: str | None) -> None:
        """Keep `player`'s balancer state as logged, before its decision is taken back.

        One device sync, on dropped steps only.
        """
        balancer = self._balancers.get(player)
        if balancer is not None:
            self._kept[player] = balance_metrics(balancer, player)

    def _metrics(self, player: str | None) -> dict[str, float]:
        weights, pairs = self._latest[player]
        metrics = {key: weight for (key, _), weight in zip(pairs, weights, strict=True)}
        values = self._values.get(player)
        if values:  # one read-back, on the steps written only
            floats = torch.stack([value.float() for _, value in values]).tolist()
            metrics.update(zip((key for key, _ in values), floats, strict=True))
        balancer = self._balancers.get(player)
        if balancer is not None:
            kept = self._kept.get(player)
            metrics.update(kept if kept is not None else balance_metrics(balancer, player))
        return metrics
