"""Warnings that point at the user's code: where the loss terms are computed."""

from __future__ import annotations

import inspect
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn

__all__ = ["Location", "user_location", "warn_at"]

Location = tuple[str, int]
_NOT_USER = ("lightning_lossmix", "lightning", "pytorch_lightning")


def user_location(module: nn.Module) -> Location | None:
    """Where the user's loss is computed: `compute_losses`, else `training_step` (file, line).

    Warnings point there rather than at the package's own line, so that the user sees which of
    their modules the warning is about.
    """
    for name in ("compute_losses", "training_step"):
        function = getattr(type(module), name, None)
        if not inspect.isfunction(function):
            continue
        package = (function.__module__ or "").split(".")[0]
        # From the code object: reading the source (inspect.getsourcelines) raises for a class
        # defined in exec'd code or a script piped to Python; such code has no file to point at.
        filename = function.__code__.co_filename
        if package in _NOT_USER or filename.startswith("<"):
            continue
        return filename, function.__code__.co_firstlineno
    return None


def warn_at(message: str, location: Location | None) -> None:
    """Warn on rank zero, at `location` (the user's code) if known, else at the caller's caller."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    if location is None:
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        warnings.warn_explicit(message, UserWarning, *location)
