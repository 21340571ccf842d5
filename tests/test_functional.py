"""The pure functions: weighted_sum, reaches_parameter, isfinite_all."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_lossmix.functional import (
    grad_cosines,
    grad_magnitudes,
    grad_shares,
    gram_by_parameter,
    isfinite_all,
    reaches_parameter,
    suggested_weights,
    weighted_sum,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=6))
def test_weighted_sum_and_its_gradient(pairs: list[tuple[float, float]]) -> None:
    values = [torch.tensor(value, dtype=torch.float64, requires_grad=True) for value, _ in pairs]
    weights = [weight for _, weight in pairs]
    total = weighted_sum(values, weights)
    assert total.shape == ()
    expected = math.fsum(value * weight for value, weight in pairs)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # d total / d values[i] is weights[i].
    grads = torch.autograd.grad(total, values)
    assert [float(grad) for grad in grads] == weights


def test_weighted_sum_docstring_value() -> None:
    total = weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [1.0, -0.5])
    assert torch.equal(total, torch.tensor(0.5))


@pytest.mark.parametrize(("n_values", "n_weights"), [(0, 0), (2, 1), (1, 2)])
def test_weighted_sum_length_mismatch(n_values: int, n_weights: int) -> None:
    with pytest.raises(ValueError) as info:
        weighted_sum([torch.tensor(1.0)] * n_values, [1.0] * n_weights)
    assert f"Found {n_values} values and {n_weights} weights" in str(info.value)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


CONNECTED: dict[str, Callable[[nn.Module], Tensor]] = {
    "output": lambda net: net(torch.ones(2, 3)).mean(),
    "stack": lambda net: torch.stack([w.sum() for w in net.parameters()]).sum(),
    "parameter itself": lambda net: net[0].bias,
    "indexed parameter": lambda net: net[0].bias[1],
    "one parameter among fresh leaves": lambda net: (
        torch.ones((), requires_grad=True) * 2 + net[2].bias.sum()
    ),
    "deep graph": lambda net: deep(net[0].bias.sum(), depth=20_000),
}
CUT_OFF: dict[str, Callable[[nn.Module], Tensor]] = {
    "torch.tensor([...])": lambda net: torch.tensor([torch.sum(w) for w in net.parameters()]),
    "detach": lambda net: net(torch.ones(2, 3)).mean().detach(),
    "fresh leaf": lambda net: torch.tensor(3.0, requires_grad=True),
    "fresh leaf through ops": lambda net: torch.tensor(3.0, requires_grad=True).exp() * 2,
    "frozen parameters": lambda net: frozen(net)(torch.ones(2, 3)).mean(),
    "frozen parameter and fresh leaf": lambda net: (
        frozen(net)[0].bias.sum() * torch.tensor(2.0, requires_grad=True)
    ),
}


def deep(tensor: Tensor, depth: int) -> Tensor:
    for _ in range(depth):
        tensor = tensor * 1.0
    return tensor


def frozen(net: nn.Module) -> nn.Module:
    net.requires_grad_(False)
    return net


@pytest.mark.parametrize("build", CONNECTED.values(), ids=CONNECTED.keys())
def test_reaches_parameter(build: Callable[[nn.Module], Tensor]) -> None:
    assert reaches_parameter(build(make_net()))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_does_not_reach_parameter(build: Callable[[nn.Module], Tensor]) -> None:
    assert not reaches_parameter(build(make_net()))


def test_reaches_parameter_through_shared_subgraphs() -> None:
    # A diamond repeated many times: without remembering visited nodes, 2**40 paths.
    x = torch.tensor(1.0, requires_grad=True)
    for _ in range(40):
        x = x * 0.5 + x * 0.5
    assert not reaches_parameter(x)
    p = nn.Parameter(torch.tensor(1.0))
    y = p * 1.0
    for _ in range(40):
        y = y * 0.5 + y * 0.5
    assert reaches_parameter(y)


def test_isfinite_all() -> None:
    values = [
        torch.tensor(1.0),
        torch.tensor(math.nan),
        torch.tensor([math.inf]),
        torch.tensor(-math.inf, dtype=torch.float64),
        torch.tensor(-2.5, requires_grad=True) * 2,
    ]
    assert isfinite_all(values).tolist() == [True, False, False, False, True]


# --- gradient statistics, against loops over the parameters -----------------------------------

SIZES = [3, 1, 6, 2]  # four parameters laid end to end


def per_term_gradients(seed: int, terms: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(terms, sum(SIZES), generator=generator, dtype=torch.float64)


def parameter_slice(per_term: Tensor, index: int) -> Tensor:
    start = sum(SIZES[:index])
    return per_term[:, start : start + SIZES[index]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_by_parameter(seed: int) -> None:
    per_term = per_term_gradients(seed)
    gram = gram_by_parameter(per_term, SIZES)
    assert gram.shape == (len(SIZES), 3, 3)
    for index in range(len(SIZES)):
        chunk = parameter_slice(per_term, index)
        for s in range(3):
            for t in range(3):
                expected = torch.dot(chunk[s], chunk[t])
                torch.testing.assert_close(gram[index, s, t], expected)
    torch.testing.assert_close(gram.sum(0), per_term @ per_term.T)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("group", [[0], [1, 2], [0, 1, 2, 3]])
def test_grad_magnitudes(norm_type: float, group: list[int]) -> None:
    per_term = per_term_gradients(seed=3)
    magnitudes = grad_magnitudes(per_term, SIZES, group, norm_type)
    in_group = torch.cat([parameter_slice(per_term, index) for index in group], dim=1)
    for term in range(3):
        if norm_type == math.inf:
            expected = in_group[term].abs().max()
        else:
            expected = in_group[term].abs().pow(norm_type).sum().pow(1 / norm_type)
        torch.testing.assert_close(magnitudes[term], expected)


def test_grad_shares() -> None:
    shares = grad_shares(torch.tensor([1.0, 3.0, 0.0]))
    torch.testing.assert_close(shares, torch.tensor([0.25, 0.75, 0.0]))
    assert torch.equal(grad_shares(torch.zeros(3)), torch.zeros(3))


def test_grad_cosines_of_signed_gradients() -> None:
    per_term = per_term_gradients(seed=4)
    per_term[2] = 0.0  # a term with no gradient on this group
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    cosines = grad_cosines(per_term @ per_term.T, signs)
    # The update follows -sign_t * g_t: a max term's pull is its gradient, reversed.
    pulls = -signs[:, None] * per_term
    for s in range(2):
        for t in range(2):
            expected = nn.functional.cosine_similarity(pulls[s], pulls[t], dim=0)
            torch.testing.assert_close(cosines[s, t], expected)
    assert cosines[0, 0] == pytest.approx(1.0)
    assert torch.isnan(cosines[2]).all()
    assert torch.isnan(cosines[:, 2]).all()


def test_suggested_weights() -> None:
    raw_norms = torch.tensor([20.0, 1.0, 0.0, 4.0])
    weights = torch.tensor([1.0, 1.0, 3.0, 0.5])
    magnitudes = weights * raw_norms
    suggested = suggested_weights(raw_norms, magnitudes)
    target = float(magnitudes.mean())
    torch.testing.assert_close(suggested[[0, 1, 3]], target / raw_norms[[0, 1, 3]])
    # With the suggested weights, every live term pulls with the same magnitude.
    torch.testing.assert_close(
        suggested[[0, 1, 3]] * raw_norms[[0, 1, 3]], torch.full((3,), target)
    )
    assert math.isnan(float(suggested[2]))  # no weight revives a term without gradient
    docstring = suggested_weights(torch.tensor([20.0, 1.0]), torch.tensor([20.0, 1.0]))
    torch.testing.assert_close(docstring, torch.tensor([0.525, 10.5]))


def test_term_gradients_batched_equals_one_backward_per_term() -> None:
    from lightning_lossmix.functional import term_gradients

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    out = net(torch.randn(5, 4))
    cut = torch.tensor(1.0)  # not attached: a zero row in both forms
    values = [out.pow(2).mean(), out[:, 1].exp().sum(), cut, net[2].bias.sum()]
    params = list(net.parameters())
    loop = term_gradients(values, params, scale=8.0)
    batched = term_gradients(values, params, scale=8.0, batched=True)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=0)
    assert batched[2].abs().sum() == 0
    expected = torch.cat(
        [g.flatten() for g in torch.autograd.grad(values[1], params, retain_graph=True)]
    )
    torch.testing.assert_close(batched[1], expected, rtol=1e-6, atol=0)


def test_term_gradients_batched_keeps_one_terms_nan_out_of_the_others() -> None:
    from lightning_lossmix.functional import term_gradients

    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    values = [(w**2).sum(), torch.sqrt(w.sum() * 0)]  # d sqrt at 0: inf, times 0 in a batch
    rows = term_gradients(values, [w], batched=True)
    assert rows[0].tolist() == [2.0, 4.0]
    assert rows[1].isnan().all()


def test_term_gradients_and_reach_tells_which_parameters_no_term_reaches() -> None:
    from lightning_lossmix.functional import _gradients_and_reach

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in [(2, 3), (4,), (3,), (2, 2), (5,)]]
    a, _, c, d, _ = params  # the second and the last: reached by no term
    values = [(a.sum() * c.sum()).sin(), (c * c).sum() + d.sum(), a.new_tensor(1.0)]
    for batched in (False, True):
        rows, reached = _gradients_and_reach(values, params, batched=batched)
        assert reached == [True, False, True, True, False]
        expected = torch.zeros_like(rows)
        for t, value in enumerate(values[:2]):
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            expected[t] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        torch.testing.assert_close(rows, expected)  # unreached blocks and rows are exact zeros
