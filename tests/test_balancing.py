"""Each balancer against its paper's update rule, computed independently on small cases."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_lossmix import LossMixError, LossTerm
from lightning_lossmix.balancing import (
    DWA,
    FAMO,
    Balancer,
    GradientBalance,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from lightning_lossmix.balancing._adam import adam_step
from lightning_lossmix.balancing._uncertainty import uncertainty_optimum
from lightning_lossmix.schedules import Piecewise

TERMS = [LossTerm("a"), LossTerm("b"), LossTerm("c")]
ONES = {"a": 1.0, "b": 1.0, "c": 1.0}


def as_floats(factors: Mapping[str, Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in factors.items()}


# -- VQGAN's adaptive weight ------------------------------------------------------------------


class TinyVQGAN(nn.Module):
    """A decoder ending in `conv_out` and a patch discriminator, as in taming-transformers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.decoder = nn.Sequential()
        self.decoder.add_module("conv_in", nn.Conv2d(3, 8, 3, padding=1))
        self.decoder.add_module("act", nn.ReLU())
        self.decoder.add_module("conv_out", nn.Conv2d(8, 3, 3, padding=1))
        self.discriminator = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3)
        )

    def losses(self, z: Tensor, x: Tensor) -> dict[str, Tensor]:
        xrec = self.decoder(z)
        return {
            "nll": (x - xrec).abs().mean(),
            "g_loss": -self.discriminator(xrec).mean(),
        }


def taming_adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's ``calculate_adaptive_weight``, written from its published formula."""
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach()


@pytest.mark.parametrize("step", [0, 4, 5, 9])
def test_gradient_balance_reproduces_vqgan_adaptive_weight(step: int) -> None:
    model = TinyVQGAN()
    start, discriminator_weight = 5, 0.8
    terms = [
        LossTerm("nll"),
        LossTerm("g_loss", weight=Piecewise([start], [0.0, discriminator_weight])),
    ]
    balancer = GradientBalance(
        terms=["g_loss"], reference="nll", on="decoder.conv_out.weight", eps=1e-4, max_weight=1e4
    )
    balancer.bind(terms, model)
    torch.manual_seed(step)
    values = model.losses(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    declared = {term.name: term.weight_at(step) for term in terms}
    factors = balancer.factors(values, declared, step=step)
    effective = declared["g_loss"] * factors["g_loss"]
    adopt = 0.0 if step < start else 1.0  # taming's adopt_weight(disc_factor=1, step, start)
    expected = (
        taming_adaptive_weight(values["nll"], values["g_loss"], model.decoder.conv_out.weight)
        * discriminator_weight
        * adopt
    )
    torch.testing.assert_close(effective, expected, rtol=1e-6, atol=0.0)
    assert factors["g_loss"] > 0 and not factors["g_loss"].requires_grad
    # The weight alone, not the layer: the bias changes the norm (taming uses the weight).
    layer = GradientBalance(terms=["g_loss"], reference="nll", on="decoder.conv_out", eps=1e-4)
    layer.bind(terms, model)
    assert float(layer.factors(values, declared, step=step)["g_loss"]) != pytest.approx(
        float(factors["g_loss"]), rel=1e-3
    )


def test_gradient_balance_pulls_follow_declared_weights_and_keep_their_sum() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    out = net(x)
    values = {
        "a": out[:, 0].pow(2).mean(),
        "b": 30 * out[:, 1].abs().mean(),
        "c": 0.01 * out.sum(),
    }
    declared = {"a": 1.0, "b": 2.0, "c": 0.5}
    balancer = GradientBalance(on="weight")
    balancer.bind(TERMS, net)
    factors = as_floats(balancer.factors(values, declared, step=0))
    norms = {
        n: float(torch.autograd.grad(v, net.weight, retain_graph=True)[0].norm())
        for n, v in values.items()
    }
    pulls = {n: declared[n] * factors[n] * norms[n] for n in values}
    per_declared = [pulls[n] / declared[n] for n in values]
    assert per_declared == pytest.approx([per_declared[0]] * 3, rel=1e-5)
    assert sum(pulls.values()) == pytest.approx(
        sum(declared[n] * norms[n] for n in values), rel=1e-5
    )
    assert set(balancer.gradients) == {"a", "b", "c"}  # shared with the monitor
    grad_b = torch.autograd.grad(values["b"], net.weight, retain_graph=True)[0]
    torch.testing.assert_close(balancer.gradients["b"][net.weight], grad_b.reshape(-1))


def test_gradient_balance_without_eps_on_zero_norms_stays_in_its_bounds() -> None:
    # Before the fix, eps=0 with every norm 0 gave 0 / 0: NaN multipliers and a NaN total.
    net = nn.Linear(2, 1)
    balancer = GradientBalance(on="weight", eps=0.0, max_weight=50.0)
    balancer.bind(TERMS[:2], net)
    flat = torch.relu(net(torch.ones(1, 2)).sum() - 100.0)  # dead: zero gradients
    found = as_floats(balancer.factors({"a": flat + 1, "b": 2 * flat + 1}, ONES, step=0))
    assert found == {"a": 0.0, "b": 0.0}
    live = net(torch.ones(1, 2)).sum()
    found = as_floats(balancer.factors({"a": live, "b": flat + 1}, ONES, step=1))
    assert found["b"] == 50.0  # a zero norm against a non-zero target: max_weight


def test_gradient_balance_smoothing_every_n_steps_and_accumulation() -> None:
    net = nn.Linear(2, 1, bias=False)
    balancer = GradientBalance(on="weight", smoothing=0.5, every_n_steps=2, eps=0.0)
    balancer.bind(TERMS[:2], net)
    x = torch.tensor([[1.0, 0.0]])

    def call(scale_b: float, step: int) -> dict[str, float]:
        y = net(x).squeeze()
        return as_floats(balancer.factors({"a": y, "b": scale_b * y}, ONES, step=step))

    first = call(4.0, step=0)  # norms 1 and 4: debiased average = the norms
    assert first == pytest.approx({"a": 2.5, "b": 0.625})
    assert call(100.0, step=0) == first  # a second micro-batch of step 0: reused
    assert balancer.gradients == {}
    assert call(100.0, step=1) == first  # held until step 2
    second = call(2.0, step=2)  # EMA of b: (0.5 * 0.5 * 4 + 0.5 * 2) / (1 - 0.25) = 8/3
    b = (0.25 * 4 + 0.5 * 2) / 0.75
    target = (1.0 + b) / 2
    assert second == pytest.approx({"a": target, "b": target / b})


def test_last_shared_layer_is_nearest_the_losses_skip_connections_included() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head_a = nn.Linear(4, 1)  # registered before the trunk on purpose
            self.head_b = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)
            self.second = nn.Linear(4, 4)
            self.only_a = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            h = self.first(x)
            h = h + self.second(torch.relu(h))  # a skip connection past `second`
            return {
                "a": self.head_a(h).pow(2).mean(),
                "b": self.head_b(h).pow(2).mean(),
                "c": self.only_a(x).sum() + self.head_a(h).mean(),
            }

    model = Heads()
    balancer = GradientBalance(terms=["a", "b"])
    balancer.bind(TERMS, model)
    balancer.factors(model(torch.randn(5, 3)), ONES, step=0)
    assert balancer.group.name == "second"
    assert balancer.group.params == [model.second.weight, model.second.bias]


def test_gradient_balance_errors_name_the_fix() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(LossMixError, match="does not declare"):
        GradientBalance(terms=["a", "z"]).bind(TERMS, net)
    with pytest.raises(LossMixError, match="single term has nothing"):
        GradientBalance(terms=["a"]).bind(TERMS, net)
    with pytest.raises(LossMixError, match="'decoder', which matches no parameter"):
        GradientBalance(on="decoder").bind(TERMS, net)
    with pytest.raises(LossMixError, match=r"`smoothing` should be in \[0, 1\)"):
        GradientBalance(smoothing=1.0)
    balancer = GradientBalance(terms=["a", "b"], on="1")
    balancer.bind(TERMS, net)
    hidden = net[0](torch.ones(1, 2))
    values = {"a": net[1](hidden).sum(), "b": hidden.sum(), "c": hidden.sum()}
    with pytest.raises(LossMixError, match="'b' does not reach the group '1'"):
        balancer.factors(values, ONES, step=0)


def hand_balanced(values: Mapping[str, Tensor], params: list[Tensor]) -> list[float]:
    """GradientBalance's multipliers from norms taken with torch.autograd.grad on `params`."""
    norms = []
    for value in values.values():
        grads = torch.autograd.grad(value, params, retain_graph=True)
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        norms.append(float(torch.cat([g.reshape(-1) for g in dense]).norm()))
    target = sum(norms) / len(norms)
    return [target / (n + 1e-8) for n in norms]


def test_gradient_balance_on_a_sparse_embedding() -> None:
    # Before the fix: "Could not run 'aten::linalg_vector_norm' ... from the 'SparseCPU' backend".
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, sparse=True)
    balancer = GradientBalance(on="weight")
    balancer.bind(TERMS[:2], emb)
    h = emb(torch.tensor([0, 2, 2, 5]))
    values = {"a": h.pow(2).sum(), "b": 3 * h.sum()}
    found = as_floats(balancer.factors(values, ONES, step=0))
    assert list(found.values()) == pytest.approx(hand_balanced(values, [emb.weight]))
    dense = torch.autograd.grad(values["b"], emb.weight, retain_graph=True)[0].to_dense()
    torch.testing.assert_close(balancer.gradients["b"][emb.weight], dense.reshape(-1))


@pytest.mark.parametrize("on", ["net.*", None])
def test_a_group_frozen_in_part_is_measured_on_what_still_trains(on: str | None) -> None:
    # Before the fix: autograd's bare "One of the differentiated Tensors does not require grad".
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    model.head = nn.Linear(4, 2)
    balancer = GradientBalance(on=on)
    balancer.bind(TERMS[:2], model)
    x = torch.randn(5, 3)

    def terms() -> dict[str, Tensor]:
        out = model.head(model.net(x))
        return {"a": out[:, 0].pow(2).mean(), "b": 5 * (out[:, 1] - 1).pow(2).mean()}

    first = [model.net[0].weight, model.net[0].bias, model.net[2].weight, model.net[2].bias]
    values = terms()
    found = balancer.factors(values, ONES, step=0)
    group = first if on else [model.head.weight, model.head.bias]
    assert list(as_floats(found).values()) == pytest.approx(hand_balanced(values, group))
    frozen = model.net[0] if on else model.head  # the default group is found again below it
    frozen.requires_grad_(False)
    values = terms()
    found = balancer.factors(values, ONES, step=1)
    assert list(as_floats(found).values()) == pytest.approx(hand_balanced(values, first[2:]))
    frozen.requires_grad_(True)  # a named group takes them back; the last layer stays found
    values = terms()
    found = balancer.factors(values, ONES, step=2)
    group = first if on else first[2:]
    assert list(as_floats(found).values()) == pytest.approx(hand_balanced(values, group))
    if on:
        model.net.requires_grad_(False)
        with pytest.raises(LossMixError, match=r"group 'net.\*' is frozen"):
            balancer.factors(terms(), ONES, step=3)


def test_a_named_group_may_be_frozen_in_part_before_binding() -> None:
    # BackboneFinetuning freezes in on_fit_start, before the first step binds the mix: before
    # the fix, binding refused the frozen entry though the group trains in part and later whole.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    balancer = GradientBalance(on=["0", "2"])
    balancer.bind(TERMS[:2], model)
    x = torch.randn(5, 3)

    def terms() -> dict[str, Tensor]:
        out = model(x)
        return {"a": out[:, 0].pow(2).mean(), "b": 5 * (out[:, 1] - 1).pow(2).mean()}

    values = terms()
    found = as_floats(balancer.factors(values, ONES, step=0))
    assert list(found.values()) == pytest.approx(hand_balanced(values, list(model[2].parameters())))
    model[0].requires_grad_(True)
    values = terms()
    found = as_floats(balancer.factors(values, ONES, step=1))
    assert list(found.values()) == pytest.approx(hand_balanced(values, list(model.parameters())))
    with pytest.raises(LossMixError, match="'3', which matches no parameter"):
        GradientBalance(on=["0", "3"]).bind(TERMS[:2], model)
    with pytest.raises(LossMixError, match=r"'1', .* \(top-level: \['0', '2'\]\)"):
        GradientBalance(on=["1"]).bind(TERMS[:2], model)  # the Tanh: no parameter


def test_balancers_in_evaluation_use_the_last_training_decision() -> None:
    net = nn.Linear(2, 1)
    balancer = GradientBalance(on="weight")
    balancer.bind(TERMS[:2], net)
    x = torch.tensor([[1.0, 2.0]])
    with torch.no_grad():  # before any training step: ones, no gradient needed
        y = net(x).squeeze()
        assert as_floats(balancer.factors({"a": y, "b": 3 * y}, ONES, step=0)) == {
            "a": 1.0,
            "b": 1.0,
        }
    y = net(x).squeeze()
    trained = as_floats(balancer.factors({"a": y, "b": 3 * y}, ONES, step=7))
    balancer.eval()
    with torch.inference_mode():
        y = net(x).squeeze()
        assert as_floats(balancer.factors({"a": y, "b": 100 * y}, ONES, step=9)) == trained
    restored = GradientBalance(on="weight")
    restored.bind(TERMS[:2], net)
    restored.load_state_dict(balancer.state_dict())
    restored.eval()
    with torch.no_grad():
        assert as_floats(restored.factors({"a": y, "b": y}, ONES, step=9)) == trained


# -- uncertainty weighting ----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["log", "softplus"])
def test_uncertainty_weighting_reaches_its_closed_form_optimum(form: str) -> None:
    losses = torch.tensor([0.3, 2.0, 9.0])
    declared = {"a": 1.0, "b": 0.5, "c": 2.0}  # the optimum does not depend on them
    balancer = UncertaintyWeighting(regularizer=form)  # type: ignore[arg-type]
    balancer.bind(TERMS, None)
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)
    for step in range(3000):
        values = {n: losses[i].clone().requires_grad_() for i, n in enumerate("abc")}
        factors = balancer.factors(values, declared, step=step)
        total = sum(declared[n] * factors[n] * values[n] for n in "abc")
        regularizer = balancer.regularizer()
        assert regularizer is not None
        optimizer.zero_grad()
        (total + regularizer).backward()
        optimizer.step()
    expected = uncertainty_optimum(losses, form)  # type: ignore[arg-type]
    torch.testing.assert_close(balancer.log_vars.detach(), expected, atol=2e-3, rtol=0)
    if form == "log":
        torch.testing.assert_close(expected, losses.log())
    else:  # s* solves exp(-s) L = sigmoid(s), the stationarity condition
        torch.testing.assert_close(losses * (-expected).exp(), torch.sigmoid(expected))


def test_uncertainty_weighting_learns_through_the_loss_and_checks_its_optimizer() -> None:
    balancer = UncertaintyWeighting(init=0.5)
    balancer.bind(TERMS[:2], None)
    assert [n for n, _ in balancer.named_parameters()] == ["log_vars"]
    w = nn.Parameter(torch.tensor(2.0))
    values = {"a": w * 3.0, "b": w * w}
    factors = balancer.factors(values, {"a": 1.0, "b": 2.0}, step=0)
    assert factors["a"].requires_grad
    regularizer = balancer.regularizer()
    assert regularizer is not None
    (factors["a"] * values["a"] + 2.0 * factors["b"] * values["b"] + regularizer).backward()
    grad = balancer.log_vars.grad
    assert grad is not None  # d/ds_i of d_i (exp(-s_i) L_i + s_i) = d_i (1 - exp(-s_i) L_i)
    expected = torch.tensor([1.0 * (1 - math.exp(-0.5) * 6.0), 2.0 * (1 - math.exp(-0.5) * 4.0)])
    torch.testing.assert_close(grad, expected)
    with pytest.raises(LossMixError, match="in no optimizer"):
        balancer.check_optimized([torch.optim.SGD([w], lr=0.1)])
    balancer.check_optimized([torch.optim.SGD([w, *balancer.parameters()], lr=0.1)])
    assert balancer.logged()["regularizer"] == pytest.approx(0.5 * 1.0 + 0.5 * 2.0)


def test_uncertainty_weighting_refuses_max_terms() -> None:
    with pytest.raises(LossMixError, match="without bound"):
        UncertaintyWeighting().bind([LossTerm("a"), LossTerm("b", mode="max")], None)
    UncertaintyWeighting(terms=["a", "c"]).bind(
        [LossTerm("a"), LossTerm("b", mode="max"), LossTerm("c")], None
    )


# -- GradNorm ------------------------------------------------------------------------------------


def linear_terms(w: Tensor, scales: Tensor, level: Tensor) -> dict[str, Tensor]:
    """Terms ``L_i = level_i * scales_i * <w, 1>``: gradient norms ``level_i scales_i sqrt(D)``."""
    base = w.sum()
    return {n: level[i] * scales[i] * base for i, n in enumerate("abc")}


def test_gradnorm_one_hand_computed_step_and_a_second_with_rates() -> None:
    w = nn.Parameter(torch.ones(4))
    scales = torch.tensor([1.0, 2.0, 5.0])
    balancer = GradNorm(alpha=1.5, on=["w"], lr=0.1)
    holder = nn.Module()
    holder.w = w
    balancer.bind(TERMS, holder)
    # step 0: L = L(0), r = 1: target = mean(G); norms n = 2 * scales (||1||_2 = 2)
    factors = balancer.factors(linear_terms(w, scales, torch.ones(3)), ONES, step=0)
    assert as_floats(factors) == {"a": 1.0, "b": 1.0, "c": 1.0}  # the model trains with w(0)
    norms = 2 * scales
    weights = torch.ones(3, requires_grad=True)
    reference = torch.optim.Adam([weights], lr=0.1)  # the weights' own optimizer
    pulls = weights * norms
    target = pulls.mean().detach()
    (pulls - target).abs().sum().backward()
    reference.step()
    with torch.no_grad():
        expected = weights.clamp(min=0) * 3 / weights.clamp(min=0).sum()
    torch.testing.assert_close(balancer.weights, expected)
    # step 1: losses fell at different rates: a to 1/2, b to 1/4, c unchanged
    level = torch.tensor([0.5, 0.25, 1.0])
    factors = balancer.factors(linear_terms(w, scales, level), ONES, step=1)
    torch.testing.assert_close(torch.stack(list(factors.values())), expected)
    ratios = level / level.mean()
    with torch.no_grad():
        weights.copy_(expected)
    reference.zero_grad()
    pulls = weights * norms * level
    target = pulls.mean().detach() * ratios.pow(1.5)
    (pulls - target).abs().sum().backward()
    reference.step()
    with torch.no_grad():
        expected = weights.clamp(min=0) * 3 / weights.clamp(min=0).sum()
    torch.testing.assert_close(balancer.weights, expected)
    assert balancer.logged()["loss_ratio/b"] == pytest.approx(0.25)


def test_gradnorm_takes_a_term_at_zero_after_the_first_step() -> None:
    # Before the fix a term that reached 0 (a hinge satisfied) stopped the fit.
    w = nn.Parameter(torch.ones(4))
    holder = nn.Module()
    holder.w = w
    scales = torch.tensor([1.0, 2.0, 5.0])
    balancer = GradNorm(alpha=1.5, on="w", lr=0.1)
    balancer.bind(TERMS, holder)
    weights = torch.ones(3, requires_grad=True)
    reference = torch.optim.Adam([weights], lr=0.1)  # the weights' own optimizer, by hand
    for step, level in enumerate([torch.ones(3), torch.tensor([0.5, 0.0, 1.0])]):
        balancer.factors(linear_terms(w, scales, level), ONES, step=step)
        reference.zero_grad()
        pulls = weights * 2 * scales * level  # ||d L_i / d w|| = 2 level_i scales_i
        target = pulls.mean().detach() * (level / level.mean()).pow(1.5)  # b's target is 0
        (pulls - target).abs().sum().backward()
        reference.step()
        with torch.no_grad():
            weights.copy_(weights.clamp(min=0) * 3 / weights.clamp(min=0).sum())
    torch.testing.assert_close(balancer.weights, weights.detach())
    kept = balancer.weights.clone()
    balancer.factors(linear_terms(w, scales, torch.zeros(3)), ONES, step=2)  # all at 0
    torch.testing.assert_close(balancer.weights, kept)
    with pytest.raises(LossMixError, match=r"\['b'\] < 0 at step 3"):
        balancer.factors(linear_terms(w, scales, torch.tensor([1.0, -1.0, 1.0])), ONES, step=3)


def test_gradnorm_fixed_point_when_losses_are_proportional() -> None:
    """L_i = c_i L: equal training rates, so the pulls w_i ||grad L_i|| become equal."""
    w = nn.Parameter(torch.ones(4))
    holder = nn.Module()
    holder.w = w
    c = torch.tensor([1.0, 3.0, 0.5])
    balancer = GradNorm(alpha=1.5, on="w", lr=0.002)
    balancer.bind(TERMS, holder)
    for step in range(3000):
        balancer.factors(linear_terms(w, c, torch.ones(3) * (1 + step) ** -0.5), ONES, step=step)
    fixed = 3 * (1 / c) / (1 / c).sum()
    torch.testing.assert_close(balancer.weights, fixed, atol=0.01, rtol=0)


def test_gradnorm_and_dwa_refuse_bad_arguments() -> None:
    with pytest.raises(LossMixError, match="`alpha` and `lr` should be > 0"):
        GradNorm(alpha=0.0)
    with pytest.raises(LossMixError, match="`temperature` should be > 0"):
        DWA(temperature=-1.0)
    with pytest.raises(LossMixError, match="training rate"):
        GradNorm().bind([LossTerm("a"), LossTerm("b", mode="max")], None)
    with pytest.raises(LossMixError, match="sequence of term names"):
        DWA(terms="a")  # type: ignore[arg-type]


# -- DWA -------------------------------------------------------------------------------------------


def test_dwa_weights_from_interval_averages() -> None:
    balancer = DWA(temperature=2.0, every_n_steps=2)
    balancer.bind(TERMS[:2], None)
    # two calls per step (accumulation), two steps per interval
    schedule = {0: (4.0, 2.0), 1: (2.0, 2.0), 2: (2.0, 1.0), 3: (2.0, 1.0), 4: (1.0, 1.0)}
    seen = []
    for step, (a, b) in schedule.items():
        for extra in (0.0, 1.0):
            values = {"a": torch.tensor(a + extra), "b": torch.tensor(b + extra)}
            factors = balancer.factors(values, ONES, step=step)
        seen.append(torch.stack(list(factors.values())))
    torch.testing.assert_close(torch.stack(seen[:4]), torch.ones(4, 2))
    # interval 0 averages a: (4.5 + 2.5) / 2 = 3.5, b: 2.5; interval 1: a 2.5, b 1.5
    rates = torch.tensor([2.5 / 3.5, 1.5 / 2.5])
    expected = 2 * torch.exp(rates / 2) / torch.exp(rates / 2).sum()
    torch.testing.assert_close(seen[4], expected)


# -- FAMO ------------------------------------------------------------------------------------------


class OfficialFAMO:
    """The update of the official FAMO code (Cranial-XIX/FAMO, famo.py), restated."""

    def __init__(self, n_tasks: int, lr: float = 0.025, gamma: float = 0.01) -> None:
        self.w = torch.zeros(n_tasks, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)

    def weighted_loss(self, losses: Tensor) -> Tensor:
        self.prev = losses.detach()
        z = F.softmax(self.w, -1)
        d = losses + 1e-8
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def update(self, current: Tensor) -> None:
        delta = (self.prev + 1e-8).log() - (current.detach() + 1e-8).log()
        with torch.enable_grad():
            grad = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
        self.opt.zero_grad()
        self.w.grad = grad
        self.opt.step()


def test_famo_follows_the_official_update() -> None:
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(3))
    official = OfficialFAMO(3)
    balancer = FAMO()
    balancer.bind(TERMS, None)
    targets = torch.tensor([1.0, -2.0, 0.5])
    for step in range(5):
        losses = (theta - targets * (1 + 0.3 * step)).pow(2) + 0.1 * (step + 1)
        if step > 0:
            official.update(losses)  # the official measures after the step; here: the next step
        reference = torch.autograd.grad(official.weighted_loss(losses), theta, retain_graph=True)[0]
        values = {n: losses[i] for i, n in enumerate("abc")}
        factors = balancer.factors(values, ONES, step=step)
        ours = torch.autograd.grad(sum(factors[n] * values[n] for n in "abc"), theta)[0]
        torch.testing.assert_close(ours / 3, reference)  # the same direction, times K = 3
        torch.testing.assert_close(balancer.logits, official.w.detach())


def test_famo_loads_a_checkpoint_from_before_has_previous() -> None:
    # Such a checkpoint knew its previous losses if it had decided: it resumes updating.
    values = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(1.0)}
    for decided, expected in ((0, True), (None, False)):
        old = {"decided_step": decided}
        balancer = FAMO()
        balancer.bind(TERMS[:2], None)
        state = balancer.state_dict()
        state["_extra_state"] = old
        balancer.load_state_dict(state)
        assert balancer._has_previous is expected
        balancer.factors(values, ONES, step=1)
        assert (not torch.equal(balancer.logits, torch.zeros(2))) is expected


@pytest.mark.parametrize(
    ("make", "value", "refused"),
    [
        (FAMO, 0.0, "<= 0"),
        (FAMO, -1.0, "<= 0"),
        (GradNorm, 0.0, "<= 0"),
        (GradNorm, -2.0, "<= 0"),
        (DWA, -1.0, "< 0"),
    ],
)
def test_loss_based_balancers_refuse_values_they_cannot_read(
    make: type[Balancer], value: float, refused: str
) -> None:
    # Before the fix FAMO let 0 through (every weight to that term), GradNorm took any value
    # (L(t) / L(0) inverted or infinite) and DWA too (a negative mean clamped to 1e-38).
    net = nn.Linear(2, 1)
    balancer = make()
    balancer.bind(TERMS[:2], net)
    y = net(torch.ones(1, 2)).sum()
    with pytest.raises(LossMixError, match=rf"\['b'\] {refused} at step 0. Shift the loss"):
        balancer.factors({"a": y.pow(2) + 1, "b": 0 * y + value}, ONES, step=0)


def test_dwa_refuses_a_negative_micro_batch_and_an_all_zero_interval() -> None:
    dwa = DWA(every_n_steps=1)
    dwa.bind(TERMS[:2], None)
    y = torch.tensor(2.0, requires_grad=True)
    dwa.factors({"a": y, "b": 0 * y}, ONES, step=0)  # 0 is a value DWA can average
    with pytest.raises(LossMixError, match=r"\['b'\] < 0 in a micro-batch"):
        dwa.factors({"a": y, "b": 0 * y - 1}, ONES, step=0)
    # A term 0 in two intervals running has a rate of 0 (before the fix: the error below).
    zero = copy.deepcopy(dwa)
    zero.factors({"a": y, "b": 0 * y}, ONES, step=1)
    found = as_floats(zero.factors({"a": y, "b": y}, ONES, step=2))
    rates = [2.0 / 2.0, 0.0]  # L(k-1) / L(k-2), with 0 / 0 taken as 0
    expected = [2 * math.exp(r / 2) / sum(math.exp(q / 2) for q in rates) for r in rates]
    assert list(found.values()) == pytest.approx(expected)
    dwa.factors({"a": y, "b": y}, ONES, step=1)
    with pytest.raises(LossMixError, match=r"\['b'\] were 0 at every call .* at step 2"):
        dwa.factors({"a": y, "b": y}, ONES, step=2)  # interval 0 divides interval 1


# -- random weighting, Adam, common contract ----------------------------------------------------


def test_random_loss_weighting_is_seeded_by_step() -> None:
    first, second = RandomLossWeighting(seed=3), RandomLossWeighting(seed=3)
    for balancer in (first, second):
        balancer.bind(TERMS, None)
    values = {n: torch.tensor(1.0, requires_grad=True) for n in "abc"}
    draws = []
    for step in (0, 1, 2):
        a = torch.stack(list(first.factors(values, ONES, step=step).values()))
        b = torch.stack(list(second.factors(values, ONES, step=step).values()))
        assert torch.equal(a, b)  # another process, or a resumed run: the same draw
        generator = random.Random((3 << 64) + step)  # the documented stream of (seed, step)
        draw = torch.tensor([generator.gauss(0.0, 1.0) for _ in range(3)])
        torch.testing.assert_close(a, 3 * torch.softmax(draw, 0))
        draws.append(a)
    assert not torch.equal(draws[0], draws[1])


def test_adam_step_matches_torch_adam() -> None:
    param = torch.tensor([0.5, -1.0, 2.0])
    reference = param.clone().requires_grad_()
    optimizer = torch.optim.Adam([reference], lr=0.1, weight_decay=0.01)
    exp_avg, exp_avg_sq = torch.zeros(3), torch.zeros(3)
    for step in range(1, 6):
        grad = torch.tensor([1.0, -0.5, 0.25]) * step
        adam_step(param, grad, exp_avg, exp_avg_sq, step, lr=0.1, weight_decay=0.01)
        reference.grad = grad.clone()
        optimizer.step()
        torch.testing.assert_close(param, reference.detach())


@pytest.mark.parametrize("kind", [GradientBalance, UncertaintyWeighting, GradNorm, DWA, FAMO])
def test_the_state_stays_float32_under_16_bit_casts_and_defaults(kind: type[Balancer]) -> None:
    # Before the fix Trainer(precision="bf16-true") cast it all: DWA's sums stalled in bf16
    # (interval means of 0.008 for 0.03) and overflowed in fp16; the Adam moments lost bits.
    def dtypes(balancer: Balancer) -> set[torch.dtype]:
        return {t.dtype for t in [*balancer.buffers(), *balancer.parameters()]}

    balancer = kind()
    balancer.bind(TERMS, None)
    assert dtypes(balancer.to(torch.bfloat16)) == {torch.float32}
    assert dtypes(balancer.half()) == {torch.float32}
    assert dtypes(balancer.double()) == {torch.float64}  # widened as asked
    # The values too: before the fix a cast rounded them to 16 bits and widened them back, so
    # a resumed DWA sum of 120016 came back infinite from float16.
    with torch.no_grad():
        for tensor in [*balancer.float().buffers(), *balancer.parameters()]:
            tensor.fill_(120016.3)
    for cast in (torch.float16, torch.bfloat16):
        state = [*balancer.to(cast).buffers(), *balancer.parameters()]
        assert all(bool((t == torch.tensor(120016.3)).all()) for t in state)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Trainer.init_module() does under bf16-true
    try:
        made = kind()
        made.bind(TERMS, None)
    finally:
        torch.set_default_dtype(default)
    assert dtypes(made) == {torch.float32}


def test_dwa_sums_16_bit_terms_in_float32() -> None:
    dwa = DWA(every_n_steps=1000)
    dwa.bind(TERMS[:2], None)
    dwa.to(torch.bfloat16)
    a, b = torch.tensor(0.03, dtype=torch.bfloat16), torch.tensor(3.0, dtype=torch.bfloat16)
    for step in range(1000):
        dwa.factors({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, step=step)
    dwa.factors({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, step=1000)  # closes the interval
    torch.testing.assert_close(dwa.averages[0], torch.tensor([float(a), float(b)]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientBalance(on="weight", smoothing=0.9),
        lambda: UncertaintyWeighting(),
        lambda: GradNorm(on="weight"),
        lambda: DWA(every_n_steps=2),
        lambda: FAMO(),
        lambda: RandomLossWeighting(),
    ],
)
def test_state_dict_resumes_the_same_decisions(make: object) -> None:
    assert callable(make)
    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    x = torch.randn(6, 3)

    def values(step: int) -> dict[str, Tensor]:
        out = net(x * (1 + 0.1 * step))
        return {
            "a": out[:, 0].pow(2).mean(),
            "b": out[:, 1].pow(2).mean() * 3,
            "c": out.exp().mean(),
        }

    def run(balancer: Balancer, steps: range) -> list[Tensor]:
        return [
            torch.stack([f.detach() for f in balancer.factors(values(s), ONES, step=s).values()])
            for s in steps
        ]

    straight: Balancer = make()
    straight.bind(TERMS, net)
    expected = run(straight, range(8))
    first: Balancer = make()
    first.bind(TERMS, net)
    run(first, range(4))
    resumed: Balancer = make()
    resumed.bind(TERMS, net)
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(run(resumed, range(4, 8)), expected[4:], strict=True):
        assert torch.equal(got, want)


def test_gradient_balance_unscales_gradients_computed_under_a_loss_scale() -> None:
    """In float16, a tiny gradient underflows to 0 unless the loss is scaled first (AMP)."""
    net = nn.Linear(4, 1, bias=False).half()
    with torch.no_grad():
        net.weight.fill_(1.0)
    x = torch.ones(1, 4, dtype=torch.float16)

    def values() -> dict[str, Tensor]:
        y = net(x).sum().float()  # float32 losses, as autocast gives, on a float16 model
        return {"a": y * 1e-8, "b": y * 1e-2}  # d a / d w = 1e-8: below float16's range

    exact = 1e-2 / 1e-8  # the ratio of the two norms, as float64 computes it
    scaled = GradientBalance(terms=["a"], reference="b", on="weight", eps=0.0, max_weight=1e9)
    scaled.bind(TERMS[:2], net)
    factor = float(scaled.factors(values(), ONES, step=0, loss_scale=2.0**16)["a"])
    assert factor == pytest.approx(exact, rel=1e-2)
    unscaled = GradientBalance(terms=["a"], reference="b", on="weight", eps=0.0, max_weight=1e9)
    unscaled.bind(TERMS[:2], net)
    assert float(unscaled.factors(values(), ONES, step=0)["a"]) == 1e9  # underflowed to 0


# -- a step whose per-term gradients are not finite (review findings) ---------------------------


def zero_with_nan_gradient(y: Tensor) -> Tensor:
    """0, whose gradient is NaN: sqrt's derivative at 0 is infinite, times a zero gradient."""
    return (y - y.detach()).pow(2).sum().sqrt()


def assert_same_state(got: Mapping[str, object], want: Mapping[str, object]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(
    "make",
    [lambda: GradientBalance(on="weight", smoothing=0.5), lambda: GradNorm(on="weight", lr=0.1)],
    ids=["GradientBalance", "GradNorm"],
)
def test_nonfinite_term_gradients_leave_the_state_untouched(make: object) -> None:
    assert callable(make)
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    x = torch.randn(6, 3)

    def values(step: int, bad: bool = False) -> dict[str, Tensor]:
        y = net(x * (1 + 0.1 * step)).squeeze(-1)
        a = y.pow(2).mean() + 0.1
        return {"a": a + zero_with_nan_gradient(y) if bad else a, "b": (y - 1).pow(2).mean()}

    bad = values(2, bad=True)
    assert bool(torch.isfinite(bad["a"]))  # the term is finite, its gradient is not
    assert not bool(torch.isfinite(torch.autograd.grad(bad["a"], net.weight)[0]).all())
    balancer, reference = make(), make()
    for each in (balancer, reference):
        each.bind(TERMS[:2], net)
        for step in (0, 1):
            each.factors(values(step), ONES, step=step)
    before = copy.deepcopy(balancer.state_dict())
    kept = balancer.factors(values(2, bad=True), ONES, step=2)
    assert_same_state(balancer.state_dict(), before)  # before the fix: NaN norms and weights
    torch.testing.assert_close(torch.stack(list(kept.values())), before["last_multipliers"])
    got = balancer.factors(values(3), ONES, step=3)  # as if step 2 had not happened
    want = reference.factors(values(3), ONES, step=3)
    torch.testing.assert_close(as_floats(got), as_floats(want), rtol=0, atol=0)
    assert_same_state(balancer.state_dict(), reference.state_dict())


# -- sharded strategies -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_per_term_gradients_under_a_sharded_strategy_raise_naming_the_fix(strategy: str) -> None:
    # Lightning runs FSDP on CUDA only: the trainer here is a stand-in with such a strategy.
    net = nn.Linear(4, 1)
    net._trainer = type("Trainer", (), {"strategy": type(strategy, (), {})()})()
    x = torch.randn(8, 4)
    for balancer in (GradientBalance(on="weight"), GradNorm(on="weight")):
        balancer.bind(TERMS[:2], net)
        values = {"a": net(x).pow(2).mean(), "b": (net(x) - 1).pow(2).mean()}
        with pytest.raises(LossMixError, match=f"{strategy} shards.*strategy='ddp'.*FAMO"):
            balancer.factors(values, ONES, step=0)
    for balancer in (UncertaintyWeighting(), DWA(), FAMO(), RandomLossWeighting()):
        balancer.bind(TERMS[:2], net)
        values = {"a": net(x).pow(2).mean() + 0.1, "b": (net(x) - 1).pow(2).mean()}
        balancer.factors(values, ONES, step=0)  # the values alone: no gradient per term
