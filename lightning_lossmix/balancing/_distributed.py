"""Averages across processes, so that every process balances with the same global numbers."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Return the number of processes of the default group (1 outside distributed training)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def mean_across_processes(tensor: Tensor) -> Tensor:
    """Return the mean of `tensor` over all processes (the tensor itself with one process).

    It uses ``torch.distributed`` directly when a default process group is initialized, as
    torchmetrics does, so it works under any Lightning strategy and in a plain training loop.
    Every process must call it at the same point. The input is not modified.
    """
    count = world_size()
    if count == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / count
