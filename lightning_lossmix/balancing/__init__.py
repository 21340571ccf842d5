"""Automatic balancing of loss terms: each balancer sets the multipliers of the terms it is given.

The effective weight of a balanced term is its declared weight at the step (a constant or a
schedule) times the balancer's multiplier; its sign comes from ``mode`` and never changes. Pass
a balancer to ``LossMix(terms, balancer=...)`` or ``LossMixModule(terms, balancer=...)``.

Examples:
    >>> from lightning_lossmix.balancing import GradientBalance, UncertaintyWeighting
    >>> GradientBalance(terms=["g_loss"], reference="nll", on="decoder.conv_out.weight")
    GradientBalance(terms=['g_loss'], on=['decoder.conv_out.weight'], reference='nll')
"""

from lightning_lossmix.balancing._base import Balancer
from lightning_lossmix.balancing._dwa import DWA
from lightning_lossmix.balancing._famo import FAMO
from lightning_lossmix.balancing._gradient_balance import GradientBalance
from lightning_lossmix.balancing._gradnorm import GradNorm
from lightning_lossmix.balancing._in_module import loss_scale
from lightning_lossmix.balancing._random import RandomLossWeighting
from lightning_lossmix.balancing._uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "Balancer",
    "GradNorm",
    "GradientBalance",
    "RandomLossWeighting",
    "UncertaintyWeighting",
    "loss_scale",
]
