"""GradientMonitor: figures equal hand-written torch.autograd.grad, in every training set-up."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixError, LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor

sys.path.insert(0, str(Path(__file__).parent))
from _distributed import leave_process_group
from _tensorboard import read_scalars

TERMS = (LossTerm("fit"), LossTerm("aux", weight=3.0), LossTerm("bounded", weight=0.5, mode="max"))


class ThreeTerms(LossMixModule):
    """Three terms over an encoder shared by a head and an auxiliary head."""

    def __init__(self, terms: tuple[LossTerm, ...] = TERMS, lr: float = 0.1) -> None:
        super().__init__(terms)
        self.lr = lr
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.aux_head = nn.Linear(8, 2)

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        hidden = torch.tanh(self.encoder(x))
        prediction = self.head(hidden).squeeze(-1)
        return {
            "fit": ((prediction - y) ** 2).mean(),
            "aux": self.aux_head(hidden).pow(2).mean(),
            "bounded": torch.tanh(prediction).mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=batch_size)


def trainer(tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "logger": TensorBoardLogger(tmp_path, name="", version="") if tmp_path else False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def reference_figures(
    model: ThreeTerms, batches: list[Any], weights: Mapping[str, float], divisor: int = 1
) -> dict[str, float]:
    """Every figure the monitor should log, by hand in float64 on `batches`.

    Only charts that carry information: a term that does not reach a group has no tags there,
    a group reached by one term has no share or cosine, a term of weight 0 no suggestion.
    """
    model = copy.deepcopy(model).double()
    batches = [[t.double() for t in batch] for batch in batches]
    groups = {
        "encoder": list(model.encoder.parameters()),
        "head": list(model.head.parameters()),
        "aux_head": list(model.aux_head.parameters()),
        "all": list(model.parameters()),
    }
    names = list(weights)
    grads: dict[str, dict[str, list[Tensor]]] = {g: {} for g in groups}
    for group, params in groups.items():
        for name in names:
            total = [torch.zeros_like(p) for p in params]
            for batch in batches:
                value = model.compute_losses(batch, 0)[name]
                for acc, g in zip(
                    total, torch.autograd.grad(value, params, allow_unused=True), strict=True
                ):
                    if g is not None:
                        acc += g / divisor
            grads[group][name] = total
    figures: dict[str, float] = {}
    for group in groups:
        flat = {n: torch.cat([g.flatten() for g in grads[group][n]]) for n in names}
        reach = [n for n in names if flat[n].norm() > 0]
        magnitude = {n: abs(weights[n]) * flat[n].norm().item() for n in names}
        for n in reach:
            figures[f"grad_magnitude/{group}/{n}"] = magnitude[n]
            if len(reach) > 1:
                figures[f"grad_share/{group}/{n}"] = magnitude[n] / sum(magnitude.values())
        for i, a in enumerate(reach):
            for b in reach[i + 1 :]:
                pull_a = math.copysign(1, weights[a]) * flat[a]
                pull_b = math.copysign(1, weights[b]) * flat[b]
                # By hand: torch's cosine_similarity clamps the norms' product at 1e-8.
                cosine = pull_a @ pull_b / (pull_a.norm() * pull_b.norm())
                figures[f"grad_cosine/{group}/{a}_vs_{b}"] = cosine.item()
        weighted = [n for n in names if weights[n] != 0]
        if group == "all" and len(weighted) > 1:
            mean = sum(magnitude[n] for n in weighted) / len(weighted)
            for n in weighted:
                figures[f"grad_suggested_weight/{n}"] = mean / flat[n].norm().item()
    return figures


class CaptureBatches(pl.Callback):
    """Keeps the batches of optimizer step `step` and the weights before it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.batches: list[Any] = []
        self.state: dict[str, Tensor] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            self.batches.append(batch)
            if self.state is None:
                self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def model_at(state: Mapping[str, Tensor], terms: tuple[LossTerm, ...] = TERMS) -> ThreeTerms:
    model = ThreeTerms(terms)
    model.load_state_dict(state)
    return model


def assert_figures_close(logged: Mapping[str, float], expected: Mapping[str, float]) -> None:
    figures = {t for t in logged if not t.startswith(("grad_alert", "grad_direction"))}
    assert set(expected) == figures, sorted(set(expected) ^ figures)
    for tag, value in expected.items():
        assert logged[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag


def test_figures_equal_hand_written_autograd_grad_read_back_from_tensorboard(tmp_path: Path):
    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=3)
    capture = CaptureBatches(step=5)  # the 6th optimizer step: (5 + 1) % 3 == 0
    trainer(tmp_path, max_steps=6, callbacks=[capture, monitor]).fit(ThreeTerms(), loader())
    weights = {"fit": 1.0, "aux": 3.0, "bounded": -0.5}
    assert capture.state is not None
    expected = reference_figures(model_at(capture.state), capture.batches, weights)
    scalars = read_scalars(tmp_path)
    logged = {tag: dict(events)[5] for tag, events in scalars.items() if tag.startswith("grad_")}
    assert_figures_close(logged, expected)
    # A term that does not reach a group logs nothing there: no constant chart.
    assert "grad_magnitude/head/aux" not in logged
    assert "grad_cosine/head/fit_vs_aux" not in logged
    assert "grad_share/aux_head/aux" not in logged  # reached by one term: its share is 1
    assert monitor.last_metrics == pytest.approx(logged)


class AddsToTheTotal(ThreeTerms):
    """Backpropagates more than the mix's total: the monitor must not read terms off it."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        total = self.mix(self.compute_losses(batch, batch_idx), "train")
        assert total is not None
        return total + 0.1 * self.encoder.weight.pow(2).sum()


class StraightThrough(ThreeTerms):
    """Adds a term of value zero but non-zero gradient: equal in value, not the same loss."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        total = self.mix(self.compute_losses(batch, batch_idx), "train")
        assert total is not None
        w = self.encoder.weight
        return total + (w - w.detach()).sum()


@pytest.mark.parametrize("model_class", [ThreeTerms, AddsToTheTotal, StraightThrough])
def test_every_term_is_exact_whether_or_not_one_is_read_off_the_backward(model_class: type):
    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=2)
    capture = CaptureBatches(step=3)
    trainer(max_steps=4, callbacks=[capture, monitor]).fit(model_class(), loader())
    assert capture.state is not None
    weights = {"fit": 1.0, "aux": 3.0, "bounded": -0.5}
    expected = reference_figures(model_at(capture.state), capture.batches, weights)
    assert_figures_close(monitor.last_metrics, expected)


def test_values_land_at_lightnings_own_logging_steps(tmp_path: Path):
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=17, log_every_n_steps=4, callbacks=[GradientMonitor()]).fit(
        ThreeTerms(), loader(n=200)
    )
    scalars = read_scalars(tmp_path)
    lightning_steps = [step for step, _ in scalars["train/loss"]]
    monitor_steps = [step for step, _ in scalars["grad_magnitude/all/fit"]]
    assert monitor_steps == [3, 7, 11, 15]  # no repeated, stale or shifted steps
    assert set(monitor_steps) <= set(lightning_steps)


def test_training_with_the_monitor_is_bit_identical():
    def final_parameters(callbacks: list[pl.Callback]) -> list[Tensor]:
        pl.seed_everything(0)
        model = ThreeTerms()
        trainer(max_steps=12, callbacks=callbacks).fit(model, loader())
        return [p.detach().clone() for p in model.parameters()]

    without = final_parameters([])
    with_monitor = final_parameters([GradientMonitor(every_n_steps=2)])
    assert all(torch.equal(a, b) for a, b in zip(without, with_monitor, strict=True))


def test_gradient_accumulation_measures_the_optimizer_steps_gradient(tmp_path: Path):
    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=2)
    capture = CaptureBatches(step=1)
    trainer(tmp_path, max_steps=2, accumulate_grad_batches=3, callbacks=[capture, monitor]).fit(
        ThreeTerms(), loader()
    )
    assert len(capture.batches) == 3
    assert capture.state is not None
    weights = {"fit": 1.0, "aux": 3.0, "bounded": -0.5}
    expected = reference_figures(model_at(capture.state), capture.batches, weights, divisor=3)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["grad_magnitude/all/fit"]] == [1]  # once per optimizer step
    assert_figures_close({t: e[-1][1] for t, e in scalars.items()}, expected)


def test_mixed_precision_with_a_gradscaler_logs_unscaled_figures():
    from lightning.pytorch.plugins.precision import MixedPrecision

    def figures(plugins: list[Any]) -> dict[str, float]:
        pl.seed_everything(0)
        monitor = GradientMonitor(every_n_steps=1)
        trainer(max_steps=1, plugins=plugins, callbacks=[monitor]).fit(ThreeTerms(), loader())
        return monitor.last_metrics

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    mixed = figures([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() == 2.0**12  # a real scaler was in use, and did not overflow
    full = figures([])
    for tag in full:
        if tag.startswith("grad_magnitude"):
            assert mixed[tag] == pytest.approx(full[tag], rel=2e-2, abs=1e-3), tag


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: any LightningModule holding a LossMix, with toggled optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loss_mix = LossMix([LossTerm("fit"), LossTerm("aux", weight=0.1)])
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 1)
        self.frozen = nn.Linear(4, 8).requires_grad_(False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        for optimizer in self.optimizers():
            self.toggle_optimizer(optimizer)
            hidden = torch.tanh(self.first(x) + self.frozen(x))
            prediction = self.second(hidden).squeeze(-1)
            losses = {"fit": ((prediction - y) ** 2).mean(), "aux": prediction.pow(2).mean()}
            out = self.loss_mix(losses, step=self.global_step)
            optimizer.zero_grad()
            self.manual_backward(out.total)
            optimizer.step()
            self.untoggle_optimizer(optimizer)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.first.parameters(), lr=0.1),
            torch.optim.SGD(self.second.parameters(), lr=0.1),
        ]


def test_manual_optimization_with_toggled_and_frozen_parameters():
    monitor = GradientMonitor(every_n_steps=1)
    trainer(max_steps=4, callbacks=[monitor]).fit(TwoOptimizers(), loader())
    # The frozen child is not a group. Each optimizer's measurement covers the parameters it
    # trains (toggling freezes the others, whose groups are left out, not logged as 0); the
    # two measurements of a step are both kept.
    assert "grad_magnitude/frozen/fit" not in monitor.last_metrics
    assert monitor.last_metrics["grad_magnitude/first/fit"] > 0
    assert monitor.last_metrics["grad_magnitude/second/fit"] > 0


def test_torch_compile(tmp_path: Path):
    pl.seed_everything(0)
    eager = GradientMonitor(every_n_steps=2)
    trainer(max_steps=2, callbacks=[eager]).fit(ThreeTerms(), loader())
    pl.seed_everything(0)
    model = ThreeTerms()
    model.encoder = torch.compile(model.encoder, backend="aot_eager")  # type: ignore[assignment]
    donated_before = torch._functorch.config.donated_buffer

    class Watch(GradientMonitor):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.saw_donated_buffer = torch._functorch.config.donated_buffer

    compiled = Watch(every_n_steps=2)
    trainer(max_steps=2, callbacks=[compiled]).fit(model, loader())
    # Off while fitting (measuring retains the graph), restored afterwards.
    assert torch._functorch.config.donated_buffer is donated_before
    assert compiled.saw_donated_buffer is False
    for tag, value in eager.last_metrics.items():
        assert compiled.last_metrics[tag] == pytest.approx(value, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_warn_and_log_nothing(strategy: str):
    fake_strategy = type(strategy, (), {})()
    fake_trainer = SimpleNamespace(strategy=fake_strategy, log_every_n_steps=50)
    monitor = GradientMonitor()
    with pytest.warns(UserWarning, match=f"not available with {strategy}"):
        monitor.setup(fake_trainer, ThreeTerms(), "fit")  # type: ignore[arg-type]
    assert not monitor.is_measured_step(  # type: ignore[arg-type]
        SimpleNamespace(
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=49))
        )
    )


def test_groups_by_module_name_and_parameter_pattern():
    monitor = GradientMonitor(
        every_n_steps=1, groups={"heads": ["head", "aux_head"], "biases": ["*.bias"]}
    )
    trainer(max_steps=1, callbacks=[monitor]).fit(ThreeTerms(), loader())
    assert {t.split("/")[1] for t in monitor.last_metrics if "magnitude" in t} == {
        "heads",
        "biases",
    }
    # Suggested weights use all monitored parameters when there is no `all` group.
    assert "grad_suggested_weight/fit" in monitor.last_metrics


def test_restricting_groups_gives_the_same_figures_for_that_group():
    def run(groups: dict[str, list[str]] | None) -> dict[str, float]:
        pl.seed_everything(0)
        monitor = GradientMonitor(every_n_steps=1, groups=groups)
        trainer(max_steps=1, callbacks=[monitor]).fit(ThreeTerms(), loader())
        return monitor.last_metrics

    full, restricted = run(None), run({"head": ["head"]})
    for name in ("fit", "bounded"):  # `aux` does not reach the head
        tag = f"grad_magnitude/head/{name}"
        assert restricted[tag] == pytest.approx(full[tag], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "`every_n_steps` should be >= 1"),
        ({"groups": {}}, "`groups` should be a non-empty mapping"),
        ({"groups": {"a/b": ["head"]}}, "cannot be used in log keys"),
        ({"norm_type": 0}, "`norm_type` should be > 0"),
        ({"warn_share": 1.5}, r"`warn_share` should be in \(0, 1\]"),
    ],
)
def test_bad_arguments_fail_fast(kwargs: dict[str, Any], match: str):
    with pytest.raises(LossMixError, match=match):
        GradientMonitor(**kwargs)


def test_a_pattern_matching_nothing_names_the_group_and_the_choices():
    monitor = GradientMonitor(groups={"dec": ["decoder"]})
    with pytest.raises(
        LossMixError, match=r"'decoder' of group 'dec'.*\['aux_head', 'encoder', 'head'\]"
    ):
        trainer(max_steps=1, callbacks=[monitor]).fit(ThreeTerms(), loader())


def test_a_module_without_a_lossmix_is_refused():
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

    with pytest.raises(LossMixError, match="needs a LossMix in Plain; found none"):
        GradientMonitor().setup(SimpleNamespace(), Plain(), "fit")  # type: ignore[arg-type]


def test_norm_types():
    pl.seed_everything(0)
    monitor = GradientMonitor(every_n_steps=1, norm_type=math.inf, log_cosine=False)
    capture = CaptureBatches(step=0)
    trainer(max_steps=1, callbacks=[capture, monitor]).fit(ThreeTerms(), loader())
    assert capture.state is not None
    model = model_at(capture.state)
    value = model.compute_losses(capture.batches[0], 0)["aux"]
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    expected = 3.0 * max(g.abs().max().item() for g in grads if g is not None)
    assert monitor.last_metrics["grad_magnitude/all/aux"] == pytest.approx(expected, rel=1e-6)
    assert not any(t.startswith("grad_cosine") for t in monitor.last_metrics)


def test_tensorboard_layout_written_once_and_histograms_in_the_same_run(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=2, log_histograms=True)
    trainer(tmp_path, max_steps=6, callbacks=[monitor]).fit(ThreeTerms(), loader())
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len({f.parent for f in event_files}) == 1  # no extra run directories
    accumulator = EventAccumulator(str(event_files[0].parent), size_guidance={"histograms": 0})
    accumulator.Reload()
    histograms = accumulator.Tags()["histograms"]
    assert "grad_histogram/encoder/fit" in histograms
    # As the magnitudes: none for a term that does not reach the group (a spike at 0).
    assert "grad_histogram/aux_head/aux" in histograms
    assert "grad_histogram/aux_head/fit" not in histograms
    assert [e.step for e in accumulator.Histograms("grad_histogram/all/aux")] == [1, 3, 5]
    layouts = []
    for event_file in event_files:
        for event in _raw_events(event_file):
            if event.summary.value and event.summary.value[0].tag == "custom_scalars__config__":
                layouts.append(event)
    assert len(layouts) == 1
    charts = _layout_charts(layouts[0])
    assert charts["gradients: encoder"] == [
        "grad_magnitude/encoder",
        "grad_share/encoder",
        "grad_cosine/encoder",
    ]
    # Only `aux` reaches its head: no share or cosine is ever logged there, so no empty chart.
    assert charts["gradients: aux_head"] == ["grad_magnitude/aux_head"]
    assert len(charts["gradients: head"]) == 3  # `fit` and `bounded`


def test_a_logger_prefix_reaches_the_histograms_and_the_layout(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="run.1")
    monitor = GradientMonitor(every_n_steps=2, log_histograms=True, summary=False)
    trainer(max_steps=2, callbacks=[monitor], logger=logger).fit(ThreeTerms(), loader())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert "run.1-grad_magnitude/encoder/fit" in scalars
    assert "run.1-grad_histogram/encoder/fit" in accumulator.Tags()["histograms"]
    config = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    patterns = [tag for c in layout.category for chart in c.chart for tag in chart.multiline.tag]
    assert r"^run\.1-grad_magnitude/encoder/" in patterns  # the dot escaped, not the dash
    assert all(any(re.search(p, tag) for tag in scalars) for p in patterns)


def _layout_charts(event: Any) -> dict[str, list[str]]:
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(event.summary.value[0].tensor.string_val[0])
    return {c.title: [chart.title for chart in c.chart] for c in layout.category}


def _raw_events(path: Path) -> list[Any]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return list(EventFileLoader(str(path)).Load())


class Warned(ThreeTerms):
    """ThreeTerms with a replaceable term, to trigger each warning."""

    def __init__(self, kind: str) -> None:
        terms = {
            "dead": (LossTerm("fit"), LossTerm("dead")),
            "drown": (LossTerm("fit"), LossTerm("aux")),
            "nonfinite": (LossTerm("fit"), LossTerm("bad")),
            "unbounded": (LossTerm("fit"), LossTerm("weights", weight=0.1, mode="max")),
        }[kind]
        super().__init__(terms)
        self.kind = kind

    def compute_losses(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx))
        x, _ = batch
        extra = {
            "dead": lambda: (self.head(torch.tanh(self.encoder(x))) * 0).sum(),
            "drown": lambda: 1000 * losses["fit"],  # 1000x fit's gradient, at equal weights
            "nonfinite": lambda: torch.sqrt(self.head.weight.sum() * 0),
            "unbounded": lambda: torch.stack([p.sum() for p in self.parameters()]).sum(),
        }[self.kind]()
        name = self.loss_mix.names[1]
        return {"fit": losses["fit"], name: extra}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.mark.parametrize(
    ("kind", "steps", "match"),
    [
        ("dead", 8, "term 'dead' has a zero gradient on every monitored parameter"),
        ("drown", 8, "term 'aux' has .* of the gradient magnitude on group 'all' for 3 measure"),
        ("unbounded", 45, "maximized term 'weights' keeps growing"),  # 5 entries, 10 apart
    ],
)
def test_each_warning_names_the_term_once(kind: str, steps: int, match: str):
    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=steps, callbacks=[monitor]).fit(Warned(kind), loader())
    hits = [w for w in caught if re.search(match, str(w.message))]
    assert len(hits) == 1, [str(w.message) for w in caught]


def test_no_false_alarm_on_a_healthy_bounded_run():
    monitor = GradientMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=12, callbacks=[monitor]).fit(ThreeTerms(), loader())
    assert not [w for w in caught if "GradientMonitor" in str(w.message)]


def test_state_dict_round_trip_keeps_warnings_from_repeating():
    monitor = GradientMonitor(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=3, callbacks=[monitor]).fit(Warned("dead"), loader())
    restored = GradientMonitor(every_n_steps=1)
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_key == monitor.state_key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[restored]).fit(Warned("dead"), loader())
    assert not [w for w in caught if "zero gradient" in str(w.message)]


def test_a_monitor_used_again_reads_the_growth_of_the_new_fit() -> None:
    monitor = GradientMonitor(every_n_steps=1, summary=False)
    trainer(max_steps=30, callbacks=[monitor]).fit(ThreeTerms(), loader())
    assert monitor._alerts.growth_steps["bounded"] == 20  # entries 10 steps apart
    trainer(max_steps=12, callbacks=[monitor]).fit(ThreeTerms(), loader())
    # Counted from the new fit's step 0, not skipped until step 30 of the old one.
    assert monitor._alerts.growth_steps["bounded"] == 10
    assert len(monitor._alerts.growth["bounded"]) == 2


# -- DDP: two CPU processes; the figure is the magnitude of the global gradient -------------------


def _ddp_main(out: str, accumulate: int = 1) -> None:
    pl.seed_everything(0)
    model = ThreeTerms()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = GradientMonitor(every_n_steps=1)
    pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, _SaveFigures(out)],
    ).fit(model, loader(n=16 * accumulate, batch_size=8))
    torch.save(initial, Path(out) / "initial.pt")


class _SaveFigures(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
        path = Path(self.out) / f"rank{trainer.global_rank}.json"
        growth = {name: list(history) for name, history in monitor._alerts.growth.items()}
        path.write_text(json.dumps({**monitor.last_metrics, "growth": growth}))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        leave_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_logs_the_magnitude_of_the_global_gradient(tmp_path: Path, accumulate: int):
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(accumulate)],
        timeout=180,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the growth alert's history too (before the fix, per process)
    model = model_at(torch.load(tmp_path / "initial.pt"))
    # Every micro-batch of every process, as one batch: what one process would measure.
    whole_batch = next(iter(loader(n=16 * accumulate, batch_size=16 * accumulate)))
    expected = reference_figures(model, [whole_batch], {"fit": 1.0, "aux": 3.0, "bounded": -0.5})
    growth = ranks[0].pop("growth")
    assert_figures_close(ranks[0], expected)
    if accumulate == 1:  # the maximized term's value the alert reads: the global one
        bounded = float(model.compute_losses(whole_batch, 0)["bounded"])
        assert growth["bounded"][0][1] == pytest.approx(bounded, rel=1e-6)


if __name__ == "__main__":
    _ddp_main(sys.argv[1], int(sys.argv[2]))


def test_a_step_dropped_for_a_nonfinite_term_is_not_logged(tmp_path: Path):
    class NaNAtSecondMicroBatch(ThreeTerms):
        def __init__(self) -> None:
            LossMixModule.__init__(self, TERMS, nonfinite="skip")
            self.lr = 0.1
            self.encoder, self.head, self.aux_head = (
                nn.Linear(4, 8),
                nn.Linear(8, 1),
                nn.Linear(8, 2),
            )

        def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
            losses = dict(super().compute_losses(batch, batch_idx))
            if batch_idx == 3:  # second micro-batch of the second optimizer step
                losses["aux"] = losses["aux"] * math.nan
            return losses

    monitor = GradientMonitor(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[monitor]).fit(
            NaNAtSecondMicroBatch(), loader()
        )
    steps = [s for s, _ in read_scalars(tmp_path)["grad_magnitude/all/fit"]]
    assert steps == [0, 2]  # step 1 was dropped by the module: nothing measured is logged


def test_every_logger_gets_the_same_figures_and_prefixes_are_kept(tmp_path: Path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    loggers = [
        TensorBoardLogger(tmp_path / "tb", name="", version="", prefix="run"),
        CSVLogger(tmp_path / "csv", name="", version=""),
    ]
    monitor = GradientMonitor(every_n_steps=2)
    trainer(max_steps=4, callbacks=[monitor], logger=loggers).fit(ThreeTerms(), loader())
    tensorboard = read_scalars(tmp_path / "tb")
    with open(tmp_path / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("grad_magnitude/all/fit")]
    assert [int(row["step"]) for row in rows] == [1, 3]
    for tag, value in monitor.last_metrics.items():
        assert tensorboard[f"run-{tag}"][-1] == (3, pytest.approx(value, rel=1e-6))
        assert float(rows[-1][tag]) == pytest.approx(value, rel=1e-6)


def test_a_maximized_term_at_weight_zero_keeps_its_direction():
    from lightning_lossmix.schedules import Piecewise

    terms = (
        LossTerm("fit"),
        LossTerm("aux"),
        LossTerm("bounded", weight=Piecewise([100], [0.0, 1.0]), mode="max"),
    )
    torch.manual_seed(0)
    monitor = GradientMonitor(every_n_steps=1)
    capture = CaptureBatches(step=0)
    trainer(max_steps=1, callbacks=[capture, monitor]).fit(ThreeTerms(terms), loader())
    assert capture.state is not None
    expected = reference_figures(
        model_at(capture.state, terms), capture.batches, {"fit": 1.0, "aux": 1.0, "bounded": -0.0}
    )
    for tag in ("grad_cosine/head/fit_vs_bounded", "grad_cosine/encoder/aux_vs_bounded"):
        assert monitor.last_metrics[tag] == pytest.approx(expected[tag], rel=1e-5)


def test_inductor_donated_buffers_would_refuse_the_measurement_and_are_turned_off():
    """torch.compile (inductor) donates saved activations unless told not to."""

    class KeepsDonatedBuffers(GradientMonitor):
        def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            torch._functorch.config.donated_buffer = True  # undo the monitor's setting

    def fit(monitor: GradientMonitor) -> None:
        torch._dynamo.reset()
        pl.seed_everything(0)
        model = ThreeTerms()
        encoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        model.encoder = torch.compile(encoder)  # type: ignore[assignment]
        trainer(max_steps=2, callbacks=[monitor]).fit(model, loader())

    with pytest.raises(RuntimeError, match="donated buffers"):
        fit(KeepsDonatedBuffers(every_n_steps=2))
    monitor = GradientMonitor(every_n_steps=2)
    fit(monitor)
    assert monitor.last_metrics["grad_magnitude/encoder/fit"] > 0
