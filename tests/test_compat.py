"""Every private access of `_compat` against the installed Lightning, TensorBoard and torch.

If one of these fails after an upgrade, the attribute moved: fix `lightning_lossmix/_compat.py`.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_lossmix import _compat
from tests._tensorboard import read_scalars


def test_batches_that_stepped_is_read_from_the_fit_loop() -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped")
    assert _compat.batches_that_stepped(trainer) == 0


def test_tensorboard_prefix_and_file_writer(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="run1")
    assert hasattr(logger, "_prefix")
    assert _compat.logger_prefix(logger) == "run1-"
    assert _compat.logger_prefix(TensorBoardLogger(tmp_path / "b", name="", version="")) == ""
    writer = _compat.tensorboard_file_writer(logger)
    writer.add_summary(Summary(value=[Summary.Value(tag="a", simple_value=2.0)]), 3)
    logger.experiment.flush()
    assert read_scalars(tmp_path)["a"] == [(3, 2.0)]


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


def test_gradient_norms_are_fused_norms_that_keep_nan_and_inf() -> None:
    assert hasattr(torch, "_foreach_norm"), "torch._foreach_norm is gone"
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.full((4,), 300.0)]
    tensors.append(tensors[-1].half())  # its norm, 600, squares beyond float16's range
    norms = _compat.gradient_norms(tensors)
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])
    torch.testing.assert_close(norms.double(), expected)
    bad = _compat.gradient_norms([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])
    assert bool(bad[0].isnan()) and bool(bad[1].isinf())
