"""What does a balancer cost per step over fixed weights? Per-step paired ratios, in lockstep.

The same `LossMixModule` (a shared MLP trunk, three heads, three terms) trains with fixed
weights and with each balancer of `lightning_lossmix.balancing` at its defaults, on the same
random data, as users run it: a full ``Trainer.fit`` with Lightning's default
``log_every_n_steps=50``, no progress bar or checkpointing. A further fit, ``floor``, trains
with fixed weights and also runs the three bare ``torch.autograd.grad`` calls of each term to
the trunk's last layer (weight and bias) that a gradient-based balancer needs, and nothing else:
the cost no implementation of `GradientBalance` can go below. Two more, ``uw_by_hand`` and
``rlw_by_hand``, write uncertainty weighting and random weighting out in ``compute_losses``
(a learnable ``log_vars`` in the model; ``3 * softmax(randn(3))`` at each step) and train with
fixed weights: what each method costs by itself, without the package.

All the fits run in one lockstep run (`_lockstep.run_lockstep`): each in its own thread, all
pinned to one CPU core, taking one optimizer step each in turn, so that step ``k`` of every fit
is timed within a few tens of milliseconds of the others, in the same speed regime of the
machine. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, the
terms, balancing, logging, backward, the optimizer step). Per fit, the verdict is the median
over steps of the ratio of its time to the fixed-weights fit's time at the same step (the
first 20 steps of warm-up left out); the spread is the lowest and highest median over 5 blocks
of consecutive steps. Several lockstep runs give the median of their medians.

Targets (issue 9): `GradientBalance` on the last shared layer, every step: at most 1.05;
`UncertaintyWeighting`, `DWA` and `RandomLossWeighting`: at most 1.02; `GradNorm` and `FAMO`
are reported.

    python benchmarks/bench_balancing.py                 # 3 runs of 800 steps, ~4 min
    python benchmarks/bench_balancing.py --quick         # 1 run of 60 steps, a smoke run
    python benchmarks/bench_balancing.py --only GradientBalance GradNorm --hidden 1024
    python benchmarks/bench_balancing.py --phases --runs 1     # also time the pieces of a step
    python benchmarks/bench_balancing.py --accelerator cuda --runs 1 --steps 300
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

import lightning
import lightning.pytorch as pl
import torch
from _lockstep import PhaseTimer, StepClock, paired_ratios, run_lockstep, spread
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixModule, LossTerm
from lightning_lossmix._train_log import TrainLog
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

IN_FEATURES, N_SAMPLES, BATCH_SIZE, WARM_UP = 64, 4096, 128, 20
#: Each balancer, and its target ratio (None: reported only).
BALANCERS: dict[str, tuple[Callable[[], Balancer], float | None]] = {
    "GradientBalance": (GradientBalance, 1.05),
    "UncertaintyWeighting": (UncertaintyWeighting, 1.02),
    "DWA": (DWA, 1.02),
    "RandomLossWeighting": (RandomLossWeighting, 1.02),
    "GradNorm": (GradNorm, None),
    "FAMO": (FAMO, None),
}
FIXED, FLOOR, PADS = "fixed", "floor", ("pad_first", "pad_last")
#: Uncertainty weighting and random weighting written out in `compute_losses`, with fixed
#: weights: what the method costs by itself, without the package.
BY_HAND = {"uw_by_hand": "UncertaintyWeighting", "rlw_by_hand": "RandomLossWeighting"}


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, IN_FEATURES, generator=generator)
    return TensorDataset(x, (x[:, :8].sum(1) > 0).long())


@dataclass(frozen=True)
class Shape:
    """The trunk: `depth` linear layers of width `hidden`, each followed by a ReLU."""

    hidden: int = 256
    depth: int = 2


class MultiTask(LossMixModule):
    """A trunk and three heads; three positive terms of different scales.

    Args:
        balancer: the balancer, or None for fixed weights.
        shape: the trunk's width and depth.
        floor: also differentiate each term alone to the trunk's last layer (the floor fit).
        by_hand: a key of `BY_HAND`: weight the terms by that method, written out here.
    """

    def __init__(
        self, balancer: Balancer | None, shape: Shape, floor: bool = False, by_hand: str = ""
    ) -> None:
        super().__init__(
            [LossTerm("label"), LossTerm("recon"), LossTerm("size")], balancer=balancer
        )
        hidden = shape.hidden
        layers: list[nn.Module] = []
        for index in range(shape.depth):
            layers += [nn.Linear(IN_FEATURES if index == 0 else hidden, hidden), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.label_head = nn.Linear(hidden, 2)
        self.recon_head = nn.Linear(hidden, IN_FEATURES)
        self.size_head = nn.Linear(hidden, 1)
        self.floor = floor
        self.by_hand = by_hand
        if by_hand == "uw_by_hand":
            self.log_vars = nn.Parameter(torch.zeros(3))

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        features = self.trunk(x)
        losses = {
            "label": nn.functional.cross_entropy(self.label_head(features), y),
            "recon": (self.recon_head(features) - x).pow(2).sum(1).mean(),
            "size": (self.size_head(features).squeeze(1) - x.norm(dim=1)).pow(2).mean() + 0.1,
        }
        if self.floor:  # what GradientBalance must compute at least, and nothing more
            layer = list(self.trunk[-2].parameters())
            for value in losses.values():
                torch.autograd.grad(value, layer, retain_graph=True)
        if self.by_hand == "uw_by_hand":  # Kendall et al.: exp(-s) * L + s
            stacked = torch.stack(list(losses.values()))
            weighted = torch.exp(-self.log_vars) * stacked + self.log_vars
            return dict(zip(losses, weighted.unbind(), strict=True))
        if self.by_hand == "rlw_by_hand":  # Lin et al.: K * softmax(N(0, I)), each step
            weights = 3 * torch.softmax(torch.randn(3), dim=0)
            return {n: w * v for (n, v), w in zip(losses.items(), weights.unbind(), strict=True)}
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def lockstep_run(
    names: Sequence[str],
    steps: int,
    shape: Shape,
    data: TensorDataset,
    logdir: str,
    accelerator: str = "cpu",
) -> dict[str, list[float]]:
    """Train every fit in `names` for `steps` steps in lockstep; return their step times."""
    models = {}
    for name in names:  # built here, in one thread, each from the same seed
        pl.seed_everything(0, verbose=False)
        balancer = BALANCERS[name][0]() if name in BALANCERS else None
        by_hand = name if name in BY_HAND else ""
        models[name] = MultiTask(balancer, shape, floor=name == FLOOR, by_hand=by_hand)

    def fit(name: str) -> Callable[[StepClock], None]:
        def go(clock: StepClock) -> None:
            PhaseTimer.fit_name(name)
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=1,
                max_steps=steps,
                logger=TensorBoardLogger(logdir, name=name),
                log_every_n_steps=50,  # Lightning's default
                callbacks=[clock],
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            )
            generator = torch.Generator().manual_seed(0)
            loader = DataLoader(data, BATCH_SIZE, shuffle=True, generator=generator)
            trainer.fit(models[name], train_dataloaders=loader)
            assert trainer.global_step == steps

        return go

    clocks = run_lockstep([fit(name) for name in names])
    for name in names:  # DWA moves after two intervals of 100 steps
        balancer = models[name].loss_mix.balancer
        if balancer is None or (isinstance(balancer, DWA) and steps <= 200):
            continue
        if torch.equal(balancer.last_multipliers.cpu(), torch.ones(3)):
            raise RuntimeError(f"{name} did not balance: its multipliers stayed at 1.")
    return {
        name: [s for s, _ in clock.steps][WARM_UP:]
        for name, clock in zip(names, clocks, strict=True)
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print the table and return each fit's median ratio to fixed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="lockstep runs")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--hidden", type=int, default=256, help="the trunk's width")
    parser.add_argument("--depth", type=int, default=2, help="the trunk's linear layers")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 run of 60 steps")
    parser.add_argument("--accelerator", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", nargs="*", choices=list(BALANCERS), help="these balancers")
    parser.add_argument("--no-floor", action="store_true", help="leave the floor fit out")
    parser.add_argument(
        "--no-by-hand", action="store_true", help="leave out the methods written by hand"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time the LossMix call, the balancer's part of it and the logging (adds about "
        "a microsecond per timed call to every fit)",
    )
    args = parser.parse_args(argv)
    runs, steps = (1, 60) if args.quick else (args.runs, args.steps)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    balancers = args.only or list(BALANCERS)
    by_hand = [] if args.no_by_hand else [k for k, v in BY_HAND.items() if v in balancers]
    fits = [FIXED, *balancers, *([] if args.no_floor else [FLOOR]), *by_hand]
    shape = Shape(args.hidden, args.depth)
    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, "
        f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{torch.cuda.get_device_name() if args.accelerator == 'cuda' else 'CPU'} training, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s), all fits pinned "
        f"to one core; trunk of {args.depth} linear layers {IN_FEATURES}-{args.hidden}"
        f"{f'-{args.hidden}' * (args.depth - 1)}, three heads, batch {BATCH_SIZE}; "
        f"{len(fits) + 2} fits in lockstep (two pads), {runs} run(s) of {steps} steps",
        flush=True,
    )
    data = make_data()
    measured_fits = fits[1:]
    per_run: dict[str, list[float]] = {name: [] for name in measured_fits}
    spreads: dict[str, list[tuple[float, float]]] = {name: [] for name in measured_fits}
    times: dict[str, list[float]] = {name: [] for name in fits}
    timer = PhaseTimer(PHASES if args.phases else {})
    with tempfile.TemporaryDirectory() as logdir, timer:
        for index in range(runs):
            turn = index % len(fits)  # each run puts the fits in another order
            names = [PADS[0], *fits[turn:], *fits[:turn], PADS[1]]
            measured = lockstep_run(names, steps, shape, data, logdir, args.accelerator)
            for name in fits:
                times[name].append(statistics.median(measured[name]) * 1e6)
            for name in measured_fits:
                ratios = paired_ratios(measured[name], measured[FIXED])
                per_run[name].append(statistics.median(ratios))
                spreads[name].append(spread(ratios))
            cells = ", ".join(f"{name} {per_run[name][-1]:.3f}" for name in measured_fits)
            print(f"run {index + 1}: {cells}", flush=True)
    print()
    print(
        "| fit | median step µs | median paired ratio to fixed "
        "| per run (spread over 5 blocks) | target |"
    )
    print("|---|---:|---:|---|---:|")
    print(f"| fixed weights | {statistics.median(times[FIXED]):.0f} | 1 | | |")
    result: dict[str, float] = {}
    for name in measured_fits:
        ratio = result[name] = statistics.median(per_run[name])
        target = BALANCERS[name][1] if name in BALANCERS else None
        verdict = "-" if target is None else f"{target} ({'met' if ratio <= target else 'MISSED'})"
        runs_text = ", ".join(
            f"{r:.3f} ({low:.3f}-{high:.3f})"
            for r, (low, high) in zip(per_run[name], spreads[name], strict=True)
        )
        label = (
            "bare autograd.grad x3 (floor)"
            if name == FLOOR
            else f"`{BY_HAND[name]}` by hand, fixed weights"
            if name in BY_HAND
            else f"`{name}`"
        )
        us = statistics.median(times[name])
        print(f"| {label} | {us:.0f} | **{ratio:.3f}** | {runs_text} | {verdict} |")
    if args.phases:
        print_phases(timer, fits)
    return result


#: What `--phases` times: `LossMixModule.mix` holds the others (the LossMix call, in which the
#: balancer's decision and multipliers are, then the logging).
PHASES: dict[str, tuple[type, str]] = {
    "mix()": (LossMixModule, "mix"),
    "LossMix call": (LossMix, "forward"),
    "balancer": (Balancer, "_current"),
    "logging": (TrainLog, "log"),
}


def print_phases(timer: PhaseTimer, fits: Sequence[str]) -> None:
    """Print the median µs of each timed phase per fit (warm-up calls left out)."""
    print()
    print("| fit | " + " | ".join(f"{label} µs" for label in PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for name in fits:
        cells = [timer.median_us(name, label, skip=WARM_UP) for label in PHASES]
        shown = " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
        print(f"| {name} | {shown} |")


if __name__ == "__main__":
    main()
