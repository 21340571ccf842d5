"""Balancer: the contract every automatic balancing method follows."""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossmix._compat import sharded_strategy
from lightning_lossmix._errors import LossMixError, check_name
from lightning_lossmix._term import LossTerm
from lightning_lossmix.balancing._distributed import mean_across_processes
from lightning_lossmix.balancing._gradients import Grads, TermGradients


class Balancer(nn.Module):
    """Sets the multiplier of each balanced term; the effective weight is declared x multiplier.

    The rule every balancer follows: the effective weight of a balanced term at a step is its
    declared weight at that step (a constant or a schedule) times the balancer's non-negative
    multiplier; the sign comes from the term's ``mode`` and never changes. Each balancer
    computes its multipliers from the raw terms, as if every declared weight were 1 (except
    `GradientBalance`, which keeps the declared weights as the intended relative pulls), so
    a declared weight scales what the balancer decided for its term. Terms that are not
    balanced keep their declared weights.

    A subclass implements `_decide` (once per optimizer step in training) and may override
    `_measure` (what the decision reads from the step), `_read`, `_per_call` (every training
    call), `_evaluation`, `regularizer`, `_check_terms` and `_options`.

    In training (module in train mode and gradients enabled), `multipliers` decides once per
    distinct ``step`` (gradient accumulation calls it several times per step: the decision is
    reused). A decision is a transaction: `_measure` computes what the step gives as one
    tensor (by default the balanced terms' values, averaged over processes; gradient-based
    methods add their per-term gradient norms, taken on the gradient averaged over processes)
    without touching the state; one read-back (`_read`) brings it to the host and checks that
    all of it is finite; only then does `_decide` update the state, from those floats. A NaN or
    infinite term, or a non-finite per-term gradient, leaves every part of the state as it
    was; since the measurements are global, every process reaches the same verdict.

    In evaluation (eval mode, ``torch.no_grad()`` or inference mode) it returns the
    multipliers of the last training decision, kept in the buffer ``last_multipliers`` so that
    checkpoints keep them; before any training step they are 1.

    Args:
        terms: the names of the terms to balance; None balances every declared term.

    Raises:
        LossMixError: for a string instead of a sequence, or a bad or repeated name.

    Examples:
        A balancer that halves every balanced term (the sign still comes from the mode):

        >>> import torch
        >>> from lightning_lossmix import LossMix, LossTerm
        >>> class Halve(Balancer):
        ...     def _decide(self, read, declared, *, step):
        ...         return [0.5] * len(self.balanced)
        >>> mix = LossMix([LossTerm("a", weight=2.0), LossTerm("b", mode="max")], balancer=Halve())
        >>> w = torch.nn.Parameter(torch.tensor(1.0))
        >>> mix({"a": w * 2, "b": w * 3}, step=0).signed_weights
        {'a': 1.0, 'b': -0.5}
    """

    #: Whether the method can balance a ``mode="max"`` term.
    allows_max: bool = True
    #: The fewest balanced terms the method can work with.
    min_terms: int = 2
    #: Whether its decisions differentiate each term on its own, a pass through the step's
    #: graph before the step's backward (which a graph compiled by torch.compile must allow).
    per_term_gradients: bool = False
    last_multipliers: Tensor

    def __init__(self, terms: Sequence[str] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if terms is not None:
            if isinstance(terms, str) or not isinstance(terms, Sequence):
                raise LossMixError(
                    f"{owner}: `terms` should be a sequence of term names, e.g. "
                    f"['recon', 'label']. Found `terms = {terms!r}`; write [{terms!r}]."
                )
            names = tuple(check_name(name, owner) for name in terms)
            if len(set(names)) != len(names):
                raise LossMixError(
                    f"{owner}: `terms` should name each term once. Found `terms = {list(names)}`."
                )
        self.given_terms: tuple[str, ...] | None = None if terms is None else names
        self.balanced: tuple[str, ...] = () if terms is None else names
        self.modes: tuple[float, ...] = ()
        self._module: tuple[nn.Module] | None = None
        self._decided_step: int | None = None
        # The Trainer of the fit of the last training call, as a weak reference (`_ended` in a
        # copy; None: no fit seen, or a checkpoint loaded), to tell a new fit that restarts at
        # a step already decided.
        self._fit: Callable[[], Any] | None = None
        self._gradients: Mapping[str, Mapping[Tensor, Tensor]] = {}
        self._stats: dict[str, Tensor | float | list[float]] = {}
        self._declared_cache: tuple[Any, Tensor] | None = None
        self._assembly_cache: dict[str, Any] = {}  # see `_assemble.balanced_total`
        # The multipliers `_current` returned as floats, when its decision gave floats (None
        # otherwise): `balanced_total` then needs no read-back of the buffer.
        self._call_floats: list[float] | None = None
        self._keep_undo = False
        # Whether this call's measurement was not finite (`LossMix` raises on it).
        self._call_rejected = False
        self._undo_state: tuple[int, list[tuple[Tensor, Tensor]], list[Any], Any] | None = None
        self.register_buffer("last_multipliers", torch.ones(len(self.balanced), dtype=STATE))

    # -- binding ---------------------------------------------------------------------------------

    def bind(self, terms: Sequence[LossTerm], module: nn.Module | None) -> None:
        """Check the balanced terms against the declared ones and remember the module.

        Args:
            terms: the mix's declared terms.
            module: the module that trains on the mix (for parameter groups), or None.

        Raises:
            LossMixError: for unknown terms, too few balanced terms, a ``"max"`` term the
                method cannot balance, or a group that names nothing in `module`.
        """
        owner = type(self).__name__
        declared = [term.name for term in terms]
        given = self.given_terms if self.given_terms is not None else self._default_terms(terms)
        unknown = [name for name in given if name not in declared]
        if unknown:
            raise LossMixError(
                f"{owner}: `terms` names {unknown}, which the mix does not declare. Its terms "
                f"are {declared}; fix the names, or declare the terms."
            )
        if len(given) < self._fewest_terms():
            raise LossMixError(
                f"{owner}: it should balance at least {self._fewest_terms()} terms. Found "
                f"{list(given)}: a single term has nothing to be balanced against. Balance "
                "two or more terms (`terms=None` balances all of them), or drop the balancer."
                + self._single_term_hint()
            )
        by_name = {term.name: term for term in terms}
        maximized = [name for name in given if by_name[name].mode == "max"]
        if maximized and not self.allows_max:
            raise LossMixError(
                f"{owner}: it cannot balance the mode='max' term(s) {maximized}: "
                f"{self._max_reason()} Leave them out with `terms=[...]` (they keep their "
                "declared weights), or use GradientBalance or RandomLossWeighting, which "
                "balance maximized terms too."
            )
        self.balanced = tuple(given)
        self.modes = tuple(by_name[name].sign for name in given)
        self._module = None if module is None else (module,)
        if self.last_multipliers.numel() != len(given):
            kept = self.last_multipliers
            self.last_multipliers = torch.ones(len(given), dtype=kept.dtype, device=kept.device)
            self._resize(len(given))
        self._check_terms(terms, module)

    def _default_terms(self, terms: Sequence[LossTerm]) -> tuple[str, ...]:
        """Return the terms balanced when `terms` was not given (default: all)."""
        return tuple(term.name for term in terms)

    def _fewest_terms(self) -> int:
        return self.min_terms

    def _resize(self, count: int) -> None:
        """Size the subclass's per-term state for `count` balanced terms."""

    def _check_terms(self, terms: Sequence[LossTerm], module: nn.Module | None) -> None:
        """Check the subclass's own options against the terms and the module."""

    def _single_term_hint(self) -> str:
        return ""

    def _max_reason(self) -> str:
        return "it works on loss values that decrease toward zero."

    @property
    def module(self) -> nn.Module | None:
        """The module `bind` was given, or None."""
        return None if self._module is None else self._module[0]

    # -- the contract ---------------------------------------------------------------------------

    def factors(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """Return each balanced term's non-negative multiplier (a scalar tensor).

        Args:
            values: term name to raw scalar value (all declared terms), attached to the graph
                in training.
            declared: term name to declared (unsigned) weight at `step`.
            step: the optimizer step; one decision per distinct step in training.
            loss_scale: the GradScaler's scale, for per-term gradients under 16-bit precision
                (they are unscaled before use).
        """
        found = self.multipliers(values, declared, step=step, loss_scale=loss_scale)
        return dict(zip(self.balanced, found.unbind(), strict=True))

    def multipliers(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float = 1.0,
    ) -> Tensor:
        """Return the multipliers as one tensor ``(K,)``, in the order of `balanced`.

        What `factors` returns, without building a mapping.
        """
        found = self._current(values, declared, step=step, loss_scale=loss_scale)
        return found.clone() if found is self.last_multipliers else found

    def _current(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        *,
        step: int,
        loss_scale: float = 1.0,
    ) -> Tensor:
        """`multipliers` for a caller that uses the result at once (LossMix, every step).

        It may return the buffer ``last_multipliers`` itself, which the next decision
        overwrites; when this call's decision gave floats, they are in ``_call_floats``.
        """
        if self._gradients:
            set_plain(self, _gradients={})
        if not self.balanced:
            raise LossMixError(
                f"{type(self).__name__}: call `bind(terms, module)` before `factors` (LossMix "
                "does it when given `balancer=`)."
            )
        floats = None
        if not (self.training and torch.is_grad_enabled()):
            set_plain(self, _call_floats=floats, _call_rejected=False)
            return self._evaluation(declared)
        self._follow_fit(step)
        measured = None
        rejected = False
        if self._decided_step != step:
            measured = self._measure(values, step=step, loss_scale=loss_scale)
            read = self._read(measured, step)
            if read is None:  # the module raises or skips this step: no trace here either
                measured = None
                rejected = True
            else:
                if self._keep_undo:
                    self._snapshot(step)
                decided = self._decide(read, declared, step=step)
                kept = self.last_multipliers
                if not isinstance(decided, Tensor):  # floats: made a tensor on the host,
                    host = torch.tensor(decided, dtype=kept.dtype)  # rounded to the buffer's
                    kept.copy_(host)  # dtype, to be read back there, with no device sync
                    # Handed to the total as they are only if the buffer is what this call
                    # returns: one per term, and no `_per_call` of a subclass to change it.
                    if host.shape == kept.shape and type(self)._per_call is Balancer._per_call:
                        floats = host.tolist()
                elif decided is not kept:
                    kept.copy_(decided.detach())
                set_plain(self, _decided_step=step)
        found = self._per_call(values, declared, measured)
        set_plain(
            self,
            _call_floats=floats if found is self.last_multipliers else None,
            _call_rejected=rejected,
        )
        return found

    def _follow_fit(self, step: int) -> None:
        """Forget the last decision's step when a new fit starts (a fresh Trainer).

        A new Trainer restarts at step 0: after a one-step fit (``fast_dev_run``), or one that
        measured at step 0 only, its first step would otherwise reuse the previous fit's
        decision, made on another batch. What the balancer learned is kept, as the weights
        are. A fit resumed from a checkpoint continues (loading forgets the Trainer): its
        first `step` comes after the last decision's. A state loaded otherwise (by
        ``load_state_dict``, as ``ddp_spawn`` hands the main process its result) followed by
        a fit from step 0 is a new fit.
        """
        module = self.module
        trainer = None if module is None else module.__dict__.get("_trainer")
        if trainer is None:  # a plain training loop: steps are the caller's
            return
        known = self._fit
        if known is not None and known() is trainer:
            return
        self._check_strategy(trainer)
        set_plain(self, _fit=weakref.ref(trainer))
        decided = self._decided_step
        if known is not None or (decided is not None and step <= decided):
            self._start_fit()

    def _check_strategy(self, trainer: Any) -> None:
        """Raise if the balancer differentiates each term and the strategy shards parameters."""
        strategy = sharded_strategy(trainer) if self.per_term_gradients else None
        if strategy is None:
            return
        owner = type(self).__name__
        raise LossMixError(
            f"{owner}: it differentiates each term on its group of parameters, which "
            f"{strategy} shards: each process holds a piece of every parameter, so a term's "
            "gradient norm on the group cannot be taken without gathering it. Train with "
            "strategy='ddp' (or on one device), or use a balancer that reads only the terms' "
            "values: UncertaintyWeighting, DWA, FAMO or RandomLossWeighting."
        )

    def _start_fit(self) -> None:
        """Forget the step-keyed state of the previous fit (subclasses add theirs)."""
        set_plain(self, _decided_step=None, _undo_state=None)

    def _measure(self, values: Mapping[str, Tensor], *, step: int, loss_scale: float) -> Tensor:
        """Return what the decision of `step` reads, without changing any state.

        It must be global (the same on every process) and finite exactly when the step may
        count. Default: the balanced terms' values, detached and averaged over processes,
        ``(K,)`` (a NaN on any process makes the mean NaN on all of them).
        """
        return mean_across_processes(self._stacked(values))

    def _read(self, measured: Tensor, step: int) -> list[float] | None:
        """Read the measurement to the host (the decision's one sync); None if not all finite."""
        read = (measured if measured.dim() == 1 else measured.reshape(-1)).tolist()
        return read if all(map(math.isfinite, read)) else None

    def _refuse_non_positive(
        self, values: Sequence[float], step: int | None, why: str, *, zero_too: bool = True
    ) -> None:
        """Raise naming the balanced terms whose `values` are <= 0 (< 0 if not `zero_too`).

        Args:
            values: the balanced terms' values, in the order of `balanced` (extra ones are
                ignored); a non-finite value is not this check's business.
            step: the optimizer step, for the message (None: a later micro-batch's call).
            why: what the method does with the values that needs them positive.
            zero_too: whether 0 is refused too.
        """
        bad = [
            name
            for name, value in zip(self.balanced, values, strict=False)
            if value < 0 or (zero_too and value == 0)
        ]
        if bad:
            sign, kind = ("<= 0", "positive") if zero_too else ("< 0", "non-negative")
            where = "in a micro-batch" if step is None else f"at step {step}"
            raise LossMixError(
                f"{type(self).__name__}: the balanced terms should be {kind} ({why}). Found "
                f"{bad} {sign} {where}. Shift the loss (e.g. add a constant, or use a loss "
                f"that is {kind}), or leave the term out with `terms=[...]` (it keeps its "
                "declared weight)."
            )

    def _decide(
        self, read: list[float], declared: Mapping[str, float], *, step: int
    ) -> Tensor | Sequence[float]:
        """Update the state from a finite measurement; return the step's multipliers.

        They are ``K`` floats or a tensor ``(K,)``, in the order of `balanced`.

        Args:
            read: what `_measure` returned at this step, flattened to floats, all finite.
            declared: term name to declared (unsigned) weight at `step`.
            step: the optimizer step.
        """
        raise NotImplementedError

    def _per_call(
        self,
        values: Mapping[str, Tensor],
        declared: Mapping[str, float],
        measured: Tensor | None,
    ) -> Tensor:
        """Return the multipliers of this training call (default: the buffer of the decision).

        Args:
            values: the call's terms, attached to the graph.
            declared: the declared weights at the step.
            measured: what `_measure` returned if this call decided, else None (a later
                micro-batch of the step, or a step that did not count).
        """
        return self.last_multipliers

    def _evaluation(self, declared: Mapping[str, float]) -> Tensor:
        """Return the multipliers outside training (default: the last training decision's)."""
        return self.last_multipliers

    def regularizer(self) -> Tensor | None:
        """Return a term added to the total (uncertainty weighting's), or None."""
        return None

    def check_optimized(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Raise if the balancer has learnable parameters that none of `optimizers` holds.

        Raises:
            LossMixError: naming the parameters and the fix.
        """
        missing = self.unoptimized(optimizers)
        if missing:
            raise LossMixError(
                f"{type(self).__name__}: its learnable parameters ({', '.join(missing)}) are in "
                "no optimizer, so the weights would never learn. Build the optimizer from "
                "`self.parameters()` (which includes them), or add them as a parameter group: "
                "{'params': self.loss_mix.balancer.parameters()}."
            )

    def unoptimized(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
        """Return the names of the balancer's parameters that none of `optimizers` holds.

        Every parameter counts, frozen or not: on a player's turn, Lightning's
        ``toggle_optimizer`` has frozen those of the other players' optimizers.
        """
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        return [name for name, p in self.named_parameters() if id(p) not in held]

    @property
    def gradients(self) -> Mapping[str, Mapping[Tensor, Tensor]]:
        """The per-term gradients computed at the last call: term -> {parameter: flat grad}.

        Empty where the call computed none. They are this process's raw-term gradients,
        unscaled, before any averaging across processes, so that `GradientMonitor` can reuse
        them instead of differentiating again. They are flattened only when read.
        """
        return self._gradients

    # -- undoing a decision ------------------------------------------------------------------

    def keep_undo(self, keep: bool) -> None:
        """Keep, at each decision, what `undo` needs to take it back.

        `LossMixModule` turns it on under ``nonfinite="skip"``, where a step may be dropped
        after its decision: a NaN in a later micro-batch, or a gradient that is not finite
        outside the balanced group. It copies the balancer's few state buffers at each
        decision; under ``"raise"`` a bad step ends the fit, and nothing is kept.
        """
        set_plain(self, _keep_undo=bool(keep), _undo_state=None)

    def undo(self, step: int) -> bool:
        """Put the state back as it was before the decision of `step`; return whether it was.

        Nothing happens unless `keep_undo` is on and the last decision was taken at `step`
        (a step whose measurement was not finite took none). The state is every buffer and
        extra state of the balancer and its submodules, what a decision changes; parameters
        (uncertainty weighting's log-variances) change only through an optimizer, which a
        dropped step does not run. A later micro-batch of the dropped step decides again, and
        the module takes that back too.
        """
        saved = self._undo_state
        if saved is None or saved[0] != step:
            return False
        _, tensors, extras, stats = saved
        with torch.no_grad():
            for tensor, kept in tensors:
                tensor.copy_(kept)
        for module, state in extras:
            module.set_extra_state(state)
        set_plain(self, _stats=stats, _gradients={}, _undo_state=None)
        return True

    def commit(self) -> None:
        """Forget the kept decision: its step went through, and no later `undo` may take it."""
        set_plain(self, _undo_state=None)

    def _snapshot(self, step: int) -> None:
        tensors = [(tensor, tensor.detach().clone()) for tensor in self.buffers()]
        extras = [
            (module, copy.deepcopy(module.get_extra_state()))
            for module in self.modules()
            if type(module).get_extra_state is not nn.Module.get_extra_state
        ]
        set_plain(self, _undo_state=(step, tensors, extras, self._stats))

    def logged(self) -> dict[str, float]:
        """Return the balancer's state to log under ``balance/<key>`` (one device sync)."""
        multipliers = self.last_multipliers.tolist()
        logged = {f"multiplier/{n}": m for n, m in zip(self.balanced, multipliers, strict=True)}
        for key, value in self._stats.items():
            found = value.tolist() if isinstance(value, Tensor) else value
            if isinstance(found, (int, float)):
                logged[key] = float(found)
            else:
                for name, item in zip(self.balanced, found, strict=True):
                    logged[f"{key}/{name}"] = float(item)
        return logged

    # -- helpers for subclasses -----------------------------------------------------------------

    def _stacked(self, values: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
        """Return the terms' values (default: the balanced ones), detached, as floats ``(K,)``."""
        stacked = torch.stack([values[name].detach() for name in names or self.balanced])
        if stacked.dtype in (torch.float32, torch.float64):
            return stacked
        return stacked.to(torch.promote_types(stacked.dtype, torch.float32))

    def _declared_weights(self, declared: Mapping[str, float], like: Tensor) -> Tensor:
        """Return the balanced terms' declared weights as a tensor like `like` (cached).

        Kept apart under inference mode: a tensor made there (``trainer.validate`` before a
        fit) cannot be saved for a training backward.
        """
        weights = tuple(declared[name] for name in self.balanced)
        key = (weights, like.dtype, like.device, torch.is_inference_mode_enabled())
        if self._declared_cache is None or self._declared_cache[0] != key:
            tensor = torch.tensor(weights, dtype=like.dtype, device=like.device)
            set_plain(self, _declared_cache=(key, tensor))
        assert self._declared_cache is not None
        return self._declared_cache[1]

    def _expose(
        self, names: Sequence[str], params: Sequence[Tensor], grads: Grads, scale: float
    ) -> None:
        """Keep the per-term gradients of this call for `gradients` (flattened when read)."""
        set_plain(self, _gradients=TermGradients(names, params, grads, scale))

    # -- checkpoints, copies and printing --------------------------------------------------------

    @override
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Balancer:
        """Apply `fn` (``.to``, ``.cuda``, ``.half()``) to the state, which stays float32 or wider.

        ``Trainer(precision="bf16-true")`` casts the whole LightningModule, the balancer
        included: in 16 bits DWA's running sums stall or overflow, and the moments of the
        small Adam optimizers lose their precision. A cast to 16 bits only moves the state to
        the device `fn` gives (its values untouched); a widened state (``.double()``) keeps what
        `fn` gave it.
        """

        def keep_wide(tensor: Tensor) -> Tensor:
            result = fn(tensor)
            if result.dtype in _NARROW and tensor.dtype not in _NARROW:
                return tensor.to(device=result.device)
            return result

        super()._apply(keep_wide, recurse)
        return self

    #: The plain Python attributes a checkpoint keeps, besides the buffers; each is stored
    #: under its name without the leading underscore.
    _plain_state: tuple[str, ...] = ()

    @override
    def __getstate__(self) -> dict[str, Any]:
        """Return the attributes to copy or pickle, without what one training call left.

        ``copy.deepcopy`` of a trained module (an EMA teacher, a kept best model),
        ``torch.save`` of the whole module, and a checkpoint whose hyperparameters hold the
        balancer (``save_hyperparameters()``) all pickle it. The caches of the last call (some
        of which cannot be pickled), its per-term gradients and its undo record are left out:
        they are rebuilt, or not needed, at the next call.
        """
        state: dict[str, Any] = super().__getstate__()
        state.update(
            _gradients={},
            _assembly_cache={},
            _declared_cache=None,
            _call_floats=None,
            _undo_state=None,
            _fit=None if self._fit is None else _ended,  # a copy's next fit is a new one
        )
        return state

    @override
    def get_extra_state(self) -> dict[str, Any]:
        """Return the Python-side state a checkpoint keeps (the step of the last decision)."""
        names = ("_decided_step", *self._plain_state)
        return {name.lstrip("_"): getattr(self, name) for name in names}

    @override
    def set_extra_state(self, state: Any) -> None:
        """Restore what `get_extra_state` returned (and forget any decision kept for `undo`)."""
        set_plain(self, _undo_state=None, _fit=None)
        for name in ("_decided_step", *self._plain_state):
            key = name.lstrip("_")
            if key in state:
                set_plain(self, **{name: state[key]})

    def _options(self) -> dict[str, Any]:
        """Return the constructor's arguments to print after `terms` (defaults are left out)."""
        return {}

    @override
    def extra_repr(self) -> str:
        """Show the constructor call's arguments that differ from their defaults."""
        parts = [] if self.given_terms is None else [f"terms={list(self.given_terms)}"]
        defaults = constructor_defaults(type(self))
        parts += [
            f"{name}={value!r}"
            for name, value in self._options().items()
            if name not in defaults or defaults[name] != value
        ]
        return ", ".join(parts)


#: The dtype of a balancer's state when created; a cast never makes it narrower (`_apply`).
STATE = torch.float32
_NARROW = (torch.float16, torch.bfloat16)


def constructor_defaults(kind: type) -> dict[str, Any]:
    """Return the default of each keyword of `kind`'s constructor that has one."""
    parameters = inspect.signature(kind).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


def _ended() -> None:
    """Return None: the trainer of the fit a copied balancer was in, as a dead weak reference."""
    return None


def set_plain(module: nn.Module, **attributes: Any) -> None:
    """Set plain (non-tensor, non-module) attributes, skipping ``nn.Module.__setattr__``.

    Its checks cost a few microseconds per assignment; the balancers set a few attributes at
    every call, for values that are never parameters, buffers or submodules.
    """
    for name, value in attributes.items():
        object.__setattr__(module, name, value)
