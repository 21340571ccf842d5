"""GradientMonitor's warnings: silent on correct code, loud on genuine cases, at the user's line."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixModule, LossTerm, Player
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.callbacks._alerts import GROWTH_GAP, Alerts
from lightning_lossmix.schedules import Linear

sys.path.insert(0, str(Path(__file__).parent))
from _tensorboard import read_scalars

EXAMPLES = Path(__file__).parent.parent / "examples"
MakeTrainer = Callable[..., pl.Trainer]


@contextmanager
def monitor_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine: list[warnings.WarningMessage] = []
        yield mine
    mine += [w for w in caught if "GradientMonitor" in str(w.message)]


class QuickStart(LossMixModule):
    """The README's quick start, as printed there."""

    def __init__(self) -> None:
        super().__init__(
            [
                LossTerm("fit"),
                LossTerm("entropy", weight=Linear(0.0, 0.1, steps=100), mode="max"),
            ]
        )
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        logits = self.net(x)
        return {
            "fit": nn.functional.cross_entropy(logits, y),
            "entropy": torch.distributions.Categorical(logits=logits).entropy().mean(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def classes(n: int = 512) -> DataLoader:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=32)


def test_no_warning_on_the_readme_quick_start(make_trainer: MakeTrainer) -> None:
    pl.seed_everything(0)
    with monitor_warnings() as caught:
        make_trainer(max_epochs=10, log_every_n_steps=5, callbacks=[GradientMonitor()]).fit(
            QuickStart(), classes()
        )
    assert not caught, [str(w.message) for w in caught]


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("every_n_steps", [None, 1])
def test_the_bounded_max_term_of_min_max_is_not_called_unbounded(
    make_trainer: MakeTrainer, every_n_steps: int | None
) -> None:
    """Its tanh climbs steadily for a long time; its gradient shrinks as it does.

    Measured at every step, its gradient once rose for five steps in a row and doubled.
    """
    pytest.importorskip("sklearn")
    example = _load_example("min_max")
    pl.seed_everything(0)
    data = example.DigitsDataModule(batch_size=64, target="value")
    monitor = GradientMonitor(every_n_steps=every_n_steps)
    with monitor_warnings() as caught:
        trainer = make_trainer(max_epochs=3, log_every_n_steps=5, callbacks=[monitor])
        trainer.fit(example.DigitsRegressor(), datamodule=data)
    assert not [str(w.message) for w in caught if "keeps growing" in str(w.message)]
    if every_n_steps is None:  # nor anything else in 3 epochs (see the docs for the share)
        assert not caught, [str(w.message) for w in caught]


class Unbounded(QuickStart):
    """The seed question: maximize the sum of the weights (unbounded)."""

    def __init__(self) -> None:
        LossMixModule.__init__(self, [LossTerm("fit"), LossTerm("weights", 0.1, mode="max")])
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        fit = super().compute_losses(batch, batch_idx)["fit"]
        return {"fit": fit, "weights": torch.stack([w.sum() for w in self.parameters()]).sum()}


def test_the_unbounded_sum_of_weights_warns_at_the_users_line(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    with monitor_warnings() as caught:
        make_trainer(max_steps=60, log_every_n_steps=5, callbacks=[GradientMonitor()]).fit(
            Unbounded(), classes()
        )
    assert [str(w.message) for w in caught if "keeps growing" in str(w.message)]
    for warning in caught:  # the user's compute_losses, not the package's line
        assert warning.filename == __file__
        assert warning.lineno == Unbounded.compute_losses.__code__.co_firstlineno
    assert "grad_alert/unbounded/weights" in read_scalars(tmp_path / "logs")


def test_growth_is_read_at_measurements_ten_steps_apart_and_resumes() -> None:
    # A quadratic blow-up, norm and value doubling at each measurement (every step).
    figures = [(2.0**k, 4.0**k) for k in range(60)]
    alerts = Alerts(warn_share=0.95)
    grows = [alerts._grows("up", norm, value, step) for step, (norm, value) in enumerate(figures)]
    assert grows.index(True) == 4 * GROWTH_GAP  # entries at steps 0, 10, 20, 30, 40
    assert [entry[0] for entry in alerts.growth["up"]][-1] == 2.0**50

    restored = Alerts(warn_share=0.95)
    restored.load_state_dict(alerts.state_dict())
    assert restored._grows("up", 2.0**55, 4.0**55, 55) is False  # 5 steps after 50: not read
    assert restored._grows("up", 2.0**60, 4.0**60, 60) is True
    state = alerts.state_dict()
    del state["growth_steps"]  # a checkpoint written before the gap: the next one is read
    restored.load_state_dict(state)
    assert restored._grows("up", 2.0**51, 4.0**51, 51) is True


class TwentyTimes(QuickStart):
    """Two terms of equal weight on a shared network, one with 20x the other's gradient."""

    def __init__(self) -> None:
        LossMixModule.__init__(self, [LossTerm("strong"), LossTerm("weak")])
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        logits = self.net(x)
        fit = nn.functional.cross_entropy(logits, y)
        return {"strong": 20 * fit, "weak": fit}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_a_term_with_20x_the_pull_warns_and_logs_an_alert(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    with monitor_warnings() as caught:
        make_trainer(max_steps=4, callbacks=[GradientMonitor(every_n_steps=1)]).fit(
            TwentyTimes(), classes()
        )
    [warning] = [w for w in caught if "drowns" in str(w.message) and "'all'" in str(w.message)]
    assert "term 'strong' has 95.2% of the gradient magnitude on group 'all'" in str(
        warning.message
    )
    assert warning.filename == __file__
    scalars = read_scalars(tmp_path / "logs")
    assert scalars["grad_alert/drowns_all/strong"] == [(2, 1.0), (3, 1.0)]  # from the 3rd on


class PlainModule(pl.LightningModule):
    """Any LightningModule holding a LossMix; `sqrt` at 0 gives a NaN gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_mix = LossMix([LossTerm("fit"), LossTerm("bad")])
        self.net = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        out = self.net(x).squeeze(-1)
        losses = {"fit": out.pow(2).mean(), "bad": torch.sqrt(self.net.weight.sum() * 0)}
        return self.loss_mix(losses, step=self.global_step).total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_nonfinite_gradient_warns_and_logs_an_alert(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    with monitor_warnings() as caught:
        make_trainer(max_steps=1, callbacks=[GradientMonitor(every_n_steps=1)]).fit(
            PlainModule(), classes()
        )
    assert len(caught) == 1, [str(w.message) for w in caught]
    [warning] = caught
    assert "the gradient of term 'bad' is not finite at step 0" in str(warning.message)
    assert warning.filename == __file__  # training_step: there is no compute_losses
    assert read_scalars(tmp_path / "logs")["grad_alert/nonfinite_gradient/bad"] == [(0, 1.0)]


def test_every_n_steps_longer_than_the_fit_warns_once(make_trainer: MakeTrainer) -> None:
    monitor = GradientMonitor(every_n_steps=100)
    with monitor_warnings() as caught:
        make_trainer(max_steps=5, callbacks=[monitor]).fit(QuickStart(), classes())
        make_trainer(max_steps=5, callbacks=[monitor]).fit(QuickStart(), classes())
    [warning] = caught
    assert "measures every 100 optimizer steps and this fit took 5" in str(warning.message)


class Heads(QuickStart):
    """A trunk and two heads; `aux` reaches only its own head."""

    def __init__(self, aux_weight: Any = 1.0) -> None:
        LossMixModule.__init__(self, [LossTerm("fit"), LossTerm("aux", aux_weight)])
        self.trunk = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.aux_head = nn.Linear(8, 1)

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        fit = nn.functional.cross_entropy(self.head(torch.tanh(self.trunk(x))), y)
        return {"fit": fit, "aux": self.aux_head(x).pow(2).mean()}


def test_a_term_outside_restricted_groups_is_not_said_to_train_nothing(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    monitor = GradientMonitor(every_n_steps=1, groups={"trunk": ["trunk"]})
    with monitor_warnings() as caught:
        make_trainer(max_steps=1, callbacks=[monitor]).fit(Heads(), classes())
    [warning] = caught
    assert "term 'aux' reaches none of the monitored groups" in str(warning.message)
    assert "trains nothing" not in str(warning.message)
    assert read_scalars(tmp_path / "logs")["grad_alert/zero_gradient/aux"] == [(0, 1.0)]


class IdleAux(Heads):
    """`aux` is off the graph while its scheduled weight is 0 (not computed yet)."""

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        losses = dict(super().compute_losses(batch, batch_idx))
        if self.global_step == 0:
            losses["aux"] = torch.zeros(())
        return losses


def test_no_zero_gradient_alert_for_a_term_at_weight_zero(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    # Before the fix the idle term was said to train nothing, at step 0, with its alert.
    monitor = GradientMonitor(every_n_steps=1)
    with monitor_warnings() as caught:
        make_trainer(max_steps=2, callbacks=[monitor]).fit(IdleAux(Linear(0.0, 1.0, 1)), classes())
    assert not caught, [str(w.message) for w in caught]
    metrics = read_scalars(tmp_path / "logs")
    assert "grad_alert/zero_gradient/aux" not in metrics
    assert [s for s, _ in metrics["grad_magnitude/all/aux"]] == [1]  # measured once it trains


def test_no_suggested_weight_for_a_term_whose_scheduled_weight_is_zero(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=2, callbacks=[monitor]).fit(Heads(Linear(0.0, 1.0, 1)), classes())
    metrics = read_scalars(tmp_path / "logs")
    assert [s for s, _ in metrics["grad_suggested_weight/fit"]] == [1]  # not at step 0
    assert [s for s, _ in metrics["grad_suggested_weight/aux"]] == [1]


class Game(LossMixModule):
    """Two players: a one-term critic and a two-term generator; the critic's term is NaN-free."""

    def __init__(self) -> None:
        terms = [LossTerm("critic"), LossTerm("fool"), LossTerm("dead")]
        players = [Player("critic", ["critic"]), Player("generator", ["fool", "dead"])]
        super().__init__(terms, players=players)
        self.generator = nn.Linear(8, 8)
        self.critic = nn.Linear(8, 1)

    def compute_losses(self, batch: Any, batch_idx: int, player: str | None = None) -> Any:
        x, _ = batch
        score = self.critic(self.generator(x)).mean()
        if player == "critic":
            return {"critic": score}
        return {"fool": -score, "dead": (self.generator(x) * 0).sum()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.critic.parameters(), lr=0.01),
            torch.optim.SGD(self.generator.parameters(), lr=0.01),
        ]


def test_players_warn_at_the_logged_step_and_a_one_term_player_gets_no_suggestion(
    make_trainer: MakeTrainer,
) -> None:
    monitor = GradientMonitor(every_n_steps=2)
    with monitor_warnings() as caught:
        make_trainer(max_steps=4, callbacks=[monitor]).fit(Game(), classes())  # 2 batches
    [warning] = caught
    assert "term 'dead' has a zero gradient" in str(warning.message)
    assert "at step 1:" in str(warning.message)  # the logged step; Lightning's global is 2-3
    assert "grad_suggested_weight/critic" not in monitor.last_metrics
    assert "grad_magnitude/critic/critic" in monitor.last_metrics
