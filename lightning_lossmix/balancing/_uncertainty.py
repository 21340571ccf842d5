"""UncertaintyWeighting: a learnable log-variance per term (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

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

    In evaluation the multipliers are ``exp(-s_i)`` of the current log-variances: those after
    the last optimizer step, which a checkpoint holds (the training logs show those of each
    step's forward, one optimizer step earlier).

    ``mode="max"`` terms are refused: ``exp(-s) * (-L)`` would be minimized by driving
    ``exp(-s)`` without bound while ``L`` grows. In a `LossMixModule`, if ``log_vars`` is in
    no optimizer (with players: not in the optimizer of the player whose terms it balances),
    the first training step raises (see `check_optimized`): it would never learn.

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
        like = self.last_multipliers
        self.log_vars = nn.Parameter(like.new_full((len(self.balanced),), self.init))
        with torch.no_grad():
            self.last_multipliers.copy_(torch.exp(-self.log_vars))
        # The declared weights and log-variances of the last call, for `regularizer`.
        self._regularized: tuple[Tensor, Tensor] | None = None

    def _resize(self, count: int) -> None:
        self.log_vars = nn.Parameter(self.log_vars.new_full((count,), self.init))
        with torch.no_grad():
            self.last_multipliers.copy_(torch.exp(-self.log_vars))

    def _max_reason(self) -> str:
        return "exp(-s) * (-L) has no minimum: the multiplier would grow without bound."

    def _measure(self, values: Mapping[str, Tensor], *, step: int, loss_scale: float) -> Tensor:
        return self.log_vars.detach()

    def _read(self, measured: Tensor, step: int) -> list[float] | None:
        # The decision reads no term: the log-variances change only through the optimizer,
        # which a skipped step does not run. So no read-back, and no verdict, is needed.
        return []

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Tensor:
        set_plain(self, _stats={"log_var": self.log_vars.detach()})
        return self.last_multipliers  # updated by `_per_call`, from the same exp(-s)

    def _per_call(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        measured: Tensor | None,
    ) -> Tensor:
        declared_weights = self._declared_weights(declared, self.log_vars)
        set_plain(self, _regularized=(declared_weights, self.log_vars))
        found = torch.exp(-self.log_vars)
        if measured is not None:  # the deciding call: its multipliers are the decision's
            self.last_multipliers.copy_(found.detach())
        return found

    def _evaluation(self, declared: Mapping[str, float]) -> Tensor:
        # The weights the current log-variances give (after the last optimizer step, as the
        # checkpoint holds them), not those of the last training step's forward.
        log_vars = self.log_vars.detach()
        set_plain(self, _regularized=(self._declared_weights(declared, log_vars), log_vars))
        return torch.exp(-log_vars)

    def regularizer(self) -> Tensor | None:
        """Return ``sum_i declared_i * r(s_i)`` of the last call (training: differentiable).

        In evaluation it uses the current log-variances, without gradient.
        """
        if self._regularized is None:
            return None
        declared, log_vars = self._regularized
        penalty = log_vars if self.regularizer_form == "log" else F.softplus(log_vars)
        return (declared * penalty).sum()

    def _options(self) -> dict[str, Any]:
        """Return the arguments that differ from the defaults."""
        options: dict[str, Any] = {}
        if self.init != 0.0:
            options["init"] = self.init
        if self.regularizer_form != "log":
            options["regularizer"] = self.regularizer_form
        return options

    def logged(self) -> dict[str, float]:
        """Return the multipliers, the log-variances and the regularizer's value."""
        logged = super().logged()
        regularizer = self.regularizer()
        if regularizer is not None:
            logged["regularizer"] = float(regularizer.detach())
        return logged
