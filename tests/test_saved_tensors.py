"""SavedTensorsKept: one process-wide setting shared by the monitor and a balancer."""

from __future__ import annotations

import pytest
import torch

from lightning_lossmix._saved_tensors import SavedTensorsKept


@pytest.mark.parametrize("found", [True, False])
@pytest.mark.parametrize("first_out", ["monitor", "balancer"])
def test_the_last_holder_restores_what_the_first_found(found: bool, first_out: str) -> None:
    before = torch._functorch.config.donated_buffer
    torch._functorch.config.donated_buffer = found
    try:
        holders = {"monitor": SavedTensorsKept(), "balancer": SavedTensorsKept()}
        holders["monitor"].hold()
        holders["balancer"].hold()
        holders["balancer"].hold()  # a second hold counts once
        assert torch._functorch.config.donated_buffer is False
        second_out = "balancer" if first_out == "monitor" else "monitor"
        holders[first_out].release()
        holders[first_out].release()  # a second release too
        assert torch._functorch.config.donated_buffer is False  # the other still holds it
        holders[second_out].release()
        assert torch._functorch.config.donated_buffer is found
    finally:
        torch._functorch.config.donated_buffer = before
