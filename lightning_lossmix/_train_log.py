"""The training tags of a `LossMixModule`: the total, each term's value and signed weight."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_lossmix._mix import LossMixOutput

__all__ = ["TrainLog"]


class TrainLog:
    """Logs a training step's total, each term's value and each term's signed weight.

    The tags are ``train/loss`` (``train/<player>/loss`` with players), ``train/loss/<term>`` and
    ``train/weight/<term>``, every step, through ``module.log``, so any logger gets them.

    Args:
        progress_bar_terms: also show each term's value on the progress bar (the total always
            is).
    """

    def __init__(self, progress_bar_terms: bool = False) -> None:
        self.progress_bar_terms = bool(progress_bar_terms)
        # The tags, built once per player (None without players): this runs every step.
        self._keys: dict[str | None, tuple[str, list[tuple[str, str, str]]]] = {}

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
        for name, loss_key, weight_key in term_keys:
            module.log(loss_key, output.values[name], on_step=True, on_epoch=False, prog_bar=bar)
            module.log(weight_key, output.signed_weights[name], on_step=True, on_epoch=False)
        if skipped_steps is not None:
            module.log("train/skipped_steps", float(skipped_steps), on_step=True)
