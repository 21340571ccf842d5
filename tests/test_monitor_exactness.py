"""Every GradientMonitor figure within 1e-5 of float64 torch.autograd.grad, at every measurement.

The cases where the old read-off of one term from the normal backward was off (issue 7, item 5):
weight 1000 on a term whose gradient is 1e-9 of another's, a milder one, a strong term that is
weak on one group; at the first measurement of a fit and the first after a resume.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_lossmix import LossMix, LossMixOutput, LossTerm
from lightning_lossmix.callbacks import GradientMonitor

sys.path.insert(0, str(Path(__file__).parent))
from test_gradient_monitor import CaptureBatches, ThreeTerms, loader, reference_figures, trainer

CASES: dict[str, tuple[tuple[LossTerm, ...], float]] = {
    # name: (terms, the factor on the second term's value)
    "weight_1000_on_a_1e-9_gradient": ((LossTerm("fit"), LossTerm("aux", weight=1000.0)), 1e-9),
    "milder": ((LossTerm("fit"), LossTerm("aux", weight=10.0)), 1e-3),
    "strong_but_weak_on_one_group": ((LossTerm("fit", weight=50.0), LossTerm("aux")), 1.0),
}


class Scaled(ThreeTerms):
    """`fit` and a scaled `aux`; `fit` reaches the aux head only through a 1e-6 leak."""

    def __init__(self, case: str) -> None:
        terms, self.factor = CASES[case]
        super().__init__(terms, lr=0.05)
        self.case = case

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        losses = super().compute_losses(batch, batch_idx)
        leak = self.aux_head.weight.pow(2).sum() * 1e-6
        return {"fit": losses["fit"] + leak, "aux": self.factor * losses["aux"]}


def expected_for(case: str, capture: CaptureBatches, divisor: int = 1) -> dict[str, float]:
    model = Scaled(case)
    assert capture.state is not None
    model.load_state_dict(capture.state)
    weights = {t.name: t.signed_weight(0) for t in model.loss_mix.terms}
    return reference_figures(model, capture.batches, weights, divisor)


def assert_exact(logged: Mapping[str, float], expected: Mapping[str, float]) -> None:
    figures = {t for t in logged if not t.startswith("grad_alert")}
    assert figures == set(expected), sorted(figures ^ set(expected))
    for tag, value in expected.items():
        tolerance = 1e-7 if "cosine" in tag else 0.0  # a cosine near 0 has no relative scale
        assert logged[tag] == pytest.approx(value, rel=1e-5, abs=tolerance), tag


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("accumulate", [1, 2])
def test_first_measurement_of_a_fit(case: str, accumulate: int) -> None:
    torch.manual_seed(0)
    monitor, capture = GradientMonitor(every_n_steps=1), CaptureBatches(step=0)
    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[capture, monitor]).fit(
        Scaled(case), loader()
    )
    assert len(capture.batches) == accumulate
    assert_exact(monitor.last_metrics, expected_for(case, capture, accumulate))


@pytest.mark.parametrize("case", list(CASES))
def test_first_measurement_after_a_resume(case: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[checkpoint], enable_checkpointing=True).fit(
        Scaled(case), loader()
    )
    monitor, capture = GradientMonitor(every_n_steps=3), CaptureBatches(step=2)
    trainer(max_steps=3, callbacks=[capture, monitor]).fit(
        Scaled(case), loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert_exact(monitor.last_metrics, expected_for(case, capture))


def test_mixed_precision_figures_are_the_unscaled_gradients_of_the_same_forward() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fit(monitor: list[pl.Callback]) -> tuple[ThreeTerms, CaptureBatches]:
        pl.seed_everything(0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        capture = CaptureBatches(step=1)
        model = ThreeTerms()
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        trainer(max_steps=2, plugins=[plugin], callbacks=[capture, *monitor]).fit(model, loader())
        assert scaler.get_scale() == 2.0**12  # a real scaler in use, and no overflow
        return model, capture

    monitor = GradientMonitor(every_n_steps=2)
    model, capture = fit([monitor])
    without, _ = fit([])
    for a, b in zip(model.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)  # training is bit-identical with the monitor
    # The reference: the same half-precision forward, differentiated without a loss scale.
    reference = ThreeTerms()
    assert capture.state is not None
    reference.load_state_dict(capture.state)
    params = list(reference.parameters())
    with torch.autocast("cpu", dtype=torch.half):
        losses = reference.compute_losses(capture.batches[0], 0)
    for name, weight in (("fit", 1.0), ("aux", 3.0), ("bounded", 0.5)):
        grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
        norm = torch.cat([g.double().flatten() for g in grads if g is not None]).norm().item()
        logged = monitor.last_metrics[f"grad_magnitude/all/{name}"]
        assert logged == pytest.approx(weight * norm, rel=1e-5), name


class KnownGradients(LossMix):
    """A LossMix whose output carries gradients computed in forward (as a balancer's will)."""

    def forward(self, losses: Mapping[str, Tensor], **kwargs: Any) -> Any:
        output = super().forward(losses, **kwargs)
        head = self.owner.head  # type: ignore[attr-defined]
        params = list(head.parameters())
        gradients = {}
        for name, value in output.values.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            # Doubled, so that the test sees they were used rather than recomputed.
            gradients[name] = {
                p: 2 * g.flatten() for p, g in zip(params, grads, strict=True) if g is not None
            }
        return WithGradients(
            output.total, output.values, output.signed_weights, output.step, gradients
        )


class WithGradients(LossMixOutput):
    """A hand-made LossMixOutput with the `gradients` field balancers will fill."""

    def __init__(self, *args: Any) -> None:
        *fields, gradients = args
        super().__init__(*fields)
        object.__setattr__(self, "gradients", gradients)


def test_gradients_in_the_output_are_reused_not_recomputed() -> None:
    def fit(reuse: bool) -> dict[str, float]:
        pl.seed_everything(0)
        model = ThreeTerms()
        if reuse:
            model.loss_mix = KnownGradients(model.loss_mix.terms)
            object.__setattr__(model.loss_mix, "owner", model)
        monitor = GradientMonitor(every_n_steps=1)
        trainer(max_steps=1, callbacks=[monitor]).fit(model, loader())
        return monitor.last_metrics

    plain, reused = fit(False), fit(True)
    for name in ("fit", "bounded"):
        head = f"grad_magnitude/head/{name}"
        assert reused[head] == pytest.approx(2 * plain[head], rel=1e-6)  # the given ones
        encoder = f"grad_magnitude/encoder/{name}"
        assert reused[encoder] == pytest.approx(plain[encoder], rel=1e-6)  # computed
