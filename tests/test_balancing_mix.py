"""LossMix with a balancer: effective weights, the total's gradient, evaluation, bad input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_lossmix import LossMix, LossMixError, LossTerm
from lightning_lossmix.balancing import (
    Balancer,
    GradientBalance,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from lightning_lossmix.balancing._assemble import balanced_total
from lightning_lossmix.balancing._random import random_weights
from lightning_lossmix.schedules import Piecewise


class TinyVQGAN(nn.Module):
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
        return {"nll": (x - xrec).abs().mean(), "g_loss": -self.discriminator(xrec).mean()}


@pytest.mark.parametrize("step", [2, 3])
def test_vqgan_total_gradient_equals_taming(step: int) -> None:
    model = TinyVQGAN()
    terms = [LossTerm("nll"), LossTerm("g_loss", weight=Piecewise([3], [0.0, 0.8]))]
    balancer = GradientBalance(
        terms=["g_loss"], reference="nll", on="decoder.conv_out.weight", eps=1e-4, max_weight=1e4
    )
    mix = LossMix(terms, balancer=balancer).bind(model)
    z, x = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    output = mix(model.losses(z, x), step=step)
    ours = torch.autograd.grad(output.total, list(model.decoder.parameters()))
    # taming-transformers' generator loss, written from its formula
    values = model.losses(z, x)
    last = model.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(values["nll"], last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(values["g_loss"], last, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
    disc_factor = 1.0 if step >= 3 else 0.0
    loss = values["nll"] + d_weight * 0.8 * disc_factor * values["g_loss"]
    theirs = torch.autograd.grad(loss, list(model.decoder.parameters()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert output.signed_weights["g_loss"] == pytest.approx(float(d_weight) * 0.8 * disc_factor)
    assert output.signed_weights["nll"] == 1.0
    assert set(output.gradients) == {"g_loss", "nll"}  # for GradientMonitor to reuse
    torch.testing.assert_close(output.gradients["g_loss"][last], g_grads.reshape(-1))


def test_max_term_keeps_its_sign_and_declared_weights_multiply() -> None:
    terms = [LossTerm("a", weight=2.0), LossTerm("b", weight=0.5, mode="max"), LossTerm("c")]
    mix = LossMix(terms, balancer=RandomLossWeighting(terms=["a", "b"], seed=4))
    w = nn.Parameter(torch.tensor(1.5))
    values = {"a": w * 2, "b": w * w, "c": w + 1}
    output = mix(values, step=11)
    m = random_weights(2, seed=4, step=11)
    m = torch.tensor(m).tolist()  # as the balancer keeps them: in float32
    assert output.signed_weights == pytest.approx({"a": 2.0 * m[0], "b": -0.5 * m[1], "c": 1.0})
    expected = torch.tensor(2.0 * m[0] * 3.0 - 0.5 * m[1] * 2.25 + 2.5)
    torch.testing.assert_close(output.total.detach(), expected)
    assert output.gradients == {}


def test_a_scheduled_declared_weight_moves_under_a_balancer() -> None:
    # The declared weights are kept between calls only while no term has a schedule.
    terms = [LossTerm("a"), LossTerm("b", weight=Piecewise([2], [1.0, 3.0]))]
    mix = LossMix(terms, balancer=RandomLossWeighting(seed=1))
    w = nn.Parameter(torch.tensor(1.0))
    for step, declared in enumerate([1.0, 1.0, 3.0, 3.0]):
        found = mix({"a": w * 2, "b": w * 3}, step=step).signed_weights
        m = torch.tensor(random_weights(2, seed=1, step=step)).tolist()
        assert found == pytest.approx({"a": m[0], "b": declared * m[1]}, rel=1e-6)


class _Decides(Balancer):
    """Decides `decision`, in any form `_decide` may return it."""

    def __init__(self, decision: object) -> None:
        super().__init__()
        self.decision = decision

    def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Any:
        return self.decision


class _DecidesCapped(_Decides):
    """Also caps the buffer in place at every call, and returns it."""

    def __init__(self, decision: object, cap: float) -> None:
        super().__init__(decision)
        self.cap = cap

    def _per_call(
        self, values: Mapping[str, Tensor], declared: Mapping[str, float], measured: Tensor | None
    ) -> Tensor:
        return self.last_multipliers.clamp_(max=self.cap)


@pytest.mark.parametrize(
    ("decision", "cap", "expected"),
    [
        ([4.0, 0.5], 2.0, [2.0, 0.5]),  # the total uses what `_per_call` returned
        (0.25, None, [0.25, 0.25]),  # one float for every term, as the buffer's copy spreads it
        ([0.25], None, [0.25, 0.25]),
        ((3, 0.5), None, [3.0, 0.5]),
    ],
)
def test_the_total_uses_the_multipliers_the_balancer_returned(
    decision: object, cap: float | None, expected: list[float]
) -> None:
    balancer = _Decides(decision) if cap is None else _DecidesCapped(decision, cap)
    mix = LossMix([LossTerm("a"), LossTerm("b", mode="max")], balancer=balancer)
    w = nn.Parameter(torch.tensor(1.0))
    for _ in range(2):  # the deciding call, then a later micro-batch of the same step
        output = mix({"a": w * 2, "b": w * 3}, step=0)
        assert output.signed_weights == {"a": expected[0], "b": -expected[1]}
        assert mix.balancer.last_multipliers.tolist() == expected
        torch.testing.assert_close(
            output.total.detach(), torch.tensor(2 * expected[0] - 3 * expected[1])
        )


def test_the_declared_weights_follow_the_terms_given() -> None:
    # `balanced_total` keeps the declared weights between calls only for the same tuple of
    # terms (a mix's): a list changed in place, or another tuple, is read again.
    terms = [LossTerm("a"), LossTerm("b", weight=0.5)]
    balancer = _Decides([1.0, 1.0])
    balancer.bind(terms, None)
    w = nn.Parameter(torch.tensor(1.0))
    values = {"a": w * 2, "b": w * 3}
    assert balanced_total(balancer, terms, values, step=0).signed_weights == {"a": 1.0, "b": 0.5}
    terms[1] = LossTerm("b", weight=5.0)
    assert balanced_total(balancer, terms, values, step=1).signed_weights == {"a": 1.0, "b": 5.0}
    frozen = tuple(terms)
    balancer.bind(frozen, None)
    assert balanced_total(balancer, frozen, values, step=2).signed_weights == {"a": 1.0, "b": 5.0}
    again = (LossTerm("a", weight=2.0), frozen[1])
    balancer.bind(again, None)
    assert balanced_total(balancer, again, values, step=3).signed_weights == {"a": 2.0, "b": 5.0}


def test_a_decision_cannot_change_the_declared_weights() -> None:
    class Greedy(_Decides):
        def _decide(self, read: list[float], declared: Mapping[str, float], *, step: int) -> Any:
            declared["b"] = 100.0  # type: ignore[index]
            return self.decision

    mix = LossMix([LossTerm("a"), LossTerm("b", weight=0.5)], balancer=Greedy([1.0, 1.0]))
    w = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(TypeError):
        mix({"a": w * 2, "b": w * 3}, step=0)


def test_uncertainty_weighting_parameters_and_regularizer_in_the_total() -> None:
    mix = LossMix(
        [LossTerm("a"), LossTerm("b", weight=3.0)], balancer=UncertaintyWeighting(init=1.0)
    )
    assert [n for n, _ in mix.named_parameters()] == ["balancer.log_vars"]
    w = nn.Parameter(torch.tensor(2.0))
    output = mix({"a": w * 1.0, "b": w * 4.0}, step=0)
    e = torch.exp(torch.tensor(-1.0))
    # 1 * (e * 2 + 1) + 3 * (e * 8 + 1)
    torch.testing.assert_close(output.total.detach(), e * 2 + 1 + 3 * (e * 8 + 1))
    assert output.signed_weights == pytest.approx({"a": float(e), "b": 3 * float(e)})
    with pytest.raises(LossMixError, match="without bound"):
        LossMix([LossTerm("a"), LossTerm("b", mode="max")], balancer=UncertaintyWeighting())


def test_evaluation_uses_the_last_training_weights() -> None:
    net = nn.Linear(2, 1)
    mix = LossMix([LossTerm("a"), LossTerm("b")], balancer=GradientBalance(on="weight")).bind(net)
    x = torch.tensor([[1.0, -2.0]])
    y = net(x).squeeze()
    trained = mix({"a": y, "b": 7 * y}, step=0).signed_weights
    mix.eval()
    with torch.inference_mode():
        y = net(x).squeeze()
        evaluated = mix({"a": y, "b": 2 * y}, step=5)
    assert evaluated.signed_weights == trained
    torch.testing.assert_close(evaluated.total, trained["a"] * y + trained["b"] * 2 * y)


def test_multipliers_are_read_again_after_any_write_to_the_buffer() -> None:
    # Every write to the buffer, from a decision or from outside, must reach the next total (a
    # cache keyed on the buffer's version counter failed this: `.data` writes do not bump it).
    net = nn.Linear(2, 1)
    balancer = GradientBalance(on="weight", every_n_steps=10)
    mix = LossMix([LossTerm("a"), LossTerm("b")], balancer=balancer).bind(net)
    x = torch.tensor([[1.0, -2.0]])

    def weights(step: int) -> dict[str, float]:
        y = net(x).squeeze()
        return dict(mix({"a": y, "b": 7 * y}, step=step).signed_weights)

    decided = weights(0)  # a decision: multipliers 8/(2 * 1) and 8/(2 * 7) of the mean pull
    assert decided == pytest.approx({"a": 4.0, "b": 4.0 / 7}, rel=1e-6)
    assert weights(1) == decided  # kept until step 10
    with torch.no_grad():
        balancer.last_multipliers.copy_(torch.tensor([2.0, 3.0]))  # written from outside
    assert weights(2) == {"a": 2.0, "b": 3.0}
    state = dict(mix.state_dict())
    state["balancer.last_multipliers"] = torch.tensor([5.0, 6.0])
    mix.load_state_dict(state)  # a checkpoint's multipliers
    assert weights(3) == {"a": 5.0, "b": 6.0}
    mix.to(torch.float64)  # a new buffer
    assert weights(4) == {"a": 5.0, "b": 6.0}
    with torch.no_grad():
        balancer.last_multipliers[1] = 0.5  # through a view
    assert weights(5) == {"a": 5.0, "b": 0.5}
    balancer.last_multipliers.data.copy_(torch.tensor([7.0, 8.0]))  # as WeightAveraging does
    assert weights(6) == {"a": 7.0, "b": 8.0}


def test_bad_balancer_arguments_name_the_fix() -> None:
    with pytest.raises(LossMixError, match=r"should be a lightning_lossmix\.balancing\.Balancer"):
        LossMix([LossTerm("a"), LossTerm("b")], balancer="gradnorm")  # type: ignore[arg-type]
    with pytest.raises(LossMixError, match="does not declare"):
        LossMix([LossTerm("a"), LossTerm("b")], balancer=GradientBalance(terms=["a", "x"]))
