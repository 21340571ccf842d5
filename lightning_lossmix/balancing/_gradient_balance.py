"""GradientBalance: scale each term so that its pull on a group matches its declared weight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossmix._errors import LossMixError, check_finite_float, check_int, check_name
from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._base import Balancer, set_plain
from lightning_lossmix.balancing._distributed import mean_across_processes
from lightning_lossmix.balancing._groups import ParameterGroup
from lightning_lossmix.functional import term_gradients


def balanced_multipliers(
    norms: Tensor,
    declared: Tensor,
    *,
    reference: Tensor | None = None,
    eps: float = 1e-8,
    max_weight: float = 1e4,
) -> Tensor:
    """Return the multipliers that make each term's pull proportional to its declared weight.

    With a reference norm ``n_ref``: ``m_i = n_ref / (n_i + eps)``, so that term ``i`` pulls
    ``declared_i / declared_ref`` times as hard as the reference. Without one: ``m_i = T /
    (n_i + eps)`` with ``T`` the declared-weighted mean of the raw norms, so that the pulls are
    proportional to the declared weights and their sum is what it was before balancing.
    Clamped to ``[0, max_weight]``.

    Args:
        norms: ``(K,)`` raw gradient norms ``||dL_i/dW||`` on the group.
        declared: ``(K,)`` declared (unsigned) weights.
        reference: the reference term's raw gradient norm, or None.
        eps: added to each norm in the denominator.
        max_weight: the largest multiplier.

    Examples:
        >>> balanced_multipliers(torch.tensor([2.0, 8.0]), torch.tensor([1.0, 1.0]), eps=0.0)
        tensor([2.5000, 0.6250])
    """
    if reference is None:
        weight = declared.sum()
        target = torch.where(
            weight > 0, (declared * norms).sum() / weight.clamp_min(1e-30), norms.mean()
        )
    else:
        target = reference
    return (target / (norms + eps)).clamp(0.0, max_weight)


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

    smoothed_norms: Tensor

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
        self.eps = check_finite_float(eps, "eps", owner)
        self.max_weight = check_finite_float(max_weight, "max_weight", owner)
        if self.eps < 0 or self.max_weight <= 0:
            raise LossMixError(
                f"{owner}: `eps` should be >= 0 and `max_weight` > 0. Found `eps = {eps}`, "
                f"`max_weight = {max_weight}`."
            )
        self._decisions = 0
        self._measured_step: int | None = None
        self.register_buffer("smoothed_norms", torch.zeros(len(self.balanced) + 1))

    def _resize(self, count: int) -> None:
        self.smoothed_norms = torch.zeros(count + 1, device=self.smoothed_norms.device)

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

    def _names(self) -> list[str]:
        return [*self.balanced, *([self.reference] if self.reference is not None else [])]

    def _decide(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float,
    ) -> Tensor:
        # A step before the last measurement is a new fit (a fresh Trainer restarts at 0).
        if self._measured_step is not None and 0 <= step - self._measured_step < self.every_n_steps:
            return self.last_multipliers.clone()
        set_plain(self, _measured_step=step)
        names = self._names()
        params = self.group.resolve({n: values[n] for n in names})
        rows = term_gradients([values[name] for name in names], params, scale=loss_scale)
        self._expose(names, params, rows)
        norms = torch.linalg.vector_norm(mean_across_processes(rows), dim=1)
        if self.smoothing > 0:
            set_plain(self, _decisions=self._decisions + 1)
            average = self.smoothed_norms[: len(names)]
            average.mul_(self.smoothing).add_(norms.to(average.dtype), alpha=1.0 - self.smoothing)
            norms = average / (1.0 - self.smoothing**self._decisions)
        count = len(self.balanced)
        weights = torch.tensor([declared[name] for name in self.balanced], dtype=norms.dtype)
        multipliers = balanced_multipliers(
            norms[:count],
            weights.to(norms.device),
            reference=norms[count] if self.reference is not None else None,
            eps=self.eps,
            max_weight=self.max_weight,
        )
        set_plain(self, _stats={"grad_norm": norms[:count]})
        return multipliers

    def _extra_state(self) -> dict[str, Any]:
        return {"decisions": self._decisions, "measured_step": self._measured_step}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._decisions = int(state.get("decisions", 0))
        self._measured_step = state.get("measured_step")

    def extra_repr(self) -> str:
        """Show the arguments that differ from the defaults."""
        parts = [super().extra_repr()] if self.given_terms is not None else []
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
        parts += [f"{k}={v!r}" for k, v in options.items() if v != defaults[k]]
        return ", ".join(parts)
