"""The total of a step under a balancer: declared weight x multiplier, signed by mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lossmix._errors import LossMixError
from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._base import Balancer


@dataclass(frozen=True)
class Balanced:
    """What `balanced_total` returns.

    Attributes:
        total: ``sum_t sign_t * declared_t * multiplier_t * value_t`` plus the balancer's
            regularizer, differentiable (also in the multipliers a method learns).
        signed_weights: each term's effective signed weight, as floats (for logs).
        gradients: the per-term gradients the balancer computed at this call (may be empty).
    """

    total: Tensor
    signed_weights: dict[str, float]
    gradients: Mapping[str, Mapping[Tensor, Tensor]]


def check_balancer(balancer: object, owner: str) -> Balancer | None:
    """Return `balancer` if it is None or a `Balancer`, else raise naming the fix."""
    if balancer is None or isinstance(balancer, Balancer):
        return balancer
    raise LossMixError(
        f"{owner}: `balancer` should be a lightning_lossmix.balancing.Balancer, e.g. "
        f"GradientBalance(). Found {balancer!r} of type {type(balancer).__name__}."
    )


def balanced_total(
    balancer: Balancer,
    terms: Sequence[LossTerm],
    values: Mapping[str, Tensor],
    *,
    step: int,
    total_steps: int | None = None,
    loss_scale: float = 1.0,
) -> Balanced:
    """Assemble the total with the balancer's multipliers (one device sync for the floats).

    Examples:
        >>> from lightning_lossmix.balancing import RandomLossWeighting
        >>> terms = [LossTerm("a"), LossTerm("b", weight=0.5, mode="max")]
        >>> balancer = RandomLossWeighting(seed=0)
        >>> balancer.bind(terms, None)
        >>> w = torch.nn.Parameter(torch.tensor(1.0))
        >>> out = balanced_total(balancer, terms, {"a": w * 2, "b": w * 3}, step=0)
        >>> out.signed_weights["b"] < 0  # the sign comes from the mode
        True
    """
    declared = {term.name: term.weight_at(step, total_steps) for term in terms}
    found = balancer.multipliers(values, declared, step=step, loss_scale=loss_scale)
    stacked = torch.stack([values[term.name] for term in terms])
    signed = [term.sign * declared[term.name] for term in terms]
    if len(balancer.balanced) == len(terms) and balancer.balanced == tuple(t.name for t in terms):
        multipliers = found.to(stacked.dtype)
    else:  # only some terms are balanced: the others keep a multiplier of 1
        position = {term.name: index for index, term in enumerate(terms)}
        index = torch.tensor([position[name] for name in balancer.balanced], device=found.device)
        multipliers = torch.ones(len(terms), dtype=stacked.dtype, device=found.device)
        multipliers = multipliers.index_put((index,), found.to(stacked.dtype))
    weights = torch.tensor(signed, dtype=stacked.dtype, device=stacked.device) * multipliers
    total = (stacked * weights).sum()
    regularizer = balancer.regularizer()
    if regularizer is not None:
        total = total + regularizer
    read = weights.detach().tolist()  # one device sync, for the logs
    effective = {term.name: w or 0.0 for term, w in zip(terms, read, strict=True)}
    return Balanced(total, effective, balancer.gradients)
