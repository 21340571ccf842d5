"""The gradient reversal layer of domain-adversarial training."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossmix._errors import LossMixError, check_finite_float, check_schedule_value
from lightning_lossmix.schedules import Schedule


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


class GradientReversal(nn.Module):
    """Identity in the forward pass, ``-scale * grad`` in the backward pass.

    Placed between a feature extractor and a domain classifier, it makes the extractor
    maximize the classifier's loss while the classifier minimizes it: domain-adversarial
    training (DANN) with one optimizer. `scale` may be a schedule, such as `DANN`;
    `LossMixModule` sets `step` and `total_steps` before each training step, and other modules
    call `set_step`.

    Args:
        scale: the factor of the reversed gradient (>= 0), or a schedule of the step.

    Examples:
        >>> from lightning_lossmix.schedules import DANN
        >>> reverse = GradientReversal(DANN(gamma=10.0))
        >>> reverse.set_step(500, total_steps=1000)
        >>> x = torch.ones(2, requires_grad=True)
        >>> reverse(x).sum().backward()
        >>> x.grad
        tensor([-0.9866, -0.9866])

    Paper: "Domain-Adversarial Training of Neural Networks", https://arxiv.org/abs/1505.07818
    """

    def __init__(self, scale: float | Schedule = 1.0) -> None:
        super().__init__()
        if isinstance(scale, Schedule):
            bounds = scale.bounds()
            if bounds is not None and bounds[0] < 0:
                raise LossMixError(
                    f"GradientReversal: the schedule {scale!r} goes down to {bounds[0]}; "
                    "`scale` should be >= 0 (the reversal is the minus sign)."
                )
        else:
            scale = check_finite_float(scale, "scale", "GradientReversal")
            if scale < 0:
                raise LossMixError(
                    f"GradientReversal: `scale` should be >= 0 (the reversal is the minus "
                    f"sign). Found `scale = {scale}`."
                )
        self.scale = scale
        self.step = 0
        self.total_steps: int | None = None
        self._step_set = False

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Set the optimizer step (and the fit's length) that a scheduled `scale` follows."""
        self.step = step
        self.total_steps = total_steps
        self._step_set = True

    @property
    def current_scale(self) -> float:
        """The scale at the current step."""
        if isinstance(self.scale, Schedule):
            if self.training and not self._step_set:
                self._step_set = True  # warn once
                warnings.warn(
                    f"GradientReversal({self.scale!r}) is used in training but its step was "
                    "never set, so its scale stays at the schedule's start. LossMixModule sets "
                    "it in on_train_batch_start (call super() if you override that hook); "
                    "elsewhere call set_step(step, total_steps) before each step.",
                    stacklevel=2,
                )
            value = self.scale(self.step, self.total_steps)
            return check_schedule_value(value, self.scale, "GradientReversal", self.step)
        return self.scale

    def forward(self, x: Tensor) -> Tensor:
        """Return `x`; its gradient comes back multiplied by ``-current_scale``."""
        result: Tensor = _Reverse.apply(x, self.current_scale)
        return result

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"
