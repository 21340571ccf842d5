"""Where `GradientMonitor`'s figures go: every logger, TensorBoard extras, callback_metrics."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_lossmix._compat import callback_metrics, logger_prefix, tensorboard_file_writer


def log_figures(
    trainer: pl.Trainer, metrics: Mapping[str, float], step: int, summaries: Summaries
) -> None:
    """Log through every logger (TensorBoard: one event), and put them in callback_metrics.

    A measurement has tens of figures; one ``add_scalar`` event each costs more than the
    gradients themselves on a small model. One Summary holding them all is what TensorBoard
    reads back the same way, in the logger's own run directory. In
    ``trainer.callback_metrics`` (as tensors) they are what `EarlyStopping` and
    `ModelCheckpoint` can monitor. `summaries` keeps the TensorBoard messages between calls.
    """
    # One tensor, seen as one 0-dim tensor per figure: one allocation, not one per figure.
    scalars = torch.tensor(list(metrics.values())).unbind() if metrics else ()
    callback_metrics(trainer).update(zip(metrics, scalars, strict=True))
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_metrics(dict(metrics), step=step)
        elif trainer.is_global_zero:
            summary = summaries.summary(logger_prefix(logger), metrics)
            tensorboard_file_writer(logger).add_summary(summary, step)


class Summaries:
    """One `Summary` per prefix and list of tags, refilled in place at each measurement.

    Building the protobuf's values costs about 1 us each; the tags of a fit's measurements
    rarely change, so the message is built once and only the numbers are set afterwards.
    ``add_summary`` copies it into its event, so refilling it later is safe.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.cache: dict[tuple[str, tuple[str, ...]], Summary] = {}

    def summary(self, prefix: str, metrics: Mapping[str, float]) -> Summary:
        key = (prefix, tuple(metrics))
        summary = self.cache.get(key)
        if summary is None:
            if len(self.cache) >= self.size:
                self.cache.clear()
            summary = Summary(value=[Summary.Value(tag=prefix + tag) for tag in metrics])
            self.cache[key] = summary
        for value, number in zip(summary.value, metrics.values(), strict=True):
            value.simple_value = number
        return summary


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """Return the trainer's TensorBoard loggers."""
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def charted(metrics: Mapping[str, float]) -> set[tuple[str, str]]:
    """Return the (kind, group) pairs of a measurement's magnitudes, shares and cosines."""
    pairs = set()
    for tag in metrics:
        kind, _, rest = tag.partition("/")
        if kind in ("grad_magnitude", "grad_share", "grad_cosine"):
            pairs.add((kind.removeprefix("grad_"), rest.rpartition("/")[0]))
    return pairs


def write_layout(
    trainer: pl.Trainer, groups: Sequence[str], cosines: bool, seen: set[tuple[str, str]]
) -> bool:
    """Write the custom-scalars layout (one multi-line chart per group and kind).

    See `layout` for how the kinds `seen` so far leave out charts that would stay empty.
    """
    loggers = tensorboard_loggers(trainer)
    for logger in loggers:
        charts = layout(groups, cosines, seen, logger_prefix(logger))
        logger.experiment.add_custom_scalars(charts)
    return bool(loggers)


def write_histograms(
    trainer: pl.Trainer,
    gradients: Tensor,
    sizes: list[int],
    group_indices: Mapping[str, list[int]],
    weights: Mapping[str, float],
    step: int,
    trained: Sequence[bool],
) -> None:
    """Histograms of each term's weighted gradient on each group (TensorBoard only).

    As the magnitudes: over the parameters `trained` in this measurement (a player's turn
    freezes the others'), and only for the terms that reach the group.
    """
    views = gradients.split(sizes, dim=1)
    for logger in tensorboard_loggers(trainer):
        prefix = logger_prefix(logger)
        for group, indices in group_indices.items():
            kept = [i for i in indices if trained[i]]
            if not kept:
                continue
            for t, (name, weight) in enumerate(weights.items()):
                raw = torch.cat([views[i][t] for i in kept])
                if not bool(raw.any()):
                    continue  # the term does not reach the group: no magnitude there either
                values = raw * weight
                tag = f"{prefix}grad_histogram/{group}/{name}"
                logger.experiment.add_histogram(tag, values, step)


def layout(
    groups: Sequence[str],
    cosines: bool,
    seen: set[tuple[str, str]] | None = None,
    prefix: str = "",
) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout for the monitor's tags.

    A group measured so far gets the charts of the kinds logged for it (`seen`, pairs of kind
    and group): one that a single term reaches has no share or cosine to chart. A group not
    measured yet (another player's, or reached by no term yet) gets every chart. The monitor
    writes the layout again when a measurement logs a kind not charted yet (TensorBoard shows
    a run's last layout). The charts match the tags as the logger wrote them, after `prefix`.
    """
    start = "^" + _escape(prefix)
    charts: dict[str, dict[str, list[Any]]] = {}
    kinds = ("magnitude", "share", "cosine") if cosines else ("magnitude", "share")
    for group in groups:
        logged = {kind for kind in kinds if (kind, group) in (seen or set())}
        shown = [kind for kind in kinds if kind in logged or "magnitude" not in logged]
        charts[f"gradients: {group}"] = {
            f"grad_{kind}/{group}": ["Multiline", [rf"{start}grad_{kind}/{_escape(group)}/"]]
            for kind in shown
        }
    charts["gradients: suggested weights"] = {
        "grad_suggested_weight": ["Multiline", [rf"{start}grad_suggested_weight/"]]
    }
    return charts


def _escape(text: str) -> str:
    """Escape the regular-expression syntax in `text` for TensorBoard's browser side.

    Only the characters that are syntax in a JavaScript pattern: ``re.escape`` also escapes
    the hyphen, an escape that a JavaScript pattern in unicode mode refuses.
    """
    return re.sub(r"[.^$*+?()\[\]{}|\\]", r"\\\g<0>", text)
