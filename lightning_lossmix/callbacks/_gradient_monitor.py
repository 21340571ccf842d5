"""GradientMonitor: how hard each loss term pulls on each group of parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_lossmix._compat import batches_that_stepped, sharded_strategy
from lightning_lossmix._engine import Batched, StepGradients, TermGradientEngine
from lightning_lossmix._errors import LossMixError, check_int
from lightning_lossmix._mix import LossMix, LossMixOutput
from lightning_lossmix._saved_tensors import SavedTensorsKept
from lightning_lossmix._warnings import user_location
from lightning_lossmix.balancing._in_module import loss_scale
from lightning_lossmix.callbacks._alerts import Alerts
from lightning_lossmix.callbacks._figures import Layouts, compute_figures
from lightning_lossmix.callbacks._groups import (
    TAG_BUDGET,
    MonitoredGroups,
    prune,
    resolve_groups,
)
from lightning_lossmix.callbacks._options import (
    check_batched,
    check_groups,
    check_norm_type,
    check_warn_share,
)
from lightning_lossmix.callbacks._summary import summary_table
from lightning_lossmix.callbacks._writer import (
    Summaries,
    charted,
    log_figures,
    write_histograms,
    write_layout,
)


class GradientMonitor(Callback):
    r"""Logs each loss term's weighted gradient magnitude on groups of parameters.

    Every `every_n_steps` optimizer steps, for each group ``g`` of parameters and each term
    ``t`` of the module's `LossMix`, it computes the term's own gradient ``dL_t/dW_g`` on the
    same batch with ``torch.autograd.grad`` (the training update is untouched; one backward per
    term restricted to the monitored parameters, or one batched backward) and logs, through
    every logger of the trainer and into ``trainer.callback_metrics``:

    - ``grad_magnitude/<g>/<t>``: ``|alpha_t| * ||dL_t/dW_g||`` (`norm_type`-norm; ``alpha_t``
      the effective weight at that step), for the terms that reach the group;
    - ``grad_share/<g>/<t>``: that magnitude over the sum of the terms' magnitudes on ``g``,
      where two or more terms reach the group;
    - ``grad_cosine/<g>/<s>_vs_<t>`` (if `log_cosine`): the cosine similarity of the two
      terms' pulls (gradients signed by their mode); negative means the terms conflict;
    - ``grad_suggested_weight/<t>``: the weight that would bring the term's magnitude on
      ``all`` to the mean of the magnitudes of the terms of non-zero weight (not logged for a
      term of weight 0, nor with a single such term);
    - ``grad_direction/<g>/<t>`` for a term with `opposed_by`: in [-1, 1], +1 where the group's
      update pushes the term down, -1 where it pushes it up;
    - ``grad_alert/<kind>/<t>`` = 1 at a measurement where a warning fires (kinds
      ``drowns_<g>``, ``zero_gradient``, ``nonfinite_gradient``, ``unbounded``);
    - ``grad_histogram/<g>/<t>`` (if `log_histograms`, TensorBoard only): the values of
      ``alpha_t * dL_t/dW_g``.

    The figures describe the gradient the optimizer step uses: with gradient accumulation they
    are summed over the micro-batches, each divided by ``accumulate_grad_batches`` like
    Lightning's loss; under DDP they are averaged over the processes; under 16-mixed precision
    they are unscaled. The monitor learns each training call of a `LossMix` through a forward
    hook, registered in `setup` and removed at `teardown` or on an exception.

    Warnings (rank zero, once per term and condition, pointing at the module's
    ``compute_losses`` or ``training_step``): a term above `warn_share` of a group's magnitude
    for 3 measurements in a row, before weighting too (a term weighted down or ramped in on
    purpose is small by choice); a
    term whose gradient is zero on the monitored parameters; a non-finite term gradient
    (outside mixed precision); a maximized term that looks unbounded.

    Args:
        every_n_steps: measure every this many optimizer steps; default: the trainer's
            `log_every_n_steps`.
        groups: group name to submodule names (``"encoder"``, ``"decoder.0"``) or
            parameter-name patterns (``"*.bias"``). Default: ``all``, plus the parts of the
            module (its children, or the children of a single child such as ``self.model``)
            when there are two or more, the 4 largest.
        norm_type: the p of the p-norm, > 0, ``float("inf")`` allowed.
        log_cosine: log the pairwise cosine similarities.
        log_histograms: log histograms of the weighted gradients (TensorBoard only).
        warn_share: warn when a term's share of a group stays above this for 3 measurements.
        summary: print the last measurement and the report command at the end of a fit.
        batched: compute the terms' gradients in one batched backward (True), one backward
            per term (False), or ``"auto"``: time both once and keep the faster. Where torch
            has no batched backward for the graph (sparse gradients), True runs the loop.

    Raises:
        LossMixError: for bad arguments; at `setup`, for a module without a `LossMix` or a
            group pattern that matches nothing.

    Examples:
        ```python
        from lightning.pytorch import Trainer
        from lightning_lossmix.callbacks import GradientMonitor

        monitor = GradientMonitor(every_n_steps=50, groups={"decoder": ["decoder"]})
        Trainer(callbacks=[monitor]).fit(model)  # model: a LossMixModule
        monitor.last_metrics["grad_suggested_weight/recon"]
        ```
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        norm_type: float = 2.0,
        log_cosine: bool = True,
        log_histograms: bool = False,
        warn_share: float = 0.95,
        summary: bool = True,
        batched: Batched = "auto",
    ) -> None:
        owner = "GradientMonitor"
        self.every_n_steps = (
            None if every_n_steps is None else check_int(every_n_steps, "every_n_steps", owner, 1)
        )
        self.groups = check_groups(groups)
        self.norm_type = check_norm_type(norm_type)
        self.log_cosine = log_cosine
        self.log_histograms = log_histograms
        self.warn_share = check_warn_share(warn_share)
        self.batched: Batched = check_batched(batched)
        self.summary = summary
        #: The figures of the latest measurement of the current (or last) fit, by tag.
        self.last_metrics: dict[str, float] = {}
        self._alerts = Alerts(self.warn_share)
        self._enabled = False
        self._hooks: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None
        self._groups: MonitoredGroups | None = None
        self._engine: TermGradientEngine | None = None
        self._trainable: tuple[int, ...] = ()  # the parameters the groups were resolved on
        self._charted: set[tuple[str, str]] = set()  # the (kind, group) pairs logged so far
        self._every = 50
        self._collecting = False
        self._call: tuple[LossMix, dict[str, float], dict[str, Tensor]] | None = None
        self._measured_step = self._metrics_step = -1
        self._layout_written = False
        self._pruned = False
        self._collect_step = -1
        self._saved_tensors = SavedTensorsKept()
        self._layouts = Layouts()
        self._summaries = Summaries()
        self._state_key: tuple[Any, str] = (None, "")

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call of every step: built again only on a change.
        config = (self.every_n_steps, self.groups)
        if self._state_key[0] != config:
            key = self._generate_state_key(every_n_steps=self.every_n_steps, groups=self.groups)
            copied = None if self.groups is None else {g: list(p) for g, p in self.groups.items()}
            self._state_key = ((self.every_n_steps, copied), key)
        return self._state_key[1]

    def __repr__(self) -> str:
        return (
            f"GradientMonitor(every_n_steps={self.every_n_steps!r}, groups={self.groups!r}, "
            f"norm_type={self.norm_type!r}, log_cosine={self.log_cosine!r}, "
            f"log_histograms={self.log_histograms!r}, warn_share={self.warn_share!r}, "
            f"summary={self.summary!r}, batched={self.batched!r})"
        )

    # -- set-up and clean-up ----------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mixes = [module for module in pl_module.modules() if isinstance(module, LossMix)]
        if not mixes:
            raise LossMixError(
                f"GradientMonitor needs a LossMix in {type(pl_module).__name__}; found none. "
                "Subclass LossMixModule, or hold a LossMix as an attribute "
                "(self.loss_mix = LossMix(terms)) and call it in training_step."
            )
        self._regroup(pl_module)
        self._alerts.start_fit()  # steps count from 0 again (a resumed fit loads its own)
        self._alerts.location = user_location(pl_module)
        self._every = self.every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50
        self.last_metrics, self._layout_written = {}, False
        self._measured_step = self._metrics_step = -1
        self._trainer, self._call, self._collecting = trainer, None, False
        self._pruned, self._collect_step, self._layouts = False, -1, Layouts()
        strategy = sharded_strategy(trainer)
        self._enabled = strategy is None
        if strategy is not None:
            rank_zero_warn(
                f"GradientMonitor: per-term gradient figures are not available with {strategy}: "
                "its parameters are sharded, so a per-term gradient cannot be measured without "
                "gathering them. Nothing will be logged; use DDP or a single device to measure."
            )
            return
        self._hooks = [mix.register_forward_hook(_ObserveHook(self)) for mix in mixes]
        # Measuring needs `retain_graph=True`; AOTAutograd's donated buffers (torch.compile)
        # forbid that, so they are turned off while a monitor is in use.
        self._saved_tensors.hold()

    def _regroup(self, pl_module: pl.LightningModule, strict: bool = True) -> None:
        """Resolve the groups on the parameters trainable now, and the engine on them.

        Not `strict` (during the fit), a group whose parameters are all frozen now is left
        out rather than refused.
        """
        self._groups = resolve_groups(pl_module, self.groups, strict)
        self._engine = TermGradientEngine(self._groups.parameters, self.batched)
        self._trainable = _trainable(pl_module)
        self._layouts, self._pruned = Layouts(), False
        self._charted = set()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        """Undo what `setup` changed outside the monitor: hooks, donated buffers, the buffer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._call, self._collecting, self._trainer = [], None, False, None
        if self._engine is not None:
            self._engine.clear()
        self._saved_tensors.release()

    # -- collection -----------------------------------------------------------------------------

    def is_measured_step(self, trainer: pl.Trainer) -> bool:
        """Whether the optimizer step being trained is measured (at Lightning's logged step)."""
        return self._enabled and (batches_that_stepped(trainer) + 1) % self._every == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A new optimizer step (the logged step moved on, or manual optimization's next batch)
        # starts empty, even if the previous one never reached its optimizer step.
        step = batches_that_stepped(trainer)
        automatic = pl_module.automatic_optimization
        if step != self._collect_step or not automatic:
            self._call = None
            if self._engine is not None:
                self._engine.clear()
        self._collect_step = step
        self._collecting = self.is_measured_step(trainer)
        if self._collecting and _trainable(pl_module) != self._trainable:
            # Parameters frozen or unfrozen since (a backbone trained from some epoch on):
            # `all` and the default groups are every trainable parameter, so resolve again;
            # the custom-scalars layout is written again for the new groups.
            self._regroup(pl_module, strict=False)
            self._layout_written = False

    def _observe(self, mix: nn.Module, args: Any, output: LossMixOutput) -> None:
        """Collect a training call's term gradients (the forward hook on each `LossMix`)."""
        if not (self._collecting and mix.training and torch.is_grad_enabled()):
            return
        assert self._engine is not None and self._trainer is not None and isinstance(mix, LossMix)
        trainer = self._trainer
        automatic = trainer.lightning_module.automatic_optimization
        self._engine.add(
            output.values,
            divisor=trainer.accumulate_grad_batches if automatic else 1,
            scale=loss_scale(trainer),
            known=getattr(output, "gradients", None),
        )
        # The unbounded-growth alert reads the values of the maximized terms only.
        values = {t.name: output.values[t.name].detach() for t in mix.terms if t.mode == "max"}
        self._call = (mix, dict(output.signed_weights), values)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._collecting or self._engine is None:
            return
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda b: trainer.strategy.reduce(b, reduce_op="mean")  # noqa: E731
        step = self._engine.take(reduce)
        call, self._call = self._call, None
        if getattr(pl_module, "skipping_step", False):  # LossMixModule drops this step
            return
        if step is None or call is None:
            if not any(p.requires_grad for p in self._engine.params):
                return  # manual optimization with every monitored parameter toggled off
            self._alerts.warn_once(
                "no-output",
                "GradientMonitor: the LossMix was not called in this training step, so nothing "
                "was measured. Call it in training_step and backpropagate its `.total`.",
            )
            return
        self._measure(trainer, step, call)

    # -- measurement ----------------------------------------------------------------------------

    def _measure(
        self,
        trainer: pl.Trainer,
        step: StepGradients,
        call: tuple[LossMix, dict[str, float], dict[str, Tensor]],
    ) -> None:
        assert self._engine is not None and self._groups is not None
        mix, weights, values = call
        terms = {term.name: term for term in mix.terms}
        modes = [terms[n].sign for n in step.names]
        opposed = [mix.opposed_parameters(n) for n in step.names]
        figures = compute_figures(
            step,
            [weights[n] for n in step.names],
            modes,
            self._layouts.segments(
                step, self._groups.indices, modes, opposed, self._engine.pull_signs
            ),
            [t for t, parameters in enumerate(opposed) if parameters],
            self._groups.indices,
            self.norm_type,
            self.log_cosine,
        )
        logged_step = batches_that_stepped(trainer)
        self._measured_step = logged_step
        if not figures.finite:
            if loss_scale(trainer) == 1.0:  # under a GradScaler, overflow is routine
                bad = [n for n, norm in figures.norms.items() if not math.isfinite(norm)]
                alerts = self._alerts.nonfinite(bad, logged_step)
                log_figures(trainer, alerts, logged_step, self._summaries)
            return
        if self.groups is None and not self._pruned:  # default groups: keep to the budget
            figures, self._pruned = prune(figures, self._groups.indices, TAG_BUDGET), True
        maximized = {n for n in step.names if terms[n].mode == "max"}
        scalars: dict[str, float] = {}
        if values:  # one read-back; under DDP the mean over processes, as the figures are
            stacked = torch.stack([value.float() for value in values.values()])
            if trainer.world_size > 1:
                stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
            scalars = dict(zip(values, stacked.tolist(), strict=True))
        alerts = self._alerts.check(
            figures, weights, scalars, maximized, logged_step, self._groups.complete
        )
        metrics = {**figures.metrics, **alerts}
        # Players are measured one after the other at the same step: keep them all.
        same = logged_step == self._metrics_step
        self.last_metrics = {**self.last_metrics, **metrics} if same else metrics
        self._metrics_step = logged_step
        log_figures(trainer, metrics, logged_step, self._summaries)
        if trainer.is_global_zero:
            seen = charted(metrics)
            if not self._layout_written or not seen <= self._charted:
                # Written again when a kind appears that is not charted yet (another
                # player's turn, a term that reached a group only later).
                self._charted |= seen
                groups = list(self._groups.indices)
                self._layout_written = write_layout(trainer, groups, self.log_cosine, self._charted)
            if self.log_histograms:
                group_indices = self._groups.indices
                assert self._engine is not None
                trained = [p.requires_grad for p in self._engine.params]
                write_histograms(
                    trainer,
                    step.gradients,
                    step.sizes,
                    group_indices,
                    weights,
                    logged_step,
                    trained,
                )

    # -- end of fit -----------------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and self._measured_step < 0:
            steps = batches_that_stepped(trainer)
            self._alerts.warn_once(
                "every",
                f"GradientMonitor: measured nothing: it measures every {self._every} optimizer "
                f"steps and this fit took {steps}. Pass a smaller `every_n_steps` (or the "
                "Trainer's `log_every_n_steps`).",
            )
        if self.summary and self.last_metrics and trainer.is_global_zero:
            log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
            print(summary_table(self.last_metrics, self._metrics_step, log_dir))

    # -- state ----------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._alerts.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._alerts.load_state_dict(state_dict)


class _ObserveHook:
    """`GradientMonitor`'s forward hook on a `LossMix`, which a copy of the module drops.

    A module copied during a fit (``copy.deepcopy`` by ``StochasticWeightAveraging`` or an
    EMA teacher, ``torch.save`` of the whole module) would otherwise carry a copy of the
    monitor, and through it of the Trainer, whose hook would watch the copy's calls. The
    copy gets `_no_hook` instead.
    """

    __slots__ = ("monitor",)

    def __init__(self, monitor: GradientMonitor) -> None:
        self.monitor = monitor

    def __call__(self, mix: nn.Module, args: Any, output: LossMixOutput) -> None:
        self.monitor._observe(mix, args, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _no_hook

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_hook_factory, ()


def _no_hook(mix: nn.Module, args: Any, output: Any) -> None:
    """Do nothing: the hook a copy of a monitored module gets."""


def _no_hook_factory() -> Any:
    return _no_hook


def _trainable(module: nn.Module) -> tuple[int, ...]:
    """Return the identities of `module`'s trainable parameters (outside a player's turn)."""
    return tuple(id(p) for p in module.parameters() if p.requires_grad)
