"""What does a balancer cost per step over fixed weights? Median ratio of alternating runs.

The same `LossMixModule` (a shared MLP trunk, three heads, three terms) trains with fixed
weights and with each balancer of `lightning_lossmix.balancing` at its defaults, on the same
random data, as users run it: a full ``Trainer.fit`` with Lightning's default
``log_every_n_steps=50``, no progress bar or checkpointing. Per run: the median wall-clock time
of a whole step (``on_train_batch_start`` to ``on_train_batch_end``: forward, balancing,
logging, backward, optimizer step). The fixed run and each balancer's run alternate for several
rounds, the order swapped every round, in one process; the verdict is the median of the
per-round ratios.

Targets (issue 9): `GradientBalance` on the last shared layer, every step: at most 1.05;
`UncertaintyWeighting`, `DWA` and `RandomLossWeighting`: at most 1.02; `GradNorm` and `FAMO`
are reported.

    python benchmarks/bench_balancing.py            # 5 rounds of 500 steps, a few minutes
    python benchmarks/bench_balancing.py --quick    # 2 rounds of 30 steps, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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

IN_FEATURES, HIDDEN, N_SAMPLES, BATCH_SIZE = 64, 256, 4096, 128
#: Each balancer, and its target ratio (None: reported only).
BALANCERS: dict[str, tuple[Callable[[], Balancer], float | None]] = {
    "GradientBalance": (GradientBalance, 1.05),
    "UncertaintyWeighting": (UncertaintyWeighting, 1.02),
    "DWA": (DWA, 1.02),
    "RandomLossWeighting": (RandomLossWeighting, 1.02),
    "GradNorm": (GradNorm, None),
    "FAMO": (FAMO, None),
}


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, IN_FEATURES, generator=generator)
    return TensorDataset(x, (x[:, :8].sum(1) > 0).long())


class MultiTask(LossMixModule):
    """A trunk and three heads; three positive terms of different scales."""

    def __init__(self, balancer: Balancer | None) -> None:
        super().__init__(
            [LossTerm("label"), LossTerm("recon"), LossTerm("size")], balancer=balancer
        )
        self.trunk = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.label_head = nn.Linear(HIDDEN, 2)
        self.recon_head = nn.Linear(HIDDEN, IN_FEATURES)
        self.size_head = nn.Linear(HIDDEN, 1)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        features = self.trunk(x)
        return {
            "label": nn.functional.cross_entropy(self.label_head(features), y),
            "recon": (self.recon_head(features) - x).pow(2).sum(1).mean(),
            "size": (self.size_head(features).squeeze(1) - x.norm(dim=1)).pow(2).mean() + 0.1,
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.batch_ns: list[int] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter_ns()

    def on_train_batch_end(self, *args: Any) -> None:
        self.batch_ns.append(time.perf_counter_ns() - self.start)


def step_us(balancer: Balancer | None, steps: int, data: TensorDataset, logdir: str) -> float:
    """Train for `steps` steps; return the median whole-step time in microseconds."""
    gc.collect()
    pl.seed_everything(0, verbose=False)
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name=type(balancer).__name__),
        log_every_n_steps=50,  # Lightning's default
        callbacks=[timer],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(data, BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(MultiTask(balancer), train_dataloaders=loader)
    assert len(timer.batch_ns) == steps
    return statistics.median(timer.batch_ns[min(10, steps // 5) :]) / 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 30 steps")
    parser.add_argument("--only", nargs="*", choices=list(BALANCERS))
    args = parser.parse_args(argv)
    rounds, steps = (2, 30) if args.quick else (args.rounds, args.steps)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"{rounds} rounds of {steps} steps"
    )
    data = make_data()
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as logdir:
        for name in args.only or BALANCERS:
            make, target = BALANCERS[name]
            per_round, times = [], []
            for index in range(rounds):
                order = [None, make] if index % 2 == 0 else [make, None]
                measured = {
                    "balanced" if m else "fixed": step_us(m() if m else None, steps, data, logdir)
                    for m in order
                }
                per_round.append(measured["balanced"] / measured["fixed"])
                times.append(measured)
            ratios[name] = statistics.median(per_round)
            verdict = "" if target is None else ("  ok" if ratios[name] <= target else "  OVER")
            fixed = statistics.median(t["fixed"] for t in times)
            balanced = statistics.median(t["balanced"] for t in times)
            print(
                f"{name:22s} ratio {ratios[name]:.3f} (target {target or '-'}){verdict}  "
                f"fixed {fixed:.0f} us, balanced {balanced:.0f} us, rounds "
                + ", ".join(f"{r:.3f}" for r in per_round)
            )
    return ratios


if __name__ == "__main__":
    main()
