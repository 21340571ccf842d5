"""Each balanced term's gradient on a group, its norm, and the gradients kept for the monitor."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.balancing._distributed import mean_across_processes, world_size
from lightning_lossmix.functional import densified

#: Per term, its gradient on each parameter of the group (None where it does not reach it),
#: as autograd returned it: scaled by the loss scale, in the parameters' dtype.
Grads = list[tuple[Tensor | None, ...]]


def group_gradients(
    values: Sequence[Tensor], params: Sequence[Tensor], scale: float, owner: str
) -> Grads:
    """Return each value's gradient on `params`: one ``torch.autograd.grad`` call per value.

    Unlike `functional.term_gradients`, no ``(T, D)`` buffer is filled: the gradients stay as
    autograd returns them (still multiplied by `scale`, the GradScaler's, so that
    half-precision backward passes do not underflow), and `measure_group` and `TermGradients`
    read them where they lie (filling the buffer cost 10 % to 40 % on top of the calls
    themselves on the benchmark's MLP, from 256 to 1024 wide). One batched call
    (``is_grads_batched``) was slower there, 2x, so there is one call per term. The graph is
    retained for the training step's own backward.

    Raises:
        LossMixError: where torch.compile's donated buffers forbid keeping the graph, naming
            the fix (`owner` is the balancer's name).
    """
    try:
        return [
            densified(
                torch.autograd.grad(
                    value * scale if scale != 1.0 else value,
                    params,
                    retain_graph=True,
                    allow_unused=True,
                )
            )
            for value in values
        ]
    except RuntimeError as error:
        if "donated buffer" not in str(error):
            raise
        raise LossMixError(
            f"{owner}: the terms' gradients go through a part of the model compiled with "
            "torch.compile, whose saved tensors are freed by the step's first backward "
            "(inductor's donated buffers), so each term cannot be differentiated on its own. "
            "LossMixModule turns donated buffers off during its fits (if you override its "
            "`configure_callbacks`, include `super().configure_callbacks()`); in your own "
            "training loop set `torch._functorch.config.donated_buffer = False` before the "
            "first compiled forward (or balance a group outside the compiled part)."
        ) from error


def measure_group(
    values: Sequence[Tensor], grads: Grads, params: Sequence[Tensor], scale: float
) -> Tensor:
    """Return the values and the pieces of the terms' gradient norms, in one tensor.

    The result is ``[v_1 .. v_n, p_1 .. p_m]``: the values (detached, averaged over processes)
    and, per term in turn, ``m / T`` pieces whose root sum of squares is the term's gradient
    norm on the group (`norms_from_pieces`), unscaled (divided by the loss `scale` that
    `group_gradients` multiplied by). On one process the pieces are the
    norms of each parameter's gradient, and all of it is one stack of scalars; under DDP the
    piece is the norm of the gradient averaged over processes (one all-reduce of the
    flattened gradients), not the average of the processes' norms. Anything non-finite on
    any process makes the result non-finite on every process.
    """
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    scalars = [v.detach() if v.dtype == dtype else v.detach().to(dtype) for v in values]
    if world_size() > 1:
        rows = torch.stack([flat_gradient(row, params) for row in grads])
        norms = torch.linalg.vector_norm(mean_across_processes(rows), dim=1)
        return torch.cat([mean_across_processes(torch.stack(scalars)), norms / scale])
    zero = None
    pieces = []
    for row in grads:
        for g in row:
            if g is None:
                zero = (
                    torch.zeros((), dtype=dtype, device=params[0].device) if zero is None else zero
                )
                pieces.append(zero)
            else:
                pieces.append(torch.linalg.vector_norm(g, dtype=dtype))
    if scale == 1.0:
        return torch.stack(scalars + pieces)
    return torch.cat([torch.stack(scalars), torch.stack(pieces) / scale])


def flat_gradient(row: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """One term's gradients on `params`, flattened and laid end to end, at least float32.

    Zeros where the term does not reach a parameter; still scaled as autograd returned them.
    """
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=dtype, device=p.device)
            if g is None
            else g.reshape(-1).to(dtype)
            for g, p in zip(row, params, strict=True)
        ]
    )


def norms_from_pieces(pieces: Sequence[float], count: int) -> list[float]:
    """Return `count` terms' gradient norms from the pieces that `measure_group` gave.

    Examples:
        >>> norms_from_pieces([3.0, 4.0, 0.0, 1.0], count=2)
        [5.0, 1.0]
    """
    size = len(pieces) // count
    return [math.hypot(*pieces[t * size : (t + 1) * size]) for t in range(count)]


class TermGradients(Mapping[str, Mapping[Tensor, Tensor]]):
    """The per-term gradients a balancer computed at a call: term -> {parameter: flat grad}.

    Built on access only (flattened, unscaled, at least float32; zeros where a term does not
    reach a parameter), so that a step whose gradients nobody reads pays nothing for them.
    They are this process's gradients, before any averaging across processes.
    """

    def __init__(
        self, names: Sequence[str], params: Sequence[Tensor], grads: Grads, scale: float
    ) -> None:
        self._rows = dict(zip(names, grads, strict=True))
        self._params = tuple(params)
        self._scale = scale
        self._built: dict[str, dict[Tensor, Tensor]] = {}

    def __getitem__(self, name: str) -> Mapping[Tensor, Tensor]:
        if name not in self._built:
            row = self._rows[name]  # KeyError for another term, as a dict
            self._built[name] = {
                p: self._flat(p, g) for p, g in zip(self._params, row, strict=True)
            }
        return self._built[name]

    def _flat(self, param: Tensor, grad: Tensor | None) -> Tensor:
        dtype = torch.promote_types(param.dtype, torch.float32)
        if grad is None:
            return torch.zeros(param.numel(), dtype=dtype, device=param.device)
        flat = grad.reshape(-1).to(dtype)
        return flat / self._scale if self._scale != 1.0 else flat

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)
