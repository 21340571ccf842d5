"""Shared by the tests that spawn DDP processes."""

from __future__ import annotations

import torch.distributed as dist


def leave_process_group() -> None:
    """End this process's part of the process group, once every process got here.

    Called from ``on_fit_end`` (after Lightning's teardown, when no collective is left): a
    spawned process that exits with its gloo group still alive aborted once in a while in CI
    ("terminate called without an active exception"), after its results were written. The
    barrier keeps one process from closing its connections while another still reads from them.
    Lightning's own clean-up at exit then finds no group and does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
