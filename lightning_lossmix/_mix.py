"""LossMix: validates the raw terms of a step and assembles their signed weighted sum."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossmix._errors import LossMixError
from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._assemble import balanced_total, check_balancer
from lightning_lossmix.balancing._base import Balancer
from lightning_lossmix.functional import isfinite_all, reached_parameters, reaches_parameter
from lightning_lossmix.schedules import Schedule


@dataclass(frozen=True)
class LossMixOutput:
    """What `LossMix` returns for one step.

    Attributes:
        total: the signed weighted sum ``sum_t signed_weights[t] * values[t]``, differentiable.
        values: each term's raw value (scalar, still attached to the graph).
        signed_weights: each term's effective weight at this step, negative for a ``"max"`` term.
        step: the optimizer step the weights were evaluated at.
        gradients: per-term gradients a balancer computed at this call (term name to
            {parameter: flattened raw-term gradient, unscaled}); empty without one.

    Examples:
        >>> import torch
        >>> from lightning_lossmix import LossMix, LossTerm
        >>> mix = LossMix([LossTerm("fit"), LossTerm("spread", weight=0.5, mode="max")])
        >>> _ = mix.eval()  # evaluation: constant terms are fine (in training they are refused)
        >>> out = mix({"fit": torch.tensor(2.0), "spread": torch.tensor(1.0)}, step=3)
        >>> out.total, out.signed_weights, out.step
        (tensor(1.5000), {'fit': 1.0, 'spread': -0.5}, 3)
        >>> out.nonfinite()
        {}
    """

    total: Tensor
    values: Mapping[str, Tensor]
    signed_weights: Mapping[str, float]
    step: int
    gradients: Mapping[str, Mapping[Tensor, Tensor]] = field(default_factory=dict)

    def nonfinite(self) -> dict[str, float]:
        """Return the terms whose value is NaN or infinite, with their values (one device sync).

        A NaN or infinite term makes the total NaN or infinite (even at weight 0, as
        ``0 * inf`` is NaN), so the total is checked first and the terms only if it fails. A
        total that overflows while every term is finite is reported as ``"(weighted total)"``.
        """
        if math.isfinite(self.total.item()):
            return {}
        names = list(self.values)
        finite = isfinite_all([self.values[name] for name in names]).tolist()
        bad = {
            name: float(self.values[name].detach())
            for name, ok in zip(names, finite, strict=True)
            if not ok
        }
        return bad or {"(weighted total)": float(self.total.detach())}


class LossMix(nn.Module):
    """Validates a step's loss terms and assembles their signed weighted sum.

    `LossMix` works inside any LightningModule (or plain PyTorch loop): call it with a mapping of
    term name to scalar tensor and the optimizer step, and backpropagate ``.total``. It checks,
    at the step where the problem enters, that every declared term is present and no other, that
    each is a real floating-point scalar tensor, that during training each one is attached to
    the autograd graph of a trainable parameter (of the bound module, once `bind` gave one),
    and (unless told not to) that each is finite.

    Args:
        terms: the declared terms, a sequence of `LossTerm`s; names must be unique.
        balancer: a `lightning_lossmix.balancing.Balancer` that sets the multipliers of the
            terms it balances (effective weight = declared weight x multiplier; the sign
            comes from `mode`). It is registered as a submodule, so its parameters and state
            are the mix's.

    Raises:
        LossMixError: for no terms, a single term or a string instead of a sequence, a
            non-`LossTerm` entry, or duplicate names.

    Examples:
        >>> import torch
        >>> mix = LossMix([LossTerm("fit"), LossTerm("spread", weight=0.1, mode="max")])
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
        >>> out = mix({"fit": (w ** 2).mean(), "spread": w.std()}, step=0)
        >>> out.total  # 5.0 - 0.1 * 1.4142
        tensor(4.8586, grad_fn=<AddBackward0>)
        >>> out.signed_weights
        {'fit': 1.0, 'spread': -0.1}
        >>> mix
        LossMix(
          terms=[
            LossTerm(name='fit', weight=1.0, mode='min'),
            LossTerm(name='spread', weight=0.1, mode='max'),
          ]
        )
    """

    def __init__(self, terms: Sequence[LossTerm], balancer: Balancer | None = None) -> None:
        super().__init__()
        terms = _checked_terms(terms)
        names = [term.name for term in terms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise LossMixError(
                f"LossMix: term names should be unique. Found {duplicates} more than once in "
                f"{names}; give each term its own name."
            )
        self.terms: tuple[LossTerm, ...] = terms
        self.names: tuple[str, ...] = tuple(names)
        # Derived from the terms, which are frozen (a schedule says whether it needs the fit's
        # length when it is built), so computed once, as `forward` runs every step: the
        # constant signed weights (None for a schedule) and the opposed terms.
        self._constant_weights: tuple[float | None, ...] = tuple(
            None if isinstance(term.weight, Schedule) else term.signed_weight(0) for term in terms
        )
        self._opposed: tuple[str, ...] = tuple(term.name for term in terms if term.opposed_by)
        self._name_set = frozenset(names)
        #: Whether a term's schedule needs the fit's total number of optimizer steps.
        self.needs_total_steps: bool = any(
            getattr(term.weight, "needs_total_steps", False) for term in terms
        )
        self._graph_checked: set[str] = set()
        # The module `bind` gave, in a tuple so that it is not registered as a submodule (the
        # LossMix lives inside it). Opposed parameters are looked up in it at every call.
        self._bound: tuple[nn.Module] | None = None
        self.balancer = check_balancer(balancer, "LossMix")
        if self.balancer is not None:
            self.balancer.bind(self.terms, None)
        # The submodules (by id) each opposed term was last found to depend on.
        self._opposition_checked: dict[str, tuple[int, ...]] = {}

    @override
    def extra_repr(self) -> str:
        """Show the declared terms, as the constructor call would take them."""
        return "terms=[\n" + "".join(f"  {term!r},\n" for term in self.terms) + "]"

    def bind(self, module: nn.Module) -> LossMix:
        """Bind the mix to the module that trains on it; return self.

        Each term's `opposed_by` names are then submodules of `module`, looked up at every
        training call, so that the opposition always applies to their current trainable
        parameters (a submodule replaced between fits, a parameter unfrozen later). During
        training, each term must also reach a parameter of `module` (checked once per term): a
        tensor kept outside the module's parameters would never train the model.

        `LossMixModule` binds each of its mixes at the first training step; another
        LightningModule calls ``self.loss_mix.bind(self)`` once its submodules exist.

        Raises:
            LossMixError: for an `opposed_by` name that is no submodule, or a submodule without
                parameters.

        Examples:
            >>> import torch
            >>> net = torch.nn.Linear(2, 1)
            >>> mix = LossMix([LossTerm("fit")]).bind(net)
            >>> kept_aside = [torch.nn.Parameter(torch.ones(()))]  # not a parameter of `net`
            >>> try:
            ...     mix({"fit": kept_aside[0] ** 2}, step=0)
            ... except LossMixError as err:
            ...     print(str(err).split(", so")[0])
            Loss term 'fit' reaches 1 trainable tensor(s), but none of them is a parameter of Linear
        """
        for term in self.terms:
            for name in term.opposed_by:
                _opposing_submodule(module, term.name, name)
        self._bound = (module,)
        if self.balancer is not None:
            self.balancer.bind(self.terms, module)
        self._graph_checked.clear()  # check the terms again, now against the module
        return self

    @property
    def needs_binding(self) -> bool:
        """Whether `bind` has not been called yet (`LossMixModule` then binds the mix)."""
        return self._bound is None

    def opposed_parameters(self, name: str) -> list[nn.Parameter]:
        """Return the trainable parameters that play against term `name` now (empty if none).

        They are looked up in the bound module at each call: the current submodules named by
        the term's `opposed_by`, and those of their parameters that require grad.
        """
        if self._bound is None:
            return []
        module = self._bound[0]
        term = self.terms[self.names.index(name)]
        found: dict[int, nn.Parameter] = {}
        for submodule in term.opposed_by:
            parameters = _opposing_submodule(module, name, submodule).parameters()
            found.update((id(p), p) for p in parameters if p.requires_grad)
        return list(found.values())

    def signed_weights(self, step: int, total_steps: int | None = None) -> dict[str, float]:
        """Return each term's declared signed weight at `step` (negative for max).

        A balancer's multipliers come on top of these, in `forward`.
        """
        return {
            term.name: term.signed_weight(step, total_steps) if constant is None else constant
            for term, constant in zip(self.terms, self._constant_weights, strict=True)
        }

    def forward(
        self,
        losses: Mapping[str, Tensor],
        *,
        step: int,
        total_steps: int | None = None,
        check_finite: bool = True,
        loss_scale: float = 1.0,
    ) -> LossMixOutput:
        """Validate `losses` and return their signed weighted sum with its parts.

        Args:
            losses: term name to scalar tensor, one entry per declared term.
            step: the optimizer step (``self.global_step`` in a LightningModule); schedules are
                evaluated at it.
            total_steps: the number of optimizer steps of the fit, for schedules that need it.
            check_finite: raise if a term is NaN or infinite (costs one device sync).
                `LossMixModule` passes False and applies its own `nonfinite` policy.
            loss_scale: the GradScaler's scale under 16-bit mixed precision, for a balancer's
                per-term gradients (they are unscaled before use).

        Raises:
            LossMixError: for missing or unknown terms, non-tensors, complex, integer or bool
                tensors, non-scalars, terms cut off the graph (or reaching no parameter of
                the bound module) during training, non-finite values, a schedule going
                negative, or (with `check_finite` and no loss scale) a balancer whose
                measurement is not finite while the terms are (a NaN gradient on its group).
        """
        values = self._validate(losses, step, total_steps)
        gradients: Mapping[str, Mapping[Tensor, Tensor]] = {}
        if self.balancer is None:
            weights = self.signed_weights(step, total_steps)
            total = _signed_sum(list(values.values()), list(weights.values()))
        else:
            balanced = balanced_total(
                self.balancer, self.terms, values,
                step=step, total_steps=total_steps, loss_scale=loss_scale,
            )  # fmt: skip
            total, weights, gradients = balanced.total, balanced.signed_weights, balanced.gradients
        if self._opposed and self.training and torch.is_grad_enabled():
            total = self._oppose(total, values, weights)
        output = LossMixOutput(
            total=total,
            values=values,
            signed_weights=weights,
            step=step,
            gradients=gradients,
        )
        if check_finite:
            bad = output.nonfinite()
            if bad:
                name, value = next(iter(bad.items()))
                raise LossMixError(nonfinite_message(name, value, step))
            if self.balancer is not None and self.balancer._call_rejected and loss_scale == 1.0:
                raise LossMixError(_rejected_message(self.balancer, step))
        return output

    def _oppose(
        self, total: Tensor, values: Mapping[str, Tensor], weights: Mapping[str, float]
    ) -> Tensor:
        """Add, for each opposed term, a zero-valued surrogate that flips its gradient there.

        For the opposing parameters ``theta`` of a term of signed weight ``w``, the surrogate
        ``-2 w (<theta, g> - <theta, g>.detach())`` with ``g = dL/dtheta`` has value 0 and
        gradient ``-2 w g``: with the term's own ``w g``, they receive ``-w g``. One backward
        of the term, restricted to ``theta``, per step; any backward of the total (automatic or
        manual optimization, DDP) then applies it.
        """
        if self._bound is None:
            raise LossMixError(
                "LossMix: terms with `opposed_by` need their submodules resolved: call "
                "`self.loss_mix.bind(self)` in your LightningModule once its submodules exist "
                "(LossMixModule does it for you)."
            )
        for name in self._opposed:
            if weights[name] == 0:
                continue
            trainable = self.opposed_parameters(name)
            if not trainable:  # all frozen for now: nothing plays against the term
                continue
            grads = torch.autograd.grad(
                values[name], trainable, retain_graph=True, allow_unused=True
            )
            reached = [(p, g) for p, g in zip(trainable, grads, strict=True) if g is not None]
            self._check_opposition(name, bool(reached))
            if not reached:
                continue
            inner = torch.stack([(p * g.detach()).sum() for p, g in reached]).sum()
            total = total - 2.0 * weights[name] * (inner - inner.detach())
        return total

    def _check_opposition(self, name: str, reached: bool) -> None:
        # Checked for the first step with trainable opposing parameters, and again whenever a
        # named submodule was replaced (the term may still use the old one, e.g. via an alias).
        assert self._bound is not None
        opposed_by = self.terms[self.names.index(name)].opposed_by
        submodules = tuple(id(self._bound[0].get_submodule(s)) for s in opposed_by)
        if self._opposition_checked.get(name) == submodules:
            return
        if not reached:
            raise LossMixError(
                f"LossTerm {name!r} is opposed by {opposed_by}, but its value does not depend "
                "on their parameters, so they cannot play against it. Compute the term from "
                "those modules' outputs (if a submodule was replaced, from the new one, not an "
                "alias of the old), or drop `opposed_by`."
            )
        self._opposition_checked[name] = submodules

    def _validate(
        self, losses: Mapping[str, Tensor], step: int, total_steps: int | None
    ) -> dict[str, Tensor]:
        if not isinstance(losses, Mapping):
            raise LossMixError(
                "LossMix: the losses should be a mapping of term name to scalar tensor, e.g. "
                f"{{{', '.join(f'{n!r}: ...' for n in self.names)}}}. "
                f"Found {type(losses).__name__}."
            )
        if losses.keys() != self._name_set:
            missing = [name for name in self.names if name not in losses]
            unknown = sorted(str(name) for name in losses if name not in self.names)
            raise LossMixError(
                f"LossMix: the losses should have exactly the declared terms {list(self.names)}. "
                f"Received {sorted(map(str, losses))}: missing {missing}, unknown {unknown}. "
                "Return one entry per declared LossTerm (check for typos), or declare the "
                "extra term."
            )
        training = self.training and torch.is_grad_enabled()
        values = {}
        for name in self.names:
            value = losses[name]
            if not isinstance(value, Tensor):
                raise LossMixError(
                    f"Loss term {name!r} should be a scalar torch.Tensor. Found {value!r} of type "
                    f"{type(value).__name__}. Compute it with torch operations on the model's "
                    "outputs; a Python number (from .item() or float()) carries no gradient. "
                    "To combine several tensors into one term, use torch.stack([...]).sum(), "
                    "not torch.tensor([...])."
                )
            if not value.is_floating_point():
                raise LossMixError(dtype_message(name, value))
            if value.numel() != 1:
                raise LossMixError(
                    f"Loss term {name!r} should be a scalar tensor. Found shape "
                    f"{tuple(value.shape)}. Reduce it, e.g. with .mean() or .sum()."
                )
            # `requires_grad` is free to read, so it is checked every step; the walk to a
            # parameter costs a graph traversal and is done once per term.
            checked = value.requires_grad and name in self._graph_checked
            if training and not checked and not self._idle(name, value, step, total_steps):
                self._check_graph(name, value)
            values[name] = value if value.dim() == 0 else value.reshape(())
        if training and not any(v.requires_grad for v in values.values()):
            # Every term idle (the others were checked above): nothing to backpropagate.
            raise LossMixError(
                f"Every loss term ({', '.join(map(repr, self.names))}) weighs 0 and is off the "
                f"autograd graph at step {step}, so the total cannot be backpropagated: this "
                "step would train nothing. Give a term that reaches the model a weight other "
                "than 0 at every step: a schedule that starts every term at 0 leaves nothing "
                "to train."
            )
        return values

    def _idle(self, name: str, value: Tensor, step: int, total_steps: int | None) -> bool:
        """Whether `value` is off the graph, weighs 0 at `step` and no balancer measures it.

        Such a term trains nothing, and may be off the graph on purpose (its inputs frozen
        for now, as a backbone that a fine-tuning callback unfreezes later): it is checked
        once it weighs something.
        """
        if value.requires_grad:
            return False
        if self.balancer is not None and name in self.balancer.balanced:
            return False
        term = self.terms[self.names.index(name)]
        return term.signed_weight(step, total_steps) == 0

    def _check_graph(self, name: str, value: Tensor) -> None:
        if self._bound is None:
            if not value.requires_grad or not reaches_parameter(value):
                raise LossMixError(cut_off_message(name, value))
        else:
            reached = reached_parameters(value)
            if not reached:
                raise LossMixError(cut_off_message(name, value))
            owned = {id(p) for p in self._bound[0].parameters()}
            if not any(id(p) in owned for p in reached):
                raise LossMixError(foreign_message(name, self._bound[0], len(reached)))
        self._graph_checked.add(name)


def _signed_sum(values: Sequence[Tensor], signed_weights: Sequence[float]) -> Tensor:
    """`functional.weighted_sum`, in fewer operations: it runs every training step.

    ``torch.add(total, value, alpha=w)`` adds ``w * value`` in one operation (and one autograd
    node) where ``total + value * w`` takes two, and a weight of 1 multiplies nothing. The
    gradients are the same (``w * grad``); the total may differ in its last bit.
    """
    total = values[0] if signed_weights[0] == 1.0 else values[0] * signed_weights[0]
    for value, weight in zip(values[1:], signed_weights[1:], strict=True):
        total = torch.add(total, value, alpha=weight)
    return total


def nonfinite_message(name: str, value: float, step: int) -> str:
    """Explain a NaN or infinite term."""
    return (
        f"Loss term {name!r} is {value} at step {step}. Training on it would corrupt the "
        "weights. Look for a log of zero, a division by zero or an exploding term; to skip such "
        "steps instead, use LossMixModule(..., nonfinite='skip')."
    )


def cut_off_message(name: str, value: Tensor) -> str:
    """Explain a term that does not reach any trainable parameter."""
    how = (
        "it does not require grad"
        if not value.requires_grad
        else "it requires grad but its graph reaches no trainable nn.Parameter (a fresh leaf "
        "such as torch.tensor(..., requires_grad=True) is not connected to the model)"
    )
    # `LossMix._idle`: only a term that does not require grad is let through at weight 0.
    frozen_for_now = (
        ""
        if value.requires_grad
        else "; if its inputs are frozen only for now (a backbone unfrozen later), give it "
        "weight 0 until then, e.g. Piecewise([step], [0.0, w]): a term of weight 0 that does "
        "not require grad is not checked"
    )
    return (
        f"Loss term {name!r} is cut off the autograd graph: {how}, so training it would never "
        "change the model. This happens when a term is built with torch.tensor([...]), "
        "float()/.item(), .detach(), .numpy() or under torch.no_grad(). Build it from the "
        "model's tensors with torch operations instead, e.g. "
        "torch.stack([w.sum() for w in model.parameters()]).sum() rather than "
        "torch.tensor([w.sum() for w in model.parameters()]).sum(). If the term has no "
        "trainable input on purpose (a frozen part), log it with self.log rather than "
        f"declaring it as a LossTerm{frozen_for_now}."
    )


def dtype_message(name: str, value: Tensor) -> str:
    """Explain a term that is not a real floating-point tensor."""
    if value.is_complex():
        fix = (
            "A loss must be a real number to be minimized or maximized: take the part you mean, "
            "e.g. .abs() (or .abs() ** 2), .real or .angle(), before reducing it."
        )
    else:
        fix = (
            "Integer and bool tensors carry no gradient: compute the term in floating point "
            "(e.g. x.float() before the loss), or log a count with self.log instead of "
            "declaring it as a LossTerm."
        )
    return (
        f"Loss term {name!r} should be a real floating-point tensor. Found dtype {value.dtype}. "
        + fix
    )


def foreign_message(name: str, module: nn.Module, count: int) -> str:
    """Explain a term whose graph reaches only parameters that `module` does not hold."""
    return (
        f"Loss term {name!r} reaches {count} trainable tensor(s), but none of them is a "
        f"parameter of {type(module).__name__}, so training it would never change the model "
        "(its optimizer and checkpoints only see the module's parameters). This happens when a "
        "tensor is kept in a plain list, dict or attribute. Register it: as an nn.Parameter "
        "attribute of a submodule (self.scale = nn.Parameter(...)), or in an nn.ParameterList "
        "or nn.ParameterDict."
    )


def _checked_terms(terms: Any) -> tuple[LossTerm, ...]:
    """Return `terms` as a tuple of LossTerms, or raise naming what was given instead."""
    if isinstance(terms, LossTerm):
        raise LossMixError(
            "LossMix: `terms` should be a sequence of LossTerms. Found the single term "
            f"{terms!r}; put it in a list: LossMix([{terms!r}])."
        )
    if isinstance(terms, str) or not isinstance(terms, Iterable):
        example = f"LossTerm({terms!r})" if isinstance(terms, str) else "LossTerm('fit')"
        raise LossMixError(
            "LossMix: `terms` should be a sequence of LossTerms. Found "
            f"{terms!r} of type {type(terms).__name__}; declare the terms, e.g. "
            f"LossMix([{example}])."
        )
    checked = tuple(terms)
    if not checked:
        raise LossMixError(
            "LossMix: `terms` should declare at least one LossTerm. Found an empty sequence."
        )
    for index, term in enumerate(checked):
        if not isinstance(term, LossTerm):
            raise LossMixError(
                f"LossMix: `terms[{index}]` should be a LossTerm. Found {term!r} of type "
                f"{type(term).__name__}; write LossTerm({term!r}) for a term of weight 1."
            )
    return checked


def _opposing_submodule(module: nn.Module, term: str, name: str) -> nn.Module:
    """Return submodule `name` of `module`, which opposes `term`, or raise if it cannot."""
    try:
        submodule = module.get_submodule(name)
    except AttributeError:
        children = sorted(
            child_name
            for child_name, child in module.named_children()
            if any(p.requires_grad for p in child.parameters())
        )
        raise LossMixError(
            f"LossTerm {term!r}: `opposed_by` names {name!r}, which is not a submodule of "
            f"{type(module).__name__}. Its top-level submodules are {children} (those with "
            "trainable parameters); nested ones are written 'parent.child'."
        ) from None
    if next(submodule.parameters(), None) is None:
        raise LossMixError(
            f"LossTerm {term!r}: `opposed_by` names {name!r}, which has no parameters, so "
            "nothing would play against the term. Name the submodule whose parameters should "
            "pursue the opposite direction (e.g. the feature extractor)."
        )
    return submodule


def _rejected_message(balancer: Balancer, step: int) -> str:
    """Say why a step whose terms are finite cannot train: the balancer's measurement is not.

    Then a term's gradient on the balanced group is NaN or infinite, or, under DDP, a term of
    another process is: backpropagating the total would write NaN into the model (or leave
    this process alone in the gradient all-reduce). `LossMix` raises only without a loss
    scale: under a GradScaler, an overflow is the scaler's to skip.
    """
    return (
        f"{type(balancer).__name__}: its measurement at step {step} is not finite while every "
        "term of this process is: a term's gradient on the balanced group is NaN or infinite "
        "(a sqrt or a log at 0, a division by 0 in the backward pass), or, under DDP, a term "
        "of another process is NaN or infinite. The balancer kept its weights; backpropagating "
        "this total would write NaN into the model. Fix the term (e.g. `sqrt(x + eps)`), or "
        "train in a LossMixModule with `nonfinite='skip'`, which drops such steps."
    )
