"""lightning_lossmix: declare weighted min/max loss terms, and see how hard each one pulls.

Examples:
    >>> from lightning_lossmix import LossMix, LossTerm
    >>> mix = LossMix([LossTerm("recon"), LossTerm("kl", weight=0.5)])
    >>> mix.names
    ('recon', 'kl')
"""

from lightning_lossmix import balancing, callbacks, functional, nn, schedules
from lightning_lossmix._errors import LossMixError
from lightning_lossmix._mix import LossMix, LossMixOutput
from lightning_lossmix._module import LossMixModule
from lightning_lossmix._player import Player
from lightning_lossmix._term import LossTerm

__all__ = [
    "LossMix",
    "LossMixError",
    "LossMixModule",
    "LossMixOutput",
    "LossTerm",
    "Player",
    "balancing",
    "callbacks",
    "functional",
    "nn",
    "schedules",
]
__version__ = "0.1.0"
