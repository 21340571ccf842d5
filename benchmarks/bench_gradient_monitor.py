"""What GradientMonitor costs, step by step, against the least a measurement can cost.

Fits of the same model on the same batches run in pairs, in lockstep (`_lockstep.run_lockstep`):
each in its own thread, both pinned to one CPU core, taking one optimizer step each in turn, so
that step ``k`` of both is timed within milliseconds of the other, in the same speed regime of
the machine. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (with a
device sync on CUDA). The fits:

- ``without``: no monitor;
- ``with``: ``GradientMonitor(every_n_steps=5)`` (many measured steps to take a median of);
- ``loop``: no monitor; on the steps the monitor measures, ``compute_losses`` also calls
  ``functional.term_gradients(terms, parameters)``: one ``torch.autograd.grad`` per term
  restricted to the monitored parameters, where the monitor computes them (after the forward,
  before the backward). This is the limit: the least a measurement can cost;
- ``batched``: the same with ``batched=True`` (one backward with ``is_grads_batched=True``).

Each run takes three pairs: ``loop`` and ``with``, ``without`` and ``loop``, ``loop`` and
``batched``. From the paired steps (the first 20 left out as warm-up; the monitor's
``batched="auto"`` times both forms there), with ``added`` = the median over measured steps of
the difference of the two fits, minus its median over unmeasured steps:

- limit: ``added(loop, without)``; batched: the limit plus ``added(batched, loop)``;
- extra, what a measurement adds to a normal step with the monitor: the limit plus
  ``added(with, loop)``, the monitor's own cost beyond the limit. Both come from the same pair
  as their reference, and the monitor's own cost is small, so extra / limit barely moves when
  the machine's speed drifts between pairs;
- hook: the median over unmeasured steps of ``with / loop`` (``loop`` is a fit without the
  monitor there): what the hook costs on a normal step;
- the overhead at the model's cadence ``N`` (50 for ``bench``, 100 for ``compute``):
  ``hook + extra / (N * normal)``, i.e. ``(N * normal_with + extra) / (N * normal_without)``.

Pairs, not one lockstep of all the fits: the harness alternates the order of the fits each
cycle, so that the first and the last fit run twice in a row at the turn (warm caches) and the
middle ones never do; four identical fits measured 1.000, 1.010, 1.012 and 0.995.

The runs are repeated; the table gives the median over runs and the lowest and highest run.
Models: ``bench`` (a 64-256-256 trunk and three heads, 4 terms, batch 64) and ``compute``
(a 256-1024-1024-1024 trunk, 4 terms, batch 256: the backward dominates). Every fit logs to
TensorBoard (``--logger none``: no logger). Steps are timed by the wall clock; ``--clock thread``
times them by the CPU time of the fit's thread, which another process on the core does not
inflate. Memory: the buffer holds ``T x`` (monitored elements) floats; on CUDA the peak
(``torch.cuda.max_memory_allocated``) of a fit without the monitor and one measuring every
step is measured too, each fit alone.

    python benchmarks/bench_gradient_monitor.py                 # about 7 minutes
    python benchmarks/bench_gradient_monitor.py --quick         # a smoke run
    python benchmarks/bench_gradient_monitor.py --accelerator cuda
    python benchmarks/bench_gradient_monitor.py --models bench --runs 5
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from _lockstep import StepClock, run_lockstep
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix._compat import batches_that_stepped
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.functional import term_gradients

TERMS = (
    LossTerm("recon"),
    LossTerm("label", weight=2.0),
    LossTerm("sparsity", weight=0.01),
    LossTerm("spread", weight=0.1, mode="max"),
)
EVERY = 5  # the cadence of the timed runs: many measured steps to take a median of
WARM_UP = 20
BATCHES = 50  # the data set: this many batches, repeated over epochs


class FourTerms(LossMixModule):
    """A trunk shared by four terms, with a head each.

    Args:
        probe: None, or on the steps a monitor would measure, compute the terms' gradients
            with `term_gradients` (``"loop"`` or ``"batched"``) after the forward.
    """

    def __init__(
        self, inputs: int = 64, width: int = 256, depth: int = 2, probe: str | None = None
    ) -> None:
        super().__init__(TERMS)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.recon_head = nn.Linear(width, inputs)
        self.label_head = nn.Linear(width, 10)
        self.head = nn.Linear(width, 1)
        self.probe = probe

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        losses = {
            "recon": nn.functional.mse_loss(self.recon_head(h), x),
            "label": nn.functional.cross_entropy(self.label_head(h), y),
            "sparsity": h.abs().mean(),
            "spread": torch.tanh(self.head(h)).std(),
        }
        if self.probe is not None and measured_step(self.trainer):
            params = [p for p in self.parameters() if p.requires_grad]
            term_gradients(list(losses.values()), params, batched=self.probe == "batched")
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def measured_step(trainer: pl.Trainer) -> bool:
    """Whether `GradientMonitor(every_n_steps=EVERY)` measures the step being trained."""
    return (batches_that_stepped(trainer) + 1) % EVERY == 0


MODELS: dict[str, dict[str, int]] = {
    "bench": {"inputs": 64, "width": 256, "depth": 2, "batch": 64, "cadence": 50, "steps": 1000},
    "compute": {
        "inputs": 256,
        "width": 1024,
        "depth": 3,
        "batch": 256,
        "cadence": 100,
        "steps": 300,
    },
}


def build(spec: Mapping[str, int], probe: str | None = None) -> FourTerms:
    torch.manual_seed(0)
    return FourTerms(spec["inputs"], spec["width"], spec["depth"], probe)


def make_data(spec: Mapping[str, int]) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    n = spec["batch"] * BATCHES
    x = torch.randn(n, spec["inputs"], generator=generator)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=generator))


def trainer(accelerator: str, steps: int, logger: Any, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


@dataclass(frozen=True)
class Run:
    """One lockstep run of the four fits: the figures of the table."""

    normal: float  # seconds: the median unmeasured step without the monitor
    hook: float  # the median paired ratio with / without over unmeasured steps
    extra: float  # seconds a measurement adds to a normal step with the monitor
    limit: float  # seconds: T restricted backward passes, in the fit
    batched: float  # seconds: the batched form, in the fit

    def overhead(self, cadence: int) -> float:
        """A fit's time at this cadence over its time without the monitor."""
        return self.hook + self.extra / (cadence * self.normal)


def added(times: Sequence[float], base: Sequence[float], flags: Sequence[bool]) -> float:
    """Median (times - base) over measured steps, less its median over unmeasured ones."""
    measured = [a - b for a, b, m in zip(times, base, flags, strict=True) if m]
    normal = [a - b for a, b, m in zip(times, base, flags, strict=True) if not m]
    return statistics.median(measured) - statistics.median(normal)


class ThreadClock(pl.Callback):
    """The CPU time of the fit's thread per step, batch start to batch end (``--clock thread``).

    Unlike the wall clock it leaves out the time the core spends on other processes, so it
    stays readable on a shared machine; it also leaves out other threads' work (TensorBoard's
    writer thread) and the GPU's.
    """

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, b: Any, i: int) -> None:
        self._start = time.thread_time()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, o: Any, b: Any, i: int) -> None:
        self.steps.append(time.thread_time() - self._start)


def paired(
    spec: Mapping[str, int],
    steps: int,
    accelerator: str,
    logdir: str | None,
    kinds: tuple[str, str],
    clock: str = "wall",
) -> tuple[list[float], list[float], list[bool], GradientMonitor | None]:
    """Train two fits (`kinds`: ``without``, ``with``, ``loop``, ``batched``) in lockstep.

    Returns:
        each fit's step times, whether each step is measured, the monitor (if one ran).
    """
    probes = {"without": None, "with": None, "loop": "loop", "batched": "batched"}
    models = [build(spec, probes[kind]) for kind in kinds]  # here: the threads share the RNG
    monitor = GradientMonitor(every_n_steps=EVERY, summary=False) if "with" in kinds else None
    data = make_data(spec)
    threads = [ThreadClock(), ThreadClock()]

    def fit(index: int) -> Callable[[StepClock], None]:
        def go(clock: StepClock) -> None:
            logger = TensorBoardLogger(logdir, name=kinds[index]) if logdir else False
            callbacks: list[pl.Callback] = [clock, threads[index]]  # then the monitor
            callbacks += [monitor] if monitor and kinds[index] == "with" else []
            generator = torch.Generator().manual_seed(0)
            loader = DataLoader(data, spec["batch"], shuffle=True, generator=generator)
            trainer(accelerator, steps, logger, callbacks).fit(models[index], loader)

        return go

    flags = [
        monitor.is_measured_step if monitor is not None and kind == "with" else measured_step
        for kind in kinds
    ]
    clocks = run_lockstep([fit(0), fit(1)], measured=flags)
    first, second = ([s for s, _ in clock.steps][WARM_UP:] for clock in clocks)
    if clock == "thread":
        first, second = (thread.steps[WARM_UP:] for thread in threads)
    measured, other = ([m for _, m in clock.steps] for clock in clocks)
    if measured != other:
        raise RuntimeError(f"The fits {kinds} measured different steps.")
    return first, second, measured[WARM_UP:], monitor
    return first, second, flags, monitor


def run(
    spec: Mapping[str, int], steps: int, accelerator: str, logdir: str | None, clock: str
) -> tuple[Run, GradientMonitor | None]:
    """One run: the three pairs; return the run's figures and the monitor."""
    # The monitor against the limit: on unmeasured steps the `loop` fit is a fit without the
    # monitor (the hook), on measured ones the difference is what the monitor adds to the
    # limit: small, so that its drift between pairs barely moves extra / limit.
    loop, with_monitor, flags, monitor = paired(
        spec, steps, accelerator, logdir, ("loop", "with"), clock
    )
    unmeasured = [(a, b) for a, b, m in zip(with_monitor, loop, flags, strict=True) if not m]
    without, probed, probe_flags, _ = paired(
        spec, steps, accelerator, logdir, ("without", "loop"), clock
    )
    limit = added(probed, without, probe_flags)
    loop_b, batched, batched_flags, _ = paired(
        spec, steps, accelerator, logdir, ("loop", "batched"), clock
    )
    result = Run(
        normal=statistics.median(b for b, m in zip(without, probe_flags, strict=True) if not m),
        hook=statistics.median(a / b for a, b in unmeasured),
        extra=limit + added(with_monitor, loop, flags),
        limit=limit,
        batched=limit + added(batched, loop_b, batched_flags),
    )
    return result, monitor


def peak_mib(spec: Mapping[str, int], every: int | None) -> float:
    """The peak CUDA memory of a short fit alone, with a monitor measuring every `every` steps."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    monitor = [] if every is None else [GradientMonitor(every_n_steps=every, summary=False)]
    model, data = build(spec), make_data(spec)

    def go(clock: StepClock) -> None:
        loader = DataLoader(data, spec["batch"])
        trainer("cuda", 10, False, [clock, *monitor]).fit(model, loader)

    run_lockstep([go])
    return float(torch.cuda.max_memory_allocated()) / 2**20


def spread_of(values: Sequence[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def row(name: str, spec: Mapping[str, int], runs: Sequence[Run]) -> str:
    cadence = spec["cadence"]
    numel = sum(p.numel() for p in build(spec).parameters())
    buffer_mib = len(TERMS) * numel * 4 / 2**20

    def median(field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    return (
        f"| {name} | {cadence} | {median('normal') * 1e3:.2f} "
        f"| {spread_of([r.hook for r in runs], 3)} | {median('extra') * 1e3:.2f} "
        f"| {median('limit') * 1e3:.2f} | {median('batched') * 1e3:.2f} "
        f"| {spread_of([r.extra / r.limit for r in runs], 2)} "
        f"| {spread_of([r.overhead(cadence) for r in runs], 3)} | {buffer_mib:.1f} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="lockstep runs per model")
    parser.add_argument(
        "--steps", type=int, help="steps per run (default: 1000 bench, 300 compute)"
    )
    parser.add_argument("--models", default="bench,compute")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run of 60 steps")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or cuda for the GPU figures")
    parser.add_argument("--logger", choices=("tensorboard", "none"), default="tensorboard")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="time steps by the wall clock, or by the CPU time of the fit's thread (CPU only: "
        "steadier on a machine shared with other processes)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps = 1, 60
    if args.clock == "thread" and args.accelerator != "cpu":
        parser.error("--clock thread times the CPU only; use the wall clock on a GPU")
    if args.accelerator == "cpu":
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if args.accelerator == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, Python "
        f"{platform.python_version()}, {device}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s), each pair of fits pinned to one core, "
        f"{args.runs} lockstep run(s), measured every {EVERY} steps, logger: {args.logger}, "
        f"{args.clock} clock",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        steps = args.steps or spec["steps"]
        runs = []
        for index in range(args.runs):
            with tempfile.TemporaryDirectory() as logdir:
                logs = logdir if args.logger != "none" else None
                result, monitor = run(spec, steps, args.accelerator, logs, args.clock)
            runs.append(result)
            engine = monitor._engine if monitor else None  # the form "auto" kept
            chosen = {None: "?", True: "batched", False: "loop"}[engine.chosen if engine else None]
            print(
                f"{name} run {index + 1} ({steps} steps): normal {result.normal * 1e3:.2f} ms, "
                f"hook {result.hook:.3f}, extra {result.extra * 1e3:.2f} ms, limit "
                f"{result.limit * 1e3:.2f} ms, batched {result.batched * 1e3:.2f} ms, "
                f"extra / limit {result.extra / result.limit:.3f}, overhead at "
                f"{spec['cadence']}: {result.overhead(spec['cadence']):.4f}, "
                f"the monitor chose the {chosen} form",
                flush=True,
            )
        rows.append(row(name, spec, runs))
        if args.accelerator == "cuda":
            without, measuring = peak_mib(spec, None), peak_mib(spec, 1)
            rows.append(
                f"|   | peak CUDA memory: {without:.0f} MiB without, {measuring:.0f} MiB with "
                "a measurement every step |"
            )
    print()
    print(
        "| model | cadence | normal step (ms) | hook on normal steps | measured step extra (ms) "
        "| limit: T restricted backward (ms) | batched (ms) | extra / limit | overhead at the "
        "cadence | buffer (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
