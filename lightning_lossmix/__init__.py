"""lightning_lossmix: declare weighted min/max loss terms, and see how hard each one pulls.

The names below are imported on first use, so that a part that needs none of them (the
report's command line, which reads logs) starts without importing Lightning.

Examples:
    >>> from lightning_lossmix import LossMix, LossTerm
    >>> mix = LossMix([LossTerm("recon"), LossTerm("kl", weight=0.5)])
    >>> mix.names
    ('recon', 'kl')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives (submodules: None).
_HOMES: dict[str, str | None] = {
    "LossMix": "_mix",
    "LossMixError": "_errors",
    "LossMixModule": "_module",
    "LossMixOutput": "_mix",
    "LossTerm": "_term",
    "Player": "_player",
    "balancing": None,
    "callbacks": None,
    "functional": None,
    "nn": None,
    "schedules": None,
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lightning_lossmix' has no attribute {name!r}")
    home = _HOMES[name]
    module = importlib.import_module(f"{__name__}.{home or name}")
    found = module if home is None else getattr(module, name)
    globals()[name] = found
    return found


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
