"""A sample-weighted mean metric that lets NaN through."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SampleMean(Metric):
    """The mean of per-batch values weighted by batch size; NaN in, NaN out; correct under DDP.

    torchmetrics' `MeanMetric` either drops NaN or, with ``nan_strategy="disable"``, drops the
    weights (torchmetrics issue #3434); a validation loss should do neither.

    Examples:
        >>> mean = SampleMean()
        >>> mean.update(torch.tensor(1.0), weight=3)
        >>> mean.update(torch.tensor(5.0), weight=1)
        >>> mean.compute()
        tensor(2.)
    """

    full_state_update = False
    total: Tensor
    weight: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float = 1.0) -> None:
        """Add a batch's mean `value` over `weight` samples."""
        if self.total.is_inference() and not torch.is_inference_mode_enabled():
            # Reset under an earlier run's inference mode (``trainer.validate`` before a fit,
            # whose validation runs under no_grad): inference tensors take no in-place update.
            self.total, self.weight = self.total.clone(), self.weight.clone()
        self.total += value.detach().to(self.total.dtype) * weight
        self.weight += weight

    def compute(self) -> Tensor:
        """Return the weighted mean."""
        return self.total / self.weight
