"""A Trainer for tests that check training itself, not its logs or files."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or summary; `kwargs` on top."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**options, **kwargs})
