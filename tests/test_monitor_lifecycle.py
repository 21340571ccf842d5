"""GradientMonitor across a fit: hooks in and out, callback_metrics, the end-of-fit summary."""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_lossmix import LossMixError
from lightning_lossmix._compat import get_donated_buffer, set_donated_buffer
from lightning_lossmix.callbacks import GradientMonitor

sys.path.insert(0, str(Path(__file__).parent))
from test_gradient_monitor import ThreeTerms, loader

MakeTrainer = Callable[..., pl.Trainer]


def hooks(model: ThreeTerms) -> int:
    return len(model.loss_mix._forward_hooks)


def test_figures_are_in_callback_metrics_for_early_stopping_and_checkpoints(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    stop = EarlyStopping(
        monitor="grad_share/all/fit", mode="max", patience=0, stopping_threshold=0.0
    )
    best = ModelCheckpoint(tmp_path / "ckpt", monitor="grad_share/all/aux", mode="max")
    monitor = GradientMonitor(every_n_steps=2)
    trainer = make_trainer(max_epochs=5, callbacks=[monitor, stop, best], enable_checkpointing=True)
    trainer.fit(ThreeTerms(), loader())
    metric = trainer.callback_metrics["grad_share/all/fit"]
    assert isinstance(metric, Tensor)
    assert float(metric) == pytest.approx(monitor.last_metrics["grad_share/all/fit"])
    assert trainer.current_epoch == 1  # the threshold (any share >= 0) stopped it at once
    assert best.best_model_path and best.best_model_score is not None
    assert float(best.best_model_score) == pytest.approx(monitor.last_metrics["grad_share/all/aux"])


def test_the_end_of_fit_summary_and_its_switch(
    make_trainer: MakeTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = GradientMonitor(every_n_steps=2)
    trainer = make_trainer(max_steps=4, callbacks=[monitor])
    trainer.fit(ThreeTerms(), loader())
    out = capsys.readouterr().out
    assert "GradientMonitor: last measurement, step 3" in out
    share = monitor.last_metrics["grad_share/encoder/fit"]
    assert any(
        line.split()[:1] == ["encoder"] and f"{share:.3f}" in line for line in out.splitlines()
    )
    assert "suggested weights: fit " in out
    assert f"lightning-lossmix report {trainer.logger.log_dir}" in out  # type: ignore[union-attr]
    make_trainer(max_steps=4, callbacks=[GradientMonitor(every_n_steps=2, summary=False)]).fit(
        ThreeTerms(), loader()
    )
    assert "GradientMonitor" not in capsys.readouterr().out


def test_a_monitor_reused_for_a_second_fit_starts_empty(make_trainer: MakeTrainer) -> None:
    monitor = GradientMonitor(every_n_steps=100, summary=False)
    monitor.last_metrics = {"grad_share/old/tag": 1.0}  # left from an earlier fit

    class Peek(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.seen = dict(monitor.last_metrics)

    peek = Peek()
    with pytest.warns(UserWarning, match="measured nothing"):
        make_trainer(max_steps=2, callbacks=[monitor, peek]).fit(ThreeTerms(), loader())
    assert peek.seen == {} and monitor.last_metrics == {}


class Raises(ThreeTerms):
    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        if batch_idx == 1:
            raise RuntimeError("the user's bug")
        return super().compute_losses(batch, batch_idx)


def test_a_fit_that_raises_restores_global_state(make_trainer: MakeTrainer) -> None:
    before = get_donated_buffer()
    set_donated_buffer(True)  # torch's default; the monitor turns it off while fitting
    model = Raises()
    try:
        with pytest.raises(RuntimeError, match="the user's bug"):
            trainer = make_trainer(max_steps=4, callbacks=[GradientMonitor(every_n_steps=1)])
            trainer.fit(model, loader())
        assert get_donated_buffer() is True
    finally:
        set_donated_buffer(bool(before))
    assert hooks(model) == 0  # the forward hook is gone: the LossMix is as it was


class Reentrant(ThreeTerms):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        hidden = torch.tanh(self.encoder(x))
        prediction = checkpoint(self.head, hidden, use_reentrant=self.reentrant).squeeze(-1)
        return {
            "fit": ((prediction - y) ** 2).mean(),
            "aux": self.aux_head(hidden).pow(2).mean(),
            "bounded": torch.tanh(prediction).mean(),
        }


def test_reentrant_checkpointing_is_refused_with_the_fix(make_trainer: MakeTrainer) -> None:
    model = Reentrant(reentrant=True)
    with pytest.raises(LossMixError, match=r"Pass use_reentrant=False"):
        make_trainer(max_steps=1, callbacks=[GradientMonitor(every_n_steps=1)]).fit(model, loader())
    assert hooks(model) == 0
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=1, callbacks=[monitor]).fit(Reentrant(reentrant=False), loader())
    assert monitor.last_metrics["grad_magnitude/head/fit"] > 0


def test_only_training_calls_with_grad_are_observed(make_trainer: MakeTrainer) -> None:
    class Evaluates(ThreeTerms):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            doubled = {n: 2 * v for n, v in self.compute_losses(batch, batch_idx).items()}
            with torch.no_grad():
                self.loss_mix(doubled, step=0)
            self.loss_mix.eval()  # an evaluation call with grad enabled
            self.loss_mix(doubled, step=0)
            self.loss_mix.train()
            return super().training_step(batch, batch_idx)

    def figures(model_class: type[ThreeTerms]) -> dict[str, float]:
        pl.seed_everything(0)
        monitor = GradientMonitor(every_n_steps=1)
        make_trainer(max_steps=1, callbacks=[monitor]).fit(model_class(), loader())
        return monitor.last_metrics

    assert figures(Evaluates) == pytest.approx(figures(ThreeTerms))


class SkipsFirstStep(pl.LightningModule):
    """Manual optimization that computes the mix but steps no optimizer on its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loss_mix = ThreeTerms().loss_mix
        self.net = nn.Linear(4, 1)

    def losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        out = self.net(x).squeeze(-1)
        return {
            "fit": (out - y).pow(2).mean(),
            "aux": out.pow(2).mean(),
            "bounded": out.tanh().mean(),
        }

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.batch = batch
        total = self.loss_mix(self.losses(batch), step=batch_idx).total
        if batch_idx == 0:
            return  # no backward, no optimizer step: the measurement must not carry over
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(total)
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay: one reference


def test_a_step_that_never_reaches_its_optimizer_step_is_not_carried_over(
    make_trainer: MakeTrainer,
) -> None:
    model = SkipsFirstStep()
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=1, limit_train_batches=2, callbacks=[monitor]).fit(model, loader())
    value = model.losses(model.batch)["aux"]
    grads = torch.autograd.grad(value, list(model.net.parameters()))
    expected = 3.0 * torch.cat([g.flatten() for g in grads]).norm().item()
    assert monitor.last_metrics["grad_magnitude/all/aux"] == pytest.approx(expected, rel=1e-5)


def test_state_key_is_rebuilt_when_the_configuration_changes() -> None:
    monitor = GradientMonitor(every_n_steps=5, groups={"enc": ["encoder"]})
    assert (
        monitor.state_key == "GradientMonitor{'every_n_steps': 5, 'groups': {'enc': ['encoder']}}"
    )
    assert monitor.groups is not None
    monitor.groups["enc"].append("head")  # changed in place: not a stale key
    monitor.every_n_steps = 7
    expected = "GradientMonitor{'every_n_steps': 7, 'groups': {'enc': ['encoder', 'head']}}"
    assert monitor.state_key == expected


def test_a_module_copied_during_a_fit_leaves_the_monitor_behind(
    make_trainer: MakeTrainer,
) -> None:
    # StochasticWeightAveraging and EMA teachers deep-copy the module during the fit, while the
    # monitor's hook is on it: the copy must not carry the monitor (nor, through it, the
    # Trainer), nor watch the copy's calls.
    copies: list[ThreeTerms] = []

    class CopyAtStepTwo(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            if i == 2:
                copies.extend([copy.deepcopy(pl_module), pickle.loads(pickle.dumps(pl_module))])

    monitor = GradientMonitor(every_n_steps=1)
    model = ThreeTerms()
    make_trainer(max_steps=4, callbacks=[monitor, CopyAtStepTwo()]).fit(model, loader())
    for copied in copies:
        assert hooks(copied) == 1
        assert not any(
            isinstance(getattr(hook, attr, None), GradientMonitor)
            for hook in copied.loss_mix._forward_hooks.values()
            for attr in ("monitor", "__self__")
        )
        copied.train()
        batch = next(iter(loader()))
        copied.loss_mix(copied.compute_losses(batch, 0), step=0)  # its hook does nothing
    assert hooks(model) == 0  # the monitor took its own hook off at the end of the fit
