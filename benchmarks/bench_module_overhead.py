"""What does LossMixModule cost over a hand-written LightningModule? Target: a median ratio <= 1.02.

The modules train the same MLP on the same random data with the same four terms (one
maximized, one with a scheduled weight) and log the same tags: ``train/loss`` (on the progress
bar), ``train/loss/<term>`` and ``train/weight/<term>``. One is a `LossMixModule`; the others
compute the weights and the signed sum by hand, with none of the package's checks:
``LightningModule`` logs every tag with ``self.log``, as one writes it by hand;
``LightningModule, weights direct`` writes the weights straight to the loggers on the steps
Lightning writes, as `LossMixModule` does, so that the ratio to it is the cost of the package's
checks and layers alone. Each is a full ``Trainer.fit`` with a TensorBoardLogger, as users run
it, without progress bar or checkpointing.

The three fits run in lockstep (`_lockstep.run_lockstep`): each in its own thread, all pinned to
one CPU core, taking one optimizer step each in turn (in a new random order every cycle), so
that step ``k`` of all is timed within a few milliseconds, in the same speed regime of the
machine. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, the
terms, their assembly and checks, logging, backward, the non-finite gradient check and the
optimizer step). Per run, a ratio is the median over steps of the ratio of two modules' times
at the same step (the first 20 steps of warm-up left out); its spread is the lowest and highest
median over 5 blocks of consecutive steps. The runs are repeated; the first checks that the
modules ended with the same weights and logged the same tags (so that they did the same work).

    python benchmarks/bench_module_overhead.py              # 5 runs of 1500 steps, ~3 min
    python benchmarks/bench_module_overhead.py --quick      # 2 runs of 100 steps, ~15 s
    python benchmarks/bench_module_overhead.py --runs 9 --steps 3000
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from _lockstep import StepClock, paired_ratios, run_lockstep, spread
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.schedules import Linear

TARGET = 1.02
KINDS = ("LossMixModule", "LightningModule", "LightningModule, weights direct")
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


class HandWrittenDirect(HandWrittenModule):
    """The same, with the weights written straight to the loggers when Lightning writes."""

    def log(self, name: str, value: object, *args: object, **kwargs: object) -> None:
        if not name.startswith("train/weight/"):
            super().log(name, value, *args, **kwargs)  # type: ignore[arg-type]
            return
        every = self.trainer.log_every_n_steps
        if (self.global_step + 1) % every == 0:
            for logger in self.trainer.loggers:
                logger.log_metrics({name: float(value)}, step=self.global_step)  # type: ignore[arg-type]


WARM_UP = 20


@dataclass(frozen=True)
class Run:
    """One lockstep run: each module's step times, and what it ended with."""

    times: dict[str, list[float]]
    weights: dict[str, dict[str, Tensor]]
    logdirs: dict[str, str]

    def ratios(self, baseline: str) -> list[float]:
        """The per-step ratios of LossMixModule's times to `baseline`'s."""
        return paired_ratios(self.times["LossMixModule"], self.times[baseline])


def build(kind: str) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    classes = dict(zip(KINDS, (MixModule, HandWrittenModule, HandWrittenDirect), strict=True))
    return classes[kind]()


def run(steps: int, data: TensorDataset, logdir: str, log_every_n_steps: int) -> Run:
    """Train the modules for `steps` steps in lockstep; return their step times and ends."""
    models = {kind: build(kind) for kind in KINDS}  # built here: the threads share the RNG
    logdirs: dict[str, str] = {}

    def fit(kind: str) -> Callable[[StepClock], None]:
        def go(clock: StepClock) -> None:
            logger = TensorBoardLogger(logdir, name=kind.replace(", ", "_").replace(" ", "_"))
            logdirs[kind] = logger.log_dir
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=steps,
                logger=logger,
                log_every_n_steps=log_every_n_steps,
                callbacks=[clock],
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            )
            generator = torch.Generator().manual_seed(0)
            loader = DataLoader(data, BATCH_SIZE, shuffle=True, generator=generator)
            trainer.fit(models[kind], train_dataloaders=loader)
            assert trainer.global_step == steps

        return go

    clocks = run_lockstep([fit(kind) for kind in KINDS])
    times = {
        kind: [s for s, _ in clock.steps][WARM_UP:]
        for kind, clock in zip(KINDS, clocks, strict=True)
    }
    weights = {
        kind: {k: v.detach().clone() for k, v in model.net.state_dict().items()}  # type: ignore[union-attr]
        for kind, model in models.items()
    }
    return Run(times, weights, logdirs)


def logged_tags(logdir: str) -> set[str]:
    tags: set[str] = set()
    for path in Path(logdir).glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()[SCALARS])
    return tags


def check_same_work(result: Run) -> None:
    """Raise unless the modules ended with the same weights and logged the same tags."""
    mix = result.weights[KINDS[0]]
    for kind in KINDS[1:]:
        for name, value in mix.items():
            if not torch.allclose(value, result.weights[kind][name], rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{kind} trained differently: `{name}` differs.")
    expected = {"train/loss", *(f"train/{k}/{n}" for k in ("loss", "weight") for n in NAMES)}
    tags = {kind: logged_tags(result.logdirs[kind]) for kind in KINDS}
    if not all(expected <= tags[kind] == tags[KINDS[0]] for kind in KINDS):
        raise RuntimeError(f"Expected the same tags, including {sorted(expected)}. Found {tags}.")


def main(argv: Sequence[str] | None = None) -> float:
    """Run the benchmark; print the table and return the median per-step time ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="lockstep runs")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
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
    parser.add_argument("--quick", action="store_true", help="2 runs of 100 steps, for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps = 2, 100
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
        f"{torch.get_num_threads()} torch thread(s), both fits pinned to one core"
    )
    print(
        f"MLP {IN_FEATURES}-{HIDDEN}-{HIDDEN}-{OUT_FEATURES}, batch {BATCH_SIZE}, 4 terms "
        f"(1 max, 1 scheduled), {args.steps} steps per run, log_every_n_steps="
        f"{args.log_every_n_steps}, {args.runs} lockstep runs\n",
        flush=True,
    )
    data = make_data()
    baselines = KINDS[1:]
    lines = [
        "| run | median step µs, mix / hand / hand direct | ratio to hand | its spread "
        "| ratio to hand direct | its spread |",
        "|---:|---:|---:|---|---:|---|",
    ]
    medians: dict[str, list[float]] = {kind: [] for kind in baselines}
    with tempfile.TemporaryDirectory() as logdir:
        for index in range(args.runs):
            result = run(args.steps, data, logdir, args.log_every_n_steps)
            if index == 0:
                check_same_work(result)
            step_us = " / ".join(f"{statistics.median(result.times[k]) * 1e6:.0f}" for k in KINDS)
            cells = [f"{index + 1}", step_us]
            for kind in baselines:
                ratios = result.ratios(kind)
                medians[kind].append(statistics.median(ratios))
                low, high = spread(ratios)
                cells += [f"{medians[kind][-1]:.3f}", f"{low:.3f} to {high:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    ratio = statistics.median(medians[KINDS[1]])
    verdict = "within" if ratio <= TARGET else "ABOVE"
    direct = medians[KINDS[2]]
    print()
    print("\n".join(lines))
    print()
    print(
        f"- **median per-step time ratio to the hand-written module: {ratio:.3f}** ({verdict} "
        f"the target {TARGET}); runs from {min(medians[KINDS[1]]):.3f} to "
        f"{max(medians[KINDS[1]]):.3f}"
    )
    print(
        f"- to the hand-written module that writes its weights the package's way: "
        f"{statistics.median(direct):.3f} (runs from {min(direct):.3f} to {max(direct):.3f}): "
        "the package's checks and layers alone"
    )
    return ratio


if __name__ == "__main__":
    main()
