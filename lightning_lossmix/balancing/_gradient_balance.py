"""GradientBalance: scale each term so that its pull on a group matches its declared weight."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_lossmix._errors import LossMixError, check_finite_float, check_int, check_name
from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._arguments import check_bounds
from lightning_lossmix.balancing._base import Balancer, set_plain
from lightning_lossmix.balancing._distributed import mean_across_processes
from lightning_lossmix.balancing._gradients import (
    group_gradients,
    measure_group,
    norms_from_pieces,
)
from lightning_lossmix.balancing._groups import ParameterGroup


def balanced_multipliers(
    norms: Sequence[float],
    declared: Sequence[float],
    *,
    reference: float | None = None,
    eps: float = 1e-8,
    max_weight: float = 1e4,
) -> list[float]:
    """Return the multipliers that make each term's pull proportional to its declared weight.

    With a reference norm ``n_ref``: ``m_i = n_ref / (n_i + eps)``, so that term ``i`` pulls
    ``declared_i / declared_ref`` times as hard as the reference. Without one: ``m_i = T /
    (n_i + eps)`` with ``T`` the declared-weighted mean of the raw norms, so that the pulls are
    proportional to the declared weights and their sum is what it was before balancing (the
    plain mean when every declared weight is 0). Clamped to ``[0, max_weight]``; with
    ``eps=0``, a zero norm gives `max_weight`, or 0 where the target is 0 too (the limit of
    ``0 / (0 + eps)``).

    The balancer reads the norms to the host anyway (to check that they are finite), so its
    few numbers are worked out in Python: no device operation, no kernel launch.

    Args:
        norms: ``K`` raw gradient norms ``||dL_i/dW||`` on the group.
        declared: ``K`` declared (unsigned) weights.
        reference: the reference term's raw gradient norm, or None.
        eps: added to each norm in the denominator.
        max_weight: the largest multiplier.

    Examples:
        >>> balanced_multipliers([2.0, 8.0], [1.0, 1.0], eps=0.0)
        [2.5, 0.625]
    """
    if reference is not None:
        target = reference
    elif sum(declared) > 0:
        target = sum(d * n for d, n in zip(declared, norms, strict=True)) / sum(declared)
    else:
        target = sum(norms) / len(norms)
    return [min(max(_divide(target, n + eps), 0.0), max_weight) for n in norms]


def _divide(a: float, b: float) -> float:
    """Return ``a / b``, with ``1 / 0`` inf as IEEE floats divide, but ``0 / 0`` 0 (not NaN)."""
    if b:
        return a / b
    return math.copysign(math.inf, a) if a else 0.0


class GradientBalance(Balancer):
    """Closed-form balancing of the terms' pulls on a group of parameters.

    At a decision step, each balanced term's raw gradient norm ``n_i = ||dL_i/dW||`` on the
    group ``W`` is measured (averaged over processes before the norm under DDP; unscaled
    under a GradScaler) and the multiplier is ``m_i = target / (n_i + eps)``, clamped to
    ``[0, max_weight]`` and detached. The declared weights are the intended relative pulls:
    the effective weight ``declared_i * m_i`` makes term ``i`` pull ``declared_i * target``.
    The target is the `reference` term's raw norm if one is given (the reference keeps its
    declared weight), else the declared-weighted mean of the balanced norms, which keeps the
    sum of the pulls unchanged.

    It reproduces VQGAN's adaptive discriminator weight (taming-transformers,
    ``calculate_adaptive_weight``): ``GradientBalance(terms=["g_loss"], reference="nll",
    on="decoder.conv_out.weight", eps=1e-4, max_weight=1e4)`` with
    ``LossTerm("g_loss", weight=Piecewise([start], [0.0, discriminator_weight]))`` gives
    ``discriminator_weight * clamp(||grad nll|| / (||grad g_loss|| + 1e-4), 0, 1e4)`` from the
    start step on, and 0 before.

    Args:
        terms: the terms to balance (default: all but the reference).
        on: the group: a submodule (``"decoder.conv_out"``), a single parameter
            (``"decoder.conv_out.weight"``), an fnmatch pattern on parameter names, or a list
            of them. Default: the last layer that every balanced term (and the reference)
            reaches, "last" meaning nearest the losses on the autograd graph (see
            ``last_shared_layer``), with its weight and bias.
        reference: a term that is not balanced and whose pull sets the target.
        every_n_steps: decide every this many optimizer steps; in between, keep the
            multipliers (and compute no gradients).
        smoothing: in ``[0, 1)``: exponential moving average of the norms over decisions
            (bias-corrected as in Adam); 0 uses each decision's norms alone.
        eps: added to each norm in the denominator.
        max_weight: the largest multiplier.

    Raises:
        LossMixError: for bad arguments; at binding, for unknown terms, a reference that is
            also balanced, a single balanced term without a reference; at the first decision,
            for a term that does not reach the group.

    Examples:
        >>> import torch
        >>> from lightning_lossmix import LossMix, LossTerm
        >>> net = torch.nn.Linear(2, 1)
        >>> mix = LossMix([LossTerm("a"), LossTerm("b")], balancer=GradientBalance(on="weight"))
        >>> _ = mix.bind(net)
        >>> y = net(torch.tensor([[1.0, 2.0]])).squeeze()
        >>> out = mix({"a": y, "b": 10 * y}, step=0)
        >>> {name: round(w, 4) for name, w in out.signed_weights.items()}  # equal pulls
        {'a': 5.5, 'b': 0.55}
    """

    _plain_state = ("_decisions", "_measured_step", "_smoothed")

    per_term_gradients = True

    def __init__(
        self,
        terms: Sequence[str] | None = None,
        *,
        on: str | Sequence[str] | None = None,
        reference: str | None = None,
        every_n_steps: int = 1,
        smoothing: float = 0.0,
        eps: float = 1e-8,
        max_weight: float = 1e4,
    ) -> None:
        super().__init__(terms)
        owner = "GradientBalance"
        self.group = ParameterGroup(on, owner)
        self.reference = None if reference is None else check_name(reference, owner)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", owner, minimum=1)
        self.smoothing = check_finite_float(smoothing, "smoothing", owner)
        if not 0.0 <= self.smoothing < 1.0:
            raise LossMixError(
                f"{owner}: `smoothing` should be in [0, 1). Found `smoothing = {smoothing}`; "
                "0 uses each decision's norms alone, 0.9 averages over about 10 decisions."
            )
        found = check_bounds(owner, positive={"max_weight": max_weight}, non_negative={"eps": eps})
        self.eps, self.max_weight = found["eps"], found["max_weight"]
        self._decisions = 0
        self._measured_step: int | None = None
        self._measured_names: tuple[str, ...] = ()
        # The moving average of the norms (balanced terms, then the reference), not debiased.
        self._smoothed: list[float] = []

    def _single_term_hint(self) -> str:
        return " With one term, give a `reference` term to balance it against (as VQGAN)."

    def _default_terms(self, terms: Sequence[LossTerm]) -> tuple[str, ...]:
        return tuple(term.name for term in terms if term.name != self.reference)

    def _fewest_terms(self) -> int:
        return 1 if self.reference is not None else 2

    def _check_terms(self, terms: Sequence[LossTerm], module: nn.Module | None) -> None:
        declared = [term.name for term in terms]
        if self.reference is not None:
            if self.reference not in declared:
                raise LossMixError(
                    f"GradientBalance: `reference` names {self.reference!r}, which the mix does "
                    f"not declare. Its terms are {declared}."
                )
            if self.reference in self.balanced:
                raise LossMixError(
                    f"GradientBalance: the reference {self.reference!r} is also in `terms`. "
                    "The reference keeps its declared weight; leave it out of `terms`."
                )
        self.group.bind(module)
        reference = () if self.reference is None else (self.reference,)
        self._measured_names = (*self.balanced, *reference)

    def _due(self, step: int) -> bool:
        """Whether `step` measures: none yet, `every_n_steps` since the last, or a new fit.

        A step before the last measurement is a new fit (a fresh Trainer restarts at 0).
        """
        last = self._measured_step
        return last is None or not 0 <= step - last < self.every_n_steps

    def _start_fit(self) -> None:
        super()._start_fit()
        set_plain(self, _measured_step=None)  # a new fit measures at its first step

    def _measure(self, values: Mapping[str, Tensor], *, step: int, loss_scale: float) -> Tensor:
        # The values (balanced terms, then the reference), and at a measuring step the pieces
        # of their gradient norms on the group (`measure_group`).
        names = self._measured_names
        if not self._due(step):
            return mean_across_processes(self._stacked(values, names))
        params = self.group.resolve({n: values[n] for n in names})
        grads = group_gradients([values[n] for n in names], params, loss_scale, "GradientBalance")
        self._expose(names, params, grads, loss_scale)
        return measure_group([values[n] for n in names], grads, params, loss_scale)

    def _decide(
        self, read: list[float], declared: Mapping[str, float], *, step: int
    ) -> Tensor | list[float]:
        if not self._due(step):  # keep the multipliers
            return self.last_multipliers
        set_plain(self, _measured_step=step)
        count = len(self._measured_names)
        norms = norms_from_pieces(read[count:], count)
        if self.smoothing > 0:
            beta, decisions = self.smoothing, self._decisions + 1
            previous = self._smoothed or [0.0] * count
            smoothed = [beta * a + (1.0 - beta) * n for a, n in zip(previous, norms, strict=True)]
            set_plain(self, _decisions=decisions, _smoothed=smoothed)
            norms = [a / (1.0 - beta**decisions) for a in smoothed]  # bias-corrected, as Adam
        balanced = len(self.balanced)
        set_plain(self, _stats={"grad_norm": norms[:balanced]})
        return balanced_multipliers(
            norms[:balanced],
            [declared[name] for name in self.balanced],
            reference=norms[balanced] if self.reference is not None else None,
            eps=self.eps,
            max_weight=self.max_weight,
        )

    def _options(self) -> dict[str, Any]:
        """Return the arguments that differ from the defaults."""
        options: dict[str, Any] = {
            "on": None if self.group.on is None else list(self.group.on),
            "reference": self.reference,
            "every_n_steps": self.every_n_steps,
            "smoothing": self.smoothing,
            "eps": self.eps,
            "max_weight": self.max_weight,
        }
        defaults: dict[str, Any] = {
            "on": None,
            "reference": None,
            "every_n_steps": 1,
            "smoothing": 0.0,
            "eps": 1e-8,
            "max_weight": 1e4,
        }
        return {k: v for k, v in options.items() if v != defaults[k]}
