"""What GradientMonitor costs: time per fit, per measured step, per group, and memory.

Trains a 4-term model (a shared trunk, three heads, one maximized term) for `--steps` optimizer
steps under several configurations, alternating them in one process for `--rounds` rounds
(order reversed every other round), and reports median ratios:

- overhead at the default cadence: GradientMonitor(every_n_steps=50) vs no monitor;
- a measured step: GradientMonitor(every_n_steps=1) vs a hand-written monitor that calls
  torch.autograd.grad once per term on all parameters, then lets the normal backward run;
- restricting `groups` to the last layer vs the default groups (every step measured);
- memory: the monitor's one buffer holds one gradient per term for the monitored parameters.

    python benchmarks/bench_gradient_monitor.py            # about 3 minutes on 2 CPU cores
    python benchmarks/bench_gradient_monitor.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor

TERMS = (
    LossTerm("recon"),
    LossTerm("label", weight=2.0),
    LossTerm("sparsity", weight=0.01),
    LossTerm("spread", weight=0.1, mode="max"),
)


class FourTerms(LossMixModule):
    def __init__(self, width: int = 256) -> None:
        super().__init__(TERMS)
        self.trunk = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.recon_head = nn.Linear(width, 64)
        self.label_head = nn.Linear(width, 10)
        self.head = nn.Linear(width, 1)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        return {
            "recon": nn.functional.mse_loss(self.recon_head(h), x),
            "label": nn.functional.cross_entropy(self.label_head(h), y),
            "sparsity": h.abs().mean(),
            "spread": torch.tanh(self.head(h)).std(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class HandWrittenMonitor(pl.Callback):
    """What a user would write: torch.autograd.grad once per term on all parameters, then the
    same figures as GradientMonitor (magnitudes, shares, cosines, suggested weights)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: Tensor) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (step + 1) % self.every_n_steps:
            return
        output = pl_module.loss_mix.last_output
        everything = list(pl_module.parameters())
        groups = {name: list(child.parameters()) for name, child in pl_module.named_children()}
        groups = {name: params for name, params in groups.items() if params}
        groups["all"] = everything
        grads = {}
        for name, value in output.values.items():
            found = torch.autograd.grad(value, everything, retain_graph=True, allow_unused=True)
            grads[name] = {
                id(p): torch.zeros_like(p) if g is None else g
                for p, g in zip(everything, found, strict=True)
            }
        names = list(grads)
        metrics = {}
        for group, params in groups.items():
            flat = {n: torch.cat([grads[n][id(p)].flatten() for p in params]) for n in names}
            weights = {n: output.signed_weights[n] for n in names}
            magnitude = {n: abs(weights[n]) * flat[n].norm() for n in names}
            total = sum(magnitude.values())
            for n in names:
                metrics[f"grad_magnitude/{group}/{n}"] = float(magnitude[n])
                metrics[f"grad_share/{group}/{n}"] = float(magnitude[n] / total)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    sign = 1.0 if weights[a] * weights[b] >= 0 else -1.0
                    cosine = nn.functional.cosine_similarity(flat[a], flat[b], dim=0)
                    metrics[f"grad_cosine/{group}/{a}_vs_{b}"] = float(sign * cosine)
            if group == "all":
                mean = total / len(names)
                for n in names:
                    metrics[f"grad_suggested_weight/{n}"] = float(mean / flat[n].norm())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class Timer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seconds = time.perf_counter() - self.start


ACCELERATOR = "cpu"


def fit_seconds(callbacks: list[pl.Callback], steps: int, data: DataLoader) -> float:
    pl.seed_everything(0, verbose=False)
    timer = Timer()
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_steps=steps,
            logger=TensorBoardLogger(logdir, name=""),
            log_every_n_steps=50,
            callbacks=[*callbacks, timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=ACCELERATOR,
            devices=1,
        )
        trainer.fit(FourTerms(), data)
    return timer.seconds


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "no monitor": lambda: [],
    "GradientMonitor, every 50 steps": lambda: [GradientMonitor(every_n_steps=50)],
    "GradientMonitor, every step": lambda: [GradientMonitor(every_n_steps=1)],
    "hand-written monitor, every step": lambda: [HandWrittenMonitor(every_n_steps=1)],
    "GradientMonitor, every step, last layer only": lambda: [
        GradientMonitor(every_n_steps=1, groups={"head": ["head"]})
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 60 steps")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or cuda for the GPU figures")
    args = parser.parse_args()
    global ACCELERATOR
    ACCELERATOR = args.accelerator
    if args.quick:
        args.rounds, args.steps = 2, 60
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # steadier timings on a small shared machine
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4096, 64, generator=generator)
    y = torch.randint(0, 10, (4096,), generator=generator)
    data = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=False)

    fit_seconds([], 20, data)  # warm-up, discarded
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        order = list(CONFIGS) if round_index % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            times[name].append(fit_seconds(CONFIGS[name](), args.steps, data))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    def extra_ratio(a: str, b: str, base: str = "no monitor") -> float:
        return statistics.median(
            (x - z) / (y - z) for x, y, z in zip(times[a], times[b], times[base], strict=True)
        )

    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} "
        f"thread, {args.rounds} rounds x {args.steps} steps, 4 terms\n"
    )
    print("| configuration | median seconds per fit | median ms per step |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {1000 * median / args.steps:.2f} |")
    print()
    print("| comparison | median ratio | target |")
    print("|---|---|---|")
    print(
        f"| every 50 steps / no monitor | {ratio(CONFIGS_KEYS[1], CONFIGS_KEYS[0]):.3f} | <= 1.03 |"
    )
    print(
        "| measured step, extra time: GradientMonitor / hand-written | "
        f"{extra_ratio(CONFIGS_KEYS[2], CONFIGS_KEYS[3]):.3f} | <= 1 |"
    )
    print(
        "| measured step, extra time: last layer only / default groups | "
        f"{extra_ratio(CONFIGS_KEYS[4], CONFIGS_KEYS[2]):.3f} | < 1 |"
    )
    model = FourTerms()
    numel = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    print(
        f"\nMemory: one float32 buffer of {len(TERMS)} x {numel} values "
        f"({len(TERMS) * numel * 4 / 2**20:.2f} MiB, one gradient per term) while a step is "
        f"measured, freed after it; {len(TERMS)} x {head} values with the last layer only."
    )


CONFIGS_KEYS = list(CONFIGS)

if __name__ == "__main__":
    main()
