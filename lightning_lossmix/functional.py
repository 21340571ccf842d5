"""The maths of lightning_lossmix as pure functions on tensors; modules and callbacks call these.

Examples:
    >>> import torch
    >>> from lightning_lossmix.functional import weighted_sum
    >>> weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [1.0, -0.5])
    tensor(0.5000)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossmix._errors import LossMixError

__all__ = [
    "gram_by_parameter",
    "grad_cosines",
    "grad_directions",
    "grad_magnitudes",
    "grad_shares",
    "graph_nodes",
    "isfinite_all",
    "reached_parameters",
    "reaches_parameter",
    "signed_grams",
    "suggested_weights",
    "term_gradients",
    "weighted_sum",
]


def weighted_sum(values: Sequence[Tensor], signed_weights: Sequence[float]) -> Tensor:
    """Return ``sum_i signed_weights[i] * values[i]``, differentiable in the values.

    Args:
        values: scalar tensors.
        signed_weights: one float per value, negative for maximized terms.

    Examples:
        >>> weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [1.0, -0.5])
        tensor(0.5000)
    """
    if len(values) != len(signed_weights) or not values:
        raise LossMixError(
            "weighted_sum: `values` and `signed_weights` should be non-empty and of equal length. "
            f"Found {len(values)} values and {len(signed_weights)} weights."
        )
    total = values[0] * signed_weights[0]
    for value, weight in zip(values[1:], signed_weights[1:], strict=True):
        total = total + value * weight
    return total


def term_gradients(
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    scale: float = 1.0,
    retain_graph: bool = True,
    batched: bool = False,
) -> Tensor:
    """Return each term's gradient on `params`, flattened and laid end to end: ``(T, D)``.

    Row ``t`` is ``d values[t] / d params``, each parameter's gradient flattened and the
    parameters concatenated in the order given (``D = sum(p.numel() for p in params)``); split
    it with ``.split([p.numel() for p in params], dim=1)``. A parameter a term does not reach
    gets an exact zero block. The rows are at least float32, on the parameters' device. The
    training gradients (``p.grad``) are untouched: this is ``torch.autograd.grad``, one call
    per term (or one batched call, with `batched`).

    Args:
        values: ``T`` scalar tensors attached to the graph (terms cut off the graph, or not
            requiring grad, give zero rows).
        params: the ``P`` tensors to differentiate with respect to (they must require grad).
        scale: multiply each value by this before differentiating and divide the gradient after:
            the loss scale of a GradScaler, so that half-precision backward passes do not
            underflow; the result is the unscaled gradient.
        retain_graph: keep the graph for a later backward (the training step's own).
        batched: one vectorized backward for all terms (``torch.autograd.grad`` with
            ``is_grads_batched=True``) instead of one backward per term. Same gradients; which
            form is faster depends on the model and the device (on CPU the loop was faster on
            both models of docs/benchmarks.md). An operation without a batching rule
            makes torch fall back to a slow loop, with its own warning. The graph is always
            retained, and the rows are read once (a device sync): if one is not finite, they
            are recomputed one term at a time, since a non-finite local derivative of one term
            (``sqrt`` at 0) would otherwise spread NaN into the others' rows; they are also
            computed one term at a time where torch has no batched backward for the graph
            (sparse gradients).

    Raises:
        LossMixError: for no parameters, or a parameter that does not require grad.

    Examples:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> b = torch.nn.Parameter(torch.tensor(3.0))
        >>> term_gradients([(w ** 2).sum(), w.sum() * b], [w, b])
        tensor([[2., 4., 0.],
                [3., 3., 3.]])
    """
    rows, _ = _gradients_and_reach(
        values, params, scale=scale, retain_graph=retain_graph, batched=batched
    )
    return rows


def _gradients_and_reach(
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    scale: float = 1.0,
    retain_graph: bool = True,
    batched: bool = False,
    strict: bool = False,
) -> tuple[Tensor, list[bool]]:
    """Return `term_gradients`' rows, and per parameter whether any term's graph reached it.

    A parameter no term reaches gets zero rows from ``torch.autograd.grad`` (``None``): that is
    either a parameter the terms do not use, or one hidden from ``torch.autograd.grad`` (inside
    reentrant activation checkpointing), which the caller may want to tell apart. With
    `strict`, a batched backward that torch cannot run raises its error instead of falling back
    to the loop, so that a caller that calls again can keep to the loop.
    """
    params = list(params)
    if not params:
        raise LossMixError("term_gradients: `params` should hold at least one tensor. Found none.")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise LossMixError(
            f"term_gradients: every tensor of `params` should require grad. Found "
            f"`params[{frozen[0]}].requires_grad = False`; leave frozen parameters out."
        )
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    sizes = [p.numel() for p in params]
    rows = torch.empty(len(values), sum(sizes), dtype=dtype, device=params[0].device)
    attached = [t for t, value in enumerate(values) if value.requires_grad]
    reached = [False] * len(params)
    done = batched and len(attached) > 1
    done = done and _batched_rows(values, params, attached, rows, scale, reached, strict)
    if not done:
        offsets = [0, *itertools.accumulate(sizes)]
        for t in attached:
            grads = torch.autograd.grad(
                values[t] * scale if scale != 1.0 else values[t],
                params,
                retain_graph=retain_graph or t < attached[-1],
                allow_unused=True,
            )
            _copy_row(rows[t], densified(grads), offsets)
            reached = [r or g is not None for r, g in zip(reached, grads, strict=True)]
    for t in set(range(len(values))).difference(attached):
        rows[t].zero_()
    if scale != 1.0:
        rows.div_(scale)
    return rows, reached


def densified(grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """Return `grads` with sparse ones made dense (``nn.Embedding(sparse=True)``'s weight)."""
    return tuple(
        g.to_dense() if g is not None and g.layout == torch.sparse_coo else g for g in grads
    )


def _copy_row(row: Tensor, grads: Sequence[Tensor | None], offsets: Sequence[int]) -> None:
    """Lay `grads` end to end into `row`: one copy per run of adjacent gradients, zeros for None.

    One ``torch.cat`` per run costs less than one copy per parameter on small models.
    """
    i = 0
    while i < len(grads):
        reached = grads[i] is not None
        j = i + 1
        while j < len(grads) and (grads[j] is not None) == reached:
            j += 1
        target = row[offsets[i] : offsets[j]]
        if not reached:
            target.zero_()
        elif j == i + 1:
            target.copy_(grads[i].reshape(-1))  # type: ignore[union-attr]
        else:
            torch.cat([g.reshape(-1) for g in grads[i:j]], out=target)  # type: ignore[union-attr]
        i = j


def _batched_rows(
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    attached: list[int],
    rows: Tensor,
    scale: float,
    reached: list[bool],
    strict: bool = False,
) -> bool:
    """Fill the rows with one batched backward; return False if it cannot give them.

    In a batched backward every node sees every term's gradient, zeros included, so a term's
    non-finite local derivative (``sqrt`` at 0) turns ``0 * inf`` into NaN in the other
    terms' rows too. Some backward operations have no batched form (sparse gradients, as
    ``nn.Embedding(sparse=True)`` gives): unless `strict`, torch's error is dropped. In both
    cases the caller computes the rows one term at a time (where a genuine error, if any, is
    raised again). Running out of memory is raised as it is.
    """
    stacked = torch.stack([values[t] * scale if scale != 1.0 else values[t] for t in attached])
    seeds = torch.eye(len(attached), dtype=stacked.dtype, device=stacked.device)
    try:
        found = torch.autograd.grad(
            stacked,
            list(params),
            grad_outputs=seeds,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on
        raise
    except RuntimeError:
        if strict:
            raise
        return False
    grads = densified(found)
    checks = [torch.isfinite(g).all() for g in grads if g is not None]
    finite = not checks or bool(torch.stack(checks).all())  # one device sync
    if finite:
        everything = len(attached) == len(rows)
        views = rows.split([p.numel() for p in params], dim=1)
        for i, (view, grad) in enumerate(zip(views, grads, strict=True)):
            reached[i] = grad is not None
            if grad is None:
                view.zero_()
            elif everything:
                view.copy_(grad.reshape(len(attached), -1))
            else:
                view[attached] = grad.reshape(len(attached), -1).to(view.dtype)
    return finite


def reached_parameters(tensor: Tensor, stop_at_first: bool = False) -> list[nn.Parameter]:
    """Return the trainable `nn.Parameter`s that `tensor`'s autograd graph reaches.

    Args:
        tensor: the output whose graph is walked (from ``tensor.grad_fn`` to the leaves).
        stop_at_first: return as soon as one parameter is found.

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> sorted(tuple(p.shape) for p in reached_parameters(net(torch.ones(1, 2)).sum()))
        [(1,), (1, 2)]
    """
    if not tensor.requires_grad:
        return []
    if tensor.grad_fn is None:
        return [tensor] if isinstance(tensor, nn.Parameter) else []
    found: list[nn.Parameter] = []
    for node in graph_nodes([tensor]):
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(variable, nn.Parameter) and variable.requires_grad:
            found.append(variable)
            if stop_at_first:
                return found
    return found


def graph_nodes(tensors: Sequence[Tensor]) -> Iterator[Any]:
    """Yield each node of the autograd graphs of `tensors` once, from the outputs to the leaves.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> [type(node).__name__ for node in graph_nodes([(2 * w).sum()])]
        ['SumBackward0', 'MulBackward0', 'AccumulateGrad']
    """
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def reaches_parameter(tensor: Tensor) -> bool:
    """Return whether `tensor`'s autograd graph reaches a trainable `nn.Parameter`.

    A tensor built with ``torch.tensor([...])``, ``.item()`` or ``.detach()`` does not, and
    neither does a fresh leaf made with ``requires_grad=True``: gradients of such a term never
    reach the model.

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> reaches_parameter(net(torch.ones(1, 2)).sum())
        True
        >>> reaches_parameter(torch.tensor([w.sum() for w in net.parameters()]).sum())
        False
    """
    return bool(reached_parameters(tensor, stop_at_first=True))


def isfinite_all(values: Sequence[Tensor]) -> Tensor:
    """Return a boolean tensor per value: whether it is finite (one device sync to read).

    Examples:
        >>> isfinite_all([torch.tensor(1.0), torch.tensor(float("nan"))])
        tensor([ True, False])
    """
    scalars = [
        value.detach() if value.dim() == 0 else value.detach().reshape(()) for value in values
    ]
    return torch.isfinite(torch.stack(scalars))


def gram_by_parameter(per_term: Tensor, sizes: Sequence[int]) -> Tensor:
    """Return the per-parameter Gram matrices of the terms' gradients.

    Args:
        per_term: ``(T, D)``: row ``t`` is term ``t``'s gradient, flattened over ``P``
            parameters laid end to end.
        sizes: the ``P`` parameters' numbers of elements, summing to ``D``.

    Returns:
        ``(P, T, T)``: entry ``[i, s, t]`` is the dot product of terms ``s`` and ``t`` on
        parameter ``i``. Summing over a subset of parameters gives that group's Gram matrix,
        whose diagonal holds the squared 2-norms.

    Examples:
        >>> rows = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])  # sizes 2 and 1
        >>> gram_by_parameter(rows, [2, 1])
        tensor([[[1., 0.],
                 [0., 1.]],
        <BLANKLINE>
                [[4., 4.],
                 [4., 4.]]])
    """
    return torch.stack([chunk @ chunk.T for chunk in per_term.split(list(sizes), dim=1)])


def signed_grams(grams: Tensor, signs: Tensor) -> Tensor:
    """Return per-parameter Gram matrices of the terms' pulls, ``sign * gradient``.

    Args:
        grams: ``(P, T, T)`` from `gram_by_parameter`.
        signs: ``(P, T)``: +1 where parameter ``i``'s update descends term ``t``, -1 where it
            ascends it (a maximized term, or a parameter that plays against the term).

    Examples:
        >>> grams = gram_by_parameter(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), [1, 1])
        >>> signed_grams(grams, torch.tensor([[1.0, -1.0], [1.0, 1.0]]))  # parameter 0 opposes
        tensor([[[ 1., -1.],
                 [-1.,  1.]],
        <BLANKLINE>
                [[ 4.,  4.],
                 [ 4.,  4.]]])
    """
    return grams * signs[:, :, None] * signs[:, None, :]


def grad_directions(grams: Tensor, signs: Tensor) -> Tensor:
    """Return, per term, which way a group of parameters pushes it, in ``[-1, 1]``.

    +1: every parameter of the group that the term reaches pushes it down; -1: all push it up;
    in between, the balance weighted by squared gradient norms. 0 where the term does not
    reach the group.

    Args:
        grams: ``(P, T, T)`` per-parameter Gram matrices of the group's parameters.
        signs: ``(P, T)`` as in `signed_grams`.

    Examples:
        >>> grams = torch.tensor([[[4.0]], [[1.0]]])  # one term, two parameters
        >>> grad_directions(grams, torch.tensor([[1.0], [-1.0]]))
        tensor([0.6000])
    """
    squared = grams.diagonal(dim1=1, dim2=2)  # (P, T)
    total = squared.sum(0)
    pushed = (squared * signs).sum(0)
    return torch.where(total > 0, pushed / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def grad_magnitudes(
    per_term: Tensor, sizes: Sequence[int], group: Sequence[int], norm_type: float = 2.0
) -> Tensor:
    """Return each term's gradient norm over the parameters in `group`, shape ``(T,)``.

    Args:
        per_term: ``(T, D)`` flattened per-term gradients (see `gram_by_parameter`).
        sizes: the parameters' numbers of elements.
        group: indices of the parameters in the group.
        norm_type: the p of the p-norm (``float("inf")`` for the max-norm).

    Examples:
        >>> rows = torch.tensor([[3.0, 4.0, 1.0], [0.0, 1.0, 0.0]])
        >>> grad_magnitudes(rows, [2, 1], group=[0])  # the first parameter only
        tensor([5., 1.])
    """
    chunks = per_term.split(list(sizes), dim=1)
    per_parameter = torch.stack(
        [torch.linalg.vector_norm(chunks[i], ord=norm_type, dim=1) for i in group], dim=1
    )
    norms: Tensor = torch.linalg.vector_norm(per_parameter, ord=norm_type, dim=1)
    return norms


def grad_shares(magnitudes: Tensor) -> Tensor:
    """Return each magnitude over the sum along the last dimension (zeros where it is zero).

    Examples:
        >>> grad_shares(torch.tensor([[3.0, 1.0], [0.0, 0.0]]))
        tensor([[0.7500, 0.2500],
                [0.0000, 0.0000]])
    """
    total = magnitudes.sum(-1, keepdim=True)
    return torch.where(total > 0, magnitudes / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def grad_cosines(gram: Tensor, signs: Tensor) -> Tensor:
    """Return the pairwise cosine similarities of the signed term gradients.

    Args:
        gram: ``(..., T, T)`` Gram matrices of the raw gradients ``g_t`` on a group (or one per
            group, stacked).
        signs: ``(..., T)`` +1 for a minimized term, -1 for a maximized one: the update follows
            ``-sign_t * g_t``, so two terms conflict when the cosine is negative. Pass ones for
            Gram matrices that are already signed (`signed_grams`).

    Returns:
        ``(..., T, T)`` cosines; NaN where a term's gradient is zero (the angle is undefined).

    Examples:
        >>> gram = torch.tensor([[5.0, 4.0], [4.0, 5.0]])
        >>> grad_cosines(gram, torch.tensor([1.0, 1.0]))
        tensor([[1.0000, 0.8000],
                [0.8000, 1.0000]])
        >>> grad_cosines(gram, torch.tensor([1.0, -1.0]))  # the second term is maximized
        tensor([[ 1.0000, -0.8000],
                [-0.8000,  1.0000]])
    """
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    signed = gram * signs[..., :, None] * signs[..., None, :]
    denominator = norms[..., :, None] * norms[..., None, :]
    return torch.where(denominator > 0, signed / denominator, torch.full_like(gram, math.nan))


def suggested_weights(raw_norms: Tensor, magnitudes: Tensor) -> Tensor:
    """Return the weights that would give every term the mean weighted magnitude.

    With ``m_t = |w_t| * ||g_t||``, term ``t``'s magnitude becomes ``mean(m)`` with the weight
    ``mean(m) / ||g_t||``. This is the "x20" a user finds by trial, as a number.

    Args:
        raw_norms: ``(T,)`` the unweighted gradient norms ``||g_t||``.
        magnitudes: ``(T,)`` the weighted magnitudes ``|w_t| * ||g_t||``.

    Returns:
        ``(T,)`` weights; NaN where the raw gradient is zero (no weight revives a dead term).

    Examples:
        >>> suggested_weights(torch.tensor([20.0, 1.0]), torch.tensor([20.0, 1.0]))
        tensor([ 0.5250, 10.5000])
    """
    target = magnitudes.mean()
    return torch.where(
        raw_norms > 0, target / raw_norms.clamp_min(torch.finfo(raw_norms.dtype).tiny), math.nan
    )
