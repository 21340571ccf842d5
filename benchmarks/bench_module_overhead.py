"""What does LossMixModule cost over a hand-written LightningModule? Target: a median ratio <= 1.02.

Both modules train the same MLP on the same random data with the same four terms (one
maximized, one with a scheduled weight) and log the same tags every step: ``train/loss`` (on the
progress bar), ``train/loss/<term>`` and ``train/weight/<term>``. One is a `LossMixModule`; the
other computes the weights and the signed sum by hand. Each run is a full ``Trainer.fit`` with a
TensorBoardLogger, as users run it, without progress bar or checkpointing.

Measured per run: the median wall-clock time of one whole step (``on_train_batch_start`` to
``on_train_batch_end``: forward, the terms, their assembly and checks, logging, backward, the
non-finite gradient check and the optimizer step), the median time of ``training_step`` alone
(``on_train_batch_start`` to ``on_before_backward``), and the CPU and wall-clock time of the
whole training loop (``on_train_start`` to ``on_train_end``). The verdict uses the median
whole-step time: a median over a thousand steps shrugs off the bursts that a shared machine
adds to a whole run's time, which swung whole-run ratios from 0.75 to 1.42 here; the whole-run
CPU ratio is printed beside it.

A warm-up pair is discarded after checking that both modules ended with the same weights and
logged the same tags (so that they did the same work); then the two alternate for several
rounds, the order swapped each round, and the median of the per-round ratios is reported.

    python benchmarks/bench_module_overhead.py              # 7 rounds of 1000 steps, ~2 min
    python benchmarks/bench_module_overhead.py --quick      # 2 rounds of 100 steps, ~10 s
    python benchmarks/bench_module_overhead.py --rounds 9 --steps 2000
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.schedules import Linear

TARGET = 1.02
KINDS = ("LossMixModule", "LightningModule")
IN_FEATURES, HIDDEN, OUT_FEATURES = 64, 256, 16
N_SAMPLES, BATCH_SIZE = 4096, 128
SPARSITY_WEIGHT, DIVERSITY_WEIGHT, SMOOTH_END, SMOOTH_STEPS = 0.01, 0.1, 0.5, 200
NAMES = ("fit", "sparsity", "diversity", "smooth")


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, IN_FEATURES, generator=generator)
    y = torch.tanh(x @ torch.randn(IN_FEATURES, OUT_FEATURES, generator=generator))
    return TensorDataset(x, y)


class _Net(nn.Module):
    """The MLP and its four terms, shared verbatim by both modules."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, OUT_FEATURES),
        )

    def terms(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        prediction = self.body(x)
        return {
            "fit": nn.functional.mse_loss(prediction, y),
            "sparsity": prediction.abs().mean(),
            # Maximized: the spread of the bounded outputs across the batch.
            "diversity": torch.tanh(prediction).std(dim=0).mean(),
            "smooth": self.body[0].weight.pow(2).mean(),
        }


class MixModule(LossMixModule):
    def __init__(self) -> None:
        super().__init__(
            [
                LossTerm("fit"),
                LossTerm("sparsity", weight=SPARSITY_WEIGHT),
                LossTerm("diversity", weight=DIVERSITY_WEIGHT, mode="max"),
                LossTerm("smooth", weight=Linear(0.0, SMOOTH_END, steps=SMOOTH_STEPS)),
            ]
        )
        self.net = _Net()

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        return self.net.terms(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class HandWrittenModule(pl.LightningModule):
    """What one writes without the package: the same terms, weights and logs, by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        losses = self.net.terms(batch)
        weights = {
            "fit": 1.0,
            "sparsity": SPARSITY_WEIGHT,
            "diversity": -DIVERSITY_WEIGHT,
            "smooth": SMOOTH_END * min(self.global_step / SMOOTH_STEPS, 1.0),
        }
        total = losses["fit"] * weights["fit"]
        for name in NAMES[1:]:
            total = total + losses[name] * weights[name]
        self.log("train/loss", total, on_step=True, on_epoch=False, prog_bar=True)
        for name in NAMES:
            self.log(f"train/loss/{name}", losses[name], on_step=True, on_epoch=False)
            self.log(f"train/weight/{name}", weights[name], on_step=True, on_epoch=False)
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _Timer(pl.Callback):
    """The training loop's CPU and wall-clock seconds, and each step's training_step time."""

    def __init__(self) -> None:
        self.step_ns: list[int] = []
        self.batch_ns: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, *args: Any) -> None:
        self.batch_start = time.perf_counter_ns()

    def on_before_backward(self, *args: Any) -> None:
        self.step_ns.append(time.perf_counter_ns() - self.batch_start)

    def on_train_batch_end(self, *args: Any) -> None:
        self.batch_ns.append(time.perf_counter_ns() - self.batch_start)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wall = time.perf_counter() - self.start[0]
        self.cpu = time.process_time() - self.start[1]


@dataclass(frozen=True)
class Run:
    cpu: float  # seconds
    wall: float  # seconds
    step_us: float  # median training_step, microseconds
    batch_us: float  # median whole step, microseconds
    weights: dict[str, Tensor]
    logdir: str


def train(kind: str, steps: int, data: TensorDataset, logdir: str, log_every_n_steps: int) -> Run:
    """Train one module for `steps` steps; return its times, final weights and log folder."""
    gc.collect()
    pl.seed_everything(0, verbose=False)
    model = MixModule() if kind == "LossMixModule" else HandWrittenModule()
    timer = _Timer()
    logger = TensorBoardLogger(logdir, name=kind)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        log_every_n_steps=log_every_n_steps,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(data, BATCH_SIZE, shuffle=True, generator=generator)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == steps == len(timer.step_ns)
    weights = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    step_us = statistics.median(timer.step_ns) / 1e3
    batch_us = statistics.median(timer.batch_ns) / 1e3
    return Run(timer.cpu, timer.wall, step_us, batch_us, weights, logger.log_dir)


def logged_tags(logdir: str) -> set[str]:
    tags: set[str] = set()
    for path in Path(logdir).glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()[SCALARS])
    return tags


def check_same_work(mix: Run, hand: Run) -> None:
    """Raise unless both runs ended with the same weights and logged the same tags."""
    for name, value in mix.weights.items():
        if not torch.allclose(value, hand.weights[name], rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"The two modules trained differently: `{name}` differs.")
    expected = {"train/loss", *(f"train/{k}/{n}" for k in ("loss", "weight") for n in NAMES)}
    tags = {run.logdir: logged_tags(run.logdir) for run in (mix, hand)}
    if not expected <= tags[mix.logdir] == tags[hand.logdir]:
        raise RuntimeError(f"Expected the same tags, including {sorted(expected)}. Found {tags}.")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| round | first | step µs, mix / hand | step ratio | CPU s, mix / hand | CPU ratio "
        "| training_step µs, mix / hand |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mix, hand = row["LossMixModule"], row["LightningModule"]
        lines.append(
            f"| {row['round']} | {row['first']} | {mix.batch_us:.0f} / {hand.batch_us:.0f} "
            f"| {mix.batch_us / hand.batch_us:.3f} | {mix.cpu:.2f} / {hand.cpu:.2f} "
            f"| {mix.cpu / hand.cpu:.3f} | {mix.step_us:.0f} / {hand.step_us:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> float:
    """Run the benchmark; print the table and return the median whole-step time ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed pairs after the warm-up")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=50,
        help="the Trainer's log_every_n_steps (Lightning's default: 50)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 keeps timings stable on a small, shared machine",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 100 steps, for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 100
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (
        "does not have many workers",
        "LeafSpec",
        "smaller than the logging",
        "Skipping val loop",
    ):
        warnings.filterwarnings("ignore", f".*{message}.*")

    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    print(
        f"MLP {IN_FEATURES}-{HIDDEN}-{HIDDEN}-{OUT_FEATURES}, batch {BATCH_SIZE}, 4 terms "
        f"(1 max, 1 scheduled), {args.steps} steps per run, log_every_n_steps="
        f"{args.log_every_n_steps}, {args.rounds} rounds after a warm-up pair\n",
        flush=True,
    )
    data = make_data()
    rows = []
    with tempfile.TemporaryDirectory() as logdir:
        warm = {
            kind: train(kind, args.steps, data, logdir, args.log_every_n_steps) for kind in KINDS
        }
        check_same_work(warm["LossMixModule"], warm["LightningModule"])
        for index in range(args.rounds):
            order = KINDS if index % 2 == 0 else KINDS[::-1]
            row: dict[str, Any] = {"round": index + 1, "first": order[0]}
            for kind in order:
                row[kind] = train(kind, args.steps, data, logdir, args.log_every_n_steps)
            rows.append(row)
            mix, hand = row["LossMixModule"], row["LightningModule"]
            print(
                f"round {index + 1}: step µs {mix.batch_us:.0f} / {hand.batch_us:.0f}, "
                f"CPU s {mix.cpu:.2f} / {hand.cpu:.2f}, "
                f"training_step µs {mix.step_us:.0f} / {hand.step_us:.0f} (mix / hand)",
                flush=True,
            )

    def median(kind: str, field: str) -> float:
        return statistics.median(getattr(row[kind], field) for row in rows)

    def median_ratio(field: str) -> float:
        return statistics.median(
            getattr(row["LossMixModule"], field) / getattr(row["LightningModule"], field)
            for row in rows
        )

    ratio = median_ratio("batch_us")
    ratios = sorted(row["LossMixModule"].batch_us / row["LightningModule"].batch_us for row in rows)
    verdict = "within" if ratio <= TARGET else "ABOVE"
    step = {kind: 1e3 * median(kind, "cpu") / args.steps for kind in KINDS}
    print()
    print(markdown_table(rows))
    print()
    print(
        f"- CPU per optimizer step (median): LossMixModule {step['LossMixModule']:.3f} ms, "
        f"LightningModule {step['LightningModule']:.3f} ms"
    )
    print(
        f"- training_step (median): LossMixModule {median('LossMixModule', 'step_us'):.0f} µs, "
        f"LightningModule {median('LightningModule', 'step_us'):.0f} µs"
    )
    print(f"- median whole-run wall-clock ratio: {median_ratio('wall'):.3f}")
    print(f"- median whole-run CPU-time ratio: {median_ratio('cpu'):.3f}")
    print(
        f"- **median whole-step time ratio: {ratio:.3f}** ({verdict} the target {TARGET}); "
        f"per-round ratios from {ratios[0]:.3f} to {ratios[-1]:.3f}"
    )
    return ratio


if __name__ == "__main__":
    main()
