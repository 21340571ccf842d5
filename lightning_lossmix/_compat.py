"""Every private attribute of Lightning, TensorBoard and torch that the package reads, in one room.

Each accessor names the version it was checked against; `tests/test_compat.py` fails loudly when
one of them disappears, so an upgrade breaks here and not silently in a figure.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = [
    "batches_that_stepped",
    "get_donated_buffer",
    "logger_prefix",
    "set_donated_buffer",
    "tensorboard_file_writer",
]


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Return the step Lightning logs a batch's training metrics at.

    Lightning counts it in ``fit_loop.epoch_loop._batches_that_stepped`` (checked on 2.6.0): it
    advances once per optimizer step, or once per batch under manual optimization with several
    optimizers, where ``global_step`` counts every optimizer's step.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def logger_prefix(logger: TensorBoardLogger) -> str:
    """Return the prefix `TensorBoardLogger` puts before every tag, with its separator, or ''.

    Read from ``logger._prefix`` (checked on Lightning 2.6.0).
    """
    prefix: str = logger._prefix
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""


def tensorboard_file_writer(logger: TensorBoardLogger) -> Any:
    """Return the event-file writer under a `TensorBoardLogger`'s `SummaryWriter`.

    ``SummaryWriter._get_file_writer()`` (checked on torch 2.13 and tensorboard 2.21) writes
    one `Summary` protobuf with many values as one event, which ``add_scalar`` cannot.
    """
    return logger.experiment._get_file_writer()


def get_donated_buffer() -> bool | None:
    """Return ``torch._functorch.config.donated_buffer``, or None where torch has no such flag.

    Inductor's donated buffers (torch >= 2.5; checked on 2.13) free a compiled graph's saved
    tensors after the first backward, which forbids the ``retain_graph=True`` a per-term
    gradient needs.
    """
    functorch = getattr(torch, "_functorch", None)
    config = getattr(functorch, "config", None)
    value = getattr(config, "donated_buffer", None)
    return None if value is None else bool(value)


def set_donated_buffer(value: bool) -> None:
    """Set ``torch._functorch.config.donated_buffer`` (see `get_donated_buffer`)."""
    torch._functorch.config.donated_buffer = value
