"""LossMixModule under a real Trainer: logged tags read back from TensorBoard, nonfinite policy,
checkpoint/resume, and subclassing."""

from __future__ import annotations

import copy
import inspect
import linecache
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _tensorboard import read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixError, LossMixModule, LossTerm
from lightning_lossmix.schedules import Cyclical, Linear, Piecewise

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks"),
]

MakeTrainer = Callable[..., pl.Trainer]
Params = dict[str, Tensor]

# --- a tiny regression model and hand-written references ----------------------------------------


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=generator)
    return TensorDataset(x, y)


def loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=False)


def train_loader() -> DataLoader:
    return loader(12, 4, seed=0)  # 3 batches of 4


def val_loader(batch_size: int = 5) -> DataLoader:
    return loader(10, batch_size, seed=1)


def held_out_loader(batch_size: int = 3) -> DataLoader:
    return loader(6, batch_size, seed=2)


# Batches of 4, 4 and 2, and of 4 and 2: their means differ from plain means of batch means.
UNEVEN_VAL, UNEVEN_TEST = 4, 4


def hand_terms(params: Params, x: Tensor, y: Tensor) -> dict[str, float]:
    """The terms of `Regressor` written out by hand from its weight and bias."""
    prediction = x @ params["net.weight"][0] + params["net.bias"][0]
    return {
        "fit": float(((prediction - y) ** 2).mean()),
        "up": math.tanh(float(params["net.weight"].mean())),
    }


def hand_means(params: Params, data: DataLoader) -> dict[str, float]:
    """Each term's mean over the samples of `data`: batch means weighted by batch sizes."""
    sums = {"fit": 0.0, "up": 0.0}
    count = 0
    for x, y in data:
        for name, value in hand_terms(params, x, y).items():
            sums[name] += value * len(x)
        count += len(x)
    return {name: total / count for name, total in sums.items()}


def unweighted_means(params: Params, data: DataLoader) -> dict[str, float]:
    values = [hand_terms(params, x, y) for x, y in data]
    return {name: sum(v[name] for v in values) / len(values) for name in ("fit", "up")}


def params_of(model: nn.Module) -> Params:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


FIT_AND_UP = (LossTerm("fit"), LossTerm("up", weight=Linear(0.0, 2.0, steps=4), mode="max"))


class Regressor(LossMixModule):
    """Fits y from x (``fit``, min) while pushing the mean weight up, boundedly (``up``, max).

    `bad` maps an optimizer step to the term that becomes NaN or infinite at that step in
    training, and the bad value.
    """

    def __init__(
        self,
        terms: Sequence[LossTerm] = FIT_AND_UP,
        *,
        nonfinite: Any = "raise",
        bad: Mapping[int, tuple[str, float]] | None = None,
        lr: float = 0.05,
    ) -> None:
        super().__init__(terms, nonfinite=nonfinite)
        self.net = nn.Linear(3, 1)
        self.bad = dict(bad or {})
        self.lr = lr

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        losses = {
            "fit": nn.functional.mse_loss(self.net(x).squeeze(-1), y),
            "up": torch.tanh(self.net.weight.mean()),
        }
        if self.training and self.global_step in self.bad:
            name, value = self.bad[self.global_step]
            losses[name] = (losses[name].abs() + 1) * value  # still on the graph
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Recorder(pl.Callback):
    """Records, per training step, the batch and the parameters before and after the step,
    and the parameters and step at the start of each (non-sanity) validation."""

    def __init__(self) -> None:
        self.batches: dict[int, Any] = {}
        self.before: dict[int, Params] = {}
        self.after: dict[int, Params] = {}
        self.validations: list[tuple[int, Params]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.batches[trainer.global_step] = copy.deepcopy(batch)
        self.before[trainer.global_step] = params_of(module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        # global_step has already moved on after the optimizer step.
        self.after[max(self.before)] = params_of(module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: Any) -> None:
        if not trainer.sanity_checking:
            self.validations.append((trainer.global_step, params_of(module)))


def linear_weight(step: int) -> float:
    return 2.0 * min(step / 4, 1.0)  # Linear(0.0, 2.0, steps=4), by hand


@contextmanager
def all_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def messages_about(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


# --- logging ---------------------------------------------------------------------------------


def test_logged_train_val_and_test_tags(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = Regressor()
    recorder = Recorder()
    trainer = make_trainer(max_steps=6, callbacks=[recorder])
    trainer.fit(model, train_loader(), val_loader())
    final = params_of(model)
    trainer.test(model, held_out_loader(), verbose=False)
    logs = read_scalars(tmp_path / "logs")

    expected_tags = {
        f"{stage}/{kind}" for stage in ("val", "test") for kind in ("loss", "loss/fit", "loss/up")
    } | {"train/loss", "train/loss/fit", "train/loss/up", "train/weight/fit", "train/weight/up"}
    assert expected_tags <= set(logs)
    assert "train/skipped_steps" not in logs  # only with nonfinite="skip"

    # Training: one point per optimizer step, at that step.
    steps = list(range(6))
    for tag in ("train/loss", "train/loss/fit", "train/loss/up", "train/weight/up"):
        assert [step for step, _ in logs[tag]] == steps, tag
    fit_weights = dict(logs["train/weight/fit"])
    up_weights = dict(logs["train/weight/up"])
    losses = {name: dict(logs[f"train/loss/{name}"]) for name in ("fit", "up")}
    total = dict(logs["train/loss"])
    for step in steps:
        assert fit_weights[step] == 1.0
        assert up_weights[step] == pytest.approx(-linear_weight(step))  # negative: a max term
        x, y = recorder.batches[step]
        for name, value in hand_terms(recorder.before[step], x, y).items():
            assert losses[name][step] == pytest.approx(value, rel=1e-5), (name, step)
        signed_sum = fit_weights[step] * losses["fit"][step] + up_weights[step] * losses["up"][step]
        assert total[step] == pytest.approx(signed_sum, rel=1e-5, abs=1e-6)

    # Validation after each epoch (global steps 3 and 6): means over the set, evaluated with
    # the parameters and the weights of that step. Sample weighting: see the next test.
    assert [step for step, _ in recorder.validations] == [3, 6]
    assert len(logs["val/loss"]) == 2
    for index, (step, params) in enumerate(recorder.validations):
        means = hand_means(params, val_loader())
        for name in ("fit", "up"):
            assert logs[f"val/loss/{name}"][index][1] == pytest.approx(means[name], rel=1e-5)
        expected = means["fit"] - linear_weight(step) * means["up"]
        assert logs["val/loss"][index][1] == pytest.approx(expected, rel=1e-5)

    # Test, with the final parameters and the weights of the final step.
    test_means = hand_means(final, held_out_loader())
    assert len(logs["test/loss"]) == 1
    for name in ("fit", "up"):
        assert logs[f"test/loss/{name}"][0][1] == pytest.approx(test_means[name], rel=1e-5)
    expected = test_means["fit"] - linear_weight(6) * test_means["up"]
    assert logs["test/loss"][0][1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_and_skips_are_written_when_lightning_writes(
    make_trainer: MakeTrainer, tmp_path: Path, accumulate: int
) -> None:
    # The weights go straight to the loggers, not through self.log (the skip count does): once
    # per step that Lightning writes (every 2nd here), at its step, with accumulation as without.
    pl.seed_everything(0)
    model = Regressor(nonfinite="skip")
    trainer = make_trainer(max_steps=6, log_every_n_steps=2, accumulate_grad_batches=accumulate)
    trainer.fit(model, loader(48, 4))
    logs = read_scalars(tmp_path / "logs")
    expected = [step for step, _ in logs["train/loss"]]
    assert expected == [1, 3, 5]
    for tag in ("train/weight/fit", "train/weight/up", "train/skipped_steps"):
        assert [step for step, _ in logs[tag]] == expected, tag
    assert [w for _, w in logs["train/weight/up"]] == pytest.approx(
        [-linear_weight(step) for step in expected]
    )
    assert {value for _, value in logs["train/skipped_steps"]} == {0.0}
    assert "train/weight/up" not in trainer.logged_metrics  # not in Lightning's collection


class WeightsSeen(pl.Callback):
    """Records ``train/weight/up`` in callback_metrics at each batch end; stops at `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[float] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(float(trainer.callback_metrics["train/weight/up"]))
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True  # as Timer(interval="step") does


def test_callback_metrics_hold_each_step_s_weights(make_trainer: MakeTrainer) -> None:
    # Written to the loggers every 50 steps only, the weights are where callbacks look at every
    # step, as through self.log (before the fix: only on logging steps).
    seen = WeightsSeen()
    trainer = make_trainer(max_steps=6, log_every_n_steps=50, callbacks=[seen])
    trainer.fit(Regressor(), loader(24, 4))
    assert seen.seen == pytest.approx([-linear_weight(step) for step in range(6)])
    assert float(trainer.callback_metrics["train/weight/fit"]) == 1.0
    assert "train/skipped_steps" not in trainer.callback_metrics  # only with nonfinite="skip"


def test_weights_are_written_when_a_callback_stops_the_fit(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # Lightning writes the metrics of the batch at which a callback sets should_stop (after the
    # training step); the weights must be there too (before the fix: missing).
    trainer = make_trainer(max_steps=20, log_every_n_steps=50, callbacks=[WeightsSeen(stop_at=3)])
    trainer.fit(Regressor(), loader(40, 4))
    logs = read_scalars(tmp_path / "logs")
    assert [step for step, _ in logs["train/loss"]] == [2]
    assert logs["train/weight/up"] == [(2, pytest.approx(-linear_weight(2)))]
    assert [step for step, _ in logs["train/weight/fit"]] == [2]


def test_a_second_fit_stopped_by_a_callback_writes_its_weights(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # The first fit wrote step 2; the second, on the same module, stops at its own step 2.
    model = Regressor()
    make_trainer(max_steps=3, logdir="first").fit(model, loader(40, 4))
    second = make_trainer(
        max_steps=20, log_every_n_steps=50, logdir="second", callbacks=[WeightsSeen(stop_at=3)]
    )
    second.fit(model, loader(40, 4))
    logs = read_scalars(tmp_path / "second")
    assert [step for step, _ in logs["train/loss"]] == [2]
    assert [step for step, _ in logs["train/weight/up"]] == [2]  # before the fix: missing


def test_eval_means_are_weighted_by_batch_size(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = Regressor([LossTerm("fit"), LossTerm("up", weight=0.5, mode="max")])
    trainer = make_trainer(max_steps=3)
    trainer.fit(model, train_loader(), val_loader(UNEVEN_VAL))
    trainer.test(model, held_out_loader(UNEVEN_TEST), verbose=False)
    logs = read_scalars(tmp_path / "logs")
    params = params_of(model)
    for stage, data in [("val", val_loader(UNEVEN_VAL)), ("test", held_out_loader(UNEVEN_TEST))]:
        means = hand_means(params, data)
        # Batch sizes matter here: a plain mean of batch means is far from the right value.
        assert abs(unweighted_means(params, data)["fit"] - means["fit"]) > 0.1
        [(_, fit)] = logs[f"{stage}/loss/fit"]
        [(_, total)] = logs[f"{stage}/loss"]
        assert fit == pytest.approx(means["fit"], rel=1e-5), stage
        assert total == pytest.approx(means["fit"] - 0.5 * means["up"], rel=1e-5), stage


def test_schedule_needing_total_steps_gets_the_trainer_estimate(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    schedule = Cyclical(cycles=2, ratio=0.5)
    model = Regressor([LossTerm("fit"), LossTerm("up", weight=schedule, mode="max")])
    assert model.total_steps is None  # no trainer yet
    trainer = make_trainer(max_epochs=2)  # 2 epochs of 3 batches: 6 optimizer steps
    trainer.fit(model, train_loader())
    assert model.total_steps == 6
    weights = read_scalars(tmp_path / "logs")["train/weight/up"]
    # Cycles of 3 steps, each ramping over 1.5 steps then holding 1.0.
    expected = [0.0, -2 / 3, -1.0, 0.0, -2 / 3, -1.0]
    assert [step for step, _ in weights] == list(range(6))
    assert [value for _, value in weights] == pytest.approx(expected)
    assert [-schedule(step, 6) for step in range(6)] == pytest.approx(expected)


def test_schedule_needing_total_steps_in_an_endless_fit(make_trainer: MakeTrainer) -> None:
    class StopSoon(pl.Callback):  # so that a missing error cannot hang the suite
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            trainer.should_stop = trainer.global_step >= 2  # step 0 needs no length

    model = Regressor([LossTerm("fit"), LossTerm("up", weight=Cyclical(), mode="max")])
    trainer = make_trainer(max_epochs=-1, max_steps=-1, callbacks=[StopSoon()], logger=False)
    with pytest.raises(LossMixError, match=r"needs `total_steps`.*give the Trainer a length"):
        trainer.fit(model, train_loader())


def test_schedule_needing_total_steps_with_an_iterable_dataset(make_trainer: MakeTrainer) -> None:
    # Lightning estimates such a fit's length as max_steps, -1: before the fix it reached the
    # schedules (Cyclical divided by zero, DANN jumped to its end at step 1).
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
            return iter(dataset(12, seed=0))

    model = Regressor([LossTerm("fit"), LossTerm("up", weight=Cyclical(), mode="max")])
    trainer = make_trainer(max_epochs=1, logger=False)
    with pytest.raises(LossMixError, match=r"needs `total_steps`.*iterable dataset"):
        trainer.fit(model, DataLoader(Stream(), batch_size=4))
    assert model.total_steps is None


def test_steps_run_without_a_trainer_and_under_fabric() -> None:
    # Lightning supports calling the step methods without a Trainer (unit tests), and Fabric
    # drives training_step; before the fix it raised "not attached to a Trainer" there, and
    # under Fabric "precision_plugin ... not available".
    from lightning.fabric import Fabric

    batch = next(iter(train_loader()))
    model = Regressor(nonfinite="skip")
    twin = copy.deepcopy(model)  # never sees a NaN
    expected = hand_terms(params_of(model), *batch)["fit"]  # the weight of "up" is 0 at step 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        total = model.training_step(batch, 0)
        assert float(total) == pytest.approx(expected)
        model.bad = {0: ("fit", math.nan)}
        assert float(model.training_step(batch, 1)) == 0.0  # skipped
        # Without a Trainer, global_step stays 0: before the fix every later call was skipped.
        model.bad = {}
        totals = [float(twin.training_step(batch, i)) for i in range(3)]
        assert float(model.training_step(batch, 2)) == totals[2] != 0.0
    assert model.skipped_steps == 1
    fabric = Fabric(accelerator="cpu", devices=1)
    model = Regressor()
    expected = hand_terms(params_of(model), *batch)["fit"]
    module, optimizer = fabric.setup(model, model.configure_optimizers())
    total = module.training_step(batch, 0)
    fabric.backward(total)
    optimizer.step()
    assert float(total) == pytest.approx(expected)


class TwoOptimizers(Regressor):
    """Manual optimization of two optimizers, both stepped at every batch."""

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        super().__init__(terms)
        self.head = nn.Linear(1, 1)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        total = self.mix(self.compute_losses(batch, batch_idx), "train", batch)
        assert total is not None
        for optimizer in self.optimizers():  # type: ignore[union-attr]
            optimizer.zero_grad()
        self.manual_backward(total + self.head.weight.sum())
        for optimizer in self.optimizers():  # type: ignore[union-attr]
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.net.parameters(), 0.01),
            torch.optim.SGD(self.head.parameters()),
        ]


def test_manual_optimization_schedules_count_batches(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # Before the fix the schedule read global_step, which counts both optimizers' steps, against
    # a length in batches: the cycle ran twice as fast and resume_step was off by one.
    schedule = Cyclical(cycles=1, ratio=1.0)
    model = TwoOptimizers([LossTerm("fit"), LossTerm("up", weight=schedule, mode="max")])
    trainer = make_trainer(max_epochs=2)  # 2 epochs of 3 batches
    trainer.fit(model, train_loader())
    assert (trainer.global_step, model.total_steps, model.schedule_step) == (12, 6, 6)
    weights = read_scalars(tmp_path / "logs")["train/weight/up"]
    assert [value for _, value in weights] == pytest.approx([-schedule(b, 6) for b in range(6)])


class StepFirst(TwoOptimizers):
    """Steps the head's optimizer before the mix is called, then the net's (a critic first)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        net, head = self.optimizers()  # type: ignore[misc]
        head.zero_grad()
        self.manual_backward(self.head.weight.sum())
        head.step()
        total = self.mix(self.compute_losses(batch, batch_idx), "train", batch)
        assert total is not None
        net.zero_grad()
        self.manual_backward(total)
        net.step()


class RecordLength(pl.Callback):
    def __init__(self) -> None:
        self.lengths: list[int | None] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.lengths.append(module.total_steps)


def test_manual_optimization_length_under_max_steps(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # max_steps=8 counts both optimizers' steps: the fit ends after 4 batches. Before the fix
    # the schedules were given a length of 8 batches, so the cycle covered half of it.
    schedule = Cyclical(cycles=1, ratio=1.0)
    model = TwoOptimizers([LossTerm("fit"), LossTerm("up", weight=schedule, mode="max")])
    trainer = make_trainer(max_steps=8)
    trainer.fit(model, train_loader())
    assert (trainer.global_step, model.total_steps, model.schedule_step) == (8, 4, 4)
    weights = [value for _, value in read_scalars(tmp_path / "logs")["train/weight/up"]]
    # Batch 0 is played before any step tells the rate: the length is max_steps there.
    assert weights == pytest.approx([-schedule(0, 8)] + [-schedule(b, 4) for b in range(1, 4)])


def test_manual_optimization_length_when_a_step_comes_before_the_mix(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # Before the fix the rate was read at the mix's first call, after the head's step of the
    # same batch: 3 steps per batch, a length of 3 batches for a fit of 4.
    terms = [LossTerm("fit"), LossTerm("up", weight=Cyclical(cycles=1, ratio=1.0), mode="max")]
    recorder = RecordLength()
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(max_steps=8, callbacks=[recorder, checkpoint], enable_checkpointing=True)
    trainer.fit(StepFirst(terms), train_loader())
    assert trainer.global_step == 8
    assert recorder.lengths == [8, 4, 4, 4]
    # Resumed after batch 2 (the checkpoint keeps the rate): the length the fit had there.
    resumed = RecordLength()
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    make_trainer(max_steps=8, callbacks=[resumed]).fit(
        StepFirst(terms), train_loader(), ckpt_path=path
    )
    assert resumed.lengths == [4, 4]


# --- non-finite terms --------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "shown"), [(math.nan, "nan"), (math.inf, "inf")])
def test_nonfinite_raise(make_trainer: MakeTrainer, bad: float, shown: str) -> None:
    model = Regressor(bad={2: ("up", bad)})
    recorder = Recorder()
    trainer = make_trainer(max_steps=5, callbacks=[recorder])
    with pytest.raises(LossMixError) as info:
        trainer.fit(model, train_loader())
    message = str(info.value)
    assert f"Loss term 'up' is {shown} at step 2" in message
    assert "nonfinite='skip'" in message
    assert max(recorder.before) == 2


def test_nonfinite_skip(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    pl.seed_everything(0)
    bad = {1: ("fit", math.nan), 3: ("fit", math.inf), 4: ("up", math.nan)}
    model = Regressor(nonfinite="skip", bad=bad)
    recorder = Recorder()
    trainer = make_trainer(max_steps=6, callbacks=[recorder])
    with all_warnings() as caught:
        trainer.fit(model, train_loader())

    # Lightning still counts a skipped step as an optimizer step.
    assert trainer.global_step == 6
    assert sorted(recorder.after) == list(range(6))
    for step in range(6):
        untouched = all(
            torch.equal(recorder.before[step][name], recorder.after[step][name])
            for name in recorder.before[step]
        )
        assert untouched == (step in bad), step
    # Adam took exactly the three steps that were not skipped.
    optimizer = trainer.optimizers[0]
    assert [int(optimizer.state[p]["step"]) for p in model.parameters()] == [3, 3]

    # One warning per term, at its first skip.
    fit_warnings = messages_about(caught, "Loss term 'fit'")
    assert len(fit_warnings) == 1
    assert "'fit' is nan at step 1: skipping this optimizer step" in fit_warnings[0]
    assert "train/skipped_steps" in fit_warnings[0]
    up_warnings = messages_about(caught, "Loss term 'up'")
    assert len(up_warnings) == 1
    assert "'up' is nan at step 4" in up_warnings[0]
    # They point at the user's compute_losses, not at the package's line.
    where = {(w.filename, w.lineno) for w in caught if "Loss term" in str(w.message)}
    assert where == {(__file__, inspect.getsourcelines(Regressor.compute_losses)[1])}

    assert model.skipped_steps == 3
    logs = read_scalars(tmp_path / "logs")
    assert logs["train/skipped_steps"] == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 3), (5, 3)]
    # Every non-skipped step logs its own values.
    for step in (0, 2, 5):
        assert dict(logs["train/weight/up"])[step] == pytest.approx(-linear_weight(step))
        x, y = recorder.batches[step]
        expected = hand_terms(recorder.before[step], x, y)["fit"]
        assert dict(logs["train/loss/fit"])[step] == pytest.approx(expected, rel=1e-5)


def test_skipped_step_logs_no_stale_values(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    model = Regressor(nonfinite="skip", bad={1: ("fit", math.nan)})
    with all_warnings():
        make_trainer(max_steps=3).fit(model, train_loader())
    logs = read_scalars(tmp_path / "logs")
    for step, weight in logs["train/weight/up"]:
        assert weight == pytest.approx(-linear_weight(step)), step
    total = dict(logs["train/loss"])
    assert 1 not in total or not math.isfinite(total[1])


def test_nonfinite_argument() -> None:
    with pytest.raises(LossMixError) as info:
        Regressor(nonfinite="ignore")
    assert "`nonfinite` should be 'raise' or 'skip'. Found `nonfinite = 'ignore'`" in str(
        info.value
    )


# --- checkpoint and resume ---------------------------------------------------------------------


def fit_to(
    make_trainer: MakeTrainer,
    logdir: str,
    max_steps: int,
    ckpt_path: Path | None = None,
    save_at: int | None = None,
    **model_kwargs: Any,
) -> Regressor:
    """Fit a freshly seeded `Regressor` to `max_steps`, resuming from `ckpt_path` if given.

    With `save_at`, a ModelCheckpoint writes ``<logdir>/checkpoints/step=<save_at>.ckpt``.
    """
    pl.seed_everything(0)
    model = Regressor(**model_kwargs)
    callbacks = []
    if save_at is not None:
        callbacks.append(
            ModelCheckpoint(filename="{step}", every_n_train_steps=save_at, save_top_k=-1)
        )
    trainer = make_trainer(
        logdir, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(model, train_loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return model


# At the end of an epoch of 3 batches: resuming mid-epoch restarts a plain DataLoader, and
# Lightning 2.6 runs an extra batch after a checkpoint written at on_train_epoch_end (or by
# trainer.save_checkpoint after fit), so neither could be bit-identical.
@pytest.mark.parametrize("interrupt_at", [3, 6])
def test_resume_is_bit_identical(
    make_trainer: MakeTrainer, tmp_path: Path, interrupt_at: int
) -> None:
    checkpoint = tmp_path / "first" / "checkpoints" / f"step={interrupt_at}.ckpt"
    straight = fit_to(make_trainer, "straight", 9)
    interrupted = fit_to(make_trainer, "first", interrupt_at, save_at=interrupt_at)
    resumed = fit_to(make_trainer, "resumed", 9, ckpt_path=checkpoint)

    for name, value in params_of(straight).items():
        assert torch.equal(params_of(resumed)[name], value), name
        # Not trivially so: training went on after the interruption.
        assert not torch.equal(params_of(interrupted)[name], value), name

    straight_logs = read_scalars(tmp_path / "straight")
    resumed_logs = read_scalars(tmp_path / "resumed")
    # The schedule resumes at the restored global step, not at 0.
    assert resumed_logs["train/weight/up"] == [
        (step, -linear_weight(step)) for step in range(interrupt_at, 9)
    ]
    for tag in ("train/loss", "train/loss/fit", "train/loss/up"):
        assert resumed_logs[tag] == straight_logs[tag][interrupt_at:], tag


def test_skip_state_survives_a_checkpoint(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    checkpoint = tmp_path / "first" / "checkpoints" / "step=3.ckpt"
    bad = {1: ("fit", math.nan), 4: ("fit", math.nan), 5: ("up", math.inf)}
    with all_warnings() as caught:
        first = fit_to(make_trainer, "first", 3, save_at=3, nonfinite="skip", bad=bad)
    assert first.skipped_steps == 1
    assert len(messages_about(caught, "Loss term 'fit'")) == 1

    with all_warnings() as caught:
        resumed = fit_to(
            make_trainer, "resumed", 6, ckpt_path=checkpoint, nonfinite="skip", bad=bad
        )
    assert resumed.skipped_steps == 3
    assert read_scalars(tmp_path / "resumed")["train/skipped_steps"] == [(3, 1), (4, 2), (5, 3)]
    # 'fit' was already reported before the checkpoint; 'up' is new.
    assert messages_about(caught, "Loss term 'fit'") == []
    assert len(messages_about(caught, "Loss term 'up' is inf at step 5")) == 1


def test_resuming_with_different_terms_warns(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    checkpoint = tmp_path / "first" / "checkpoints" / "step=3.ckpt"
    fit_to(make_trainer, "first", 3, save_at=3)

    with all_warnings() as caught:
        fit_to(make_trainer, "same", 4, ckpt_path=checkpoint)
    assert messages_about(caught, "loss terms differ") == []

    changed = (LossTerm("fit"), LossTerm("up", weight=0.5, mode="max"))
    with all_warnings() as caught:
        fit_to(make_trainer, "changed", 4, ckpt_path=checkpoint, terms=changed)
    [message] = messages_about(caught, "The loss terms differ from the checkpoint's")
    assert repr(list(map(repr, changed))) in message
    assert repr(list(map(repr, FIT_AND_UP))) in message


# --- subclassing ---------------------------------------------------------------------------------


def test_compute_losses_not_implemented(make_trainer: MakeTrainer) -> None:
    class Forgetful(LossMixModule):
        def __init__(self) -> None:
            super().__init__([LossTerm("fit"), LossTerm("reg", weight=0.1)])
            self.net = nn.Linear(3, 1)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(max_steps=1, logger=False)
    with pytest.raises(NotImplementedError) as info:
        trainer.fit(Forgetful(), train_loader())
    message = str(info.value)
    assert "Forgetful should implement compute_losses(self, batch, batch_idx)" in message
    assert "['fit', 'reg']" in message


class DictBatches(LossMixModule):
    """Overrides the steps themselves (dict batches) and calls `mix` to keep checks and logs."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__([LossTerm("fit"), LossTerm("up", weight=0.25, mode="max")])
        self.net = nn.Linear(3, 1)
        self.broken = broken

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        prediction = self.net(batch["x"]).squeeze(-1)
        losses = {
            "fit": nn.functional.mse_loss(prediction, batch["y"]),
            "up": torch.tanh(self.net.weight.mean()),
        }
        if self.broken:
            losses["up"] = losses["up"].detach()
        return losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self.mix(self.losses(batch), "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self.mix(self.losses(batch), "val", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x, y = self.data[index]
        return {"x": x, "y": y}


def dict_loader(data: DataLoader) -> DataLoader:
    return DataLoader(DictDataset(data.dataset), batch_size=data.batch_size)  # type: ignore[arg-type]


def test_overridden_steps_can_call_mix(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    model = DictBatches()
    recorder = Recorder()
    trainer = make_trainer(max_steps=3, callbacks=[recorder])
    trainer.fit(model, dict_loader(train_loader()), dict_loader(val_loader()))
    logs = read_scalars(tmp_path / "logs")

    for step in range(3):
        assert logs["train/weight/up"][step] == (step, -0.25)
        batch = recorder.batches[step]
        expected = hand_terms(recorder.before[step], batch["x"], batch["y"])
        assert logs["train/loss/fit"][step][1] == pytest.approx(expected["fit"], rel=1e-5)
        assert logs["train/loss"][step][1] == pytest.approx(
            expected["fit"] - 0.25 * expected["up"], rel=1e-5
        )
        assert not torch.equal(
            recorder.before[step]["net.weight"], recorder.after[step]["net.weight"]
        )
    [(_, params)] = recorder.validations
    means = hand_means(params, val_loader())
    assert logs["val/loss/fit"][0][1] == pytest.approx(means["fit"], rel=1e-5)


def test_overridden_steps_keep_the_checks(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(max_steps=1, logger=False)
    with pytest.raises(LossMixError, match="'up' is cut off the autograd graph"):
        trainer.fit(DictBatches(broken=True), dict_loader(train_loader()))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_cut_off_term_fails_in_training_but_not_in_validation(make_trainer: MakeTrainer) -> None:
    class CutOff(Regressor):
        def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx))
            # The classic mistake: torch.tensor([...]) copies the values off the graph.
            losses["up"] = torch.tensor([torch.sum(w) for w in self.net.parameters()]).sum()
            return losses

    model = CutOff()
    with pytest.raises(LossMixError) as info:  # at step 1: "up" weighs 0 at step 0
        make_trainer(max_steps=2, logger=False).fit(model, train_loader())
    assert "Loss term 'up' is cut off the autograd graph" in str(info.value)
    assert "torch.stack" in str(info.value)
    assert model.global_step == 1

    [metrics] = make_trainer(logger=False).validate(model, val_loader(), verbose=False)
    expected = float(sum(p.sum() for p in model.parameters()))
    assert metrics["val/loss/up"] == pytest.approx(expected, rel=1e-5)


class FrozenAtFirst(Regressor):
    """An L2-SP term on a backbone frozen until `unfreeze_at` (as BackboneFinetuning does)."""

    def __init__(self, weight: Any, unfreeze_at: int) -> None:
        super().__init__([LossTerm("fit"), LossTerm("l2sp", weight=weight)])
        self.backbone = nn.Linear(3, 3)
        self.start = [p.detach().clone() for p in self.backbone.parameters()]
        self.backbone.requires_grad_(False)
        self.unfreeze_at = unfreeze_at

    def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        if self.global_step == self.unfreeze_at:
            self.backbone.requires_grad_(True)
        x, y = batch
        fit = nn.functional.mse_loss(self.net(torch.tanh(self.backbone(x))).squeeze(-1), y)
        moved = [
            (p - p0).pow(2).sum()
            for p, p0 in zip(self.backbone.parameters(), self.start, strict=True)
        ]
        return {"fit": fit, "l2sp": torch.stack(moved).sum()}


def test_a_term_of_weight_0_on_frozen_parameters_is_not_checked(make_trainer: MakeTrainer) -> None:
    # Before the fix it was "cut off the autograd graph" at step 0, though it weighed nothing.
    model = FrozenAtFirst(Piecewise([2], [0.0, 0.5]), unfreeze_at=2)
    make_trainer(max_steps=4, logger=False).fit(model, train_loader())
    assert not torch.equal(model.backbone.weight, model.start[0])
    with pytest.raises(LossMixError, match=r"'l2sp' is cut off.*give it weight 0 until then"):
        make_trainer(max_steps=4, logger=False).fit(
            FrozenAtFirst(Piecewise([2], [0.0, 0.5]), unfreeze_at=3), train_loader()
        )


# --- bugs found while writing these tests, now fixed ------------------------------------------


def test_total_steps_is_not_stale_after_lr_find(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    from lightning.pytorch.tuner import Tuner

    schedule = Cyclical(cycles=1, ratio=1.0)
    model = Regressor([LossTerm("fit"), LossTerm("up", weight=schedule, mode="max")])
    trainer = make_trainer(max_steps=8)
    Tuner(trainer).lr_find(
        model, train_loader(), num_training=5, early_stop_threshold=None, update_attr=False
    )
    trainer.fit(model, train_loader())
    weights = read_scalars(tmp_path / "logs")["train/weight/up"][-8:]
    assert [value for _, value in weights] == pytest.approx([-schedule(s, 8) for s in range(8)])


def test_test_without_fit_with_schedule_needing_total_steps(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    model = Regressor([LossTerm("fit"), LossTerm("up", weight=Cyclical(), mode="max")])
    trainer = make_trainer()
    trainer.test(model, held_out_loader(), verbose=False)
    logs = read_scalars(tmp_path / "logs")
    means = hand_means(params_of(model), held_out_loader())
    # At step 0 every Cyclical weight is `start`, whatever the fit's length.
    assert logs["test/loss"][0][1] == pytest.approx(means["fit"], rel=1e-5)


def test_nonfinite_skip_with_gradient_accumulation(make_trainer: MakeTrainer) -> None:
    class FirstMicroBatchIsNaN(Regressor):
        def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx))
            if batch_idx == 0:
                losses["fit"] = losses["fit"] * math.nan
            return losses

    model = FirstMicroBatchIsNaN(nonfinite="skip")
    before = params_of(model)
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=2, logger=False)
    with all_warnings():
        trainer.fit(model, train_loader())
    assert trainer.global_step == 1
    assert model.skipped_steps == 1
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name


# --- found in review ---------------------------------------------------------------------------


def test_test_after_an_in_process_fit_uses_the_last_step_and_length(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    schedule = Cyclical(cycles=2, ratio=1.0)
    model = Regressor([LossTerm("fit"), LossTerm("up", weight=schedule, mode="max")])
    trainer = make_trainer(max_steps=5)
    trainer.fit(model, train_loader())
    [metrics] = trainer.test(model, held_out_loader(), verbose=False)
    means = hand_means(params_of(model), held_out_loader())
    weight = schedule(5, 5)  # Lightning's step after the fit, and the fit's length
    expected = means["fit"] - weight * means["up"]
    assert metrics["test/loss"] == pytest.approx(expected, rel=1e-5)


def test_a_module_can_be_deep_copied_after_training(make_trainer: MakeTrainer) -> None:
    import copy

    model = Regressor()
    make_trainer(max_steps=2, logger=False).fit(model, train_loader())
    clone = copy.deepcopy(model)
    assert all(
        torch.equal(a, b) for a, b in zip(clone.parameters(), model.parameters(), strict=True)
    )


def test_an_override_without_super_does_not_stop_training_after_a_skip(
    make_trainer: MakeTrainer,
) -> None:
    class Overrides(Regressor):
        def on_before_optimizer_step(self, optimizer: Any) -> None:  # no super()
            pass

    model = Overrides(nonfinite="skip", bad={1: ("fit", math.nan)})
    with all_warnings():
        make_trainer(max_steps=4, logger=False).fit(model, train_loader())
    assert model.skipped_steps == 1  # only the bad step; the others trained


# --- issue 7: the non-finite policy under manual optimization and on gradients ---------------


class ManualRegressor(Regressor):
    """Its own manual optimization: it calls `mix` and skips its backward when that returns None.

    Batches whose index (in the epoch) is in `bad_batches` have a NaN `fit`.
    """

    def __init__(self, bad_batches: Sequence[int] = (), **kwargs: Any) -> None:
        super().__init__((LossTerm("fit"), LossTerm("up", weight=0.5, mode="max")), **kwargs)
        self.automatic_optimization = False
        self.bad_batches = set(bad_batches)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx))
        if batch_idx in self.bad_batches:
            losses["fit"] = losses["fit"] * math.nan
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        total = self.mix(self.compute_losses(batch, batch_idx), "train", batch)
        if total is None:
            return
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(total)
        optimizer.step()  # type: ignore[union-attr]


class BatchRecorder(pl.Callback):
    """The parameters before and after each batch, in the order of the batches."""

    def __init__(self) -> None:
        self.before: list[Params] = []
        self.after: list[Params] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.before.append(params_of(module))

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.after.append(params_of(module))

    def moved(self) -> list[bool]:
        return [
            not all(torch.equal(b[name], a[name]) for name in b)
            for b, a in zip(self.before, self.after, strict=True)
        ]


def test_manual_optimization_skips_only_the_bad_batches(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    model = ManualRegressor(bad_batches=[1], nonfinite="skip")
    recorder = BatchRecorder()
    with all_warnings():
        make_trainer(max_epochs=2, callbacks=[recorder]).fit(model, train_loader())
    # Batch 1 of each epoch (batches 1 and 4) is skipped; every other batch trains.
    assert recorder.moved() == [True, False, True, True, False, True]
    assert model.skipped_steps == 2
    skipped = read_scalars(tmp_path / "logs")["train/skipped_steps"]
    assert [value for _, value in skipped] == [0, 1, 1, 1, 2, 2]


def sqrt_at_zero_module(**kwargs: Any) -> Regressor:
    """`up` is sqrt(0 * w) at steps in `bad_at`: finite (0), but its gradient is NaN (inf * 0)."""

    class SqrtAtZero(Regressor):
        bad_at = kwargs.pop("bad_at", ())

        def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx))
            if self.training and self.global_step in self.bad_at:
                losses["up"] = torch.sqrt(self.net.weight.sum() * 0.0)
            return losses

    return SqrtAtZero((LossTerm("fit"), LossTerm("up", weight=0.5, mode="max")), **kwargs)


def test_nonfinite_gradient_of_a_finite_term_raises(make_trainer: MakeTrainer) -> None:
    model = sqrt_at_zero_module(bad_at={2})
    with pytest.raises(LossMixError) as info:
        make_trainer(max_steps=4, logger=False).fit(model, train_loader())
    message = str(info.value)
    assert "The gradient of parameter 'net.weight' is nan at step 2" in message
    assert "every loss term is finite" in message
    assert "nonfinite='skip'" in message
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class SparseEmbedding(LossMixModule):
    """An `nn.Embedding(sparse=True)` trained by SGD; its gradient is NaN at `bad_at` steps."""

    def __init__(self, bad_at: int | None = None, **kwargs: Any) -> None:
        super().__init__([LossTerm("fit"), LossTerm("small", weight=0.1)], **kwargs)
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 3, sparse=True)
        self.bad_at = bad_at

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        index, y = batch
        h = self.emb(index)
        if self.global_step == self.bad_at:
            h = torch.sqrt(h * 0)  # finite values, NaN gradients
        return {"fit": nn.functional.mse_loss(h.sum(-1), y), "small": h.pow(2).mean()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def sparse_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    index, y = (
        torch.randint(0, 10, (12,), generator=generator),
        torch.randn(12, generator=generator),
    )
    return DataLoader(TensorDataset(index, y), batch_size=4)


def test_sparse_gradients_train_and_are_checked(make_trainer: MakeTrainer) -> None:
    # Before the fix the gradient check ran a dense kernel on them: NotImplementedError for
    # the SparseCPU backend at the first step, whatever `nonfinite`.
    model = SparseEmbedding()
    make_trainer(max_steps=3, logger=False).fit(model, sparse_loader())
    by_hand = SparseEmbedding()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for index, y in sparse_loader():
        h = by_hand.emb(index)
        loss = nn.functional.mse_loss(h.sum(-1), y) + 0.1 * h.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(model.emb.weight, by_hand.emb.weight)
    with pytest.raises(LossMixError, match=r"gradient of parameter 'emb\.weight' is nan at step 1"):
        make_trainer(max_steps=3, logger=False).fit(SparseEmbedding(bad_at=1), sparse_loader())


@pytest.mark.filterwarnings("ignore:The gradient")
def test_the_skip_count_at_a_step_dropped_for_its_gradients(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # The gradient check runs after the terms were logged: the count written at that step
    # must already include the drop, once per step.
    model = sqrt_at_zero_module(bad_at={2}, nonfinite="skip")
    make_trainer(max_steps=5).fit(model, loader(20, 4))
    skipped = read_scalars(tmp_path / "logs")["train/skipped_steps"]
    assert skipped == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]


class SkipBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of 4 of the 12 training samples, leaving out the batches at `left_out`."""

    def __init__(self, left_out: Sequence[int] = ()) -> None:
        self.batches = [list(range(4 * i, 4 * i + 4)) for i in range(3) if i not in left_out]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@pytest.mark.parametrize("name", [None, "cell", "ipython"])
def test_a_warning_for_a_module_defined_in_exec_d_code(
    make_trainer: MakeTrainer, name: str | None
) -> None:
    # No source file to point the warning at (code run through exec, a script piped to
    # Python): the warning still comes. Before the fix the fit crashed without a `__name__`
    # (the functions' __module__ is None); with a script read from stdin, inspect's
    # getsourcelines raised OSError (not reproduced here: exec'd code has no line cache).
    namespace: dict[str, Any] = {"Regressor": Regressor, "math": math}
    if name is not None:
        namespace["__name__"] = name
    source = (
        "class Execd(Regressor):\n"
        "    def compute_losses(self, batch, batch_idx):\n"
        "        losses = super().compute_losses(batch, batch_idx)\n"
        "        if self.global_step == 1:\n"
        "            losses['fit'] = losses['fit'] * math.nan\n"
        "        return losses\n"
    )
    filename = "<string>"
    if name == "ipython":  # an IPython cell: a pseudo-file whose source is in the line cache
        filename = "<ipython-input-3-0123abcd>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    model = namespace["Execd"](nonfinite="skip")
    with all_warnings() as caught:
        make_trainer(max_steps=3, logger=False).fit(model, train_loader())
    assert model.skipped_steps == 1
    [warning] = [w for w in caught if "Loss term 'fit' is nan at step 1" in str(w.message)]
    if name == "ipython":  # the warning points at the cell's compute_losses
        assert (warning.filename, warning.lineno) == (filename, 2)
        del linecache.cache[filename]


@pytest.mark.parametrize("cause", ["term", "gradient"])
def test_a_skipped_step_equals_a_run_without_it(make_trainer: MakeTrainer, cause: str) -> None:
    """Parameters and Adam's state equal a fit in which the bad batch was never there."""
    pl.seed_everything(0)
    if cause == "term":
        terms = (LossTerm("fit"), LossTerm("up", weight=0.5, mode="max"))
        model = Regressor(terms, nonfinite="skip", bad={1: ("fit", math.nan)})
    else:
        model = sqrt_at_zero_module(bad_at={1}, nonfinite="skip")
    trainer = make_trainer(max_epochs=1, logger=False)
    with all_warnings() as caught:
        trainer.fit(model, DataLoader(dataset(12, 0), batch_sampler=SkipBatches()))
    assert model.skipped_steps == 1
    if cause == "gradient":
        [message] = messages_about(caught, "The gradient of parameter")
        assert "'net.weight' is nan at step 1" in message
        assert "train/skipped_steps" in message

    pl.seed_everything(0)
    reference = Regressor((LossTerm("fit"), LossTerm("up", weight=0.5, mode="max")))
    reference_trainer = make_trainer(max_epochs=1, logger=False)
    data = DataLoader(dataset(12, 0), batch_sampler=SkipBatches(left_out=[1]))
    reference_trainer.fit(reference, data)

    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs), name
        state, reference_state = (
            trainer.optimizers[0].state[mine],
            reference_trainer.optimizers[0].state[theirs],
        )
        assert int(state["step"]) == int(reference_state["step"]) == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], reference_state[key]), (name, key)


def test_gradient_check_runs_once_per_optimizer_step(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_lossmix import _nonfinite

    calls: list[int] = []
    original = _nonfinite.any_nonfinite

    def counting(grads: list[Tensor]) -> bool:
        calls.append(len(grads))
        return original(grads)

    monkeypatch.setattr(_nonfinite, "any_nonfinite", counting)
    model = Regressor()
    make_trainer(max_steps=3, accumulate_grad_batches=2, logger=False).fit(model, loader(24, 4))
    assert calls == [2, 2, 2]  # one fused check of both parameters per optimizer step


def test_callbacks_see_a_dropped_step_in_on_before_optimizer_step(
    make_trainer: MakeTrainer,
) -> None:
    """The gradients are decided right after the backward, before any callback's hook."""
    seen: list[bool] = []

    class Sees(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, opt: Any) -> None:
            seen.append(module.skipping_step)

    model = sqrt_at_zero_module(bad_at={1}, nonfinite="skip")
    with all_warnings():
        make_trainer(max_steps=3, logger=False, callbacks=[Sees()]).fit(model, train_loader())
    assert seen == [False, True, False]


def test_a_new_trainer_is_read_again(make_trainer: MakeTrainer) -> None:
    """What the module keeps of a trainer (its GradScaler) is not taken for the next one's."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = sqrt_at_zero_module(bad_at={4}, nonfinite="skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer(max_steps=3, plugins=[plugin], logger=False).fit(model, train_loader())
    assert model.skipped_steps == 0
    # Without a GradScaler, the NaN gradient at step 4 is the module's to drop.
    with all_warnings():
        make_trainer(max_steps=6, logger=False).fit(model, train_loader())
    assert model.skipped_steps == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_skip_in_one_fit_does_not_skip_that_step_in_the_next(make_trainer: MakeTrainer) -> None:
    model = Regressor(nonfinite="skip", bad={1: ("fit", math.nan)})
    with all_warnings():
        make_trainer(max_steps=2, logger=False).fit(model, train_loader())
    model.bad = {}
    recorder = Recorder()
    make_trainer(max_steps=3, logger=False, callbacks=[recorder]).fit(model, train_loader())
    moved = [
        not all(
            torch.equal(recorder.before[s][n], recorder.after[s][n]) for n in recorder.before[s]
        )
        for s in range(3)
    ]
    assert moved == [True, True, True]  # step 1 of the new fit is finite, and trains
    assert model.skipped_steps == 1


def test_a_deep_copy_skips_its_own_steps(make_trainer: MakeTrainer) -> None:
    model = Regressor(nonfinite="skip", bad={1: ("fit", math.nan)})
    with all_warnings():
        make_trainer(max_steps=2, logger=False).fit(model, train_loader())
    clone = copy.deepcopy(model)
    assert clone.nonfinite_policy._trainer is None  # the trainer is not copied with the module
    recorder = Recorder()
    with all_warnings():
        make_trainer(max_steps=3, logger=False, callbacks=[recorder]).fit(clone, train_loader())
    moved = [
        not all(
            torch.equal(recorder.before[s][n], recorder.after[s][n]) for n in recorder.before[s]
        )
        for s in range(3)
    ]
    assert moved == [True, False, True]
    assert (model.skipped_steps, clone.skipped_steps) == (1, 2)


# --- issue 7 item 6: several validation and test dataloaders ---------------------------------


class MeanOfTargets(LossMixModule):
    """`fit` is the mean of the targets (plus a zero that keeps a parameter on the graph)."""

    def __init__(self) -> None:
        super().__init__([LossTerm("fit"), LossTerm("other", weight=0.5)])
        self.net = nn.Linear(3, 1)

    def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        _, y = batch
        zero = 0.0 * self.net.weight.sum()
        return {"fit": y.mean() + zero, "other": 2.0 * y.mean() + zero}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def constant_loader(value: float, n: int = 6) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 3), torch.full((n,), value)), batch_size=4)


def test_each_dataloader_gets_its_own_means(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    model = MeanOfTargets()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, constant_loader(0.0, n=4), [constant_loader(1.0), constant_loader(9.0, n=3)])
    results = trainer.test(model, [constant_loader(2.0), constant_loader(4.0)], verbose=False)
    logs = read_scalars(tmp_path / "logs")
    keys = ("", "/fit", "/other")
    for stage, means in [("val", (1.0, 9.0)), ("test", (2.0, 4.0))]:
        for index, mean in enumerate(means):
            suffix = f"dataloader_idx_{index}"
            values = {key: [v for _, v in logs[f"{stage}/loss{key}/{suffix}"]] for key in keys}
            assert values["/fit"] == [pytest.approx(mean)]
            assert values["/other"] == [pytest.approx(2 * mean)]
            assert values[""] == [pytest.approx(mean + 0.5 * 2 * mean)]
    assert results[1]["test/loss/fit/dataloader_idx_1"] == pytest.approx(4.0)
    assert "val/loss/fit" not in logs  # no pooled key


# --- issue 10: terms on the progress bar --------------------------------------------------------


@pytest.mark.parametrize("shown", [False, True])
def test_progress_bar_terms(make_trainer: MakeTrainer, shown: bool) -> None:
    class Shown(Regressor):
        def __init__(self) -> None:
            LossMixModule.__init__(self, FIT_AND_UP, progress_bar_terms=shown)
            self.net = nn.Linear(3, 1)
            self.bad, self.lr = {}, 0.05

    trainer = make_trainer(max_steps=1, logger=False)
    trainer.fit(Shown(), train_loader())
    bar = set(trainer.progress_bar_metrics)
    assert "train/loss" in bar
    assert ({"train/loss/fit", "train/loss/up"} <= bar) is shown
    assert "train/weight/fit" not in bar


# --- issue 8: composing with an existing LightningModule hierarchy ----------------------------


class VQModel(pl.LightningModule):
    """A user's model whose constructor takes required arguments (as taming's VQModel does)."""

    def __init__(self, width: int, depth: int, *, scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        self.head = nn.Linear(width, 1)
        self.scale = scale

    def predict_y(self, x: Tensor) -> Tensor:
        return self.scale * self.head(self.net(x)).squeeze(-1)


def vq_losses(model: Any, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    x, y = batch
    return {"fit": nn.functional.mse_loss(model.predict_y(x), y), "size": model.head.weight.norm()}


class LossMixFirst(LossMixModule, VQModel):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__([LossTerm("fit"), LossTerm("size", weight=0.1)], width, depth, scale=2.0)

    def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return vq_losses(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ParentFirst(VQModel, LossMixModule):
    loss_terms = (LossTerm("fit"), LossTerm("size", weight=0.1))

    def __init__(self, width: int, depth: int) -> None:
        super().__init__(width, depth, scale=2.0)  # VQModel calls super().__init__() bare

    def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return vq_losses(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("port", [LossMixFirst, ParentFirst])
def test_composes_with_a_parent_taking_required_arguments(
    make_trainer: MakeTrainer, tmp_path: Path, port: type[LossMixModule]
) -> None:
    model = port(3, 2)  # type: ignore[call-arg]
    assert isinstance(model, VQModel) and model.scale == 2.0 and len(model.net) == 2
    assert model.loss_mix.names == ("fit", "size")
    before = params_of(model)
    make_trainer(max_steps=2).fit(model, train_loader())
    assert not torch.equal(before["head.weight"], model.head.weight)
    assert {"train/loss/fit", "train/weight/size"} <= set(read_scalars(tmp_path / "logs"))


class OneCycle(pl.LightningModule):
    """A user's model that sizes its OneCycleLR with `self.total_steps`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.total_steps = 8

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}


def one_cycle_losses(model: Any, batch: Any, batch_idx: int) -> dict[str, Tensor]:
    x, y = batch
    fit = nn.functional.mse_loss(model.net(x).squeeze(-1), y)
    return {"fit": fit, "up": torch.tanh(model.net.weight.mean())}


class CycledFirst(LossMixModule, OneCycle):
    def __init__(self) -> None:
        super().__init__([LossTerm("fit"), LossTerm("up", weight=Cyclical(cycles=1), mode="max")])

    compute_losses = one_cycle_losses


class CycledAfter(OneCycle, LossMixModule):
    loss_terms = (LossTerm("fit"), LossTerm("up", weight=Cyclical(cycles=1), mode="max"))
    compute_losses = one_cycle_losses


@pytest.mark.parametrize("port", [CycledFirst, CycledAfter])
def test_a_parent_setting_total_steps_gives_the_schedules_their_length(
    make_trainer: MakeTrainer, tmp_path: Path, port: type[LossMixModule]
) -> None:
    # Before the fix: "property 'total_steps' of ... object has no setter" in the parent.
    model = port()
    assert model.total_steps == 8
    make_trainer(max_steps=4).fit(model, train_loader())
    weights = [value for _, value in read_scalars(tmp_path / "logs")["train/weight/up"]]
    assert weights == pytest.approx([-Cyclical(cycles=1)(step, 8) for step in range(4)])
    model.total_steps = None  # the trainer's estimate again
    assert model.total_steps == 4
    with pytest.raises(LossMixError, match="`total_steps` should be an int"):
        model.total_steps = 2.5  # type: ignore[assignment]


def test_extra_arguments_without_a_parent_to_take_them() -> None:
    with pytest.raises(LossMixError, match="extra arguments nonfinit='skip', and no parent"):
        LossMixModule([LossTerm("fit")], nonfinit="skip")
    with pytest.raises(LossMixError, match="as a class attribute `loss_terms = "):
        LossMixModule()


def test_nonfinite_skip_under_a_grad_scaler(make_trainer: MakeTrainer) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = Regressor(nonfinite="skip", bad={1: ("fit", math.nan)})
    recorder = Recorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = make_trainer(max_steps=3, plugins=[plugin], callbacks=[recorder], logger=False)
    with all_warnings():
        trainer.fit(model, train_loader())
    assert model.skipped_steps == 1
    untouched = [
        all(torch.equal(recorder.before[s][n], recorder.after[s][n]) for n in recorder.before[s])
        for s in range(3)
    ]
    assert untouched == [False, True, False]
    assert [int(trainer.optimizers[0].state[p]["step"]) for p in model.parameters()] == [2, 2]
    assert scaler.get_scale() == 2.0**12  # the scaler saw no overflow: the module skipped


def test_manual_optimization_skips_a_batch_whose_gradient_is_not_finite(
    make_trainer: MakeTrainer,
) -> None:
    class SqrtAtBatch1(ManualRegressor):
        def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx))
            if batch_idx == 1:
                losses["up"] = torch.sqrt(self.net.weight.sum() * 0.0)  # 0, NaN gradient
            return losses

    model = SqrtAtBatch1(nonfinite="skip")
    recorder = BatchRecorder()
    trainer = make_trainer(max_epochs=2, callbacks=[recorder], logger=False)
    with all_warnings() as caught:
        trainer.fit(model, train_loader())
    assert recorder.moved() == [True, False, True, True, False, True]
    assert model.skipped_steps == 2
    assert len(messages_about(caught, "The gradient of parameter 'net.weight' is nan")) == 1
    assert [int(trainer.optimizers[0].state[p]["step"]) for p in model.parameters()] == [4, 4]


def test_lbfgs_re_evaluates_the_closure_as_without_the_module(make_trainer: MakeTrainer) -> None:
    """`optimizer_step` runs the closure once itself; LBFGS's further evaluations still run."""

    class WithLBFGS(Regressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)

    terms = (LossTerm("fit"), LossTerm("up", weight=0.5, mode="max"))
    pl.seed_everything(0)
    model = WithLBFGS(terms)
    reference = copy.deepcopy(model.net)
    make_trainer(max_steps=2, logger=False).fit(model, train_loader())

    optimizer = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)
    for step, (x, y) in enumerate(train_loader()):
        if step == 2:
            break

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            fit = nn.functional.mse_loss(reference(x).squeeze(-1), y)
            total = fit - 0.5 * torch.tanh(reference.weight.mean())
            total.backward()
            return total

        optimizer.step(closure)
    for mine, theirs in zip(model.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_lbfgs_skips_a_nonfinite_step(make_trainer: MakeTrainer) -> None:
    """LBFGS reads the closure's loss: a skipped step hands it a 0, not None (review finding)."""

    class LBFGSModel(LossMixModule):
        def __init__(self) -> None:
            super().__init__([LossTerm("a"), LossTerm("b")], nonfinite="skip")
            self.net = nn.Linear(4, 1)

        def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
            y = self.net(batch[0]).squeeze(-1)
            a = (y - 1).pow(2).mean()
            return {"a": a * float("nan") if batch_idx == 1 else a, "b": y.pow(2).mean()}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    model = LBFGSModel()
    recorder = Recorder()
    data = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4)
    with all_warnings():
        make_trainer(max_steps=4, logger=False, callbacks=[recorder]).fit(model, data)
    assert model.skipped_steps == 1
    for name in recorder.before[1]:  # the skipped step moved nothing
        assert torch.equal(recorder.before[1][name], recorder.after[1][name])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
