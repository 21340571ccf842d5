"""Checkpoints that load with ``torch.load(weights_only=True)``, torch's default from 2.6 on."""

from __future__ import annotations

import torch


def allow_loading(cls: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild instances of `cls` from a checkpoint.

    ``self.save_hyperparameters()`` in a module whose ``__init__`` takes `terms` pickles the
    `LossTerm`s (their `Schedule`s, `Player`s) into the checkpoint; torch's restricted
    unpickler refuses any class not registered with `torch.serialization.add_safe_globals`.
    These classes hold plain numbers, strings and tuples, and rebuilding one runs no code of
    the checkpoint's choosing. Before torch 2.4 (no `add_safe_globals`), `torch.load` does not
    default to ``weights_only=True`` and nothing needs registering.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals([cls])
