"""GPU check: GradientMonitor and GradientBalance on CUDA in 32-true, 16-mixed and bf16-mixed,
eager and compiled.

For each set-up it runs short ``Trainer.fit`` calls and checks:

- the monitor's figures against a reference computed by hand with ``torch.autograd.grad`` on
  the same batch and parameters: in float64 for 32-true; for mixed precision, on the same
  autocast forward (compiled as the fit's, under ``torch.compile``: inductor's fused kernels
  round half-precision intermediates otherwise than eager kernels, by up to 1e-3 in bf16),
  scaled by the GradScaler's scale of that step and unscaled in float64 (the monitor must
  unscale exactly);
- that training is bit-identical with and without the monitor;
- `GradientBalance`'s gradient norms and multipliers of the last step (on the last shared
  layer, found on the graph, also through ``torch.compile``) against its rule applied to
  gradient norms computed by hand the same way, and `GradNorm`'s norms.

Then it runs the three benchmarks on the device and prints the tables. Without CUDA it says
so and exits cleanly; ``--accelerator cpu`` runs the checks on the CPU instead (16-mixed with
a CPU GradScaler), to try the script where no GPU is.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --skip-benchmarks
    python benchmarks/gpu_check.py --accelerator cpu --skip-benchmarks --no-compile

Where one command may run only so long (a lent machine's limit), run the checks with
``--skip-benchmarks`` first, then each benchmark as its own command, as `main` calls them.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix._compat import get_donated_buffer, set_donated_buffer
from lightning_lossmix.balancing import Balancer, GradientBalance, GradNorm
from lightning_lossmix.callbacks import GradientMonitor

HERE = Path(__file__).parent
TERMS = (LossTerm("fit"), LossTerm("aux", weight=3.0), LossTerm("bounded", weight=0.5, mode="max"))
WEIGHTS = {"fit": 1.0, "aux": 3.0, "bounded": 0.5}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


class ThreeTerms(LossMixModule):
    def __init__(self, balancer: Balancer | None = None) -> None:
        super().__init__(TERMS, balancer=balancer)
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
        state = module.state_dict()
        self.state = {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}
        self.batch = batch
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale = float(scaler.get_scale()) if scaler is not None else 1.0


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=32)


def precision_options(precision: str, accelerator: str) -> dict[str, Any]:
    """The Trainer's arguments for `precision` (on CPU, Lightning turns 16-mixed into bf16)."""
    if precision == "16-mixed" and accelerator == "cpu":
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


def fit(
    precision: str,
    compiled: bool,
    accelerator: str,
    monitor: bool,
    balancer: Callable[[], Balancer] | None = None,
) -> tuple[ThreeTerms, Any, Capture]:
    pl.seed_everything(0, verbose=False)
    model = ThreeTerms(None if balancer is None else balancer())
    if compiled:
        model.encoder = torch.compile(model.encoder)  # type: ignore[assignment]
    gradient_monitor = GradientMonitor(every_n_steps=4, summary=False) if monitor else None
    capture = Capture()
    callbacks: list[pl.Callback] = [capture] + ([gradient_monitor] if gradient_monitor else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            **precision_options(precision, accelerator),
        ).fit(model, loader())
    return model, gradient_monitor, capture


def hand_gradients(
    precision: str,
    accelerator: str,
    capture: Capture,
    names: list[str] | None = None,
    compiled: bool = False,
) -> dict[str, Tensor]:
    """Each raw term's gradient on the parameters `names` (all: None), by hand, in float64.

    On the state and batch of the last step, with the same forward (float64 for 32-true, the
    same autocast otherwise, compiled if the fit's was), scaled like the GradScaler's backward
    (half-precision gradients underflow without it) and unscaled in float64.
    """
    device = torch.device(accelerator)
    model = ThreeTerms().to(device)
    state = {k.replace("_orig_mod.", ""): v for k, v in capture.state.items()}
    loaded = model.load_state_dict(state, strict=False)  # the balancer's state is not needed
    assert not loaded.missing_keys, loaded.missing_keys
    batch = [t.to(device) for t in capture.batch]
    if precision == "32-true":  # float64 rounds less than any float32 kernel, compiled or not
        model = model.double()
        batch = [t.double() for t in batch]
        losses = model.compute_losses(batch, 0)
    else:
        if compiled:  # a fresh compile of the same module, with the fit's rounding
            model.encoder = torch.compile(model.encoder)  # type: ignore[assignment]
        dtype = torch.half if precision == "16-mixed" else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype):
            losses = model.compute_losses(batch, 0)
    named = {n.replace("_orig_mod.", ""): p for n, p in model.named_parameters()}
    params = list(named.values()) if names is None else [named[n] for n in names]
    found = {}
    for name in WEIGHTS:
        value = losses[name] * capture.scale
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat = [g.double().flatten() for g in grads if g is not None]
        found[name] = torch.cat(flat) / capture.scale
    return found


@contextmanager
def saved_tensors_kept() -> Iterator[None]:
    """Inductor's donated buffers off: each term's grad differentiates the graph again."""
    previous = get_donated_buffer()
    if previous is not None:
        set_donated_buffer(False)
    try:
        yield
    finally:
        if previous is not None:
            set_donated_buffer(previous)


def check_monitor(precision: str, compiled: bool, accelerator: str) -> dict[str, Any]:
    with_monitor, monitor, capture = fit(precision, compiled, accelerator, monitor=True)
    without, _, _ = fit(precision, compiled, accelerator, monitor=False)
    identical = all(
        torch.equal(a, b)
        for a, b in zip(with_monitor.parameters(), without.parameters(), strict=True)
    )
    with saved_tensors_kept():
        grads = hand_gradients(precision, accelerator, capture, compiled=compiled)
    expected = {
        f"grad_magnitude/all/{name}": weight * grads[name].norm().item()
        for name, weight in WEIGHTS.items()
    }
    errors = [abs(monitor.last_metrics[tag] / value - 1) for tag, value in expected.items()]
    return {"identical": identical, "max_rel_error": max(errors)}


def check_balance(
    precision: str, compiled: bool, accelerator: str, kind: Callable[[], Balancer]
) -> dict[str, Any]:
    """A gradient-based balancer's logged norms against hand-computed ones.

    `GradientBalance`'s multipliers are also checked against its rule on those norms.
    """
    model, _, capture = fit(precision, compiled, accelerator, monitor=False, balancer=kind)
    balancer = model.loss_mix.balancer
    assert isinstance(balancer, (GradientBalance, GradNorm))
    assert balancer.group.params is not None
    by_id = {id(p): n.replace("_orig_mod.", "") for n, p in model.named_parameters()}
    group = [by_id[id(p)] for p in balancer.group.params]
    with saved_tensors_kept():
        grads = hand_gradients(precision, accelerator, capture, group, compiled)
    names = balancer.balanced
    norms = [grads[name].norm().item() for name in names]
    # The norms it logs (`balance/grad_norm/<term>`: unscaled, or a GradScaler's scale would
    # show there, while it cancels out of GradientBalance's multipliers), then the multipliers.
    logged = balancer.logged()
    found, expected = [logged[f"grad_norm/{n}"] for n in names], norms
    if isinstance(balancer, GradientBalance):
        declared = [WEIGHTS[name] for name in names]
        target = sum(d * n for d, n in zip(declared, norms, strict=True)) / sum(declared)
        found += [logged[f"multiplier/{n}"] for n in names]
        expected += [min(target / (n + balancer.eps), balancer.max_weight) for n in norms]
    errors = [abs(f / e - 1) for f, e in zip(found, expected, strict=True)]
    return {"group": ", ".join(group), "max_rel_error": max(errors)}


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
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-compile", action="store_true", help="eager set-ups only")
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing to check here. Run this on a machine with a GPU.")
        return 0
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.cuda.get_device_name() if args.accelerator == "cuda" else "CPU"
    print(f"{device}, torch {torch.__version__}")
    print("| precision | torch.compile | check | max relative error | identical training / group |")
    print("| --- | --- | --- | --- | --- |")
    failed = False
    for precision in PRECISIONS:
        for compiled in (False,) if args.no_compile else (False, True):
            checks = {
                "GradientMonitor": check_monitor,
                "GradientBalance": partial(check_balance, kind=GradientBalance),
                # GradNorm refuses the maximized term (a training rate needs a decreasing loss)
                "GradNorm (norms)": partial(check_balance, kind=partial(GradNorm, ["fit", "aux"])),
            }
            for what, check in checks.items():
                try:
                    result = check(precision, compiled, args.accelerator)
                except Exception as error:  # report every set-up, then fail
                    message = f"error: {type(error).__name__}: {error}"
                    print(f"| {precision} | {compiled} | {what} | {message} | |")
                    failed = True
                    continue
                ok = result["max_rel_error"] <= 1e-5 and result.get("identical", True)
                failed = failed or not ok
                identical = result.get("identical", f"(group {result.get('group')})")
                print(
                    f"| {precision} | {compiled} | {what} | {result['max_rel_error']:.1e} "
                    f"| {identical} |"
                )
    if not args.skip_benchmarks:
        accelerator = ("--accelerator", args.accelerator)
        print()
        print(benchmark("bench_gradient_monitor.py", *accelerator))
        print()
        print(benchmark("bench_module_overhead.py", "--quick"))
        print()
        print(benchmark("bench_balancing.py", *accelerator, "--runs", "1", "--steps", "300"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
