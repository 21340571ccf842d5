"""TermGradientEngine: per-term gradients of a step against hand-written torch.autograd.grad."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_lossmix import LossMixError
from lightning_lossmix._engine import TermGradientEngine
from lightning_lossmix.functional import term_gradients


def net_and_terms(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    out = net(torch.randn(7, 3))
    return net, {"a": out.pow(2).mean(), "b": out[:, 0].sin().sum(), "c": net[2].bias.sum()}


def reference(values: dict[str, Tensor], params: list[Tensor]) -> Tensor:
    rows = []
    for value in values.values():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def terms_on(params: list[Tensor], seed: int) -> dict[str, Tensor]:
    """The terms of micro-batch `seed` on the parameters of `net_and_terms`' network."""
    torch.manual_seed(seed)
    hidden = torch.tanh(torch.randn(7, 3) @ params[0].T + params[1])
    out = hidden @ params[2].T + params[3]
    return {"a": out.pow(2).mean(), "b": out[:, 0].sin().sum(), "c": params[3].sum()}


@pytest.mark.parametrize("batched", [False, True, "auto"])
def test_accumulated_scaled_step_equals_the_reference(batched: bool | str) -> None:
    params = list(net_and_terms()[0].parameters())
    engine = TermGradientEngine(params, batched=batched)  # type: ignore[arg-type]
    expected = torch.zeros(3, sum(p.numel() for p in params))
    for seed in (0, 1, 2):  # three micro-batches, each divided by 3; a loss scale of 2**10
        values = terms_on(params, seed)
        engine.add(values, divisor=3, scale=2.0**10)
        expected += reference(values, params) / 3
    step = engine.take()
    assert step is not None and not engine.collecting
    assert step.names == ("a", "b", "c")
    assert step.active == [0, 1, 2, 3]
    torch.testing.assert_close(step.gradients, expected, rtol=1e-6, atol=1e-7)
    assert engine.take() is None  # freed at take


def test_gradients_computed_elsewhere_are_reused_and_only_the_rest_computed() -> None:
    net, values = net_and_terms()
    params = list(net.parameters())
    engine = TermGradientEngine(params, batched=False)
    # A balancer's gradients of `a` on the last layer only; doubled, to see that they are used.
    known = {
        "a": {
            p: 2 * g.flatten()
            for p, g in zip(params[2:], reference_parts(values, params[2:]), strict=True)
        }
    }
    engine.add(values, known=known)
    step = engine.take()
    assert step is not None
    expected = reference(values, params)
    first = params[0].numel() + params[1].numel()
    torch.testing.assert_close(step.gradients[0, first:], 2 * expected[0, first:])
    torch.testing.assert_close(step.gradients[0, :first], expected[0, :first])  # computed
    torch.testing.assert_close(step.gradients[1:], expected[1:])


def reference_parts(values: dict[str, Tensor], params: list[Tensor]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(values["a"], params, retain_graph=True)


def test_frozen_parameters_are_left_out_and_a_new_mix_starts_a_new_step() -> None:
    net, values = net_and_terms()
    params = list(net.parameters())
    engine = TermGradientEngine(params, batched=False)
    params[0].requires_grad_(False)
    engine.add(values)
    params[0].requires_grad_(True)
    engine.add({"other": values["a"]})  # another player's mix: the first collection is dropped
    step = engine.take()
    assert step is not None and step.names == ("other",) and step.active == [0, 1, 2, 3]


def test_pull_signs_flip_the_opposing_parameters() -> None:
    net, _ = net_and_terms()
    params = list(net.parameters())
    engine = TermGradientEngine(params)
    signs = engine.pull_signs([1.0, -1.0], [[params[0]], []], torch.float32)
    assert signs.tolist() == [[-1.0, -1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]]


def test_reentrant_checkpointing_says_what_to_do() -> None:
    layer = nn.Linear(3, 3)
    x = torch.randn(4, 3, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=True)
    engine = TermGradientEngine(list(layer.parameters()), batched=False)
    with pytest.raises(LossMixError, match="use_reentrant=False"):
        engine.add({"a": out.sum(), "b": out.pow(2).sum()})
    out = checkpoint(layer, x, use_reentrant=False)
    engine.add({"a": out.sum(), "b": out.pow(2).sum()})  # the non-reentrant form works
    assert engine.collecting


def test_auto_times_both_forms_once_then_keeps_the_faster() -> None:
    params = list(net_and_terms()[0].parameters())
    engine = TermGradientEngine(params, batched="auto")
    results = []
    for seed in range(3):
        engine.add(terms_on(params, seed))
        step = engine.take()
        assert step is not None
        results.append(step.gradients)
        if seed == 0:
            assert engine.chosen is None  # only the batched form timed so far
    assert engine.chosen in (True, False)
    for seed, rows in enumerate(results):  # the same gradients whichever form ran
        torch.testing.assert_close(rows, reference(terms_on(params, seed), params))


def test_the_graph_is_walked_at_the_first_collection_and_when_a_parameter_is_unreached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_lossmix import _engine

    walks = []
    walk = _engine._reentrant_checkpoint
    monkeypatch.setattr(_engine, "_reentrant_checkpoint", lambda v: walks.append(1) or walk(v))
    params = list(net_and_terms()[0].parameters())
    engine = TermGradientEngine(params, batched=False)
    for seed in (0, 1):  # every parameter reached: one walk, at the first collection
        engine.add(terms_on(params, seed))
        engine.take()
    assert len(walks) == 1
    engine.add({"a": terms_on(params, 2)["c"]})  # reaches the last bias only
    engine.take()
    assert len(walks) == 2


def test_reentrant_checkpointing_that_appears_later_is_refused() -> None:
    torch.manual_seed(0)
    layer, head = nn.Linear(3, 3), nn.Linear(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    engine = TermGradientEngine(list(layer.parameters()), batched=False)
    out = head(layer(x))
    engine.add({"a": out.sum(), "b": out.pow(2).sum()})  # the first collection: no checkpoint
    engine.take()
    out = head(checkpoint(layer, x, use_reentrant=True))  # the layer's parameters are hidden
    with pytest.raises(LossMixError, match="use_reentrant=False"):
        engine.add({"a": out.sum(), "b": out.pow(2).sum()})


@pytest.mark.parametrize("batched", [False, "auto", True])
def test_sparse_gradients_are_laid_out_dense(batched: bool | str) -> None:
    # nn.Embedding(sparse=True): before the fix, "reshape is not implemented for sparse tensors";
    # with batched=True, torch's bare error (no batched rule): the loop computes them now.
    torch.manual_seed(0)
    emb, lin = nn.Embedding(6, 3, sparse=True), nn.Linear(3, 1)
    h = emb(torch.tensor([0, 2, 2, 5]))
    values = {"a": lin(h).pow(2).sum(), "b": h.sum()}
    engine = TermGradientEngine([emb.weight, lin.weight], batched=batched)  # type: ignore[arg-type]
    engine.add(values)
    found = engine.take().gradients
    rows = [
        torch.autograd.grad(v, [emb.weight, lin.weight], retain_graph=True, allow_unused=True)
        for v in values.values()
    ]
    want = torch.stack(
        [
            torch.cat([g.to_dense().reshape(-1), torch.zeros(3) if w is None else w.reshape(-1)])
            for g, w in rows
        ]
    )
    torch.testing.assert_close(found, want)


def test_a_batched_form_torch_cannot_run_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before the fix every call ran the batched backward to its error, then the loop: two
    # backward passes per measured step, for the rest of the fit.
    torch.manual_seed(0)
    emb, lin = nn.Embedding(6, 3, sparse=True), nn.Linear(3, 1)
    grad = torch.autograd.grad
    passes: list[bool] = []  # per backward pass, whether it was batched

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(bool(kwargs.get("is_grads_batched")))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    for batched in (True, "auto"):
        passes.clear()
        engine = TermGradientEngine([emb.weight, lin.weight], batched=batched)  # type: ignore[arg-type]
        for _ in range(3):
            h = emb(torch.tensor([0, 2, 2, 5]))
            engine.add({"a": lin(h).pow(2).sum(), "b": h.sum()})
            engine.take()
        # "auto" times the loop too, once, after its failed trial of the batched form.
        first = [True, False, False] if batched is True else [True, False, False, False, False]
        assert passes == first + [False, False] * (2 if batched is True else 1), batched


def test_running_out_of_memory_in_the_batched_form_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before the fix it was taken for a missing batched rule: the loop ran instead, silently.
    net = nn.Linear(3, 2)
    out = net(torch.ones(1, 3))
    grad = torch.autograd.grad

    def short_of_memory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_grads_batched"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", short_of_memory)
    engine = TermGradientEngine(list(net.parameters()), batched=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.add({"a": out.sum(), "b": out.pow(2).sum()})
    with pytest.raises(torch.cuda.OutOfMemoryError):
        term_gradients([out.sum(), out.pow(2).sum()], list(net.parameters()), batched=True)
