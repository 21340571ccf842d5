"""Keeping a compiled graph's saved tensors for per-term gradients (inductor's donated buffers)."""

from __future__ import annotations

from typing import ClassVar

from lightning_lossmix._compat import get_donated_buffer, set_donated_buffer

__all__ = ["SavedTensorsKept"]


class SavedTensorsKept:
    """A hold on ``torch._functorch.config.donated_buffer = False``, shared by all holders.

    A per-term gradient differentiates a step's graph before the step's own backward
    (``retain_graph=True``). Inductor's donated buffers (torch >= 2.5) free a compiled graph's
    saved tensors at its first backward and refuse a graph kept for another. `GradientMonitor`
    and a gradient-based balancer each hold this during a fit: the first hold turns donated
    buffers off, and the last release puts back the value the first hold found, whatever the
    order in which the holders let go. The setting is process-wide, so other compiled backward
    passes meanwhile may use a little more memory.

    Examples:
        >>> import torch
        >>> found = torch._functorch.config.donated_buffer
        >>> monitor, balancer = SavedTensorsKept(), SavedTensorsKept()
        >>> monitor.hold(); balancer.hold()
        >>> torch._functorch.config.donated_buffer
        False
        >>> monitor.release(); balancer.release()
        >>> torch._functorch.config.donated_buffer == found
        True
    """

    _holders: ClassVar[int] = 0
    _found: ClassVar[bool | None] = None

    def __init__(self) -> None:
        self.held = False

    def hold(self) -> None:
        """Keep saved tensors (idempotent)."""
        if self.held:
            return
        self.held = True
        if SavedTensorsKept._holders == 0:
            SavedTensorsKept._found = get_donated_buffer()
            if SavedTensorsKept._found is not None:
                set_donated_buffer(False)
        SavedTensorsKept._holders += 1

    def release(self) -> None:
        """Let go (idempotent); the last holder to let go restores the setting."""
        if not self.held:
            return
        self.held = False
        SavedTensorsKept._holders -= 1
        if SavedTensorsKept._holders == 0 and SavedTensorsKept._found is not None:
            set_donated_buffer(SavedTensorsKept._found)
            SavedTensorsKept._found = None
