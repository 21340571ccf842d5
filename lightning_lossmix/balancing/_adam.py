"""The small Adam optimizer of GradNorm's weights and FAMO's logits, with its state in buffers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """Apply one Adam step in place (as ``torch.optim.Adam`` does; `step` counts from 1)."""
    with torch.no_grad():
        if weight_decay:
            grad = grad + weight_decay * param  # L2 penalty, as torch.optim.Adam's weight_decay
        exp_avg.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
        exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
        corrected = exp_avg / (1.0 - betas[0] ** step)
        denominator = (exp_avg_sq / (1.0 - betas[1] ** step)).sqrt().add_(eps)
        param.addcdiv_(corrected, denominator, value=-lr)


class SmallAdam(nn.Module):
    """Adam for one small tensor that a balancer owns (GradNorm's weights, FAMO's logits).

    The moments are buffers and the step count is extra state, so that a checkpoint and
    ``module.to(device)`` carry them like any other state of the balancer.

    Args:
        size: the number of elements of the tensor it updates.
        lr: the learning rate.
        weight_decay: the L2 penalty, as ``torch.optim.Adam``'s.

    Examples:
        >>> param = torch.zeros(2)
        >>> adam = SmallAdam(2, lr=0.1)
        >>> adam.step(param, torch.tensor([1.0, -1.0]))
        >>> param, adam.steps
        (tensor([-0.1000,  0.1000]), 1)
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor

    def __init__(self, size: int, *, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = 0
        self.register_buffer("exp_avg", torch.zeros(size, dtype=torch.float32))
        self.register_buffer("exp_avg_sq", torch.zeros(size, dtype=torch.float32))

    def step(self, param: Tensor, grad: Tensor) -> None:
        """Update `param` in place with `grad`."""
        self.steps += 1
        adam_step(
            param, grad.to(param.dtype), self.exp_avg, self.exp_avg_sq, self.steps,
            lr=self.lr, weight_decay=self.weight_decay,
        )  # fmt: skip

    @override
    def get_extra_state(self) -> dict[str, Any]:
        """Return the step count (a checkpoint keeps it)."""
        return {"steps": self.steps}

    @override
    def set_extra_state(self, state: Any) -> None:
        """Restore the step count."""
        self.steps = int(state["steps"])

    @override
    def extra_repr(self) -> str:
        return f"lr={self.lr}, weight_decay={self.weight_decay}"
