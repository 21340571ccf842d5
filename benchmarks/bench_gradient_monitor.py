"""What GradientMonitor costs, timed step by step: normal steps, measured steps, memory.

Whole-fit times are too noisy on shared machines to show a 2 % effect, so each optimizer step is
timed by a callback around the batch (`on_train_batch_start` to `on_train_batch_end`, with a
device sync on CUDA). For each model, alternating the runs in one process for `--rounds` rounds:

- ``base``: no monitor; the median of its steps is the normal step;
- ``monitor``: GradientMonitor(every_n_steps=`--measure-every`); the median of its unmeasured
  steps against ``base`` shows what the hook costs on normal steps, and the median extra time
  of its measured steps is the cost of a measurement;
- ``limit``: on the same model and batch, one ``torch.autograd.grad`` per term restricted to the
  monitored parameters (the least a measurement can cost), and the batched form
  (``is_grads_batched=True``), timed directly.

The overhead at a cadence N is ``(normal_with * (N - 1) + measured) / N / normal_without``,
reported per round (its spread shows the run-to-run noise) and as the median over rounds.
Models: ``bench`` (a 64-256-256 trunk and three heads, 4 terms, batch 64) and ``compute`` (three
1024-wide layers, 4 terms, batch 256: the backward dominates). Memory: the buffer holds
``T x`` (monitored elements) floats; on CUDA the peak is measured too.

    python benchmarks/bench_gradient_monitor.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/bench_gradient_monitor.py --quick         # a smoke run
    python benchmarks/bench_gradient_monitor.py --accelerator cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.functional import term_gradients

TERMS = (
    LossTerm("recon"),
    LossTerm("label", weight=2.0),
    LossTerm("sparsity", weight=0.01),
    LossTerm("spread", weight=0.1, mode="max"),
)


class FourTerms(LossMixModule):
    """A trunk shared by four terms, with a head each (the existing bench model at 256)."""

    def __init__(self, inputs: int = 64, width: int = 256, depth: int = 2) -> None:
        super().__init__(TERMS)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.recon_head = nn.Linear(width, inputs)
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
        return torch.optim.Adam(self.parameters(), lr=1e-4)


MODELS: dict[str, dict[str, int]] = {
    "bench": {"inputs": 64, "width": 256, "depth": 2, "batch": 64, "cadence": 50},
    "compute": {"inputs": 256, "width": 1024, "depth": 3, "batch": 256, "cadence": 100},
}


class StepTimer(pl.Callback):
    """Seconds per optimizer step, and whether the monitor measured it."""

    def __init__(self, monitor: GradientMonitor | None) -> None:
        self.monitor = monitor
        self.steps: list[tuple[float, bool]] = []
        self.peak_mib = 0.0
        self._start = 0.0
        self._measured = False

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, b: Any, i: int) -> None:
        _sync(module)
        self._measured = self.monitor is not None and self.monitor.is_measured_step(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, o: Any, b: Any, i: int) -> None:
        _sync(module)
        self.steps.append((time.perf_counter() - self._start, self._measured))


def _sync(module: nn.Module) -> None:
    if next(module.parameters()).is_cuda:
        torch.cuda.synchronize()


def data(spec: Mapping[str, int], steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    n = spec["batch"] * steps
    x = torch.randn(n, spec["inputs"], generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=spec["batch"])


def run(spec: Mapping[str, int], steps: int, every: int | None, accelerator: str) -> StepTimer:
    torch.manual_seed(0)
    model = FourTerms(spec["inputs"], spec["width"], spec["depth"])
    monitor = None if every is None else GradientMonitor(every_n_steps=every, summary=False)
    timer = StepTimer(monitor)
    callbacks: list[pl.Callback] = [timer] + ([monitor] if monitor else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        ).fit(model, data(spec, steps))
    if accelerator == "cuda":
        timer.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return timer


def limit_seconds(spec: Mapping[str, int], accelerator: str, repeats: int) -> dict[str, float]:
    """One restricted backward per term (the limit), and the batched form, on one batch."""
    device = "cuda" if accelerator == "cuda" else "cpu"
    torch.manual_seed(0)
    model = FourTerms(spec["inputs"], spec["width"], spec["depth"]).to(device)
    x, y = next(iter(data(spec, 1)))
    params = list(model.parameters())
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    for _ in range(repeats):
        for form in times:
            losses = model.compute_losses((x.to(device), y.to(device)), 0)
            values = list(losses.values())
            _sync(model)
            start = time.perf_counter()
            term_gradients(values, params, batched=form == "batched")
            _sync(model)
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(t[1:] or t) for form, t in times.items()}


@dataclass
class Round:
    normal_without: float
    normal_with: float
    measured_extra: float


def one_round(spec: Mapping[str, int], steps: int, every: int, accelerator: str) -> Round:
    base = run(spec, steps, None, accelerator).steps[5:]  # the first steps warm up
    with_monitor = run(spec, steps, every, accelerator).steps[5:]
    normal_without = statistics.median(s for s, _ in base)
    normal_with = statistics.median(s for s, m in with_monitor if not m)
    measured = [s for s, m in with_monitor if m]
    return Round(normal_without, normal_with, statistics.median(measured) - normal_with)


def overhead(r: Round, cadence: int) -> float:
    """A fit's time per step at this cadence over the time without the monitor."""
    return (cadence * r.normal_with + r.measured_extra) / (cadence * r.normal_without)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--measure-every", type=int, default=5, help="cadence of the timed runs")
    parser.add_argument("--models", default="bench,compute")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 20 steps")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or cuda for the GPU figures")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rounds, steps = (2, 20) if args.quick else (args.rounds, args.steps)
    print(f"torch {torch.__version__}, {args.accelerator}, {rounds} rounds of {steps} steps")
    print(
        "| model | cadence | normal step (ms) | hook on normal steps | measured step extra (ms) "
        "| limit: T restricted backward (ms) | batched (ms) | extra / limit | overhead "
        "(median, spread) | buffer (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        spec = MODELS[name]
        results = [
            one_round(spec, steps, args.measure_every, args.accelerator) for _ in range(rounds)
        ]
        limit = limit_seconds(spec, args.accelerator, repeats=3 if args.quick else 7)
        cadence = spec["cadence"]
        ratios = [overhead(r, cadence) for r in results]
        normal = statistics.median(r.normal_without for r in results)
        hook = statistics.median(r.normal_with / r.normal_without for r in results)
        extra = statistics.median(r.measured_extra for r in results)
        model = FourTerms(spec["inputs"], spec["width"], spec["depth"])
        numel = sum(p.numel() for p in model.parameters())
        buffer_mib = len(TERMS) * numel * 4 / 2**20
        print(
            f"| {name} | {cadence} | {normal * 1e3:.2f} | {hook:.3f} | {extra * 1e3:.2f} "
            f"| {limit['loop'] * 1e3:.2f} | {limit['batched'] * 1e3:.2f} "
            f"| {extra / limit['loop']:.2f} | {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f}) | {buffer_mib:.1f} |"
        )
        if args.accelerator == "cuda":
            base = run(spec, 10, None, args.accelerator).peak_mib
            measured = run(spec, 10, 1, args.accelerator).peak_mib
            print(f"|   | peak CUDA memory: {base:.0f} MiB without, {measured:.0f} MiB with |")


if __name__ == "__main__":
    main()
