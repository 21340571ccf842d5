"""GPU check: GradientMonitor on CUDA in 32-true, 16-mixed and bf16-mixed, eager and compiled.

For each set-up it runs a short ``Trainer.fit`` with the monitor and checks:

- the figures against a reference computed by hand with ``torch.autograd.grad`` on the same
  batch and parameters: in float64 for 32-true; for mixed precision, on the same autocast
  forward, scaled by the GradScaler's scale of that step and unscaled in float64 (the monitor
  must unscale exactly);
- that training is bit-identical with and without the monitor.

Then it runs both benchmarks on CUDA and prints one markdown table. Without CUDA it says so
and exits cleanly.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --skip-benchmarks
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor

HERE = Path(__file__).parent
TERMS = (LossTerm("fit"), LossTerm("aux", weight=3.0), LossTerm("bounded", weight=0.5, mode="max"))
WEIGHTS = {"fit": 1.0, "aux": 3.0, "bounded": 0.5}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


class ThreeTerms(LossMixModule):
    def __init__(self) -> None:
        super().__init__(TERMS)
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 1)
        self.aux_head = nn.Linear(64, 4)

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        hidden = self.encoder(x)
        prediction = self.head(hidden).squeeze(-1)
        return {
            "fit": ((prediction.float() - y) ** 2).mean(),
            "aux": self.aux_head(hidden).float().pow(2).mean(),
            "bounded": torch.tanh(prediction.float()).mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Capture(pl.Callback):
    """The batch and the weights before the last optimizer step."""

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.batch = batch
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale = float(scaler.get_scale()) if scaler is not None else 1.0


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=32)


def fit(precision: str, compiled: bool, monitor: bool) -> tuple[ThreeTerms, Any, Capture]:
    pl.seed_everything(0, verbose=False)
    model = ThreeTerms()
    if compiled:
        model.encoder = torch.compile(model.encoder)  # type: ignore[assignment]
    gradient_monitor = GradientMonitor(every_n_steps=4, summary=False) if monitor else None
    capture = Capture()
    callbacks: list[pl.Callback] = [capture] + ([gradient_monitor] if gradient_monitor else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            accelerator="cuda",
            devices=1,
            precision=precision,  # type: ignore[arg-type]
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        ).fit(model, loader())
    return model, gradient_monitor, capture


def reference(precision: str, capture: Capture) -> dict[str, float]:
    """Each term's weighted gradient norm on all parameters, by hand."""
    model = ThreeTerms().cuda()
    model.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in capture.state.items()})
    batch = [t.cuda() for t in capture.batch]
    if precision == "32-true":
        model = model.double()
        batch = [t.double() for t in batch]
        losses = model.compute_losses(batch, 0)
    else:
        dtype = torch.half if precision == "16-mixed" else torch.bfloat16
        with torch.autocast("cuda", dtype=dtype):
            losses = model.compute_losses(batch, 0)
    params = list(model.parameters())
    figures = {}
    for name, weight in WEIGHTS.items():
        # Scaled like the GradScaler's backward (half-precision gradients underflow without
        # it), then unscaled in float64.
        value = losses[name] * capture.scale
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([g.double().flatten() for g in grads if g is not None])
        norm = flat.norm().item() / capture.scale
        figures[f"grad_magnitude/all/{name}"] = weight * norm
    return figures


def check(precision: str, compiled: bool) -> dict[str, Any]:
    with_monitor, monitor, capture = fit(precision, compiled, monitor=True)
    without, _, _ = fit(precision, compiled, monitor=False)
    identical = all(
        torch.equal(a, b)
        for a, b in zip(with_monitor.parameters(), without.parameters(), strict=True)
    )
    expected = reference(precision, capture)
    errors = [abs(monitor.last_metrics[tag] / value - 1) for tag, value in expected.items()]
    return {"identical": identical, "max_rel_error": max(errors)}


def benchmark(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return f"{script} failed: {result.stderr[-500:]}"
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith("|")]
    return "\n".join(table or lines[-8:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-benchmarks", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to check here. Run this on a machine with a GPU.")
        return 0
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| precision | torch.compile | figures: max relative error | bit-identical training |")
    print("| --- | --- | --- | --- |")
    failed = False
    for precision in PRECISIONS:
        for compiled in (False, True):
            try:
                result = check(precision, compiled)
            except Exception as error:  # report every set-up, then fail
                print(f"| {precision} | {compiled} | error: {type(error).__name__}: {error} | |")
                failed = True
                continue
            ok = result["max_rel_error"] <= 1e-5 and result["identical"]
            failed = failed or not ok
            print(
                f"| {precision} | {compiled} | {result['max_rel_error']:.1e} "
                f"| {result['identical']} |"
            )
    if not args.skip_benchmarks:
        print()
        print(benchmark("bench_gradient_monitor.py", "--accelerator", "cuda"))
        print()
        print(benchmark("bench_module_overhead.py", "--quick"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
