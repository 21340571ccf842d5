"""RandomLossWeighting: fresh random weights at every step (Lin et al., TMLR 2022)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from lightning_lossmix._errors import check_int
from lightning_lossmix.balancing._base import Balancer


def random_weights(count: int, seed: int, step: int) -> list[float]:
    """Return ``count * softmax(N(0, I))`` drawn from a generator seeded by `seed` and `step`.

    The draw depends on nothing else, so every process draws the same weights, and a resumed
    run draws what the uninterrupted one did. It runs on the host in Python, every step: a
    torch generator, draw and softmax cost several times more there.

    Examples:
        >>> random_weights(3, seed=0, step=5) == random_weights(3, seed=0, step=5)
        True
        >>> round(sum(random_weights(3, seed=0, step=5)), 12)
        3.0
    """
    generator = random.Random((seed << 64) + step)  # one stream per (seed, step)
    draw = [generator.gauss(0.0, 1.0) for _ in range(count)]
    top = max(draw)
    exps = [math.exp(x - top) for x in draw]
    total = sum(exps)
    return [count * e / total for e in exps]


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
        >>> rlw = RandomLossWeighting(seed=3)
        >>> rlw.bind([LossTerm("a"), LossTerm("b")], None)
        >>> rlw  # the arguments that differ from their defaults
        RandomLossWeighting(seed=3)
    """

    def __init__(self, terms: Sequence[str] | None = None, *, seed: int = 0) -> None:
        super().__init__(terms)
        self.seed = check_int(seed, "seed", "RandomLossWeighting", minimum=0)

    def _decide(
        self, read: list[float], declared: Mapping[str, float], *, step: int
    ) -> list[float]:
        return random_weights(len(self.balanced), self.seed, step)

    def _options(self) -> dict[str, int]:
        return {"seed": self.seed}
