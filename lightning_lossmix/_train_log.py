"""The training tags of a `LossMixModule`: the total, each term's value and signed weight."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl

from lightning_lossmix._compat import attached_trainer
from lightning_lossmix._mix import LossMixOutput
from lightning_lossmix._step_log import logger_writes, update_callback_metrics, write_step_metrics

__all__ = ["TrainLog"]


class TrainLog:
    """Logs a training step's total, each term's value and each term's signed weight.

    The total (``train/loss``, ``train/<player>/loss`` with players, on the progress bar), each
    term's value (``train/loss/<term>``) and, under ``nonfinite="skip"``, the skip count
    (``train/skipped_steps``, which the gradient check after the backward may raise again) go
    through ``module.log`` every step, as any logged value. The signed weights
    (``train/weight/<term>``) are the package's own bookkeeping, final when the terms are
    assembled: they go straight to every logger on the steps Lightning writes
    (`lightning_lossmix._step_log`), and into ``trainer.callback_metrics`` then and at the end
    of each epoch (`flush`).

    Args:
        progress_bar_terms: also show each term's value on the progress bar (the total always
            is).
    """

    def __init__(self, progress_bar_terms: bool = False) -> None:
        self.progress_bar_terms = bool(progress_bar_terms)
        # The tags, built once per player (None without players): this runs every step.
        self._keys: dict[str | None, tuple[str, list[tuple[str, str, str]]]] = {}
        # The latest signed weights per player, for `flush` (floats only: the output's tensors
        # would keep the step's graph alive).
        self._latest: dict[str | None, Mapping[str, float]] = {}

    def log(
        self,
        module: pl.LightningModule,
        output: LossMixOutput,
        player: str | None,
        skipped_steps: int | None,
    ) -> None:
        """Log `output`, and `skipped_steps` (``train/skipped_steps``) unless it is None."""
        keys = self._keys.get(player)
        if keys is None:
            total_key = "train/loss" if player is None else f"train/{player}/loss"
            keys = (total_key, [(n, f"train/loss/{n}", f"train/weight/{n}") for n in output.values])
            self._keys[player] = keys
        total_key, term_keys = keys
        module.log(total_key, output.total, on_step=True, on_epoch=False, prog_bar=True)
        bar = self.progress_bar_terms
        for name, loss_key, _ in term_keys:
            module.log(loss_key, output.values[name], on_step=True, on_epoch=False, prog_bar=bar)
        if skipped_steps is not None:
            module.log("train/skipped_steps", float(skipped_steps), on_step=True)
        self._latest[player] = output.signed_weights
        trainer = attached_trainer(module)
        if trainer is not None and logger_writes(trainer):
            write_step_metrics(trainer, self._bookkeeping(player))

    def flush(self, module: pl.LightningModule) -> None:
        """Put the latest weights into ``trainer.callback_metrics``."""
        trainer = attached_trainer(module)
        if trainer is None:
            return
        for player in self._latest:
            update_callback_metrics(trainer, self._bookkeeping(player))

    def _bookkeeping(self, player: str | None) -> dict[str, float]:
        weights = self._latest[player]
        return {key: weights[name] for name, _, key in self._keys[player][1]}
