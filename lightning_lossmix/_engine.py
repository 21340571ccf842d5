"""TermGradientEngine: each term's gradient on chosen parameters, collected over one step."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.functional import _gradients_and_reach, graph_nodes

Batched = bool | Literal["auto"]

# torch's error when torch.autograd.grad meets a reentrant checkpoint (older and newer wording)
_REENTRANT = (
    "Checkpointing is not compatible with .grad()",
    "torch.utils.checkpoint is incompatible",
)
_REENTRANT_FIX = (
    "Per-term gradients cannot be computed through reentrant activation checkpointing "
    "(torch.utils.checkpoint(..., use_reentrant=True)): its backward only runs inside a full "
    ".backward(), so torch.autograd.grad gets no gradient (or an error) for the parameters "
    "inside it. Pass use_reentrant=False to torch.utils.checkpoint (torch's recommended "
    "setting); training gives the same result."
)


@dataclass(frozen=True)
class StepGradients:
    """The per-term gradients of one optimizer step, as `TermGradientEngine.take` returns them.

    Attributes:
        gradients: ``(T, D)``: row ``t`` is term ``names[t]``'s gradient on the parameters,
            flattened and laid end to end (split it with ``sizes``).
        names: the terms, in row order.
        sizes: each parameter's number of elements.
        active: positions of the parameters that were trainable while the step was collected
            (with toggled optimizers, another player's parameters are left out).
    """

    gradients: Tensor
    names: tuple[str, ...]
    sizes: list[int]
    active: list[int]


class TermGradientEngine:
    """Collects each term's gradient on a fixed list of parameters over one optimizer step.

    Call `add` once per micro-batch with the raw terms (still attached to the graph), the
    divisor Lightning applies to the loss (``accumulate_grad_batches``) and the GradScaler's
    scale; call `take` at the optimizer step, which returns the sum (averaged over processes
    by the `reduce` given) and frees the buffer. A step that is dropped is freed with `clear`.
    Gradients already computed elsewhere (`LossMixOutput.gradients`, from a balancer) are
    reused: only the parameters they lack are differentiated.

    Args:
        params: the parameters to differentiate with respect to.
        batched: one batched backward for all terms (True; the loop from the first call on
            which torch cannot run it, e.g. sparse gradients), one backward per term (False),
            or ``"auto"``: time each form once and keep the faster (the loop if the batched
            form fails or warns, e.g. an operation without a batching rule).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> engine = TermGradientEngine([w], batched=False)
        >>> for x in (1.0, 3.0):  # two micro-batches, each divided by 2 like Lightning's loss
        ...     engine.add({"a": (w * x).sum(), "b": (w**2).sum()}, divisor=2)
        >>> engine.take().gradients
        tensor([[2., 2.],
                [2., 4.]])
    """

    def __init__(self, params: Sequence[Tensor], batched: Batched = "auto") -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.batched: Batched = batched
        self._timings: dict[bool, float] = {}
        self._failed: set[bool] = set()  # {True} once torch could not run the batched form
        self._buffer: Tensor | None = None
        self._names: tuple[str, ...] = ()
        self._active: set[int] = set()
        self._walked = False  # whether a graph was walked for reentrant checkpointing

    @property
    def collecting(self) -> bool:
        """Whether a step is being collected (a buffer is held)."""
        return self._buffer is not None

    @property
    def chosen(self) -> bool | None:
        """With ``batched="auto"``, the form kept once both were timed (True: batched)."""
        if self.batched != "auto":
            return bool(self.batched)
        return None if len(self._timings) < 2 else self._timings[True] < self._timings[False]

    @property
    def numel(self) -> int:
        """The number of elements of one term's gradient: the buffer holds ``T`` of them."""
        return sum(self.sizes)

    def add(
        self,
        values: Mapping[str, Tensor],
        *,
        divisor: float = 1.0,
        scale: float = 1.0,
        known: Mapping[str, Mapping[Tensor, Tensor]] | None = None,
    ) -> None:
        """Add each term's gradient on the trainable parameters, divided by `divisor`.

        Args:
            values: term name to raw scalar value, attached to the graph.
            divisor: what the loss of this micro-batch is divided by (gradient accumulation).
            scale: the GradScaler's scale (the backward runs scaled; the result is unscaled).
            known: term name to {parameter: its flattened, unscaled gradient} computed already.

        Raises:
            LossMixError: under reentrant activation checkpointing, which cannot give a
                gradient on chosen parameters.
        """
        names = tuple(values)
        if self._buffer is not None and names != self._names:
            self.clear()  # another mix's terms (players take turns): a new collection
        active = [i for i, p in enumerate(self.params) if p.requires_grad]
        if not active:
            return
        self._active.update(active)
        everything = tuple(range(len(self.params)))
        if self._buffer is None and not known and tuple(active) == everything:
            # The common first call: the rows are the buffer, with no copy.
            self._buffer = self._gradients(list(values.values()), everything, scale)
            if divisor != 1:
                self._buffer.div_(divisor)
            self._names = names
            return
        if self._buffer is None:
            dtype = torch.promote_types(self.params[0].dtype, torch.float32)
            device = self.params[0].device
            self._buffer = torch.zeros(len(names), self.numel, dtype=dtype, device=device)
            self._names = names
        views = self._buffer.split(self.sizes, dim=1)
        known = known or {}
        missing: dict[tuple[int, ...], list[int]] = {}
        for t, name in enumerate(names):
            have = known.get(name, {})
            for i in active:
                if self.params[i] in have:
                    views[i][t].add_(have[self.params[i]].reshape(-1), alpha=1.0 / divisor)
            lacking = tuple(i for i in active if self.params[i] not in have)
            if lacking:
                missing.setdefault(lacking, []).append(t)
        for lacking, rows in missing.items():
            grads = self._gradients([values[names[t]] for t in rows], lacking, scale)
            block = grads.split([self.sizes[i] for i in lacking], dim=1)
            for k, i in enumerate(lacking):
                for row, t in enumerate(rows):  # (indexing with a list would copy)
                    views[i][t].add_(block[k][row], alpha=1.0 / divisor)

    def _gradients(self, values: list[Tensor], lacking: tuple[int, ...], scale: float) -> Tensor:
        params = [self.params[i] for i in lacking]
        batched: bool | Literal["auto", "trial"] = self.batched
        if batched == "auto":
            batched = self._choose() if len(values) > 1 else False
        try:
            if batched == "trial":
                rows, reached = self._trial(values, params, scale)
            elif batched and True not in self._failed:
                rows, reached = self._batched_or_loop(values, params, scale)
            else:
                rows, reached = _gradients_and_reach(values, params, scale=scale)
        except RuntimeError as error:
            if _reentrant_error(error):
                raise LossMixError(_REENTRANT_FIX) from error
            raise
        # Reentrant checkpointing hides the parameters inside it from torch.autograd.grad: they
        # come back unreached (the error above only fires when the checkpoint's own inputs
        # lead to a requested parameter). A graph walk tells such a parameter from an unused
        # one; it runs at the first collection (which also catches a hidden use of a parameter
        # that is reached elsewhere) and whenever a parameter comes back unreached.
        if not (self._walked and all(reached)):
            self._walked = True
            if _reentrant_checkpoint(values):
                raise LossMixError(_REENTRANT_FIX)
        return rows

    def _batched_or_loop(
        self, values: list[Tensor], params: list[Tensor], scale: float
    ) -> tuple[Tensor, list[bool]]:
        """Run the batched form; if torch cannot (sparse gradients), the loop from now on."""
        try:
            return _gradients_and_reach(values, params, scale=scale, batched=True, strict=True)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on
            raise
        except RuntimeError as error:
            if _reentrant_error(error):
                raise
            self._failed.add(True)
            return _gradients_and_reach(values, params, scale=scale)

    def _choose(self) -> bool | Literal["trial"]:
        if len(self._timings) < 2:
            return "trial"
        return self._timings[True] < self._timings[False]

    def _trial(
        self, values: list[Tensor], params: list[Tensor], scale: float
    ) -> tuple[Tensor, list[bool]]:
        """Time the form not timed yet; the batched one counts as failed if it warns."""
        batched = True not in self._timings  # the batched form first, then the loop
        sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sync()
            start = time.perf_counter()
            try:
                result = _gradients_and_reach(
                    values, params, scale=scale, batched=batched, strict=True
                )
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from 2.5 on
                raise
            except RuntimeError as error:
                if not batched or _reentrant_error(error):
                    raise
                self._timings[True] = float("inf")  # no batching rule: keep the loop
                return _gradients_and_reach(values, params, scale=scale)
            sync()
        elapsed = time.perf_counter() - start
        self._timings[batched] = float("inf") if batched and caught else elapsed
        return result

    def take(self, reduce: Callable[[Tensor], Tensor] | None = None) -> StepGradients | None:
        """Return the collected step (reduced across processes by `reduce`) and free it."""
        if self._buffer is None:
            return None
        buffer = self._buffer if reduce is None else reduce(self._buffer)
        collected = StepGradients(buffer, self._names, list(self.sizes), sorted(self._active))
        self.clear()
        return collected

    def clear(self) -> None:
        """Drop the step being collected (a skipped step, the end of a fit)."""
        self._buffer, self._names, self._active = None, (), set()

    def pull_signs(
        self, modes: Sequence[float], opposed: Sequence[Sequence[Tensor]], dtype: torch.dtype
    ) -> Tensor:
        """Return ``(P, T)``: +1 where parameter ``i``'s update descends term ``t``, else -1.

        Args:
            modes: per term, +1 for a minimized term and -1 for a maximized one.
            opposed: per term, the parameters that play against it (`opposed_by`).
            dtype: the dtype of the result.
        """
        device = self.params[0].device
        signs = torch.tensor(list(modes), dtype=dtype, device=device).repeat(len(self.params), 1)
        position = {id(p): i for i, p in enumerate(self.params)}
        for t, parameters in enumerate(opposed):
            rows = [position[id(p)] for p in parameters if id(p) in position]
            signs[rows, t] *= -1.0
        return signs


def _reentrant_checkpoint(values: Sequence[Tensor]) -> bool:
    """Whether a graph goes through reentrant activation checkpointing (a graph walk)."""
    return any(type(node).__name__ == "CheckpointFunctionBackward" for node in graph_nodes(values))


def _reentrant_error(error: RuntimeError) -> bool:
    """Whether torch raised `error` on meeting reentrant activation checkpointing."""
    return any(marker in str(error) for marker in _REENTRANT)
