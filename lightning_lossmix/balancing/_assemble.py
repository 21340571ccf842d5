"""The total of a step under a balancer: declared weight x multiplier, signed by mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

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
    """Assemble the total with the balancer's multipliers (at most one device sync).

    The floats of a decision made on the host (`GradientBalance`, `RandomLossWeighting`)
    are used as they are; other multipliers are read back once.

    Constant multipliers (detached) are read as floats and the total is the plain weighted
    sum, as with fixed weights; multipliers that learn through the total (and a regularizer)
    are assembled as tensors, so that their gradient flows.

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
    declared, names, signed = _declared(balancer, terms, step, total_steps)
    found = balancer._current(values, declared, step=step, loss_scale=loss_scale)
    regularizer = balancer.regularizer()
    if found.requires_grad or regularizer is not None:  # multipliers that learn (UW)
        stacked = torch.stack([values[name] for name in names])
        if found.dtype != stacked.dtype:
            found = found.to(stacked.dtype)
        weights = _signed_tensor(balancer, signed, names, stacked) * _spread(found, balancer, names)
        total = torch.dot(stacked, weights)
        if regularizer is not None:
            total = total + regularizer
        read = weights.detach().tolist()  # one device sync, for the logs
    else:  # constants: the total is assembled as with fixed weights, from their floats
        floats = balancer._call_floats
        if floats is None:
            floats = found.tolist()  # one sync
        read = list(signed)
        for position, multiplier in zip(_positions(balancer, names), floats, strict=True):
            read[position] *= multiplier
        total = _signed_sum([values[name] for name in names], read)
    effective = {name: w or 0.0 for name, w in zip(names, read, strict=True)}
    return Balanced(total, effective, balancer.gradients)


def _declared(
    balancer: Balancer, terms: Sequence[LossTerm], step: int, total_steps: int | None
) -> tuple[Mapping[str, float], tuple[str, ...], tuple[float, ...]]:
    """Return the declared weights at `step` (read-only), the names and the signed weights.

    Kept between calls for the same tuple of terms (a mix's) while none has a schedule: this
    runs every training call.
    """
    cached = balancer._assembly_cache.get("declared")
    if cached is not None and cached[0] is terms:
        kept: tuple[Mapping[str, float], tuple[str, ...], tuple[float, ...]] = cached[1]
        return kept
    weights = {term.name: term.weight_at(step, total_steps) for term in terms}
    signed = tuple(term.sign * weights[term.name] for term in terms)
    found = MappingProxyType(weights), tuple(weights), signed
    if type(terms) is tuple and all(isinstance(term.weight, float) for term in terms):
        balancer._assembly_cache["declared"] = (terms, found)
    return found


def _positions(balancer: Balancer, names: tuple[str, ...]) -> tuple[int, ...]:
    """Return the position among `names` of each balanced term, in the balancer's order."""
    cached = balancer._assembly_cache.get("positions")
    if cached is None or cached[0] != (balancer.balanced, names):
        cached = ((balancer.balanced, names), tuple(map(names.index, balancer.balanced)))
        balancer._assembly_cache["positions"] = cached
    return cached[1]


def _signed_sum(values: Sequence[Tensor], signed_weights: Sequence[float]) -> Tensor:
    """Return ``sum_i w_i * v_i`` as `LossMix` sums fixed weights (its `_signed_sum`).

    ``torch.add(total, value, alpha=w)`` is one operation where ``total + value * w`` is two,
    so that a balanced step is assembled in as many operations as a fixed-weights one (`_mix`
    imports this module, so its function cannot be imported here).
    """
    total = values[0] if signed_weights[0] == 1.0 else values[0] * signed_weights[0]
    for value, weight in zip(values[1:], signed_weights[1:], strict=True):
        total = torch.add(total, value, alpha=weight)
    return total


def _signed_tensor(
    balancer: Balancer, signed: tuple[float, ...], names: tuple[str, ...], like: Tensor
) -> Tensor:
    """Return the signed declared weights as a tensor, made again when they change (schedules).

    As `Balancer._declared_weights`, kept apart under inference mode.
    """
    key = (signed, names, like.dtype, like.device, torch.is_inference_mode_enabled())
    cached = balancer._assembly_cache.get("signed")
    if cached is None or cached[0] != key:
        cached = (key, torch.tensor(signed, dtype=like.dtype, device=like.device))
        balancer._assembly_cache["signed"] = cached
    return cached[1]


def _spread(found: Tensor, balancer: Balancer, names: tuple[str, ...]) -> Tensor:
    """Return every term's multiplier: the balancer's, and 1 for the terms it does not balance."""
    if balancer.balanced == names:
        return found
    key = (balancer.balanced, names, found.device, torch.is_inference_mode_enabled())
    cached = balancer._assembly_cache.get("index")
    if cached is None or cached[0] != key:
        position = {name: index for index, name in enumerate(names)}
        index = torch.tensor([position[n] for n in balancer.balanced], device=found.device)
        cached = (key, index)
        balancer._assembly_cache["index"] = cached
    ones = torch.ones(len(names), dtype=found.dtype, device=found.device)
    return ones.index_put((cached[1],), found)
