"""Every private attribute of Lightning, TensorBoard and torch that the package reads, in one room.

Each accessor names the version it was checked against; `tests/test_compat.py` fails loudly when
one of them disappears, so an upgrade breaks here and not silently in a figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = [
    "attached_trainer",
    "batches_that_stepped",
    "current_dataloader_idx",
    "get_donated_buffer",
    "gradient_norms",
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


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """Return the Trainer `module` is attached to, or None (``module.trainer`` raises then).

    Read from ``LightningModule._trainer`` (checked on Lightning 2.6.0).
    """
    trainer: pl.Trainer | None = module._trainer
    return trainer


def current_dataloader_idx(trainer: pl.Trainer) -> int:
    """Return the index of the dataloader an evaluation loop is running (0 with one dataloader).

    Lightning keeps it on the loop's result collection, ``trainer._results.dataloader_idx``
    (checked on 2.6.0), where ``self.log`` reads it to add ``/dataloader_idx_<N>`` to the keys.
    """
    results = trainer._results
    index = None if results is None else results.dataloader_idx
    return 0 if index is None else int(index)


def gradient_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the 2-norm of each tensor, as one float32-or-wider tensor on the first's device.

    ``torch._foreach_norm`` (checked on torch 2.13, with its ``dtype`` argument) computes
    them in one fused kernel per device and dtype; half-precision tensors are reduced in
    float32, so that a norm above 65504 does not overflow. NaN and infinite values give NaN and
    infinite norms.
    """
    if not tensors:
        return torch.zeros(0)
    low = [t for t in tensors if t.dtype in (torch.float16, torch.bfloat16)]
    if not low:  # the common case: one fused kernel per device and dtype
        norms = list(torch._foreach_norm(list(tensors)))
    else:
        other = [t for t in tensors if t.dtype not in (torch.float16, torch.bfloat16)]
        norms = [*torch._foreach_norm(other)] if other else []
        norms += torch._foreach_norm(low, 2, dtype=torch.float32)
    first = norms[0]
    if any(n.dtype != first.dtype or n.device != first.device for n in norms):
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        norms = [n.to(device=first.device, dtype=dtype) for n in norms]
    return torch.stack(norms)
