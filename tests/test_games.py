"""Games: `opposed_by` and `GradientReversal` give the hand-computed gradients."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _trainers import quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixError, LossMixModule, LossTerm
from lightning_lossmix.balancing import Balancer, GradientBalance
from lightning_lossmix.nn import GradientReversal
from lightning_lossmix.schedules import DANN, Linear


class DomainGame(nn.Module):
    """A feature extractor, a label head and a domain head, as in DANN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)
        self.domain = nn.Linear(8, 1)

    def losses(self, x: Tensor, y: Tensor, d: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {
            "label": nn.functional.cross_entropy(self.classifier(h), y),
            "domain": nn.functional.binary_cross_entropy_with_logits(self.domain(h).squeeze(-1), d),
        }


def batch() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(16, 5, generator=g),
        torch.randint(0, 3, (16,), generator=g),
        (torch.rand(16, generator=g) > 0.5).float(),
    )


def hand_gradients(
    model: DomainGame, weights: Mapping[str, float], opposed: Mapping[str, list[nn.Parameter]]
) -> dict[str, Tensor]:
    """Each parameter descends sum_t w_t L_t, but ascends it for the terms that it opposes."""
    losses = model.losses(*batch())
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for term, value in losses.items():
        against = {id(p) for p in opposed.get(term, [])}
        params = dict(model.named_parameters())
        found = torch.autograd.grad(
            value, list(params.values()), allow_unused=True, retain_graph=True
        )
        for (name, p), g in zip(params.items(), found, strict=True):
            if g is not None:
                grads[name] += (-1.0 if id(p) in against else 1.0) * weights[term] * g
    return grads


@pytest.mark.parametrize("mode", ["min", "max"])
def test_opposed_by_gives_the_hand_computed_gradients(mode: str) -> None:
    model = DomainGame()
    mix = LossMix(
        [LossTerm("label"), LossTerm("domain", weight=0.7, mode=mode, opposed_by=("features",))]
    )
    model.mix = mix
    mix.bind(model)
    out = mix(model.losses(*batch()), step=0)
    out.total.backward()
    sign = 1.0 if mode == "min" else -1.0
    expected = hand_gradients(
        model, {"label": 1.0, "domain": sign * 0.7}, {"domain": list(model.features.parameters())}
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # The opposed-gradient surrogate has value 0: the total is still the weighted sum.
    plain = out.values["label"] + sign * 0.7 * out.values["domain"]
    assert out.total.item() == pytest.approx(plain.item(), rel=1e-6)


def test_opposed_by_equals_a_gradient_reversal_layer_of_scale_one() -> None:
    def gradients(opposed: bool) -> list[Tensor]:
        model = DomainGame()
        reverse = GradientReversal(1.0)
        x, y, d = batch()
        h = model.features(x)
        head_input = h if opposed else reverse(h)
        losses = {
            "label": nn.functional.cross_entropy(model.classifier(h), y),
            "domain": nn.functional.binary_cross_entropy_with_logits(
                model.domain(head_input).squeeze(-1), d
            ),
        }
        domain = LossTerm("domain", opposed_by=("features",) if opposed else ())
        mix = LossMix([LossTerm("label"), domain])
        model.mix = mix
        mix.bind(model)
        mix(losses, step=0).total.backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(gradients(True), gradients(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_reversal_backward_is_minus_scale_times_grad() -> None:
    x = torch.randn(4, requires_grad=True)
    weights = torch.randn(4)
    (GradientReversal(0.3)(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * weights)
    y = torch.randn(3)
    assert torch.equal(GradientReversal(2.0)(y), y)


def test_gradient_reversal_follows_its_schedule() -> None:
    reverse = GradientReversal(DANN(gamma=10.0))
    for step, total in [(0, 100), (25, 100), (100, 100)]:
        reverse.set_step(step, total)
        x = torch.ones(1, requires_grad=True)
        reverse(x).sum().backward()
        p = step / total
        expected = 2.0 / (1.0 + torch.exp(torch.tensor(-10.0 * p))) - 1.0
        torch.testing.assert_close(x.grad, -expected.reshape(1))


@pytest.mark.parametrize(
    ("scale", "match"),
    [(-1.0, "`scale` should be >= 0"), (Linear(1.0, -1.0, steps=5), "goes down to -1.0")],
)
def test_gradient_reversal_rejects_negative_scales(scale: Any, match: str) -> None:
    with pytest.raises(LossMixError, match=match):
        GradientReversal(scale)


class DANNModule(LossMixModule):
    def __init__(
        self, opposed_by: tuple[str, ...] = ("features",), balancer: Balancer | None = None
    ) -> None:
        super().__init__(
            [
                LossTerm("label"),
                LossTerm("domain", weight=Linear(0.0, 1.0, 4), opposed_by=opposed_by),
            ],
            balancer=balancer,
        )
        self.net = DomainGame()
        self.features = self.net.features
        self.classifier = self.net.classifier
        self.domain = self.net.domain
        self.reverse = GradientReversal(DANN())

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        return self.net.losses(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*batch()), batch_size=8)


def test_module_binds_opposed_by_and_sets_the_reversal_layers_step() -> None:
    model = DANNModule()
    quiet_trainer(max_steps=3).fit(model, loader())
    assert model.loss_mix.opposed_parameters("domain") == list(model.features.parameters())
    assert model.reverse.step == 2 and model.reverse.total_steps == 3


class EvalMode(pl.Callback):
    """Puts the whole module in eval mode for each training batch (dropout, batch norm off)."""

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        module.eval()


def test_a_module_in_eval_mode_in_training_still_plays_and_balances() -> None:
    # Before the fix the mix followed the module's mode: `opposed_by` was dropped (the game
    # became cooperation) and a balancer kept its weights of 1, with no warning.
    def fit(*callbacks: pl.Callback) -> tuple[Tensor, Tensor]:
        torch.manual_seed(0)
        model = DANNModule(balancer=GradientBalance(on="features"))
        quiet_trainer(max_steps=3, callbacks=list(callbacks)).fit(model, loader())
        balancer = model.loss_mix.balancer
        assert balancer is not None
        return nn.utils.parameters_to_vector(model.net.parameters()), balancer.last_multipliers

    (played, balanced), (played_eval, balanced_eval) = fit(), fit(EvalMode())
    torch.testing.assert_close(played_eval, played)
    torch.testing.assert_close(balanced_eval, balanced)
    assert not torch.equal(balanced, torch.ones(2))


@pytest.mark.parametrize(
    ("opposed_by", "match"),
    [
        (
            ("encoder",),
            r"'encoder', which is not a submodule.*\['classifier', 'domain', 'features', 'net'\]",
        ),
        (("reverse",), "'reverse', which has no parameters"),
        (("classifier",), "does not depend on their parameters"),
    ],
)
def test_bad_opposed_by_names_the_culprit(opposed_by: tuple[str, ...], match: str) -> None:
    model = DANNModule(opposed_by)
    if opposed_by == ("classifier",):  # reachable module, but the domain term never uses it
        with pytest.raises(LossMixError, match=match):
            quiet_trainer(max_steps=2).fit(model, loader())
        return
    with pytest.raises(LossMixError, match=match):
        quiet_trainer(max_steps=1).fit(model, loader())


def test_opposed_by_without_bind_in_a_plain_module_explains_the_fix() -> None:
    model = DomainGame()
    mix = LossMix([LossTerm("label"), LossTerm("domain", opposed_by="features")])
    with pytest.raises(LossMixError, match=r"call `self.loss_mix.bind\(self\)`"):
        mix(model.losses(*batch()), step=0)


def test_opposed_by_from_a_list_and_its_repr() -> None:
    term = LossTerm("domain", opposed_by=["features", "backbone.layer4"])  # type: ignore[arg-type]
    assert term.opposed_by == ("features", "backbone.layer4")
    assert eval(repr(term)) == term
    with pytest.raises(LossMixError, match="`opposed_by` should be submodule names"):
        LossTerm("domain", opposed_by=("",))


def test_gradient_monitor_shows_which_way_each_group_pushes_an_opposed_term() -> None:
    from lightning_lossmix.callbacks import GradientMonitor

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, b: Any, i: int) -> None:
            self.state = {k: v.clone() for k, v in module.state_dict().items()}
            self.batch = b

    model, monitor, capture = DANNModule(), GradientMonitor(every_n_steps=2), Capture()
    quiet_trainer(max_steps=2, callbacks=[capture, monitor]).fit(model, loader())
    figures = monitor.last_metrics
    assert figures["grad_direction/features/domain"] == pytest.approx(-1.0)
    assert figures["grad_direction/domain/domain"] == pytest.approx(1.0)
    assert "grad_direction/classifier/domain" not in figures  # not reached: no constant chart
    assert "grad_direction/features/label" not in figures  # only opposed terms get one

    reference = DANNModule()
    reference.load_state_dict(capture.state)
    losses = reference.net.losses(*capture.batch)
    features = list(reference.features.parameters())
    g_label, g_domain = (
        torch.cat(
            [g.flatten() for g in torch.autograd.grad(losses[n], features, retain_graph=True)]
        )
        for n in ("label", "domain")
    )
    weight = 1 / 4  # Linear(0, 1, 4) at step 1
    assert figures["grad_magnitude/features/domain"] == pytest.approx(
        weight * g_domain.norm().item(), rel=1e-5
    )
    # The features push the domain term up: their pull on it is -g_domain.
    cosine = nn.functional.cosine_similarity(g_label, -g_domain, dim=0).item()
    assert figures["grad_cosine/features/label_vs_domain"] == pytest.approx(cosine, rel=1e-5)


def test_a_reversal_layer_that_is_never_stepped_warns() -> None:
    reverse = GradientReversal(DANN())
    with pytest.warns(UserWarning, match="its step was never set"):
        reverse(torch.ones(2, requires_grad=True))
    reverse.set_step(0, 10)
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        reverse(torch.ones(2, requires_grad=True))  # stepped: no warning


# --- opposed_by follows the module as it is now ------------------------------------------------


class GameModule(LossMixModule):
    """DANN's game with a constant weight, so that the opposition acts from the first step."""

    def __init__(self) -> None:
        super().__init__(
            [LossTerm("label"), LossTerm("domain", weight=0.5, opposed_by=("net.features",))]
        )
        self.net = DomainGame()

    def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        return self.net.losses(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradientCapture(pl.Callback):
    def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
        self.grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def one_step_gradients(model: GameModule) -> dict[str, Tensor]:
    capture = GradientCapture()
    data = DataLoader(TensorDataset(*batch()), batch_size=16)
    quiet_trainer(max_steps=1, callbacks=[capture]).fit(model, data)
    return capture.grads


def assert_same_gradients(model: GameModule) -> None:
    """One step of `model` against a freshly built module with the same weights, and by hand."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = one_step_gradients(model)
    fresh = GameModule()
    fresh.load_state_dict(state)
    expected = one_step_gradients(fresh)
    assert grads.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-6, atol=1e-8, msg=name)
    reference = GameModule()
    reference.load_state_dict(state)
    opposed = {"domain": list(reference.net.features.parameters())}
    by_hand = hand_gradients(reference.net, {"label": 1.0, "domain": 0.5}, opposed)
    for name, grad in by_hand.items():
        torch.testing.assert_close(grads[f"net.{name}"], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_opposed_by_applies_to_a_submodule_replaced_between_fits() -> None:
    model = GameModule()
    one_step_gradients(model)
    torch.manual_seed(5)
    model.net.features = nn.Sequential(nn.Linear(5, 8), nn.Tanh())  # e.g. a new backbone
    assert_same_gradients(model)


def test_opposed_by_applies_to_parameters_unfrozen_after_the_first_step() -> None:
    model = GameModule()
    model.net.features[0].weight.requires_grad_(False)  # frozen at the first step
    grads = one_step_gradients(model)
    assert "net.features.0.weight" not in grads
    model.net.features[0].weight.requires_grad_(True)
    assert_same_gradients(model)
    assert model.loss_mix.opposed_parameters("domain") == list(model.net.features.parameters())


def test_opposed_by_a_fully_frozen_submodule_trains_the_rest_as_usual() -> None:
    model = GameModule()
    model.net.features.requires_grad_(False)  # a warm-up with a frozen extractor
    before = copy.deepcopy(model.net)
    grads = one_step_gradients(model)
    assert model.loss_mix.opposed_parameters("domain") == []
    assert not any(name.startswith("net.features") for name in grads)
    losses = before.losses(*batch())
    head = list(before.domain.parameters())
    expected = torch.autograd.grad(0.5 * losses["domain"], head)
    for (name, _), grad in zip(before.domain.named_parameters(), expected, strict=True):
        torch.testing.assert_close(grads[f"net.domain.{name}"], grad, msg=name)


def test_a_replaced_submodule_that_the_term_no_longer_uses_is_an_error() -> None:
    class Aliased(GameModule):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = [self.net.features]  # an alias the losses use

        def compute_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
            x, y, d = batch
            h = self.extractor[0](x)
            return {
                "label": nn.functional.cross_entropy(self.net.classifier(h), y),
                "domain": nn.functional.binary_cross_entropy_with_logits(
                    self.net.domain(h).squeeze(-1), d
                ),
            }

    model = Aliased()
    one_step_gradients(model)  # the alias is the named submodule: fine
    model.net.features = nn.Sequential(nn.Linear(5, 8), nn.Tanh())  # the alias still points back
    with pytest.raises(LossMixError, match=r"'domain' is opposed by \('net.features',\), but"):
        one_step_gradients(model)
