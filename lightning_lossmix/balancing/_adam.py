"""The small Adam optimizer of GradNorm's weights and FAMO's logits, with its state in buffers."""

from __future__ import annotations

import torch
from torch import Tensor


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
    """Apply one Adam step in place (as ``torch.optim.Adam`` does; `step` counts from 1).

    The balancers keep their small optimizers' state in buffers, so that a checkpoint and
    ``module.to(device)`` carry it like any other state.
    """
    with torch.no_grad():
        if weight_decay:
            grad = grad + weight_decay * param  # L2 penalty, as torch.optim.Adam's weight_decay
        exp_avg.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
        exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
        corrected = exp_avg / (1.0 - betas[0] ** step)
        denominator = (exp_avg_sq / (1.0 - betas[1] ** step)).sqrt().add_(eps)
        param.addcdiv_(corrected, denominator, value=-lr)
