"""FAMO: fast adaptive multitask optimization (Liu, Feng, Stone and Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossmix.balancing._adam import SmallAdam
from lightning_lossmix.balancing._arguments import check_bounds
from lightning_lossmix.balancing._base import Balancer, set_plain

#: Added to every loss before its logarithm, as in the official code.
FAMO_EPS = 1e-8


def famo_multipliers(logits: Tensor, losses: Tensor) -> Tensor:
    """Return FAMO's weights on the raw losses, scaled to sum to ``K``.

    FAMO descends ``sum_i z_i log(L_i) / c`` with ``z = softmax(logits)`` and
    ``c = sum_j z_j / L_j`` (detached): its gradient is ``sum_i (z_i / (c L_i)) grad L_i``. The
    weights ``z_i / (c L_i)`` sum to 1; times ``K`` they are 1 each at equal logits and losses.

    Examples:
        >>> famo_multipliers(torch.zeros(2), torch.tensor([1.0, 3.0]))
        tensor([1.5000, 0.5000])
    """
    shifted = losses + FAMO_EPS
    z = torch.softmax(logits, dim=0)
    c = (z / shifted).sum()
    return len(losses) * z / (c * shifted)


def famo_logit_gradient(logits: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """Return FAMO's gradient on the logits from the losses before and after a step.

    ``delta_i = log L_i(before) - log L_i(after)`` (each task's log-improvement); the gradient
    is ``J_softmax(logits)^T delta = z * (delta - <z, delta>)``.
    """
    delta = (before + FAMO_EPS).log() - (after + FAMO_EPS).log()
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


class FAMO(Balancer):
    """FAMO: weights that let every term's log-loss decrease at about the same rate.

    Per optimizer step, with the logits ``xi`` (starting at 0) and the balanced losses ``L``
    (averaged over processes under DDP): the multipliers are ``K * z_i / (c * L_i)``
    (`famo_multipliers`, detached), which makes the update follow FAMO's
    ``sum_i z_i log L_i / c`` up to the constant factor ``K``. Then the logits learn from the
    improvement ``log L_i(t) - log L_i(t+1)`` by one step of Adam (`lr`, `weight_decay`, as
    the official ``w_opt``).

    The official code measures ``L(t+1)`` on the same batch right after the optimizer step,
    with one more forward pass. Inside a Lightning step there is no such pass, so here
    ``L(t+1)`` is the next training step's losses on the next batch, measured before that
    step's update (the logits then update first, and the step uses the new weights): no extra
    forward, but the improvement includes the change of batch, which averages out over steps.
    The official code also clips the shared gradient norm to 1.0: use
    ``Trainer(gradient_clip_val=1.0)`` for that. Losses must stay positive (``log``).

    Reference: B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask
    Optimization", NeurIPS 2023, https://arxiv.org/abs/2306.03792.

    Args:
        terms: the terms to balance (default: all); ``mode="max"`` terms are refused.
        lr: the learning rate of the logits' Adam optimizer (official: 0.025).
        weight_decay: its L2 penalty on the logits (official ``gamma``: 0.01).

    Examples:
        >>> from lightning_lossmix import LossTerm
        >>> famo = FAMO()
        >>> famo.bind([LossTerm("a"), LossTerm("b")], None)
        >>> famo.logits
        tensor([0., 0.])
    """

    allows_max = False

    logits: Tensor
    previous_losses: Tensor
    _plain_state = ("_has_previous",)

    def __init__(
        self,
        terms: Sequence[str] | None = None,
        *,
        lr: float = 0.025,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(terms)
        found = check_bounds(
            "FAMO",
            positive={"lr": lr},
            non_negative={"weight_decay": weight_decay},
            hint="the official values are 0.025 and 0.01.",
        )
        self.lr, self.weight_decay = found["lr"], found["weight_decay"]
        self._has_previous = False  # whether `previous_losses` holds a step's losses
        self._resize(len(self.balanced))

    def _resize(self, count: int) -> None:
        like = self.last_multipliers
        self.register_buffer("logits", like.new_zeros(count))
        self.register_buffer("previous_losses", like.new_ones(count))
        adam = SmallAdam(count, lr=self.lr, weight_decay=self.weight_decay)
        self.adam = adam.to(like.device, like.dtype)

    def _max_reason(self) -> str:
        return "it descends log(L), which needs a positive loss that decreases."

    def _read(self, measured: Tensor, step: int) -> list[float] | None:
        read = super()._read(measured, step)  # None: not finite, the step does not count
        if read is not None:  # at 0, log(0 + 1e-8) would hand the term every weight
            self._refuse_non_positive(read, step, "FAMO takes their logarithm")
        return read

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Tensor:
        # The losses averaged over processes.
        losses = torch.tensor(read, dtype=self.logits.dtype, device=self.logits.device)
        if self._has_previous:  # also from the last step of a previous fit
            grad = famo_logit_gradient(self.logits, self.previous_losses, losses)
            self.adam.step(self.logits, grad)
        self.previous_losses.copy_(losses)
        set_plain(self, _has_previous=True, _stats={"logit": self.logits.clone()})
        return famo_multipliers(self.logits, losses)

    @override
    def set_extra_state(self, state: Any) -> None:
        """Restore the state (a checkpoint from before ``has_previous``: known if it decided)."""
        super().set_extra_state(state)
        if "has_previous" not in state:
            set_plain(self, _has_previous=state.get("decided_step") is not None)

    def _options(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}
