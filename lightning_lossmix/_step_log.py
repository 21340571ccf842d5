"""Training values the package computes itself, written straight to the loggers.

The signed weights and a balancer's state depend on the step, not on the batch's data, and are
final once the terms are assembled: nothing is gained by passing them through ``self.log``,
whose result collection handles every key it ever saw at every step, logged or not (the
weights' four calls made a step of the base-class benchmark about a quarter slower,
docs/benchmarks.md). They go to every logger on the steps Lightning writes (as Lightning's
``LearningRateMonitor`` does), at Lightning's step, and into ``trainer.callback_metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch

from lightning_lossmix._compat import accumulating, batches_that_stepped, callback_metrics

__all__ = ["logger_writes", "write_step_metrics"]


def logger_writes(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the current training batch's metrics to the loggers.

    As its ``update_train_step_metrics`` decides it: never on a micro-batch that accumulates
    gradients (automatic optimization), else every ``log_every_n_steps`` optimizer steps,
    every step under ``fast_dev_run``, and when the trainer is stopping.
    """
    if trainer.lightning_module.automatic_optimization and accumulating(trainer):
        return False
    # Both set by the Trainer's __init__ (outside its annotations).
    if getattr(trainer, "fast_dev_run", False):
        return True
    every = int(getattr(trainer, "log_every_n_steps", 1))
    if every == 0:
        return False
    return (batches_that_stepped(trainer) + 1) % every == 0 or trainer.should_stop


def write_step_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write `metrics` to every logger at Lightning's step, and into callback_metrics."""
    step = batches_that_stepped(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
    scalars = torch.tensor(list(metrics.values()), dtype=torch.float32).unbind()  # one allocation
    callback_metrics(trainer).update(zip(metrics, scalars, strict=True))
