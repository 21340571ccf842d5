"""Checkpoints of modules whose hyperparameters hold LossTerms load with torch's defaults."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm, Player
from lightning_lossmix.schedules import (
    DANN,
    Constant,
    Cosine,
    Cyclical,
    Linear,
    Piecewise,
    Schedule,
    Sigmoid,
)


class Halving(Schedule):
    """A user's own schedule: registered for loading by subclassing `Schedule`."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        return 0.5 ** (step // self.every)

    def _arguments(self) -> dict[str, Any]:
        return {"every": self.every}


class Saved(LossMixModule):
    """The natural pattern (and LightningCLI's): terms in __init__, save_hyperparameters()."""

    def __init__(
        self,
        terms: Sequence[LossTerm],
        players: Sequence[Player] | None = None,
        lr: float = 0.05,
    ) -> None:
        super().__init__(terms, players=players)
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.gen = nn.Linear(3, 2)
        self.critic = nn.Linear(2, 1)

    def compute_losses(self, batch: Any, batch_idx: int, player: str | None = None) -> Any:
        (x,) = batch
        fake = self.gen(x)
        losses = {
            "fit": fake.pow(2).mean(),
            "spread": fake.std(),
            "critic": self.critic(fake).pow(2).mean(),
        }
        if player is None:
            return losses
        wanted = next(p for p in self.players if p.name == player).terms
        return {name: losses[name] for name in wanted}

    def configure_optimizers(self) -> Any:
        if not self.players:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [
            torch.optim.SGD(m.parameters(), lr=self.hparams.lr) for m in (self.gen, self.critic)
        ]


SCHEDULED = [
    LossTerm("fit", weight=Linear(0.0, 1.0, steps=4)),
    LossTerm("spread", weight=Sigmoid(0.0, 0.1, steps=4, sharpness=2000.0), mode="max"),
    LossTerm("critic", weight=Piecewise([2], [0.5, 1.0]), opposed_by=("gen",)),
]
CASES: dict[str, dict[str, Any]] = {
    "constant": {
        "terms": [LossTerm("fit"), LossTerm("spread", 0.1, "max"), LossTerm("critic", 0.5)]
    },
    "scheduled": {"terms": SCHEDULED},
    "every schedule": {
        "terms": [
            LossTerm("fit", weight=Cosine(1.0, 0.0, steps=4, delay=1)),
            LossTerm("spread", weight=Cyclical(0.0, 0.2, period=3), mode="max"),
            LossTerm("critic", weight=Constant(0.5)),
        ]
    },
    "players": {
        "terms": [
            LossTerm("fit", weight=DANN()),
            LossTerm("spread", weight=Halving(2), mode="max"),
            LossTerm("critic"),
        ],
        "players": [Player("generator", ("fit", "spread")), Player("critic", ("critic",))],
    },
}


def data() -> DataLoader:
    return DataLoader(
        TensorDataset(torch.randn(16, 3, generator=torch.Generator().manual_seed(1))), batch_size=4
    )


def trainer(root: Path, steps: int = -1, save: bool = False) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=save,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)] if save else [],
    )


@pytest.fixture(params=list(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, Saved]:
    model = Saved(**CASES[request.param])
    trainer(tmp_path, steps=2, save=True).fit(model, data(), data())
    return request.param, tmp_path / "last.ckpt", model


def test_the_checkpoint_loads_with_weights_only(checkpoint: tuple[str, Path, Saved]) -> None:
    case, path, _ = checkpoint
    loaded = torch.load(path, weights_only=True)  # torch's default from 2.6 on
    assert loaded["hyper_parameters"]["terms"] == CASES[case]["terms"]
    assert loaded["hyper_parameters"].get("players") == CASES[case].get("players")


def test_load_from_checkpoint(checkpoint: tuple[str, Path, Saved]) -> None:
    case, path, trained = checkpoint
    model = Saved.load_from_checkpoint(path)
    assert model.loss_mix.terms == tuple(CASES[case]["terms"])
    assert model.players == tuple(CASES[case].get("players") or ())
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_fit_resumes_from_the_checkpoint(checkpoint: tuple[str, Path, Saved]) -> None:
    case, path, _ = checkpoint
    model = Saved(**CASES[case])
    resumed = trainer(path.parent, steps=4)
    started = StartStep()
    resumed.callbacks.append(started)
    resumed.fit(model, data(), data(), ckpt_path=path)
    assert started.step == torch.load(path, weights_only=True)["global_step"] > 0
    assert resumed.global_step == 4


class StartStep(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def test_validate_from_the_checkpoint(checkpoint: tuple[str, Path, Saved]) -> None:
    case, path, trained = checkpoint
    model = Saved(**CASES[case])
    [metrics] = trainer(path.parent).validate(model, data(), ckpt_path=path, verbose=False)
    [expected] = trainer(path.parent).validate(trained, data(), verbose=False)
    assert metrics.keys() == expected.keys() and "val/loss" in metrics
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key
