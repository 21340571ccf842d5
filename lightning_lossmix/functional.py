"""The maths of lightning_lossmix as pure functions on tensors; modules and callbacks call these.

Example:
    >>> import torch
    >>> from lightning_lossmix.functional import weighted_sum
    >>> weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [1.0, -0.5])
    tensor(0.5000)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["reaches_parameter", "weighted_sum"]


def weighted_sum(values: Sequence[Tensor], signed_weights: Sequence[float]) -> Tensor:
    """Return ``sum_i signed_weights[i] * values[i]``, differentiable in the values.

    Args:
        values: scalar tensors.
        signed_weights: one float per value, negative for maximized terms.
    """
    if len(values) != len(signed_weights) or not values:
        raise ValueError(
            "weighted_sum: `values` and `signed_weights` should be non-empty and of equal length. "
            f"Found {len(values)} values and {len(signed_weights)} weights."
        )
    total = values[0] * signed_weights[0]
    for value, weight in zip(values[1:], signed_weights[1:], strict=True):
        total = total + value * weight
    return total


def reaches_parameter(tensor: Tensor) -> bool:
    """Return whether `tensor`'s autograd graph reaches a trainable `nn.Parameter`.

    A tensor built with ``torch.tensor([...])``, ``.item()`` or ``.detach()`` does not, and
    neither does a fresh leaf made with ``requires_grad=True``: gradients of such a term never
    reach the model.
    """
    if not tensor.requires_grad:
        return False
    if tensor.grad_fn is None:
        return isinstance(tensor, nn.Parameter)
    stack = [tensor.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if isinstance(variable, nn.Parameter) and variable.requires_grad:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def isfinite_all(values: Sequence[Tensor]) -> Tensor:
    """Return a boolean tensor per value: whether it is finite (one device sync to read)."""
    return torch.isfinite(torch.stack([value.detach().reshape(()) for value in values]))
