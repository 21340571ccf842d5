"""Weight schedules: small picklable objects called as ``schedule(step, total_steps=None)``.

Examples:
    >>> from lightning_lossmix import LossTerm
    >>> from lightning_lossmix.schedules import Linear
    >>> LossTerm("kl", weight=Linear(0.0, 1.0, steps=1000))
    LossTerm(name='kl', weight=Linear(start=0.0, end=1.0, steps=1000, delay=0), mode='min')
"""

from lightning_lossmix.schedules._base import Constant, Schedule
from lightning_lossmix.schedules._cyclical import Cyclical
from lightning_lossmix.schedules._dann import DANN
from lightning_lossmix.schedules._piecewise import Piecewise
from lightning_lossmix.schedules._ramps import Cosine, Linear, Sigmoid

__all__ = [
    "DANN",
    "Constant",
    "Cosine",
    "Cyclical",
    "Linear",
    "Piecewise",
    "Schedule",
    "Sigmoid",
]
