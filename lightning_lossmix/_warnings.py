"""Warnings that point at the user's code: where the loss terms are computed."""

from __future__ import annotations

import inspect
import linecache
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
        function = inspect.unwrap(function)  # through functools.wraps decorators
        package = (function.__module__ or "").split(".")[0]
        # From the code object: reading the source (inspect.getsourcelines) raises for code
        # read from stdin. A pseudo-file ("<string>", "<stdin>") is kept only where the line
        # cache has its source (an IPython cell), so that the warning can show the line.
        code = getattr(function, "__code__", None)
        if package in _NOT_USER or code is None:
            continue
        if code.co_filename.startswith("<") and code.co_filename not in linecache.cache:
            continue
        return code.co_filename, code.co_firstlineno
    return None


def warn_at(message: str, location: Location | None) -> None:
    """Warn on rank zero, at `location` (the user's code) if known, else at the caller's caller."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    if location is None:
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        warnings.warn_explicit(message, UserWarning, *location)
