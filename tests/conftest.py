"""Shared fixtures: a quiet, CPU-only `Trainer` that logs to real TensorBoard event files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """Return ``make_trainer(logdir="logs", **trainer_kwargs)``: a small CPU `Trainer`.

    It logs every step to TensorBoard event files under ``tmp_path / logdir`` (read them back
    with `tests._tensorboard.read_scalars`), with no progress bar, model summary or automatic
    checkpointing; any keyword overrides these defaults.
    """

    def make(logdir: str = "logs", **kwargs: Any) -> pl.Trainer:
        defaults: dict[str, Any] = {
            "default_root_dir": tmp_path,
            "accelerator": "cpu",
            "devices": 1,
            "logger": TensorBoardLogger(tmp_path / logdir, name="", version=""),
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
        }
        return pl.Trainer(**{**defaults, **kwargs})

    return make
