"""scikit-learn's bundled digits as tensors and a LightningDataModule (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 1797 digits as (pixels in [0, 1], shape (N, 64); labels), shuffled by `seed`."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


class DigitsDataModule(pl.LightningDataModule):
    """The digits, split 1500 / 297 into train and validation sets.

    Args:
        batch_size: samples per batch.
        target: ``"label"`` for the class index, ``"value"`` for the digit as a float (regression).
        seed: the shuffle before the split.
    """

    def __init__(self, batch_size: int = 64, target: str = "label", seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.target = target
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        x, y = digits_tensors(self.seed)
        target = y.float() if self.target == "value" else y
        self.train_set = TensorDataset(x[:1500], target[:1500])
        self.val_set = TensorDataset(x[1500:], target[1500:])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
