"""RandomLossWeighting: fresh random weights at every step (Lin et al., TMLR 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_lossmix._errors import check_int
from lightning_lossmix.balancing._base import Balancer


def random_weights(count: int, seed: int, step: int) -> Tensor:
    """Return ``count * softmax(N(0, I))`` drawn from a generator seeded by `seed` and `step`.

    The draw depends on nothing else, so every process draws the same weights, and a resumed
    run draws what the uninterrupted one did.

    Examples:
        >>> torch.equal(random_weights(3, seed=0, step=5), random_weights(3, seed=0, step=5))
        True
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draw = torch.randn(count, generator=generator)
    return torch.softmax(draw, dim=0).mul_(count)


class RandomLossWeighting(Balancer):
    """Random loss weighting (RLW): a new random weight per term at each optimizer step.

    The weights are ``K * softmax(x)`` with ``x ~ N(0, I)`` (the paper's normal-softmax
    variant, scaled by the number of balanced terms ``K`` so that they average 1 like the
    other balancers' multipliers; the paper's sum to 1, a constant factor of the learning
    rate). The draw is seeded by `seed` and the step, so every DDP process uses the same
    weights and a resumed run continues bit-identically with no state to save. The declared
    weights multiply them; a ``mode="max"`` term keeps its sign.

    Reference: B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022,
    https://arxiv.org/abs/2111.10603.

    Args:
        terms: the terms to balance (default: all).
        seed: the seed of the draws.

    Examples:
        >>> from lightning_lossmix import LossTerm
        >>> rlw = RandomLossWeighting(seed=0)
        >>> rlw.bind([LossTerm("a"), LossTerm("b")], None)
        >>> rlw
        RandomLossWeighting(seed=0)
    """

    def __init__(self, terms: Sequence[str] | None = None, *, seed: int = 0) -> None:
        super().__init__(terms)
        self.seed = check_int(seed, "seed", "RandomLossWeighting", minimum=0)

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Tensor:
        return random_weights(len(self.balanced), self.seed, step)

    def _options(self) -> dict[str, int]:
        return {"seed": self.seed}
