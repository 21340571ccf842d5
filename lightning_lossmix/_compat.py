"""Every private attribute of Lightning, TensorBoard and torch that the package reads, in one room.

Each accessor names the version it was checked against; `tests/test_compat.py` fails loudly when
one of them disappears, so an upgrade breaks here and not silently in a figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = [
    "accumulating",
    "any_nonfinite",
    "attached_trainer",
    "batches_that_stepped",
    "callback_metrics",
    "current_dataloader_idx",
    "dense_values",
    "epoch_batches_done",
    "get_donated_buffer",
    "logger_prefix",
    "set_donated_buffer",
    "sharded_strategy",
    "tensorboard_file_writer",
    "trainer_callback",
]

CallbackT = TypeVar("CallbackT", bound=pl.Callback)

#: Lightning strategies that shard the parameters (checked by class name, so that none of
#: them needs importing, nor its optional dependency installed).
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Return the step Lightning logs a batch's training metrics at.

    Lightning counts it in ``fit_loop.epoch_loop._batches_that_stepped`` (checked on 2.6.0): it
    advances once per optimizer step, or once per batch under manual optimization with several
    optimizers, where ``global_step`` counts every optimizer's step.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def accumulating(trainer: pl.Trainer) -> bool:
    """Return whether the current training batch is a micro-batch that accumulates gradients.

    ``fit_loop._should_accumulate()`` (checked on Lightning 2.6.0): True on every micro-batch of
    an optimizer step but the last, where Lightning neither steps nor writes to the loggers.
    """
    return bool(trainer.fit_loop._should_accumulate())


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


def callback_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """Return the dict that ``trainer.callback_metrics`` returns, without refreshing it first.

    The public property merges every value the module logged into
    ``trainer._logger_connector._callback_metrics`` (checked on Lightning 2.6.0) at each read,
    which costs more than a measurement's figures; what is put in this dict is what the
    property returns next.
    """
    metrics: dict[str, Any] = trainer._logger_connector._callback_metrics
    return metrics


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


def sharded_strategy(trainer: Any) -> str | None:
    """Return the name of `trainer`'s strategy if it shards the parameters, else None.

    Under those, a process holds a piece of each parameter, so one term's gradient on a
    parameter cannot be taken without gathering it.

    Examples:
        >>> from types import SimpleNamespace
        >>> sharded_strategy(SimpleNamespace(strategy=type("FSDPStrategy", (), {})()))
        'FSDPStrategy'
    """
    name = type(getattr(trainer, "strategy", None)).__name__
    return name if any(part in name for part in _SHARDED_STRATEGIES) else None


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """Return the Trainer `module` is attached to, or None (``module.trainer`` raises then).

    Read from ``LightningModule._trainer`` (checked on Lightning 2.6.0).
    """
    trainer: pl.Trainer | None = module._trainer
    return trainer


def trainer_callback(trainer: pl.Trainer, kind: type[CallbackT]) -> CallbackT | None:
    """Return the Trainer's callback of type `kind`, or None.

    Lightning keeps the callbacks a module's ``configure_callbacks`` returned on the Trainer
    for its later runs, and announces each one a later run's returns replace (at INFO).
    ``Trainer.callbacks`` is set by its callback connector, undeclared on the class (checked
    on Lightning 2.6.6).
    """
    callbacks: list[pl.Callback] = getattr(trainer, "callbacks", [])
    return next((c for c in callbacks if isinstance(c, kind)), None)


def epoch_batches_done(trainer: pl.Trainer) -> bool:
    """Whether the training epoch's last batch has been fetched (not a stop by `max_steps`).

    Lightning's own test before stepping the "epoch" schedulers, read from
    ``trainer.fit_loop.epoch_loop._num_ready_batches_reached()`` (checked on Lightning 2.6.6).
    """
    done: bool = trainer.fit_loop.epoch_loop._num_ready_batches_reached()
    return done


def current_dataloader_idx(trainer: pl.Trainer) -> int:
    """Return the index of the dataloader an evaluation loop is running (0 with one dataloader).

    Lightning keeps it on the loop's result collection, ``trainer._results.dataloader_idx``
    (checked on 2.6.0), where ``self.log`` reads it to add ``/dataloader_idx_<N>`` to the keys.
    """
    results = trainer._results
    index = None if results is None else results.dataloader_idx
    return 0 if index is None else int(index)


def any_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """Return whether any element of `tensors` is NaN or infinite; one device sync per device.

    ``torch._amp_foreach_non_finite_check_and_unscale_`` (checked on torch 2.13, CPU and CUDA,
    float16 to float64) is the fused check a GradScaler runs on every step: one kernel per
    device, which measured 3x cheaper than the norms of the gradients and a read-back. It
    multiplies the tensors in place by the inverse scale, here exactly 1, which changes no
    value.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(dense_values(tensor))
    found = False
    for device, group in by_device.items():
        one = _ONES.get(device)
        if one is None:
            one = _ONES[device] = torch.ones(1, device=device)
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
        found = found or bool(flag)
    return found


def dense_values(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor`, or its values if it is sparse (``nn.Embedding(sparse=True)``'s gradient).

    The values are taken as the optimizer will apply them: summed where an index repeats in
    half precision (``coalesce``), where the sum may overflow, as a GradScaler does.
    """
    if tensor.layout != torch.sparse_coo:
        return tensor
    return (tensor.coalesce() if tensor.dtype == torch.float16 else tensor)._values()


# The inverse scale of `any_nonfinite`, one per device: it runs every optimizer step, and the
# kernel only reads it. Never written, so it stays valid for the whole process.
_ONES: dict[torch.device, torch.Tensor] = {}
