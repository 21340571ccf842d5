"""Three tasks on one trunk: which balancer finds the weights by itself?

A small network reads scikit-learn's bundled 8x8 digits (no download) and, from one shared trunk,
predicts three things: the digit (`digit`, cross-entropy), its parity (`parity`, cross-entropy)
and the image itself (`pixels`, Bernoulli likelihood summed over 64 pixels). The pixel term's
gradient on the trunk is about ten times the others' at the start and several times afterwards,
so with equal weights the trunk mostly learns to reconstruct. The script trains the same model
with fixed equal weights and with every balancer of `lightning_lossmix.balancing` at its defaults
(equal declared weights), and prints,
for each, the validation accuracy of the digit and parity heads, the pixel error and the
wall time per training step (median).

    python examples/multitask_digits.py              # 7 runs, about 10 s on a 2-core CPU
    python examples/multitask_digits.py --fast       # a smoke run
    tensorboard --logdir runs/multitask_digits        # balance/... shows each balancer's state
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DigitsDataModule

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

TERMS = ("digit", "parity", "pixels")
#: Each run: its name and the balancer it trains with (None: fixed equal weights).
BALANCERS: dict[str, Callable[[int], Balancer | None]] = {
    "fixed": lambda steps_per_epoch: None,
    "GradientBalance": lambda steps_per_epoch: GradientBalance(),
    "UncertaintyWeighting": lambda steps_per_epoch: UncertaintyWeighting(),
    "GradNorm": lambda steps_per_epoch: GradNorm(),
    "DWA": lambda steps_per_epoch: DWA(every_n_steps=steps_per_epoch),  # the paper's epochs
    "FAMO": lambda steps_per_epoch: FAMO(),
    "RandomLossWeighting": lambda steps_per_epoch: RandomLossWeighting(),
}


class MultiTaskDigits(LossMixModule):
    """A shared trunk and three heads: the digit, its parity and the pixels."""

    def __init__(self, balancer: Balancer | None, hidden: int = 64, lr: float = 2e-3) -> None:
        super().__init__([LossTerm(name) for name in TERMS], balancer=balancer)
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, hidden), nn.ReLU())
        self.digit_head = nn.Linear(hidden, 10)
        self.parity_head = nn.Linear(hidden, 2)
        self.pixel_head = nn.Linear(hidden, 64)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.trunk(x)
        return self.digit_head(features), self.parity_head(features), self.pixel_head(features)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        digit, parity, pixels = self(x)
        return {
            "digit": F.cross_entropy(digit, y),
            "parity": F.cross_entropy(parity, y % 2),
            "pixels": F.binary_cross_entropy_with_logits(pixels, x, reduction="none")
            .sum(-1)
            .mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class StepTimer(pl.Callback):
    """The wall time of each training step (forward, balancing, backward, optimizer step).

    Wall time rather than the process's CPU time, which also counts torch's worker threads
    spinning while they wait: it varied twofold between two runs of the same fit. Run it on a
    quiet machine; `benchmarks/bench_balancing.py` measures the overhead in lockstep.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def evaluate(model: MultiTaskDigits, data: DigitsDataModule) -> dict[str, float]:
    """Each task's validation metric."""
    model.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        digit, parity, pixels = model(x)
    model.train()
    return {
        "digit_accuracy": (digit.argmax(-1) == y).float().mean().item(),
        "parity_accuracy": (parity.argmax(-1) == y % 2).float().mean().item(),
        "pixel_error": (torch.sigmoid(pixels) - x).abs().mean().item(),
    }


def train(name: str, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, workers=True)
    data = DigitsDataModule(batch_size=64, target="label")
    data.setup()
    steps_per_epoch = 10 if args.fast else len(data.train_dataloader())
    model = MultiTaskDigits(BALANCERS[name](steps_per_epoch))
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=2 if args.fast else args.epochs,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=0,
        logger=TensorBoardLogger(Path(args.logdir), name="", version=name),
        callbacks=[timer],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return {
        "run": name,
        **evaluate(model, data),
        "ms_per_step": 1000 * statistics.median(timer.times[5:] or timer.times),
    }


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per run, as a Markdown table."""
    lines = [
        "| run | digit acc. | parity acc. | pixel err. | ms / step |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['run']} | {r['digit_accuracy']:.3f} | {r['parity_accuracy']:.3f} | "
        f"{r['pixel_error']:.4f} | {r['ms_per_step']:.2f} |"
        for r in results
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps per run (CI)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--logdir", default="runs/multitask_digits")
    parser.add_argument(
        "--only", nargs="*", choices=list(BALANCERS), help="run only these (default: all)"
    )
    args = parser.parse_args(argv)
    results = [train(name, args) for name in args.only or BALANCERS]
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
