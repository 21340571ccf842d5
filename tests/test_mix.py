"""LossMix: the signed weighted sum against a hand-written reference, and every bad input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossmix import LossMix, LossMixError, LossMixModule, LossMixOutput, LossTerm, Player
from lightning_lossmix.functional import weighted_sum
from lightning_lossmix.schedules import Cyclical, Linear, Piecewise, Schedule

# --- assembly against an independent reference ----------------------------------------------

term_spec = st.tuples(
    st.one_of(st.integers(0, 5), st.floats(0, 10, allow_nan=False, allow_infinity=False)),
    st.sampled_from(["min", "max"]),
)


@settings(max_examples=50, deadline=None)
@given(specs=st.lists(term_spec, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_total_and_gradient_match_reference(specs: list[tuple[float, str]], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Two parameters of different shapes; each term is a different function of both.
    a = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64))
    b = nn.Parameter(torch.randn(2, 2, generator=generator, dtype=torch.float64))
    coefficients = [torch.randn(3, generator=generator, dtype=torch.float64) for _ in specs]

    def terms() -> list[Tensor]:
        return [
            (c * a).sin().sum() + (b**2).mean() * c[0] + (i + 1) * b[0, 1]
            for i, c in enumerate(coefficients)
        ]

    names = [f"t{i}" for i in range(len(specs))]
    mix = LossMix([LossTerm(n, weight=w, mode=m) for n, (w, m) in zip(names, specs, strict=True)])  # type: ignore[arg-type]
    output = mix(dict(zip(names, terms(), strict=True)), step=3)
    grads = torch.autograd.grad(output.total, [a, b])

    signs = [1.0 if mode == "min" else -1.0 for _, mode in specs]
    reference = sum(s * w * value for s, (w, _), value in zip(signs, specs, terms(), strict=True))
    assert isinstance(reference, Tensor)
    reference_grads = torch.autograd.grad(reference, [a, b])

    assert output.total.shape == ()
    torch.testing.assert_close(output.total, reference)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad)
    assert output.signed_weights == {
        n: s * w for n, s, (w, _) in zip(names, signs, specs, strict=True)
    }
    assert output.step == 3
    assert list(output.values) == names
    for value, expected in zip(output.values.values(), terms(), strict=True):
        torch.testing.assert_close(value, expected)


def test_the_total_s_gradients_are_weighted_sum_s_exactly() -> None:
    """`LossMix` adds ``w * value`` in one operation; the gradients are those of the plain sum."""
    generator = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(5, generator=generator))

    def terms() -> list[Tensor]:
        return [w.sin().sum(), w.pow(2).mean(), torch.tanh(w).std(), 3 * w[0]]

    mix = LossMix(
        [
            LossTerm("a"),
            LossTerm("b", weight=0.01),
            LossTerm("c", weight=0.1, mode="max"),
            LossTerm("d", weight=Linear(0.0, 0.5, steps=200)),
        ]
    )
    output = mix(dict(zip("abcd", terms(), strict=True)), step=57)
    reference = weighted_sum(terms(), list(output.signed_weights.values()))
    torch.testing.assert_close(output.total, reference, rtol=2e-7, atol=0)
    (grad,) = torch.autograd.grad(output.total, [w])
    (reference_grad,) = torch.autograd.grad(reference, [w])
    assert torch.equal(grad, reference_grad)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_nonfinite_term_at_weight_0_still_makes_the_total_nonfinite(bad: float) -> None:
    p = nn.Parameter(torch.tensor(1.0))
    mix = LossMix([LossTerm("fit"), LossTerm("warm", weight=Linear(0.0, 1.0, steps=10))])
    output = mix({"fit": p * 2, "warm": (p + 1) * bad}, step=0, check_finite=False)
    assert output.signed_weights["warm"] == 0.0
    assert math.isnan(float(output.total.detach()))  # 0 * inf is NaN
    assert list(output.nonfinite()) == ["warm"]


def test_scheduled_weights_are_evaluated_at_the_step() -> None:
    mix = LossMix(
        [
            LossTerm("a", weight=Linear(0.0, 1.0, steps=10)),
            LossTerm("b", weight=Piecewise([5], [2.0, 0.0]), mode="max"),
            LossTerm("c", weight=Cyclical(cycles=2), mode="max"),
        ]
    )
    assert mix.needs_total_steps
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    for step, (wa, wb, wc) in {0: (0.0, 2.0, 0.0), 4: (0.4, 2.0, 0.8), 7: (0.7, 0.0, 1.0)}.items():
        output = mix({"a": p[0], "b": p[1], "c": p[2]}, step=step, total_steps=20)
        assert output.signed_weights == pytest.approx({"a": wa, "b": -wb, "c": -wc})
        assert float(output.total.detach()) == pytest.approx(wa * 1 - wb * 2 - wc * 3)
        assert mix.signed_weights(step, 20) == output.signed_weights


def test_docstring_example() -> None:
    mix = LossMix([LossTerm("fit"), LossTerm("spread", weight=0.1, mode="max")])
    assert mix.names == ("fit", "spread")
    assert not mix.needs_total_steps
    w = nn.Parameter(torch.tensor([1.0, 3.0]))
    output = mix({"fit": (w**2).mean(), "spread": w.std()}, step=0)
    assert float(output.total.detach()) == pytest.approx(5.0 - 0.1 * math.sqrt(2))


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_single_element_tensors_are_accepted_as_scalars(shape: tuple[int, ...]) -> None:
    p = nn.Parameter(torch.ones(shape))
    output = LossMix([LossTerm("a", weight=2.0)])({"a": p * 3}, step=0)
    assert output.total.shape == output.values["a"].shape == ()
    assert float(output.total.detach()) == 6.0


def test_a_lossmix_keeps_no_output_of_a_training_call() -> None:
    import copy
    import pickle

    mix = LossMix([LossTerm("a")])
    p = nn.Parameter(torch.tensor(2.0))
    mix({"a": p * 1}, step=0)
    assert not any(isinstance(v, LossMixOutput) for v in vars(mix).values())
    copy.deepcopy(mix)  # nothing attached to a graph to copy
    pickle.dumps(mix)


# --- bad declarations --------------------------------------------------------------------------


def test_empty_terms() -> None:
    with pytest.raises(LossMixError, match=r"at least one LossTerm\. Found an empty sequence"):
        LossMix([])


def test_entry_that_is_not_a_loss_term() -> None:
    with pytest.raises(LossMixError) as info:
        LossMix([LossTerm("a"), "kl"])  # type: ignore[list-item]
    message = str(info.value)
    assert "`terms[1]` should be a LossTerm" in message
    assert "'kl' of type str" in message
    assert "LossTerm('kl')" in message


def test_duplicate_names() -> None:
    with pytest.raises(LossMixError) as info:
        LossMix([LossTerm("a"), LossTerm("b"), LossTerm("a", weight=2.0, mode="max")])
    message = str(info.value)
    assert "unique" in message
    assert "['a']" in message
    assert "['a', 'b', 'a']" in message


# --- bad losses --------------------------------------------------------------------------------


@pytest.fixture
def mix() -> LossMix:
    return LossMix([LossTerm("recon"), LossTerm("kl", weight=0.5)])


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_missing_term(mix: LossMix, net: nn.Module) -> None:
    with pytest.raises(LossMixError) as info:
        mix({"recon": net.weight.sum()}, step=0)
    message = str(info.value)
    assert "exactly the declared terms ['recon', 'kl']" in message
    assert "Received ['recon']" in message
    assert "missing ['kl']" in message
    assert "unknown []" in message


def test_unknown_extra_term(mix: LossMix, net: nn.Module) -> None:
    losses = {"recon": net.weight.sum(), "kl": net.bias.sum(), "klx": net.bias.mean()}
    with pytest.raises(LossMixError) as info:
        mix(losses, step=0)
    message = str(info.value)
    assert "exactly the declared terms ['recon', 'kl']" in message
    assert "Received ['kl', 'klx', 'recon']" in message
    assert "missing []" in message
    assert "unknown ['klx']" in message
    assert "declare the extra term" in message


def test_losses_not_a_mapping(mix: LossMix, net: nn.Module) -> None:
    with pytest.raises(LossMixError) as info:
        mix([net.weight.sum(), net.bias.sum()], step=0)  # type: ignore[arg-type]
    message = str(info.value)
    assert "mapping of term name to scalar tensor" in message
    assert "{'recon': ..., 'kl': ...}" in message
    assert "Found list" in message


@pytest.mark.parametrize("shape", [(3,), (2, 2), (0,)])
def test_non_scalar_term(mix: LossMix, shape: tuple[int, ...]) -> None:
    p = nn.Parameter(torch.ones(shape))
    with pytest.raises(LossMixError) as info:
        mix({"recon": p.sum(), "kl": p * 2}, step=0)
    message = str(info.value)
    assert "Loss term 'kl' should be a scalar tensor" in message
    assert f"Found shape {shape}" in message
    assert ".mean()" in message


def test_python_number_from_item_is_a_type_error(mix: LossMix, net: nn.Module) -> None:
    for context in (torch.enable_grad, torch.no_grad):
        with context(), pytest.raises(LossMixError) as info:
            mix({"recon": net.weight.sum(), "kl": net.bias.sum().item()}, step=0)
        message = str(info.value)
        assert "Loss term 'kl' should be a scalar torch.Tensor" in message
        assert "of type float" in message
        assert ".item()" in message


CUT_OFF: dict[str, Callable[[nn.Module], Tensor]] = {
    "torch.tensor([...])": lambda net: torch.tensor([torch.sum(w) for w in net.parameters()]).sum(),
    "detach": lambda net: net(torch.ones(4, 3)).pow(2).mean().detach(),
    "fresh leaf": lambda net: torch.tensor(float(net.bias.sum()), requires_grad=True),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_term_cut_off_the_graph_during_training(
    mix: LossMix, net: nn.Module, build: Callable[[nn.Module], Tensor]
) -> None:
    with pytest.raises(LossMixError) as info:
        mix({"recon": net(torch.ones(4, 3)).mean(), "kl": build(net)}, step=0)
    message = str(info.value)
    assert "Loss term 'kl' is cut off the autograd graph" in message
    assert "torch.stack([w.sum() for w in model.parameters()])" in message
    requires_grad = build(net).requires_grad
    if requires_grad:
        assert "requires grad but its graph reaches no trainable nn.Parameter" in message
    else:
        assert "it does not require grad" in message


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_term_cut_off_the_graph_is_fine_outside_training(
    mix: LossMix, net: nn.Module, build: Callable[[nn.Module], Tensor]
) -> None:
    recon = net(torch.ones(4, 3)).mean()
    kl = build(net)
    expected = float(recon.detach()) + 0.5 * float(kl.detach())
    with torch.no_grad():
        output = mix({"recon": net(torch.ones(4, 3)).mean(), "kl": build(net)}, step=0)
    assert float(output.total) == pytest.approx(expected)
    mix.eval()
    output = mix({"recon": recon, "kl": kl}, step=0)
    assert float(output.total.detach()) == pytest.approx(expected)


def test_term_computed_under_no_grad_during_training(mix: LossMix, net: nn.Module) -> None:
    with torch.no_grad():
        kl = net.bias.pow(2).sum()
    with pytest.raises(LossMixError, match=r"'kl' is cut off.*under torch\.no_grad"):
        mix({"recon": net.weight.sum(), "kl": kl}, step=0)


def test_term_detached_after_passing_the_check_once(mix: LossMix, net: nn.Module) -> None:
    mix({"recon": net.weight.sum(), "kl": net.bias.sum()}, step=0)
    with pytest.raises(LossMixError, match=r"'kl' is cut off.*does not require grad"):
        mix({"recon": net.weight.sum(), "kl": net.bias.sum().detach()}, step=1)


@pytest.mark.parametrize(
    ("bad", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
)
def test_nonfinite_term(mix: LossMix, net: nn.Module, bad: float, shown: str) -> None:
    losses = {"recon": net.weight.sum(), "kl": (net.bias.abs().sum() + 1) * bad}
    with pytest.raises(LossMixError) as info:
        mix(losses, step=17)
    message = str(info.value)
    assert f"Loss term 'kl' is {shown} at step 17" in message
    assert "nonfinite='skip'" in message
    # check_finite=False leaves the decision to the caller.
    bad_terms = mix(losses, step=17, check_finite=False).nonfinite()
    assert list(bad_terms) == ["kl"]
    assert str(bad_terms["kl"]) == shown


def test_nonfinite_reports_all_bad_terms(mix: LossMix, net: nn.Module) -> None:
    output = mix(
        {"recon": (net.weight.abs().sum() + 1) * math.inf, "kl": net.bias.sum() * math.nan},
        step=0,
        check_finite=False,
    )
    bad = output.nonfinite()
    assert list(bad) == ["recon", "kl"]
    assert bad["recon"] == math.inf
    assert math.isnan(bad["kl"])
    assert mix({"recon": net.weight.sum(), "kl": net.bias.sum()}, step=0).nonfinite() == {}


class Drop(Schedule):
    """A custom schedule with no declared bounds: 1 - step / 2, checked at every step."""

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        return 1.0 - step / 2

    def _arguments(self) -> dict[str, Any]:
        return {}


def test_schedule_going_negative_names_term_and_step(net: nn.Module) -> None:
    mix = LossMix([LossTerm("recon"), LossTerm("aux", weight=Drop())])
    losses = {"recon": net.weight.sum(), "aux": net.bias.sum()}
    mix(losses, step=2)
    with pytest.raises(LossMixError) as info:
        mix(losses, step=3)
    message = str(info.value)
    assert "LossTerm 'aux'" in message
    assert "Drop() returned -0.5 at step 3" in message


def test_schedule_with_a_negative_range_is_refused_when_declared() -> None:
    with pytest.raises(LossMixError, match=r"LossTerm 'aux'.*goes down to -1.0.*mode='max'"):
        LossTerm("aux", weight=Linear(1.0, -1.0, steps=4))


def test_schedule_needing_total_steps_without_it(net: nn.Module) -> None:
    mix = LossMix([LossTerm("kl", weight=Cyclical())])
    assert mix({"kl": net.bias.sum()}, step=0).signed_weights["kl"] == 0.0  # any length
    with pytest.raises(LossMixError, match="needs `total_steps`"):
        mix({"kl": net.bias.sum()}, step=1)


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        (lambda: LossTerm("a", weight=-1.0), "mode='max'"),
        (lambda: LossTerm("a", weight=math.nan), "should be finite"),
        (lambda: LossTerm("a", weight=True), "of type bool"),
        (lambda: LossTerm("a", mode="maximum"), "'min' or 'max'"),
        (lambda: LossTerm("a/b"), "no '/'"),
        (lambda: LossTerm("with space"), "no '/', no spaces"),
        (lambda: LossTerm(""), "''"),
    ],
)
def test_bad_terms_fail_before_reaching_loss_mix(term: Callable[[], Any], expected: str) -> None:
    with pytest.raises(LossMixError, match=expected.replace("(", r"\(")):
        LossMix([term()])


def test_a_total_that_overflows_with_finite_terms_is_caught(net: nn.Module) -> None:
    mix = LossMix([LossTerm("a"), LossTerm("b")])
    big = net.weight.sum() * 0 + 3e38  # finite in float32; their sum is not
    with pytest.raises(LossMixError, match=r"'\(weighted total\)' is inf"):
        mix({"a": big, "b": big}, step=0)


# --- the terms argument, dtypes, the printed form ----------------------------------------------


def test_a_single_term_instead_of_a_list_says_put_it_in_a_list() -> None:
    with pytest.raises(LossMixError) as info:
        LossMix(LossTerm("fit"))  # type: ignore[arg-type]
    message = str(info.value)
    assert "`terms` should be a sequence of LossTerms" in message
    assert "Found the single term LossTerm(name='fit'" in message
    assert "LossMix([LossTerm(name='fit', weight=1.0, mode='min')])" in message


@pytest.mark.parametrize(
    ("given", "fix"), [("fit", "LossMix([LossTerm('fit')])"), (3, "LossMix([")]
)
def test_a_string_or_a_non_sequence_names_what_was_given(given: Any, fix: str) -> None:
    with pytest.raises(LossMixError) as info:
        LossMix(given)
    message = str(info.value)
    assert f"Found {given!r} of type {type(given).__name__}" in message
    assert fix in message
    assert "Found 'f'" not in message


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("dtype", "fix"),
    [(torch.complex64, r"\.abs\(\)"), (torch.int64, r"\.float\(\)"), (torch.bool, r"\.float\(\)")],
)
def test_a_term_that_is_not_real_floating_point_is_refused_by_name(
    net: nn.Module, training: bool, dtype: torch.dtype, fix: str
) -> None:
    mix = LossMix([LossTerm("fit"), LossTerm("phase")])
    mix.train(training)
    out = net(torch.randn(4, 3))
    # A complex term is attached to the graph: it passed every check, then failed in backward.
    complex_term = torch.polar(out.abs(), out).sum()
    phase = complex_term if dtype.is_complex else (out > 0).sum().to(dtype)
    with pytest.raises(LossMixError, match=rf"Loss term 'phase' .*Found dtype {dtype}.*{fix}"):
        mix({"fit": out.pow(2).mean(), "phase": phase}, step=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_floating_point_dtype_is_accepted(net: nn.Module, dtype: torch.dtype) -> None:
    mix = LossMix([LossTerm("fit")])
    value = net(torch.randn(4, 3)).pow(2).mean().to(dtype)
    total = mix({"fit": value}, step=0).total
    assert total.is_floating_point() and total.item() == pytest.approx(value.item())


def test_repr_shows_the_terms_as_the_constructor_takes_them() -> None:
    mix = LossMix([LossTerm("fit"), LossTerm("spread", weight=Linear(0.0, 0.1, 10), mode="max")])
    assert repr(mix) == (
        "LossMix(\n"
        "  terms=[\n"
        "    LossTerm(name='fit', weight=1.0, mode='min'),\n"
        "    LossTerm(name='spread', weight=Linear(start=0.0, end=0.1, steps=10, delay=0), "
        "mode='max'),\n"
        "  ]\n"
        ")"
    )
    rebuilt = eval(repr(mix), {"LossMix": LossMix, "LossTerm": LossTerm, "Linear": Linear})
    assert rebuilt.terms == mix.terms


# --- terms that reach no parameter of the bound module -----------------------------------------


class Regularized(LossMixModule):
    """A net, and a scale that is a plain tensor (`kept="list"`) or a registered parameter."""

    def __init__(self, kept: str) -> None:
        super().__init__([LossTerm("fit"), LossTerm("prior", weight=0.1)])
        self.net = nn.Linear(3, 1)
        scale = nn.Parameter(torch.ones(()))
        if kept == "list":
            self.extra = [scale]  # not a parameter of the module: never trained, never saved
        else:
            self.extra = nn.ParameterList([scale])

    def compute_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        (x,) = batch
        return {"fit": self.net(x).pow(2).mean(), "prior": (self.extra[0] - 2.0) ** 2}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: LossMixModule, steps: int = 2) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)


def test_a_term_reaching_only_a_tensor_outside_the_module_is_refused_by_name() -> None:
    model = Regularized("list")
    with pytest.raises(LossMixError) as info:
        _fit(model)
    message = str(info.value)
    assert message.startswith("Loss term 'prior' reaches 1 trainable tensor(s), but none of")
    assert "parameter of Regularized" in message
    assert "nn.Parameter" in message and "nn.ParameterList" in message


def test_the_same_term_on_a_registered_parameter_trains_it() -> None:
    model = Regularized("registered")
    _fit(model)
    assert model.extra[0].item() != 1.0  # the prior pulled the scale towards 2


def test_an_unbound_lossmix_keeps_accepting_any_trainable_leaf_parameter(net: nn.Module) -> None:
    mix = LossMix([LossTerm("fit"), LossTerm("prior")])
    outside = nn.Parameter(torch.ones(()))
    losses = {"fit": net(torch.randn(2, 3)).pow(2).mean(), "prior": outside**2}
    mix(losses, step=0)  # no module bound: any nn.Parameter counts, as before
    mix.bind(net)
    with pytest.raises(LossMixError, match="none of them is a parameter of Linear"):
        mix(losses, step=1)


def test_a_lossmix_module_binds_its_mix_at_the_first_training_step() -> None:
    model = Regularized("registered")
    assert model.loss_mix.needs_binding
    _fit(model, steps=1)
    assert not model.loss_mix.needs_binding


class Duel(LossMixModule):
    """Two players; the generator's term reaches a plain tensor (`foreign`) or its network."""

    def __init__(self, foreign: bool) -> None:
        players = [Player("gen", terms=["g"]), Player("disc", terms=["d"])]
        super().__init__([LossTerm("g"), LossTerm("d")], players=players)
        self.gen, self.disc = nn.Linear(3, 1), nn.Linear(1, 1)
        self.foreign = foreign
        self.extra = [nn.Parameter(torch.ones(()))]

    def compute_losses(self, batch: Any, batch_idx: int, player: str | None = None) -> Any:
        (x,) = batch
        if player == "gen":
            return {"g": self.extra[0] ** 2 if self.foreign else self.gen(x).pow(2).mean()}
        return {"d": self.disc(self.gen(x).detach()).pow(2).mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.gen, self.disc)]


@pytest.mark.parametrize("foreign", [True, False])
def test_each_players_mix_is_bound_and_checked(foreign: bool) -> None:
    model = Duel(foreign)
    if foreign:
        with pytest.raises(LossMixError, match="Loss term 'g' reaches 1 trainable tensor"):
            _fit(model, steps=1)
        return
    _fit(model, steps=1)
    assert not any(mix.needs_binding for mix in model.player_mixes.values())


def test_a_term_of_weight_0_off_the_graph_passes_unless_every_term_is() -> None:
    net = nn.Linear(2, 1)
    mix = LossMix([LossTerm("fit"), LossTerm("later", weight=Linear(0.0, 1.0, steps=4))])
    mix.bind(net)
    fit = net(torch.ones(1, 2)).sum()
    off = torch.tensor([w.sum() for w in net.parameters()]).sum()  # cut off the graph
    mix({"fit": fit, "later": off}, step=0)  # weighs 0: not checked
    with pytest.raises(LossMixError, match="'later' is cut off"):
        mix({"fit": fit, "later": off}, step=1)
    alone = LossMix([LossTerm("later", weight=Linear(0.0, 1.0, steps=4))])
    alone.bind(net)
    # Before the fix the message was the cut-off one, whose hint (weight 0) was already taken.
    with pytest.raises(LossMixError, match=r"Every loss term \('later'\) weighs 0 .* step 0"):
        alone({"later": off}, step=0)
