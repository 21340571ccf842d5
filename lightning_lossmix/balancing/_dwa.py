"""DWA: weights from the terms' recent rates of descent (Liu, Johns and Davison, CVPR 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lossmix._errors import LossMixError, check_int
from lightning_lossmix.balancing._arguments import check_bounds
from lightning_lossmix.balancing._base import Balancer, set_plain
from lightning_lossmix.balancing._distributed import mean_across_processes

_RATES = "DWA's rates are ratios of their means"


def dwa_weights(previous: Tensor, before: Tensor, temperature: float) -> Tensor:
    """Return ``K * softmax((previous / before) / temperature)`` for ``K`` terms.

    Args:
        previous: ``(K,)`` each term's mean loss over the last interval, ``L(t-1)``.
        before: ``(K,)`` the same over the interval before it, ``L(t-2)``.
        temperature: the softness (> 0); a large one gives equal weights.

    Examples:
        >>> dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), temperature=2.0)
        tensor([0.8756, 1.1244])
    """
    rates = previous / before.clamp_min(torch.finfo(before.dtype).tiny)
    return len(rates) * torch.softmax(rates / temperature, dim=0)


class DWA(Balancer):
    """Dynamic Weight Average: terms that descend slowly get more weight.

    The losses are averaged over intervals of `every_n_steps` optimizer steps (every call in
    training counts, micro-batches included; under DDP each call's losses are averaged over
    processes, one small collective per call, so the sums are global). With ``L_i(k)`` term
    ``i``'s average over interval ``k``, the multipliers during interval ``k`` are
    ``K * softmax_i((L_i(k-1) / L_i(k-2)) / temperature)``, and 1
    during the first two intervals. The original averages over epochs: set `every_n_steps` to
    the number of optimizer steps per epoch to reproduce it (a balancer sees steps, not
    epochs). The multipliers sum to the number of balanced terms; the declared weights
    multiply them. The running sums and the last two averages are buffers (checkpointed).
    The balanced terms must not be negative, nor 0 at every call of an interval and above 0
    in the next (an infinite rate; a `LossMixError` names them); a term 0 over both intervals
    has a rate of 0.

    Reference: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, https://arxiv.org/abs/1803.10704.

    Args:
        terms: the terms to balance (default: all); ``mode="max"`` terms are refused.
        temperature: the softmax temperature (> 0; 2.0 in the paper).
        every_n_steps: the length of an averaging interval in optimizer steps.

    Examples:
        >>> from lightning_lossmix import LossTerm
        >>> dwa = DWA(temperature=1.0, every_n_steps=100)
        >>> dwa.bind([LossTerm("a"), LossTerm("b")], None)
        >>> dwa  # the arguments that differ from their defaults
        DWA(temperature=1.0)
    """

    allows_max = False

    running_sum: Tensor
    averages: Tensor
    _plain_state = ("_interval", "_closed", "_count")

    def __init__(
        self,
        terms: Sequence[str] | None = None,
        *,
        temperature: float = 2.0,
        every_n_steps: int = 100,
    ) -> None:
        super().__init__(terms)
        self.temperature = check_bounds(
            "DWA",
            positive={"temperature": temperature},
            hint="the paper uses 2.0, larger values give more even weights.",
        )["temperature"]
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", "DWA", minimum=1)
        self._interval: int | None = None
        self._closed = 0
        self._count = 0  # the calls summed in `running_sum`
        self._resize(len(self.balanced))

    def _resize(self, count: int) -> None:
        like = self.last_multipliers
        self.register_buffer("running_sum", like.new_zeros(count))
        self.register_buffer("averages", like.new_ones(2, count))  # k-1, k-2

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Tensor:
        # The multipliers change only when an interval ends; in between they are kept.
        interval = step // self.every_n_steps
        closing = self._interval is not None and interval != self._interval
        if closing:
            self._close()
        set_plain(self, _interval=interval)
        if self._closed < 2:
            return self.last_multipliers  # 1 during the first two intervals
        if not self._stats:  # also after a resume
            set_plain(self, _stats={"loss_ratio": self.averages[0] / self.averages[1]})
        if not closing:
            return self.last_multipliers
        before = self.averages[1].tolist()  # once per interval
        if not all(before):
            # A term 0 over both intervals has a rate 0 (it stays solved); one that rose from 0
            # has an infinite rate.
            previous = self.averages[0].tolist()
            zero = [
                name
                for name, mean, after in zip(self.balanced, before, previous, strict=True)
                if not mean and after
            ]
            if zero:
                raise LossMixError(
                    f"DWA: the term(s) {zero} were 0 at every call of an interval of "
                    f"{self.every_n_steps} steps and above 0 in the next one; DWA divides by "
                    f"that mean at step {step}, which would give them every weight. Balance "
                    "terms that stay above 0 (e.g. add a constant), or leave them out with "
                    "`terms=[...]` (they keep their declared weights)."
                )
        return dwa_weights(self.averages[0], self.averages[1], self.temperature)

    def _read(self, measured: Tensor, step: int) -> list[float] | None:
        read = super()._read(measured, step)  # None: not finite, the step does not count
        if read is not None:
            self._refuse_non_positive(read, step, _RATES, zero_too=False)
        return read

    def _close(self) -> None:
        """End an interval: its mean becomes ``L(k-1)``."""
        self.averages[1].copy_(self.averages[0])
        self.averages[0].copy_(self.running_sum / max(self._count, 1))
        self.running_sum.zero_()
        set_plain(self, _count=0, _closed=self._closed + 1, _stats={})

    def _per_call(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        measured: Tensor | None,
    ) -> Tensor:
        # Every call counts, averaged over processes so that the sums are the same everywhere
        # (DDP broadcasts rank 0's buffers before each forward, which would drop local sums).
        # The deciding call's measurement is that mean, already checked; a later micro-batch
        # is checked here, so that a skipped step leaves no trace.
        if measured is None:
            measured = mean_across_processes(self._stacked(values))
            read = measured.tolist()  # one read-back, as the decision's
            if not all(map(math.isfinite, read)):
                return self.last_multipliers
            self._refuse_non_positive(read, None, _RATES, zero_too=False)
        self.running_sum.add_(measured.to(self.running_sum.dtype))
        set_plain(self, _count=self._count + 1)
        return self.last_multipliers

    def _options(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "every_n_steps": self.every_n_steps}
