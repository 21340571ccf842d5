"""GradientMonitor's default groups and tags: every chart carries information."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMixModule, LossTerm
from lightning_lossmix.callbacks import GradientMonitor
from lightning_lossmix.callbacks._groups import resolve_groups

MakeTrainer = Callable[..., pl.Trainer]


def data() -> DataLoader:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


class Wrapped(LossMixModule):
    """The common `self.model = nn.Sequential(...)`."""

    def __init__(self) -> None:
        super().__init__([LossTerm("fit"), LossTerm("small", weight=0.5)])
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, y = batch
        out = self.model(x).squeeze(-1)
        return {"fit": (out - y).pow(2).mean(), "small": out.pow(2).mean()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_network_under_one_attribute_gets_its_parts_as_groups(make_trainer: MakeTrainer):
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=1, callbacks=[monitor]).fit(Wrapped(), data())
    groups = {tag.split("/")[1] for tag in monitor.last_metrics if "magnitude" in tag}
    assert groups == {"model.0", "model.2", "all"}  # not `model`, a copy of `all`


class FrozenFirst(Wrapped):
    """A first layer frozen in __init__ and trained from the third step on (fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.model[0].requires_grad_(False)


class Unfreeze(pl.Callback):
    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.batch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        if trainer.global_step == 2:
            module.model[0].requires_grad_(True)
        self.state = {k: v.clone() for k, v in module.state_dict().items()}
        self.batch = batch


def test_parameters_unfrozen_during_the_fit_are_measured_from_then_on(
    make_trainer: MakeTrainer,
) -> None:
    monitor, unfreeze = GradientMonitor(every_n_steps=1, summary=False), Unfreeze()
    make_trainer(max_steps=2, callbacks=[unfreeze, monitor]).fit(FrozenFirst(), data())
    assert {tag.split("/")[1] for tag in monitor.last_metrics if "magnitude" in tag} == {"all"}
    make_trainer(max_steps=3, callbacks=[unfreeze, monitor]).fit(FrozenFirst(), data())
    groups = {tag.split("/")[1] for tag in monitor.last_metrics if "magnitude" in tag}
    assert groups == {"model.0", "model.2", "all"}  # the default groups of a trained network
    reference = Wrapped()  # every parameter trainable: `all` as the third step sees it
    reference.load_state_dict(unfreeze.state)
    losses = reference.compute_losses(unfreeze.batch, 0)
    for name, weight in (("fit", 1.0), ("small", 0.5)):
        grads = torch.autograd.grad(losses[name], list(reference.parameters()), retain_graph=True)
        expected = weight * torch.cat([g.flatten() for g in grads]).norm().item()
        found = monitor.last_metrics[f"grad_magnitude/all/{name}"]
        assert abs(found / expected - 1) < 1e-5, name


def test_a_named_group_frozen_during_the_fit_is_left_out(make_trainer: MakeTrainer) -> None:
    class Freeze(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            if trainer.global_step == 2:
                module.model[0].requires_grad_(False)

    monitor = GradientMonitor(every_n_steps=1, groups={"first": ["model.0"], "last": ["model.2"]})
    make_trainer(max_steps=3, callbacks=[Freeze(), monitor]).fit(Wrapped(), data())
    assert {tag.split("/")[1] for tag in monitor.last_metrics if "magnitude" in tag} == {"last"}
    # A group with a pattern still trained keeps it: only the frozen pattern drops out.
    both = GradientMonitor(every_n_steps=1, groups={"body": ["model.0", "model.2"]})
    make_trainer(max_steps=3, callbacks=[Freeze(), both]).fit(Wrapped(), data())
    assert both._groups is not None and len(both._groups.parameters) == 2  # model.2's
    assert "grad_magnitude/body/fit" in both.last_metrics


class OneChild(Wrapped):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(8, 1)  # type: ignore[assignment]


def test_a_single_part_is_not_a_second_copy_of_all(make_trainer: MakeTrainer):
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=1, callbacks=[monitor]).fit(OneChild(), data())
    assert {tag.split("/")[1] for tag in monitor.last_metrics if tag.count("/") == 2} == {"all"}


class EightHeads(LossMixModule):
    """4 terms, 8 top-level children: a shared trunk and heads each reached by one term."""

    def __init__(self) -> None:
        super().__init__([LossTerm(n) for n in ("a", "b", "c", "d")])
        self.trunk = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32)
        for name in ("head_a", "head_b", "head_c", "head_d", "extra_1", "extra_2"):
            setattr(self, name, nn.Linear(32, 1))

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        x, _ = batch
        hidden = torch.tanh(self.mid(torch.tanh(self.trunk(x))))
        extra = self.extra_1(hidden).mean() + self.extra_2(hidden).mean()
        losses = {n: getattr(self, f"head_{n}")(hidden).pow(2).mean() for n in "abcd"}
        losses["a"] = losses["a"] + extra
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_four_terms_and_eight_children_write_about_40_informative_tags(
    make_trainer: MakeTrainer,
):
    monitor = GradientMonitor(every_n_steps=1)
    make_trainer(max_steps=1, callbacks=[monitor]).fit(EightHeads(), data())
    tags = [t for t in monitor.last_metrics if not t.startswith("grad_alert")]
    assert len(tags) <= 40, len(tags)
    # No constant chart: a head reached by one term has its magnitude only.
    shares = {t.split("/")[1] for t in tags if t.startswith("grad_share")}
    assert all(not g.startswith("head_") for g in shares)
    # The largest shared part is kept in full; smaller parts are dropped to stay in budget.
    assert "grad_share/mid/a" in tags and "grad_cosine/mid/a_vs_b" in tags
    # Everything is still there on request.
    everything = GradientMonitor(
        every_n_steps=1,
        groups={n: [n] for n, c in EightHeads().named_children() if isinstance(c, nn.Linear)},
    )
    make_trainer(max_steps=1, callbacks=[everything]).fit(EightHeads(), data())
    assert "grad_magnitude/extra_2/a" in everything.last_metrics


def test_default_groups_keep_the_four_largest_parts() -> None:
    groups = resolve_groups(EightHeads(), None)
    assert list(groups.indices)[:2] == ["mid", "trunk"]
    assert len(groups.indices) == 5 and "all" in groups.indices
    assert groups.complete
    restricted = resolve_groups(EightHeads(), {"heads": ["head_*"]})
    assert not restricted.complete


def test_a_submodule_registered_twice_is_found_by_either_name() -> None:
    # `self.features = self.net.features`: before the fix only "net.features" matched (the
    # first name), for the monitor's groups and for a balancer's `on=`.
    from lightning_lossmix.balancing._groups import resolve_named

    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model.features = model.net[0]
    want = list(model.net[0].parameters())
    for names in (["features"], ["features.*"], ["net.0"], ["net.0.*"]):
        found = resolve_groups(model, {"f": names})
        assert [found.parameters[i] for i in found.indices["f"]] == want, names
        assert resolve_named(model, names, "GradientBalance") == want, names
