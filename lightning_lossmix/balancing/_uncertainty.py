"""UncertaintyWeighting: a learnable log-variance per term (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_lossmix._errors import LossMixError, check_finite_float
from lightning_lossmix.balancing._base import Balancer, set_plain

Regularizer = Literal["log", "softplus"]


def uncertainty_optimum(loss: Tensor, regularizer: Regularizer = "log") -> Tensor:
    """Return the log-variance ``s*`` minimizing ``exp(-s) * L + r(s)`` for a fixed loss ``L``.

    ``r(s) = s`` (Kendall et al.): ``s* = log L``, so the effective weight is ``1 / L``.
    ``r(s) = softplus(s) = log(1 + exp(s))`` (Liebel and Koerner, 2018): with ``u = exp(s)``,
    ``u^2 = L (1 + u)``, so ``s* = log((L + sqrt(L^2 + 4L)) / 2)``.

    Examples:
        >>> uncertainty_optimum(torch.tensor([1.0, 4.0]))
        tensor([0.0000, 1.3863])
    """
    if regularizer == "log":
        return loss.log()
    return ((loss + (loss.square() + 4 * loss).sqrt()) / 2).log()


class UncertaintyWeighting(Balancer):
    """Homoscedastic uncertainty weighting: multiplier ``exp(-s_i)``, ``s_i`` learned.

    Each balanced term gets a learnable log-variance ``s_i`` (the parameter ``log_vars``,
    registered under the mix, so ``self.parameters()`` includes it and the model's optimizer
    trains it). The term's contribution is ``declared_i * (exp(-s_i) * L_i + r(s_i))``: the
    multiplier ``exp(-s_i)`` learns through the loss, and `regularizer` returns
    ``sum_i declared_i * r(s_i)``, which LossMix adds to the total and logs apart
    (``balance/regularizer``). The declared weight multiplies the whole term, so the optimum
    ``s_i* = log L_i`` does not depend on it and the effective weight there is
    ``declared_i / L_i``.

    ``r(s) = s`` is Kendall et al.'s form (the total can then go below zero when a loss is
    under 1, since ``log L < 0``); ``regularizer="softplus"`` uses ``log(1 + exp(s))``
    (Liebel and Koerner, 2018), which keeps every term's contribution positive.

    ``mode="max"`` terms are refused: ``exp(-s) * (-L)`` would be minimized by driving
    ``exp(-s)`` without bound while ``L`` grows. If ``log_vars`` is in no optimizer, the first
    training step raises (see `check_optimized`): it would never learn.

    Reference: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115.

    Args:
        terms: the terms to balance (default: all).
        init: the initial log-variance of every term (0: multipliers 1).
        regularizer: ``"log"`` (Kendall et al.) or ``"softplus"`` (positive).

    Examples:
        >>> import torch
        >>> from lightning_lossmix import LossTerm
        >>> uw = UncertaintyWeighting()
        >>> uw.bind([LossTerm("a"), LossTerm("b")], None)
        >>> [name for name, _ in uw.named_parameters()]
        ['log_vars']
    """

    allows_max = False

    def __init__(
        self,
        terms: Sequence[str] | None = None,
        *,
        init: float = 0.0,
        regularizer: Regularizer = "log",
    ) -> None:
        super().__init__(terms)
        self.init = check_finite_float(init, "init", "UncertaintyWeighting")
        if regularizer not in get_args(Regularizer):
            raise LossMixError(
                "UncertaintyWeighting: `regularizer` should be 'log' or 'softplus'. Found "
                f"`regularizer = {regularizer!r}`."
            )
        self.regularizer_form: Regularizer = regularizer
        self.log_vars = nn.Parameter(torch.full((len(self.balanced),), self.init))
        with torch.no_grad():
            self.last_multipliers.copy_(torch.exp(-self.log_vars))
        self._declared: Tensor | None = None
        self._checked = False

    def _resize(self, count: int) -> None:
        self.log_vars = nn.Parameter(torch.full((count,), self.init, device=self.log_vars.device))
        with torch.no_grad():
            self.last_multipliers.copy_(torch.exp(-self.log_vars))

    def _max_reason(self) -> str:
        return "exp(-s) * (-L) has no minimum: the multiplier would grow without bound."

    def _decide(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float,
    ) -> Tensor:
        set_plain(self, _stats={"log_var": self.log_vars.detach()})
        return torch.exp(-self.log_vars.detach())

    def _per_call(self, values: Mapping[str, Tensor], declared: Mapping[str, float]) -> Tensor:
        set_plain(self, _declared=self._declared_tensor(declared, self.log_vars))
        return torch.exp(-self.log_vars)

    def _penalty(self, log_vars: Tensor) -> Tensor:
        return log_vars if self.regularizer_form == "log" else F.softplus(log_vars)

    def regularizer(self) -> Tensor | None:
        """Return ``sum_i declared_i * r(s_i)`` of the last call (training: differentiable).

        In evaluation it uses the log-variances of the last training decision (no gradient).
        """
        if self._declared is None:
            return None
        training = self.training and torch.is_grad_enabled()
        log_vars: Tensor = self.log_vars if training else -self.last_multipliers.log()
        return (self._declared * self._penalty(log_vars)).sum()

    def multipliers(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float = 1.0,
    ) -> Tensor:
        """See `Balancer.multipliers`; also remembers the declared weights for `regularizer`."""
        found = super().multipliers(values, declared, step=step, loss_scale=loss_scale)
        if not (self.training and torch.is_grad_enabled()):
            set_plain(self, _declared=self._declared_tensor(declared, self.last_multipliers))
        return found

    def _declared_tensor(self, declared: Mapping[str, float], like: Tensor) -> Tensor:
        return torch.tensor(
            [declared[name] for name in self.balanced], dtype=like.dtype, device=like.device
        )

    def logged(self) -> dict[str, float]:
        """Return the multipliers, the log-variances and the regularizer's value."""
        logged = super().logged()
        regularizer = self.regularizer()
        if regularizer is not None:
            logged["regularizer"] = float(regularizer.detach())
        return logged

    def check_optimized(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Raise if ``log_vars`` is in none of `optimizers`: it would never learn.

        Raises:
            LossMixError: naming the fix (optimize ``self.parameters()``).
        """
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        if id(self.log_vars) not in held:
            raise LossMixError(
                "UncertaintyWeighting: its log-variances (`loss_mix.balancer.log_vars`) are in "
                "no optimizer, so the weights would never learn. Build the optimizer from "
                "`self.parameters()` (which includes them), or add them as a parameter group: "
                "{'params': self.loss_mix.balancer.parameters()}."
            )
