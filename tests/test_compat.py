"""Every private access of `_compat` against the installed Lightning, TensorBoard and torch.

If one of these fails after an upgrade, the attribute moved: fix `lightning_lossmix/_compat.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_lossmix import _compat
from tests._tensorboard import read_scalars


def test_batches_that_stepped_is_read_from_the_fit_loop() -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped")
    assert _compat.batches_that_stepped(trainer) == 0


def test_accumulating_is_read_from_the_fit_loop() -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, accumulate_grad_batches=2)
    assert hasattr(trainer.fit_loop, "_should_accumulate")
    loop = trainer.fit_loop.epoch_loop
    loop.batch_progress.current.ready = 1  # the first micro-batch of two
    assert _compat.accumulating(trainer)
    loop.batch_progress.current.ready = 2  # the second: Lightning steps
    assert not _compat.accumulating(trainer)


def test_tensorboard_prefix_and_file_writer(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="run1")
    assert hasattr(logger, "_prefix")
    assert _compat.logger_prefix(logger) == "run1-"
    assert _compat.logger_prefix(TensorBoardLogger(tmp_path / "b", name="", version="")) == ""
    writer = _compat.tensorboard_file_writer(logger)
    writer.add_summary(Summary(value=[Summary.Value(tag="a", simple_value=2.0)]), 3)
    logger.experiment.flush()
    assert read_scalars(tmp_path)["a"] == [(3, 2.0)]


def test_callback_metrics_is_the_dict_the_property_returns() -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert hasattr(trainer._logger_connector, "_callback_metrics")
    _compat.callback_metrics(trainer)["figure"] = torch.tensor(2.0)
    assert trainer.callback_metrics["figure"] == 2.0
    assert _compat.callback_metrics(trainer) is trainer.callback_metrics


def test_donated_buffer_round_trip() -> None:
    before = _compat.get_donated_buffer()
    assert before is not None, "torch._functorch.config.donated_buffer is gone"
    try:
        _compat.set_donated_buffer(not before)
        assert torch._functorch.config.donated_buffer is (not before)
        assert _compat.get_donated_buffer() is (not before)
    finally:
        _compat.set_donated_buffer(before)


def test_attached_trainer_reads_the_module_s_trainer() -> None:
    module = pl.LightningModule()
    assert hasattr(module, "_trainer")
    assert _compat.attached_trainer(module) is None
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer


def test_current_dataloader_idx_is_read_from_the_results() -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    seen: list[tuple[int, int]] = []

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(1, 1)

        def validation_step(self, batch: object, batch_idx: int, dataloader_idx: int = 0) -> None:
            seen.append((dataloader_idx, _compat.current_dataloader_idx(self.trainer)))

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert hasattr(trainer, "_results")
    loaders = [DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2) for _ in range(2)]
    trainer.validate(Model(), loaders, verbose=False)
    assert seen == [(0, 0), (1, 1)]
    trainer.validate(Model(), loaders[0], verbose=False)  # one dataloader: Lightning passes none
    assert seen[-1] == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_any_nonfinite_is_the_fused_check_and_changes_nothing(
    dtype: torch.dtype, bad: float | None
) -> None:
    assert hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"), "the fused check is gone"
    tensors = [torch.randn(3, 4).to(dtype), torch.full((5,), 1e4, dtype=torch.float64)]
    if bad is not None:
        tensors[0][1, 2] = bad
    before = [t.clone() for t in tensors]
    assert _compat.any_nonfinite(tensors) is (bad is not None)
    for tensor, copy in zip(tensors, before, strict=True):
        torch.testing.assert_close(tensor, copy, equal_nan=True, rtol=0, atol=0)
    assert _compat.any_nonfinite([]) is False


def test_any_nonfinite_starts_afresh_at_each_call() -> None:
    bad, good = [torch.tensor([1.0, math.nan])], [torch.tensor([1.0, 2.0])]
    assert [_compat.any_nonfinite(t) for t in (bad, good, bad, good)] == [True, False, True, False]


def test_trainer_callback_finds_a_callback_by_type() -> None:
    checkpoint = pl.callbacks.ModelCheckpoint()
    trainer = pl.Trainer(logger=False, callbacks=[checkpoint], enable_progress_bar=False)
    assert hasattr(trainer, "callbacks")
    assert _compat.trainer_callback(trainer, pl.callbacks.ModelCheckpoint) is checkpoint
    assert _compat.trainer_callback(trainer, pl.callbacks.EarlyStopping) is None


def test_epoch_batches_done_reads_lightning_s_own_test() -> None:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    assert hasattr(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached")
    assert _compat.epoch_batches_done(trainer) is False  # no batch fetched yet
