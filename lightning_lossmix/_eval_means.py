"""The validation and test means of a `LossMixModule`: one set per stage and per dataloader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
from torch import nn

from lightning_lossmix._mean import SampleMean
from lightning_lossmix._mix import LossMixOutput

__all__ = ["EvalMeans"]

EvalStage = Literal["val", "test"]


class EvalMeans(nn.Module):
    """Sample-weighted epoch means of the total and of every term, per stage and dataloader.

    Each dataloader gets its own means, so that two validation sets are never pooled; Lightning
    appends ``/dataloader_idx_<N>`` to the keys when there are several dataloaders. The means are
    torchmetrics states, reduced across DDP processes and reset by Lightning every epoch.

    Args:
        names: the declared terms' names.
        attribute: the module attribute this object is stored under, for Lightning's
            ``metric_attribute`` (which it cannot find for means created during a fit).
    """

    def __init__(self, names: Sequence[str], attribute: str) -> None:
        super().__init__()
        self.names = tuple(names)
        self.attribute = attribute
        # Keys are "<stage>_<dataloader>", and positions within: term names may contain '.',
        # which ModuleDict rejects.
        self.means = nn.ModuleDict({f"{stage}_0": self._new_set() for stage in ("val", "test")})

    def _new_set(self) -> nn.ModuleList:
        return nn.ModuleList(SampleMean() for _ in range(len(self.names) + 1))

    def log(
        self,
        module: pl.LightningModule,
        output: LossMixOutput,
        stage: EvalStage,
        batch_size: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add a batch to `stage`'s means for `dataloader_idx` and log them with `module.log`."""
        key = f"{stage}_{dataloader_idx}"
        if key not in self.means:  # a second dataloader, met during the loop
            self.means[key] = self._new_set().to(output.total.device)
        means = list(self.means[key])  # type: ignore[call-overload]
        tags = [f"{stage}/loss", *(f"{stage}/loss/{name}" for name in self.names)]
        values = [output.total, *output.values.values()]
        for position, (tag, mean, value) in enumerate(zip(tags, means, values, strict=True)):
            assert isinstance(mean, SampleMean)
            mean.update(value, weight=batch_size)
            module.log(
                tag,
                mean,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                metric_attribute=f"{self.attribute}.means.{key}.{position}",
            )
