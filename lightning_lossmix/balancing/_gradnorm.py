"""GradNorm: weights that equalize the terms' training rates (Chen et al., ICML 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._adam import SmallAdam
from lightning_lossmix.balancing._arguments import check_bounds
from lightning_lossmix.balancing._base import Balancer, set_plain
from lightning_lossmix.balancing._gradients import (
    group_gradients,
    measure_group,
    norms_from_pieces,
)
from lightning_lossmix.balancing._groups import ParameterGroup


def gradnorm_gradient(
    weights: Tensor, norms: Tensor, losses: Tensor, initial: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return GradNorm's gradient on the weights, its loss ``L_grad`` and the targets.

    ``G_i = w_i * ||dL_i/dW||``; ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``;
    target ``mean(G) * r_i ** alpha``, held constant; ``L_grad = sum_i |G_i - target_i|``,
    whose derivative in ``w_i`` is ``sign(G_i - target_i) * ||dL_i/dW||``.

    Examples:
        >>> grad, loss, target = gradnorm_gradient(
        ...     torch.ones(2), torch.tensor([1.0, 3.0]), torch.ones(2), torch.ones(2), 1.5)
        >>> grad, loss, target
        (tensor([-1.,  3.]), tensor(2.), tensor([2., 2.]))
    """
    pulls = weights * norms
    ratios = losses / initial
    rates = ratios / ratios.mean()
    target = pulls.mean() * rates.pow(alpha)
    return torch.sign(pulls - target) * norms, (pulls - target).abs().sum(), target


class GradNorm(Balancer):
    """GradNorm: learn weights whose pulls on the last shared layer follow the training rates.

    At each optimizer step ``t``, with the current weights ``w_i`` (they start at 1):
    ``G_i = w_i * ||dL_i/dW||`` on the group ``W`` (the last shared layer by default);
    the relative inverse training rate ``r_i = (L_i(t) / L_i(0)) / mean_j(L_j(t) / L_j(0))``
    with ``L_i(0)`` the loss at the first decision; the target ``mean(G) * r_i ** alpha``,
    held constant; ``L_grad = sum_i |G_i - target_i|``. The model trains with ``w(t)``; then
    the weights take one step of their own Adam optimizer (`lr`) on ``dL_grad/dw`` (only
    ``L_grad`` moves them), are clipped at 0 and renormalized to sum to the number of
    balanced terms. The weights, ``L_i(0)`` and the Adam state are buffers (checkpointed).
    Under DDP, norms are taken on the gradient averaged over processes and the losses are
    averaged too, so every process updates the same weights. The balanced terms must be
    positive at the first decision and non-negative after it (a `LossMixError` names one that
    is not); a term at 0 has a training rate of 0, and while every term is 0 the weights
    stay.

    The declared weights multiply GradNorm's weights (effective ``declared_i * w_i``); GradNorm
    itself sees the raw terms, so declared weights set the relative pulls at its balance.

    Reference: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018,
    https://arxiv.org/abs/1711.02257.

    Args:
        terms: the terms to balance (default: all); ``mode="max"`` terms are refused (their
            training rate is not a loss ratio).
        alpha: the strength of the restoring force toward equal training rates (> 0; 1.5 in
            the paper's NYUv2 experiments).
        on: the group (see `GradientBalance`); default: the last shared layer.
        lr: the learning rate of the weights' Adam optimizer.

    Examples:
        >>> from lightning_lossmix import LossTerm
        >>> balancer = GradNorm(alpha=1.5, lr=0.025)
        >>> balancer.bind([LossTerm("a"), LossTerm("b")], None)
        >>> balancer.weights
        tensor([1., 1.])
    """

    allows_max = False

    weights: Tensor
    initial_losses: Tensor

    per_term_gradients = True

    def __init__(
        self,
        terms: Sequence[str] | None = None,
        *,
        alpha: float = 1.5,
        on: str | Sequence[str] | None = None,
        lr: float = 0.025,
    ) -> None:
        super().__init__(terms)
        found = check_bounds(
            "GradNorm",
            positive={"alpha": alpha, "lr": lr},
            hint="alpha = 1.5 is the paper's choice; for equal pulls regardless of training "
            "rates, use GradientBalance.",
        )
        self.alpha, self.lr = found["alpha"], found["lr"]
        self.group = ParameterGroup(on, "GradNorm")
        self._resize(len(self.balanced))

    def _resize(self, count: int) -> None:
        like = self.last_multipliers
        self.register_buffer("weights", like.new_ones(count))
        self.register_buffer("initial_losses", like.new_full((count,), float("nan")))
        self.adam = SmallAdam(count, lr=self.lr).to(like.device, like.dtype)

    def _max_reason(self) -> str:
        return "its training rate L(t) / L(0) assumes a loss that decreases."

    def _check_terms(self, terms: Sequence[LossTerm], module: nn.Module | None) -> None:
        self.group.bind(module)

    def _measure(self, values: Mapping[str, Tensor], *, step: int, loss_scale: float) -> Tensor:
        # The losses, then the pieces of the gradient norms on the group (`measure_group`).
        params = self.group.resolve({n: values[n] for n in self.balanced})
        grads = group_gradients([values[n] for n in self.balanced], params, loss_scale, "GradNorm")
        self._expose(self.balanced, params, grads, loss_scale)
        return measure_group([values[n] for n in self.balanced], grads, params, loss_scale)

    def _read(self, measured: Tensor, step: int) -> list[float] | None:
        read = super()._read(measured, step)  # None: not finite, the step does not count
        if read is not None:  # the losses come first; L(0) divides, a later 0 is a rate 0
            first = self.adam.steps == 0
            self._refuse_non_positive(
                read, step, "its training rate is L(t) / L(0)", zero_too=first
            )
        return read

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Tensor:
        count = len(self.balanced)
        norms_read = norms_from_pieces(read[count:], count)
        losses, norms = torch.tensor(
            [read[:count], norms_read], dtype=self.weights.dtype, device=self.weights.device
        )
        if self.adam.steps == 0:
            self.initial_losses.copy_(losses)
        used = self.weights.clone()
        if not any(read[:count]):  # every term at 0: no rate to follow, the weights stay
            zero = torch.zeros_like(losses)
            stats = {"grad_norm": norms_read, "loss_ratio": zero, "grad_loss": zero.sum()}
            set_plain(self, _stats={**stats, "target": zero})
            return used
        grad, grad_loss, target = gradnorm_gradient(
            used, norms, losses, self.initial_losses, self.alpha
        )
        self.adam.step(self.weights, grad)
        with torch.no_grad():
            self.weights.clamp_(min=0.0)
            self.weights.mul_(count / self.weights.sum().clamp_min(1e-12))
        set_plain(
            self,
            _stats={
                "grad_norm": norms_read,
                "loss_ratio": losses / self.initial_losses,
                "grad_loss": grad_loss,
                "target": target,
            },
        )
        return used

    def _options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "on": None if self.group.on is None else list(self.group.on),
            "lr": self.lr,
        }
