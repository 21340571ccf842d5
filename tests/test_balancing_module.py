"""LossMixModule with a balancer, through a real Trainer: logs, resume, evaluation, checks."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _tensorboard import read_scalars
from _trainers import quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixError, LossMixModule, LossTerm, Player
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from lightning_lossmix.balancing import loss_scale as balancing_loss_scale
from lightning_lossmix.balancing._in_module import KeepSavedTensors
from lightning_lossmix.balancing._random import random_weights

DECLARED = {"a": 1.0, "b": 0.5, "c": 2.0}


def make_data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, torch.stack([x.sum(1), x[:, 0] * x[:, 1]], dim=1))


class ThreeTasks(LossMixModule):
    """A trunk and three heads; three positive terms of different scales."""

    def __init__(
        self, balancer: Any = None, optimize_all: bool = True, nonfinite: Any = "raise"
    ) -> None:
        terms = [LossTerm(name, weight=weight) for name, weight in DECLARED.items()]
        super().__init__(terms, balancer=balancer, nonfinite=nonfinite)
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.Linear(8, 3)
        self.optimize_all = optimize_all

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        out = self.heads(torch.tanh(self.trunk(x)))
        return {
            "a": (out[:, 0] - y[:, 0]).pow(2).mean(),
            "b": 10 * (out[:, 1] - y[:, 1]).pow(2).mean(),
            "c": (out[:, 2] - 1).pow(2).mean() + 0.1,
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters() if self.optimize_all else self.trunk.parameters()
        return torch.optim.Adam(params, lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), 4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(12), 4)


def test_logged_weights_are_declared_weights_times_the_multipliers(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    trainer = make_trainer(max_steps=5, limit_val_batches=0)
    trainer.fit(ThreeTasks(RandomLossWeighting(seed=2)))
    scalars = read_scalars(tmp_path / "logs")
    for index, name in enumerate(DECLARED):
        logged = [value for _, value in scalars[f"train/weight/{name}"]]
        # The draws, recomputed from the seed and the step: an independent reference.
        expected = [DECLARED[name] * float(random_weights(3, 2, step)[index]) for step in range(5)]
        assert logged == pytest.approx(expected, rel=1e-6)
        multipliers = [value for _, value in scalars[f"balance/multiplier/{name}"]]
        assert [DECLARED[name] * m for m in multipliers] == pytest.approx(logged, rel=1e-6)


def straight_and_resumed(
    model: Callable[[], pl.LightningModule], trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> tuple[Any, Any]:
    """Fit two epochs straight, and one epoch, a checkpoint, then the second epoch resumed."""
    straight = model()
    trainer(max_epochs=2).fit(straight)
    first = model()
    one_epoch = trainer(max_epochs=1)
    one_epoch.fit(first)
    one_epoch.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = model()
    trainer(max_epochs=2).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    return straight, resumed


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientBalance(smoothing=0.9),
        UncertaintyWeighting,
        lambda: GradNorm(lr=0.05),
        lambda: DWA(every_n_steps=3),
        FAMO,
    ],
    ids=["GradientBalance", "UncertaintyWeighting", "GradNorm", "DWA", "FAMO"],
)
def test_stop_and_resume_is_bit_identical(
    make: Callable[[], Balancer], make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    # Four steps per epoch: the checkpoint is at an epoch's end (Lightning cannot resume a plain
    # DataLoader mid-epoch), inside a DWA interval (steps 3 to 5).
    options = {"limit_val_batches": 0, "logger": False, "limit_train_batches": 4}
    straight, resumed = straight_and_resumed(
        lambda: ThreeTasks(make()), lambda **kw: make_trainer(**options, **kw), tmp_path
    )
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, expected[key]), key
        else:
            assert value == expected[key], key
    assert not torch.equal(
        expected["loss_mix.balancer.last_multipliers"], torch.ones(3)
    )  # the balancer moved


def test_evaluation_after_fit_and_from_a_checkpoint_uses_the_last_training_weights(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    model = ThreeTasks(GradientBalance())
    trainer = make_trainer(max_steps=6, limit_val_batches=0)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    multipliers = model.loss_mix.balancer.last_multipliers.clone()  # type: ignore[union-attr]
    assert not torch.equal(multipliers, torch.ones(3))
    x, y = make_data(12).tensors
    with torch.no_grad():
        values = model.compute_losses((x, y), 0)
    expected = sum(
        DECLARED[name] * float(multipliers[index]) * float(values[name])
        for index, name in enumerate(DECLARED)
    )
    validated = make_trainer(logger=False).validate(model, verbose=False)[0]
    assert validated["val/loss"] == pytest.approx(expected, rel=1e-5)
    fresh = ThreeTasks(GradientBalance())
    restored = make_trainer(logger=False).validate(
        fresh, ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert restored[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_uncertainty_weighting_outside_the_optimizer_fails_at_the_first_step(
    make_trainer: Callable[..., pl.Trainer],
) -> None:
    trainer = make_trainer(max_steps=2, limit_val_batches=0, logger=False)
    with pytest.raises(LossMixError, match="in no optimizer"):
        trainer.fit(ThreeTasks(UncertaintyWeighting(), optimize_all=False))


class TwoPlayers(LossMixModule):
    def __init__(self, balancer: Any, nonfinite: Any = "raise") -> None:
        terms = [LossTerm("a"), LossTerm("b"), LossTerm("critic")]
        players = [Player("model", terms=["a", "b"]), Player("critic", terms=["critic"])]
        super().__init__(terms, players=players, balancer=balancer, nonfinite=nonfinite)
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)
        self.critic = nn.Linear(4, 1)

    def compute_losses(  # type: ignore[override]
        self, batch: tuple[Tensor, Tensor], batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        x, y = batch
        if player == "critic":
            return {"critic": self.critic(x).pow(2).mean()}
        out = self.net(x)
        return {
            "a": (out[:, 0] - y[:, 0]).pow(2).mean(),
            "b": 5 * (out[:, 1] - y[:, 1]).abs().mean(),
        }

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [
            torch.optim.SGD(self.net.parameters(), lr=0.01),
            torch.optim.SGD(self.critic.parameters(), lr=0.01),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), 4)


def test_a_balancer_works_within_a_players_terms(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    make_trainer(max_steps=6).fit(TwoPlayers({"model": GradientBalance(on="net.weight")}))
    scalars = read_scalars(tmp_path / "logs")
    assert {"balance/model/multiplier/a", "balance/model/multiplier/b"} <= set(scalars)
    pulls = [
        [value for _, value in scalars[f"balance/model/grad_norm/{name}"]] for name in ("a", "b")
    ]
    weights = [[value for _, value in scalars[f"train/weight/{name}"]] for name in ("a", "b")]
    for norm_a, norm_b, weight_a, weight_b in zip(*pulls, *weights, strict=True):
        assert weight_a * norm_a == pytest.approx(weight_b * norm_b, rel=1e-5)  # equal pulls
    assert {value for _, value in scalars["train/weight/critic"]} == {1.0}
    with pytest.raises(LossMixError, match="map player names to balancers"):
        TwoPlayers(GradientBalance())


class _RecordingBalance(GradientBalance):
    """GradientBalance that records the loss scale it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.scales: list[float] = []

    def _measure(self, values: Any, *, step: int, loss_scale: float) -> Tensor:
        self.scales.append(loss_scale)
        return super()._measure(values, step=step, loss_scale=loss_scale)


def test_16_mixed_passes_the_grad_scalers_scale(make_trainer: Callable[..., pl.Trainer]) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    options = {"max_steps": 1, "limit_val_batches": 0, "logger": False}
    reference = ThreeTasks(_RecordingBalance())
    make_trainer(**options).fit(reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    mixed = ThreeTasks(_RecordingBalance())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer(plugins=[plugin], **options).fit(mixed)
    assert reference.loss_mix.balancer.scales == [1.0]  # type: ignore[union-attr]
    assert mixed.loss_mix.balancer.scales == [2.0**12]  # type: ignore[union-attr]
    torch.testing.assert_close(
        mixed.loss_mix.balancer.last_multipliers,  # type: ignore[union-attr]
        reference.loss_mix.balancer.last_multipliers,  # type: ignore[union-attr]
        rtol=2e-2,
        atol=0.0,
    )


# --- a skipped step leaves no trace in the balancer (review findings) -------------------------


class OneBadBatch(LossMixModule):
    """Two terms on one linear layer; term `a` is NaN on batch `bad` (None: never)."""

    def __init__(self, balancer: Balancer, bad: int | None) -> None:
        super().__init__([LossTerm("a"), LossTerm("b")], nonfinite="skip", balancer=balancer)
        self.net = nn.Linear(4, 1)
        self.bad = bad

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        y = self.net(batch[0]).squeeze(-1)
        a = (y - 1).pow(2).mean() + 0.1
        if batch_idx == self.bad:
            a = a * float("nan")
        return {"a": a, "b": y.pow(2).mean() + 0.1}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def fit_one_bad_batch(balancer: Balancer, drop_bad: bool) -> OneBadBatch:
    torch.manual_seed(0)
    x = torch.randn(80, 4, generator=torch.Generator().manual_seed(1))
    if drop_bad:  # the same run without batch 3 at all
        x = torch.cat([x[:12], x[16:]])
    model = OneBadBatch(balancer, None if drop_bad else 3)
    steps = 19 if drop_bad else 20
    quiet_trainer(max_steps=steps).fit(model, DataLoader(TensorDataset(x), batch_size=4))
    return model


@pytest.mark.filterwarnings("ignore:Loss term 'a' is nan")
@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientBalance(on="net.weight", smoothing=0.9),
        lambda: GradNorm(on="net.weight"),
        lambda: FAMO(),
        lambda: DWA(every_n_steps=2),
    ],
    ids=["GradientBalance", "GradNorm", "FAMO", "DWA"],
)
def test_a_skipped_nan_step_leaves_the_balancer_untouched(make: Callable[[], Balancer]) -> None:
    model = fit_one_bad_batch(make(), drop_bad=False)
    assert model.skipped_steps == 1  # before the fix: 17 skips (NaN state), or FAMO raised
    balancer = model.loss_mix.balancer
    assert balancer is not None
    assert bool(torch.isfinite(balancer.last_multipliers).all())
    if not isinstance(balancer, DWA):  # DWA's intervals count steps, which the skip shifts
        reference = fit_one_bad_batch(make(), drop_bad=True).loss_mix.balancer
        assert reference is not None
        torch.testing.assert_close(balancer.last_multipliers, reference.last_multipliers)


def test_gradient_balance_measures_again_in_a_second_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_lossmix.balancing import _gradient_balance

    model = fit_one_bad_batch(GradientBalance(on="net.weight"), drop_bad=True)
    measured: list[int] = []
    original = _gradient_balance.group_gradients

    def counting(*args: Any, **kwargs: Any) -> Any:
        measured.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_gradient_balance, "group_gradients", counting)
    quiet_trainer(max_steps=5).fit(
        model, DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4)
    )
    assert len(measured) == 5  # before the fix: 0, steps 0-4 fell "before" the last fit's 18


def multipliers_measured_now(model: ThreeTasks, balancer: Balancer) -> Tensor:
    """Return what `balancer` decides at step 0 on `model`'s first batch, in a model copy."""
    fresh = ThreeTasks(balancer)
    weights = {k: v for k, v in model.state_dict().items() if ".balancer." not in k}
    fresh.load_state_dict(weights, strict=False)
    fresh.loss_mix.bind(fresh)
    fresh.train()
    batch = next(iter(fresh.train_dataloader()))
    fresh.loss_mix(fresh.compute_losses(batch, 0), step=0)
    return fresh.loss_mix.balancer.last_multipliers


@pytest.mark.parametrize("loaded", [False, True])
@pytest.mark.parametrize("every", [1, 100])
def test_a_new_fit_decides_at_its_first_step_after_a_one_step_fit(every: int, loaded: bool) -> None:
    # A one-step fit (fast_dev_run) decides at step 0; a new Trainer starts at step 0 again.
    # Before the fix its first step (and, measuring every 100 steps, the 99 after it) reused
    # the first fit's decision, made on weights that have moved since. `loaded`: the state
    # comes back through load_state_dict (as ddp_spawn hands it to the main process), which
    # forgot the fit; before that fix the new fit took it for a resumed one.
    model = ThreeTasks(GradientBalance(every_n_steps=every))
    quiet_trainer(fast_dev_run=True).fit(model)
    if loaded:
        model.load_state_dict(model.state_dict())
    first = model.loss_mix.balancer.last_multipliers.clone()
    expected = multipliers_measured_now(model, GradientBalance(every_n_steps=every))
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model)
    found = model.loss_mix.balancer.last_multipliers
    torch.testing.assert_close(found, expected, rtol=0, atol=0)
    assert not torch.equal(found, first)


def test_famo_carries_its_last_losses_into_a_new_fit() -> None:
    # FAMO's first decision in a new fit updates its logits from the previous fit's last
    # losses, as within a fit; a resumed fit does too (`previous_losses` is checkpointed).
    model = ThreeTasks(FAMO())
    quiet_trainer(fast_dev_run=True).fit(model)
    balancer = model.loss_mix.balancer
    assert torch.equal(balancer.logits, torch.zeros(3))
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model)
    assert not torch.equal(balancer.logits, torch.zeros(3))


class NanGradientBatch(OneBadBatch):
    """Term `a` is finite on batch `bad`, but its gradient is NaN (sqrt at 0)."""

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        y = self.net(batch[0]).squeeze(-1)
        a = (y - 1).pow(2).mean() + 0.1
        if batch_idx == self.bad:
            a = a + (y - y.detach()).pow(2).sum().sqrt()  # adds 0, and a NaN gradient
        return {"a": a, "b": y.pow(2).mean() + 0.1}


@pytest.mark.filterwarnings("ignore:The gradient")
@pytest.mark.parametrize(
    "make",
    [lambda: GradientBalance(on="net.weight", smoothing=0.9), lambda: GradNorm(on="net.weight")],
    ids=["GradientBalance", "GradNorm"],
)
def test_a_step_skipped_for_nan_term_gradients_leaves_the_balancer_untouched(
    make: Callable[[], Balancer],
) -> None:
    torch.manual_seed(0)
    x = torch.randn(80, 4, generator=torch.Generator().manual_seed(1))
    runs = {}
    for bad in (True, False):  # with batch 3 (NaN gradient), and without it at all
        torch.manual_seed(0)
        model = NanGradientBatch(make(), 3 if bad else None)
        data = x if bad else torch.cat([x[:12], x[16:]])
        quiet_trainer(max_steps=20 if bad else 19).fit(
            model, DataLoader(TensorDataset(data), batch_size=4)
        )
        runs[bad] = model
    assert runs[True].skipped_steps == 1  # the module's gradient check skipped the step
    got, want = (runs[bad].loss_mix.balancer for bad in (True, False))
    assert got is not None and want is not None
    assert bool(torch.isfinite(got.last_multipliers).all())  # before the fix: NaN from then on
    torch.testing.assert_close(got.last_multipliers, want.last_multipliers)


def assert_same_tensors(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    """Assert that two state dicts have the same keys and equal tensors (extra state aside)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(got[key], value, msg=key)


class LateBadMicroBatch(OneBadBatch):
    """Batch `bad` is bad in one of two ways that a balancer cannot see when it decides."""

    def __init__(self, balancer: Balancer, bad: int | None, how: str) -> None:
        super().__init__(balancer, bad)
        self.how = how

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        y = self.net(batch[0]).squeeze(-1)
        a = (y - 1).pow(2).mean() + 0.1
        if batch_idx == self.bad and self.how == "nan_term":
            a = a * float("nan")
        if batch_idx == self.bad and self.how == "nan_bias_gradient":  # outside the group
            bias = self.net.bias
            a = a + (bias - bias.detach()).pow(2).sum().sqrt()  # adds 0, a NaN gradient
        return {"a": a, "b": y.pow(2).mean() + 0.1}


def state_of(balancer: Balancer | None) -> dict[str, Any]:
    assert balancer is not None
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in balancer.state_dict().items()}


@pytest.mark.filterwarnings("ignore:Loss term 'a' is nan", "ignore:The gradient")
@pytest.mark.parametrize(
    ("how", "accumulate", "bad"),
    [
        ("nan_term", 2, 7),
        ("nan_bias_gradient", 1, 3),
        ("nan_bias_gradient", 2, 6),
        ("nan_bias_gradient", 1, 0),
    ],
    ids=["nan-in-a-later-micro-batch", "nan-gradient-outside-the-group", "both", "first-step"],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientBalance(on="net.weight", smoothing=0.9),
        lambda: GradNorm(on="net.weight"),
        lambda: FAMO(),
    ],
    ids=["GradientBalance", "GradNorm", "FAMO"],
)
def test_a_step_dropped_after_the_decision_is_taken_back(
    make: Callable[[], Balancer], how: str, accumulate: int, bad: int
) -> None:
    # The balancer decides at the first micro-batch, on its group; the module drops the step
    # later (a NaN term in the second micro-batch, or a NaN gradient on the bias, outside the
    # group). The balancer's whole state must then be that of a run without that step.
    x = torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    first = (bad // accumulate) * accumulate * 4  # the dropped step's samples
    runs = {}
    for with_bad in (True, False):
        torch.manual_seed(0)
        model = LateBadMicroBatch(make(), bad if with_bad else None, how)
        data = x if with_bad else torch.cat([x[:first], x[first + 4 * accumulate :]])
        quiet_trainer(max_steps=10 if with_bad else 9, accumulate_grad_batches=accumulate).fit(
            model, DataLoader(TensorDataset(data), batch_size=4)
        )
        runs[with_bad] = model
    assert runs[True].skipped_steps == 1
    got, want = (state_of(runs[b].loss_mix.balancer) for b in (True, False))
    assert got.keys() == want.keys()
    if "adam._extra_state" in want:  # the decisions counted (FAMO dropped at step 0: one more)
        assert got["adam._extra_state"] == want["adam._extra_state"]
    assert_same_tensors(got, want)  # before the fix: the dropped step's decision stayed
    torch.testing.assert_close(
        dict(runs[True].net.named_parameters()), dict(runs[False].net.named_parameters())
    )


class PlayerWithABadBias(TwoPlayers):
    """The model's turn on batch 2 has a NaN gradient on `net.bias`, outside GradNorm's group."""

    def compute_losses(  # type: ignore[override]
        self, batch: tuple[Tensor, Tensor], batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx, player))
        if player == "model" and batch_idx == 2:
            bias = self.net.bias
            losses["a"] = losses["a"] + (bias - bias.detach()).pow(2).sum().sqrt()
        return losses


@pytest.mark.filterwarnings("ignore:The gradient")
def test_a_players_dropped_turn_is_taken_back_from_its_balancer(
    make_trainer: Callable[..., pl.Trainer],
) -> None:
    model = PlayerWithABadBias({"model": GradNorm(on="net.weight")}, nonfinite="skip")
    make_trainer(max_epochs=1, limit_train_batches=5, logger=False).fit(model)
    assert model.skipped_steps == 1
    balancer = model.player_mixes["model"].balancer
    assert isinstance(balancer, GradNorm)
    assert balancer.adam.steps == 4  # five turns, one dropped (before the fix: 5)


@pytest.mark.filterwarnings("ignore:Loss term 'a' is nan")
def test_dwa_does_not_count_the_micro_batches_of_a_dropped_step() -> None:
    # Three micro-batches per step, the middle one of step 2 NaN: the third one must not be
    # summed either (before the fix it was), as in a run without the step.
    x = torch.randn(96, 4, generator=torch.Generator().manual_seed(1))
    runs = {}
    for with_bad in (True, False):
        torch.manual_seed(0)
        model = LateBadMicroBatch(DWA(every_n_steps=100), 7 if with_bad else None, "nan_term")
        data = x if with_bad else torch.cat([x[:24], x[36:]])
        quiet_trainer(max_steps=8 if with_bad else 7, accumulate_grad_batches=3).fit(
            model, DataLoader(TensorDataset(data), batch_size=4)
        )
        runs[with_bad] = model.loss_mix.balancer
    got, want = runs[True], runs[False]
    assert isinstance(got, DWA) and isinstance(want, DWA)
    torch.testing.assert_close(got.running_sum, want.running_sum)
    assert got.get_extra_state()["count"] == want.get_extra_state()["count"] == 21


class TwoOptimizers(LateBadMicroBatch):
    """Manual optimization: the balancer's log-variances in their own optimizer, stepped first;
    the network's step is dropped at batch 2 (a NaN gradient on its bias)."""

    def __init__(self) -> None:
        super().__init__(UncertaintyWeighting(), 2, "nan_bias_gradient")
        self.automatic_optimization = False
        self.applied: dict[int, Tensor] = {}
        self.kept: dict[int, Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        balancer_optimizer, net_optimizer = self.optimizers()  # type: ignore[misc]
        total = self.mix(self.compute_losses(batch, batch_idx), "train", batch)
        assert total is not None
        balancer_optimizer.zero_grad()
        net_optimizer.zero_grad()
        self.manual_backward(total)
        balancer_optimizer.step()
        log_vars = self.loss_mix.balancer.log_vars  # type: ignore[union-attr]
        self.applied[batch_idx] = log_vars.detach().clone()
        net_optimizer.step()  # dropped at batch 2 by the base class's gradient check
        self.kept[batch_idx] = log_vars.detach().clone()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [
            torch.optim.SGD(self.loss_mix.balancer.parameters(), lr=0.1),  # type: ignore[union-attr]
            torch.optim.SGD(self.net.parameters(), lr=0.01),
        ]


@pytest.mark.filterwarnings("ignore:The gradient")
def test_a_second_optimizer_s_dropped_step_keeps_the_first_one_s_update() -> None:
    model = TwoOptimizers()
    quiet_trainer(max_epochs=1).fit(
        model, DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    )
    assert model.skipped_steps == 1
    for index in range(4):  # before the fix: batch 2's update of the log-variances undone
        torch.testing.assert_close(model.kept[index], model.applied[index], msg=str(index))


class CriticWithABadTerm(TwoPlayers):
    """The critic's term is NaN on batch 2, after the model's turn of that batch has stepped."""

    def compute_losses(  # type: ignore[override]
        self, batch: tuple[Tensor, Tensor], batch_idx: int, player: str | None = None
    ) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx, player))
        if player == "critic" and batch_idx == 2:
            losses["critic"] = losses["critic"] * float("nan")
        return losses


@pytest.mark.filterwarnings("ignore:Loss term 'critic' is nan")
def test_another_players_dropped_turn_leaves_the_balancer_alone(
    make_trainer: Callable[..., pl.Trainer],
) -> None:
    runs = {}
    for cls in (CriticWithABadTerm, TwoPlayers):
        model = cls({"model": GradNorm(on="net.weight")}, nonfinite="skip")
        make_trainer(max_epochs=1, limit_train_batches=5, logger=False).fit(model)
        runs[cls] = model
    bad, good = runs[CriticWithABadTerm], runs[TwoPlayers]
    assert bad.skipped_steps == 1
    got, want = (state_of(m.player_mixes["model"].balancer) for m in (bad, good))  # type: ignore[arg-type]
    assert_same_tensors(got, want)  # before the fix: the model's decision of batch 2 undone
    assert got["adam._extra_state"] == {"steps": 5}
    torch.testing.assert_close(bad.net.weight, good.net.weight)


@pytest.mark.filterwarnings("ignore:Loss term 'a' is nan")
def test_a_dropped_first_step_of_a_second_fit_keeps_the_first_fit_s_decisions() -> None:
    # Fit 1 decides at its step 0 and steps; fit 2 (a new Trainer, counting from 0 again) drops
    # its step 0 before deciding: nothing may be taken back (before the fix: fit 1's decision).
    model = OneBadBatch(GradNorm(on="net.weight"), None)
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    quiet_trainer(max_steps=1).fit(model, data)
    before = state_of(model.loss_mix.balancer)
    model.bad = 0
    quiet_trainer(max_steps=1).fit(model, data)
    assert model.skipped_steps == 1
    after = state_of(model.loss_mix.balancer)
    assert_same_tensors(after, before)
    extras = [{k: v for k, v in d.items() if not isinstance(v, Tensor)} for d in (after, before)]
    assert extras[1]["_extra_state"] == {"decided_step": 0}
    # The new fit forgot only the step of the last decision.
    assert extras[0] == {**extras[1], "_extra_state": {"decided_step": None}}


class BadAt(ThreeTasks):
    """Under nonfinite="skip", at batch `bad`: term `a` is NaN (`how="term"`), or it gets a NaN
    gradient on the heads' bias (`how="gradient"`)."""

    def __init__(self, balancer: Balancer, bad: int, how: str) -> None:
        super().__init__(balancer, nonfinite="skip")
        self.bad = bad
        self.how = how

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx))
        if batch_idx == self.bad and self.how == "gradient":
            bias = self.heads.bias
            losses["a"] = losses["a"] + (bias - bias.detach()).pow(2).sum().sqrt()
        if batch_idx == self.bad and self.how == "term":
            losses["a"] = losses["a"] * float("nan")
        return losses


@pytest.mark.filterwarnings("ignore:The gradient", "ignore:Loss term 'a' is nan")
@pytest.mark.parametrize("how", ["gradient", "term"])
def test_weights_and_balance_agree_at_a_dropped_step_a_callback_stops_at(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path, how: str
) -> None:
    # The step is dropped after its decision (taken back), then a callback stops the fit: the
    # written weights and multipliers are both the step's (before the fix: the multipliers were
    # those of the step before; for a NaN term, kept once, then overwritten after the undo).
    # `a` is not balanced, so that a NaN `a` leaves the decision on `b` and `c` to be taken.
    model = BadAt(RandomLossWeighting(["b", "c"], seed=5), bad=3, how=how)
    trainer = make_trainer(
        max_steps=20, limit_val_batches=0, log_every_n_steps=50, callbacks=[StopAt(3)]
    )
    trainer.fit(model)
    assert model.skipped_steps == 1
    scalars = read_scalars(tmp_path / "logs")
    for name in ("b", "c"):
        declared = DECLARED[name]
        [(step, weight)] = scalars[f"train/weight/{name}"]
        [(_, multiplier)] = scalars[f"balance/multiplier/{name}"]
        assert step == 3
        assert weight == pytest.approx(declared * multiplier, rel=1e-6), name


def test_lbfgs_writes_the_weights_once_per_logged_step(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    # LBFGS evaluates the closure (the training step) several times per optimizer step; the
    # weights and balance tags must get one point per logged step, as train/loss does (before
    # the fix: one per evaluation).
    class WithLBFGS(ThreeTasks):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)

    trainer = make_trainer(max_steps=4, limit_val_batches=0, log_every_n_steps=2)
    trainer.fit(WithLBFGS(UncertaintyWeighting()))  # weights move with every evaluation
    scalars = read_scalars(tmp_path / "logs")
    expected = [step for step, _ in scalars["train/loss"]]
    assert expected == [1, 3]
    for tag in ("train/weight/a", "balance/multiplier/a"):
        assert [step for step, _ in scalars[tag]] == expected, tag
    # All of one evaluation, the first: weights and multipliers agree, in the logs and in
    # callback_metrics (before the fix, callback_metrics mixed the first and the last).
    for name, declared in DECLARED.items():
        weights = [w for _, w in scalars[f"train/weight/{name}"]]
        multipliers = [m for _, m in scalars[f"balance/multiplier/{name}"]]
        assert weights == pytest.approx([declared * m for m in multipliers], rel=1e-6)
        metrics = trainer.callback_metrics
        assert float(metrics[f"train/weight/{name}"]) == pytest.approx(weights[-1], rel=1e-6)
        assert float(metrics[f"balance/multiplier/{name}"]) == pytest.approx(multipliers[-1])


def test_undo_is_kept_only_under_skip() -> None:
    net = nn.Linear(2, 1)
    balancer = GradNorm(on="weight")
    mix = LossMix([LossTerm("a"), LossTerm("b")], balancer=balancer).bind(net)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])

    def decide(step: int) -> None:
        y = net(x).squeeze(-1)
        mix({"a": y.pow(2).mean(), "b": (y - 1).pow(2).mean()}, step=step)

    decide(0)
    assert not balancer.undo(0)  # keep_undo is off by default (nonfinite="raise")
    balancer.keep_undo(True)
    decide(1)
    before = state_of(balancer)
    decide(2)
    assert not balancer.undo(1)  # only the last decision can be taken back
    assert balancer.undo(2)
    after = state_of(balancer)
    assert_same_tensors(after, before)
    assert after["_extra_state"] == before["_extra_state"]
    assert not balancer.undo(2)  # once


# --- evaluation with players, and uncertainty weighting's current weights ------------------


class TwoPlayersValidated(TwoPlayers):
    """TwoPlayers with validation data; the model's balancer's parameters go to `optimize_in`."""

    def __init__(self, balancer: Any, optimize_in: str | None = "model") -> None:
        super().__init__(balancer)
        self.optimize_in = optimize_in

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        extra = {"model": [], "critic": []}  # type: dict[str | None, list[nn.Parameter]]
        extra[self.optimize_in] = list(self.player_mixes["model"].parameters())
        return [
            torch.optim.SGD([*self.net.parameters(), *extra["model"]], lr=0.05),
            torch.optim.SGD([*self.critic.parameters(), *extra["critic"]], lr=0.05),
        ]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(12), 4)


@pytest.mark.parametrize(
    "make", [lambda: GradientBalance(on="net.weight"), UncertaintyWeighting], ids=["GB", "UW"]
)
def test_players_evaluation_uses_each_players_last_training_weights(
    make: Callable[[], Balancer], make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    model = TwoPlayersValidated({"model": make()})
    trainer = make_trainer(max_steps=8, limit_val_batches=0, logger=False)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    balancer = model.player_mixes["model"].balancer
    assert isinstance(balancer, Balancer)
    x, y = make_data(12).tensors
    with torch.no_grad():
        values = {
            **model.compute_losses((x, y), 0, "model"),
            **model.compute_losses((x, y), 0, "critic"),
        }
    if isinstance(balancer, UncertaintyWeighting):  # its current log-variances
        s = balancer.log_vars.detach()
        expected = sum(float(s.neg().exp()[i] * values[n] + s[i]) for i, n in enumerate("ab"))
    else:  # the last training decision
        m = balancer.last_multipliers
        expected = float(m[0] * values["a"] + m[1] * values["b"])
    assert not torch.allclose(balancer.last_multipliers, torch.ones(2))
    expected += float(values["critic"])  # not balanced: its declared weight, 1
    evaluation = model.loss_mix.balancer  # never decides, in training mode either
    assert evaluation is not None and evaluation.train().training
    found = evaluation.multipliers(values, dict.fromkeys(values, 1.0), step=99)
    want = s.neg().exp() if isinstance(balancer, UncertaintyWeighting) else m
    torch.testing.assert_close(found, want)
    validated = make_trainer(logger=False).validate(model, verbose=False)[0]
    assert validated["val/loss"] == pytest.approx(expected, rel=1e-5)  # before: declared weights
    fresh = TwoPlayersValidated({"model": make()})
    assert not any(key.startswith("loss_mix.balancer") for key in fresh.state_dict())
    restored = make_trainer(logger=False).validate(
        fresh, ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert restored[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_uncertainty_weighting_evaluates_with_the_checkpointed_log_variances(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    model = ThreeTasks(UncertaintyWeighting())
    trainer = make_trainer(max_steps=5, limit_val_batches=0, logger=False)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    s = torch.load(tmp_path / "last.ckpt")["state_dict"]["loss_mix.balancer.log_vars"]
    # The last training step's forward used the log-variances before its optimizer step.
    last = model.loss_mix.balancer.last_multipliers  # type: ignore[union-attr]
    assert not torch.allclose(last, s.neg().exp(), rtol=1e-3, atol=0)
    x, y = make_data(12).tensors
    with torch.no_grad():
        values = model.compute_losses((x, y), 0)
    expected = sum(
        DECLARED[n] * float(s.neg().exp()[i] * values[n] + s[i]) for i, n in enumerate(DECLARED)
    )
    validated = make_trainer(logger=False).validate(model, verbose=False)[0]
    assert validated["val/loss"] == pytest.approx(expected, rel=1e-5)  # before: one step stale
    restored = make_trainer(logger=False).validate(
        ThreeTasks(UncertaintyWeighting()), ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert restored[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("optimize_in", "message"),
    [("critic", "in the optimizer of player 'critic'"), (None, "are in no optimizer: they")],
)
def test_a_players_learnable_balancer_must_be_in_that_players_optimizer(
    optimize_in: str | None, message: str, make_trainer: Callable[..., pl.Trainer]
) -> None:
    model = TwoPlayersValidated({"model": UncertaintyWeighting()}, optimize_in=optimize_in)
    trainer = make_trainer(max_steps=2, limit_val_batches=0, logger=False)
    with pytest.raises(LossMixError, match=message):  # before the fix: no error for 'critic'
        trainer.fit(model)
    model = TwoPlayersValidated({"model": UncertaintyWeighting()}, optimize_in="model")
    make_trainer(max_steps=4, limit_val_batches=0, logger=False).fit(model)
    assert not torch.equal(model.player_mixes["model"].balancer.log_vars, torch.zeros(2))  # type: ignore[union-attr]


class StopAt(pl.Callback):
    """Stops the fit after the training step of `step`, as Timer(interval="step") does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step + 1:
            trainer.should_stop = True


def test_balance_is_written_at_the_step_a_callback_stops_the_fit(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    trainer = make_trainer(
        max_steps=20, limit_val_batches=0, log_every_n_steps=50, callbacks=[StopAt(4)]
    )
    trainer.fit(ThreeTasks(RandomLossWeighting(seed=5)))
    scalars = read_scalars(tmp_path / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [4]
    assert [step for step, _ in scalars["train/weight/a"]] == [4]
    assert [step for step, _ in scalars["balance/multiplier/a"]] == [4]  # before the fix: none


def test_balance_logs_at_the_steps_and_values_lightning_logs_the_weights(
    make_trainer: Callable[..., pl.Trainer], tmp_path: Path
) -> None:
    trainer = make_trainer(max_steps=8, limit_val_batches=0, log_every_n_steps=3)
    trainer.fit(ThreeTasks(RandomLossWeighting(seed=5)))
    scalars = read_scalars(tmp_path / "logs")
    for name in DECLARED:
        weights = scalars[f"train/weight/{name}"]
        multipliers = scalars[f"balance/multiplier/{name}"]
        assert [step for step, _ in multipliers] == [step for step, _ in weights] == [2, 5]
        for (_, m), (_, w) in zip(multipliers, weights, strict=True):
            assert DECLARED[name] * m == pytest.approx(w, rel=1e-6)
    assert "balance/multiplier/a" in trainer.callback_metrics  # for callbacks that monitor it


# --- torch.compile: gradient-based balancers need the compiled graph twice ----------------------


@pytest.mark.parametrize(
    "make_balancer",
    [
        # Inductor donates a compiled graph's saved tensors to its first backward; a per-term
        # gradient through that graph (the group is in the compiled trunk) needs them again.
        # The module keeps them for the fit and restores the setting.
        lambda: GradientBalance(on="trunk.*"),
        lambda: GradNorm(on="trunk.*"),
        UncertaintyWeighting,
        DWA,
        FAMO,
        RandomLossWeighting,
    ],
    ids=["GradientBalance", "GradNorm", "UW", "DWA", "FAMO", "RLW"],
)
def test_balancers_train_a_module_compiled_with_inductor(
    make_balancer: Callable[[], Balancer],
) -> None:

    def fit(compiled: bool) -> Tensor:
        torch._dynamo.reset()
        model = ThreeTasks(make_balancer())
        if compiled:
            model.trunk = torch.compile(model.trunk)  # type: ignore[assignment]
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(model)
        assert model.loss_mix.balancer is not None
        return model.loss_mix.balancer.last_multipliers

    before = torch._functorch.config.donated_buffer
    eager = fit(compiled=False)
    torch.testing.assert_close(fit(compiled=True), eager, rtol=1e-4, atol=1e-6)
    assert torch._functorch.config.donated_buffer == before


def test_a_compiled_model_without_the_module_gets_the_fix() -> None:
    # A LossMix in a plain training loop: nothing turns the donated buffers off for it.
    torch._dynamo.reset()
    model = ThreeTasks(GradientBalance(on="trunk.*"))
    model.trunk = torch.compile(model.trunk)  # type: ignore[assignment]
    model.loss_mix.bind(model)
    x, y = make_data(4).tensors
    before = torch._functorch.config.donated_buffer
    torch._functorch.config.donated_buffer = True
    try:
        losses = model.compute_losses((x, y), 0)
        with pytest.raises(LossMixError, match="donated_buffer = False"):
            model.loss_mix(losses, step=0)
    finally:
        torch._functorch.config.donated_buffer = before


class _CallbacksOrNone(pl.LightningModule):
    """A user's model whose `configure_callbacks` returns None (Lightning accepts it)."""

    def configure_callbacks(self) -> Any:
        return None


class _Port(ThreeTasks, _CallbacksOrNone):
    pass


def test_a_parent_configure_callbacks_returning_none_is_accepted() -> None:
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(_Port())
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(_Port(GradientBalance()))


def test_a_later_fit_without_a_gradient_balancer_keeps_donated_buffers() -> None:
    # Lightning keeps a callback the module returned on its Trainer for later fits.
    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_fit_start(self, *args: Any) -> None:
            seen.append(torch._functorch.config.donated_buffer)

    before = torch._functorch.config.donated_buffer
    torch._functorch.config.donated_buffer = True
    try:
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Spy()])
        trainer.fit(ThreeTasks(GradientBalance()))
        trainer.fit(ThreeTasks(RandomLossWeighting()))  # the same Trainer, no per-term gradients
        assert seen == [False, True]
        assert torch._functorch.config.donated_buffer is True
    finally:
        torch._functorch.config.donated_buffer = before


def test_runs_after_a_fit_on_the_same_trainer_do_not_say_a_callback_is_overridden(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Lightning says so (at INFO) whenever a module's callback replaces one of the same type.
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer.fit(ThreeTasks(GradientBalance()))
        trainer.validate(trainer.lightning_module, verbose=False)
        trainer.fit(ThreeTasks(RandomLossWeighting()))
    assert "will override existing callbacks" not in caplog.text
    assert sum(isinstance(c, KeepSavedTensors) for c in trainer.callbacks) == 1


ALL_BALANCERS = {
    "GradientBalance": lambda: GradientBalance(smoothing=0.9),
    "UncertaintyWeighting": UncertaintyWeighting,
    "GradNorm": lambda: GradNorm(lr=0.05),
    "DWA": lambda: DWA(every_n_steps=2),
    "FAMO": FAMO,
    "RandomLossWeighting": RandomLossWeighting,
}


SOME_BALANCED = {"UncertaintyWeighting(['a', 'b'])": lambda: UncertaintyWeighting(["a", "b"])}


@pytest.mark.parametrize("name", [*ALL_BALANCERS, *SOME_BALANCED, None])
def test_validate_or_test_before_fit_leaves_the_fit_trainable(name: str | None) -> None:
    # Evaluation runs under inference mode: a tensor kept from there (the declared weights of
    # UncertaintyWeighting's regularizer, the validation means' state) broke the fit after it.
    balancers = {**ALL_BALANCERS, **SOME_BALANCED}
    model = ThreeTasks(None if name is None else balancers[name]())
    trainer = quiet_trainer(max_steps=2, limit_val_batches=2, val_check_interval=2)
    trainer.validate(model, verbose=False)
    trainer.test(model, dataloaders=model.val_dataloader(), verbose=False)
    trainer.fit(model)  # with its sanity check and a validation, under no_grad
    assert trainer.global_step == 2
    assert {"val/loss", "train/loss"} <= set(trainer.callback_metrics)


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    expected = want.state_dict()
    found = got.state_dict()
    assert found.keys() == expected.keys()
    for key, value in found.items():
        if isinstance(value, Tensor):
            assert torch.equal(value, expected[key]), key
        else:
            assert value == expected[key], key


@pytest.mark.parametrize("make", list(ALL_BALANCERS.values()), ids=list(ALL_BALANCERS))
def test_a_trained_module_copies_and_pickles_with_its_balancer(
    make: Callable[[], Balancer], tmp_path: Path
) -> None:
    # An EMA teacher or a kept best model (copy.deepcopy), torch.save of the whole module and
    # save_hyperparameters() all pickle the balancer after training calls filled its caches.
    model = ThreeTasks(make())
    quiet_trainer(max_steps=4, limit_val_batches=0).fit(model)
    copied = copy.deepcopy(model)
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert_same_state(copied, model)
    assert_same_state(loaded, model)
    for module in (model, copied, loaded):  # each trains on as the original does
        quiet_trainer(max_steps=3, limit_val_batches=0).fit(module)
    assert_same_state(copied, model)
    assert_same_state(loaded, model)
    moved = model.state_dict()["loss_mix.balancer.last_multipliers"]
    assert not torch.equal(moved, torch.ones(3))


class Remembering(ThreeTasks):
    """Saves its hyperparameters, leaving the balancer out as Lightning recommends."""

    def __init__(self, balancer: Any = None, ignore: bool = True) -> None:
        super().__init__(balancer)
        self.save_hyperparameters(ignore=["balancer"] if ignore else None)


def test_load_from_checkpoint_takes_the_balancer_again(tmp_path: Path) -> None:
    model = Remembering(GradientBalance())
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = Remembering.load_from_checkpoint(tmp_path / "last.ckpt", balancer=GradientBalance())
    assert_same_state(loaded, model)
    with (
        pytest.warns(
            UserWarning,
            match=r"the checkpoint has the module's balancer "
            r"GradientBalance\(\), this module none.*"
            r"Remembering.load_from_checkpoint\(path, balancer=GradientBalance\(\)\)",
        ),
        pytest.raises(RuntimeError, match=r"loss_mix\.balancer\.last_multipliers"),
    ):
        Remembering.load_from_checkpoint(tmp_path / "last.ckpt")


@pytest.mark.filterwarnings("ignore:Attribute 'balancer' is an instance of `nn.Module`")
def test_a_balancer_kept_in_the_hyperparameters_saves(tmp_path: Path) -> None:
    model = Remembering(UncertaintyWeighting(), ignore=False)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # pickles the trained balancer
    loaded = Remembering.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    assert_same_state(loaded, model)


@pytest.mark.filterwarnings("ignore:Found keys that")
@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        (
            GradientBalance,
            lambda: GradientBalance(smoothing=0.5),
            r"the module's balancer is GradientBalance\(smoothing=0.5\) here and "
            r"GradientBalance\(\) in the checkpoint",
        ),
        (
            lambda: UncertaintyWeighting(regularizer="softplus", init=1.0),
            UncertaintyWeighting,
            r"the module's balancer is UncertaintyWeighting\(\) here and "
            r"UncertaintyWeighting\(init=1.0, regularizer='softplus'\) in the checkpoint.*"
            r"balancer=UncertaintyWeighting\(init=1.0, regularizer='softplus'\)\)`",
        ),
        (
            lambda: None,
            UncertaintyWeighting,
            r"this module has the module's balancer UncertaintyWeighting\(\), the checkpoint "
            r"none.*To load the checkpoint as it was written, give the module no balancer",
        ),
        (
            RandomLossWeighting,
            lambda: None,
            r"the checkpoint has the module's balancer RandomLossWeighting\(\), this module "
            r"none.*balancer=RandomLossWeighting\(\)\)`",
        ),
    ],
    ids=["options", "uncertainty-options", "added", "removed"],
)
def test_loading_with_another_balancer_says_which_one_wrote_the_checkpoint(
    saved: Callable[[], Balancer | None],
    loaded: Callable[[], Balancer | None],
    message: str,
    tmp_path: Path,
) -> None:
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(ThreeTasks(saved()))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match=message):
        ThreeTasks.load_from_checkpoint(tmp_path / "last.ckpt", balancer=loaded(), strict=False)


def test_the_same_balancer_loads_without_a_warning(tmp_path: Path) -> None:
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(TwoPlayers({"model": GradientBalance(on="net.weight")}))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The balancers differ")
        TwoPlayers.load_from_checkpoint(
            tmp_path / "last.ckpt", balancer={"model": GradientBalance(on="net.weight")}
        )
    with pytest.warns(
        UserWarning,
        match=r"player 'model''s balancer is GradientBalance\(on="
        r"\['net.bias'\]\) here and GradientBalance\(on=\['net.weight'\]\).*"
        r"balancer=\{'model': GradientBalance\(on=\['net.weight'\]\)\}\)`",
    ):
        TwoPlayers.load_from_checkpoint(
            tmp_path / "last.ckpt", balancer={"model": GradientBalance(on="net.bias")}
        )


def test_a_balancer_prints_the_arguments_that_differ_from_their_defaults() -> None:
    assert [repr(b()) for b in (DWA, FAMO, RandomLossWeighting)] == [
        "DWA()",
        "FAMO(\n  (adam): SmallAdam(lr=0.025, weight_decay=0.01)\n)",
        "RandomLossWeighting()",
    ]
    assert repr(DWA(temperature=3.0, every_n_steps=100)) == "DWA(temperature=3.0)"
    assert repr(GradNorm(["a", "b"], alpha=1.0)).startswith(
        "GradNorm(\n  terms=['a', 'b'], alpha=1.0"
    )


def test_a_checkpoint_that_printed_default_arguments_loads_without_a_warning(
    tmp_path: Path,
) -> None:
    # Checkpoints written before the reprs left defaults out name DWA with all its arguments.
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(ThreeTasks(DWA()))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    saved["lightning_lossmix"]["balancers"] = {"": "DWA(temperature=2.0, every_n_steps=100)"}
    torch.save(saved, path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The balancers differ")
        ThreeTasks.load_from_checkpoint(path, balancer=DWA())
    with pytest.warns(UserWarning, match=r"is DWA\(temperature=3.0\) here and DWA\(temperature="):
        ThreeTasks.load_from_checkpoint(path, balancer=DWA(temperature=3.0))


class PlainTwoHeads(pl.LightningModule):
    """A LossMix with a balancer in a plain LightningModule, as docs/concepts.md shows it."""

    def __init__(self, balancer: Balancer, bind: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.Linear(8, 2)
        self.loss_mix = LossMix([LossTerm("a"), LossTerm("b", weight=0.5)], balancer=balancer)
        if bind:
            self.loss_mix.bind(self)

    def losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        out = self.heads(torch.tanh(self.trunk(x)))
        return {
            "a": (out[:, 0] - y[:, 0]).pow(2).mean(),
            "b": 10 * (out[:, 1] - y[:, 1]).pow(2).mean(),
        }

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        scale = balancing_loss_scale(self.trainer)
        return self.loss_mix(self.losses(batch), step=self.global_step, loss_scale=scale).total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), 4)


@pytest.mark.parametrize(
    "make",
    [GradientBalance, UncertaintyWeighting, lambda: GradNorm(lr=0.05)],
    ids=["GradientBalance", "UncertaintyWeighting", "GradNorm"],
)
def test_a_balancer_in_a_plain_lightning_module_resumes_exactly(
    make: Callable[[], Balancer], tmp_path: Path
) -> None:
    options = {"limit_val_batches": 0, "limit_train_batches": 4}
    straight, resumed = straight_and_resumed(
        lambda: PlainTwoHeads(make()), lambda **kw: quiet_trainer(**options, **kw), tmp_path
    )
    assert_same_state(resumed, straight)
    assert not torch.equal(straight.loss_mix.balancer.last_multipliers, torch.ones(2))  # type: ignore[union-attr]


def test_an_unbound_plain_module_is_told_to_bind_its_mix() -> None:
    with pytest.raises(LossMixError, match=r"bind the mix \(`self.loss_mix.bind\(self\)`"):
        quiet_trainer(max_steps=1).fit(PlainTwoHeads(GradientBalance(), bind=False))


def test_a_plain_module_passes_the_grad_scalers_scale() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model = PlainTwoHeads(_RecordingBalance())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    quiet_trainer(max_steps=2, plugins=[plugin]).fit(model)
    assert model.loss_mix.balancer.scales == [2.0**12] * 2  # type: ignore[union-attr]
    assert balancing_loss_scale(None) == 1.0


class PlainNanGradient(PlainTwoHeads):
    """Term `b` is 0 with a NaN gradient on the heads (the square root of 0's derivative)."""

    def losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        out = self.heads(torch.tanh(self.trunk(x)))
        gap = out[:, 1] - out[:, 1].detach()  # exactly 0, attached
        return {"a": (out[:, 0] - y[:, 0]).pow(2).mean(), "b": gap.pow(2).sum().sqrt()}


@pytest.mark.parametrize("make", [GradientBalance, GradNorm], ids=["GradientBalance", "GradNorm"])
def test_a_plain_module_raises_on_a_nan_gradient_that_the_terms_hide(
    make: Callable[[], Balancer],
) -> None:
    # Both values are finite; without the check the step trained NaN into the model, and the
    # next step blamed term 'a'.
    model = PlainNanGradient(make())
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(LossMixError, match=r"measurement at step 0 is not finite while every term"):
        quiet_trainer(max_steps=2).fit(model)
    assert_same_tensors(dict(model.named_parameters()), before)


def test_under_a_grad_scaler_the_scaler_skips_such_a_step() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = PlainNanGradient(GradientBalance())
    before = {k: v.clone() for k, v in model.named_parameters()}
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    quiet_trainer(max_steps=2, plugins=[plugin]).fit(model)  # the scaler's overflow to skip
    assert_same_tensors(dict(model.named_parameters()), before)
