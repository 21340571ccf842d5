"""GradientMonitor: how hard each loss term pulls on each group of parameters."""

from __future__ import annotations

import fnmatch
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossmix import functional as F
from lightning_lossmix._errors import LossMixError, check_finite_float, check_int, check_name
from lightning_lossmix._mix import LossMix, LossMixOutput

_SHARE_STREAK = 3  # measurements in a row above `warn_share` before warning
_GROWTH_WINDOW = 5  # measurements of a maximized term inspected for unbounded growth
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


class GradientMonitor(Callback):
    r"""Logs each loss term's weighted gradient magnitude on groups of parameters.

    Every `every_n_steps` optimizer steps, for each group ``g`` of parameters and each term
    ``t`` of the module's `LossMix`, it computes the term's own gradient ``dL_t/dW_g`` on the
    same batch with ``torch.autograd.grad`` (the training update is untouched) and logs, through
    every logger of the trainer:

    - ``grad_magnitude/<g>/<t>``: ``|alpha_t| * ||dL_t/dW_g||`` (`norm_type`-norm; ``alpha_t``
      the effective weight at that step; 0 where the term does not reach the group);
    - ``grad_share/<g>/<t>``: that magnitude over the sum of the terms' magnitudes on ``g``;
    - ``grad_cosine/<g>/<s>_vs_<t>`` (if `log_cosine`): the cosine similarity of the two
      terms' pulls (gradients signed by their mode); negative means the terms conflict;
    - ``grad_suggested_weight/<t>``: the weight that would bring the term's magnitude on
      ``all`` to the mean of the terms' magnitudes;
    - ``grad_direction/<g>/<t>`` for a term with `opposed_by`: in [-1, 1], +1 where the group's
      update pushes the term down, -1 where it pushes it up;
    - ``grad_histogram/<g>/<t>`` (if `log_histograms`, TensorBoard only): the values of
      ``alpha_t * dL_t/dW_g``.

    With TensorBoard, a custom-scalars layout puts each group's terms on one multi-line chart.
    Values land at the same steps as Lightning's own ``train/...`` metrics when `every_n_steps`
    is the trainer's `log_every_n_steps` (the default).

    The figures describe the gradient the optimizer step uses: with gradient accumulation they
    are measured on every micro-batch of a measured step and summed, divided by
    ``accumulate_grad_batches`` like Lightning's loss; under DDP they are averaged over the
    processes like DDP's gradients, so they equal what one process with the whole batch would
    log; under 16-mixed precision they are unscaled.

    Warnings (rank zero, once per term and condition): a term above `warn_share` of a group's
    magnitude for 3 measurements in a row; a term whose gradient is zero on every group; a
    non-finite term gradient (outside mixed precision, where the GradScaler handles them); a
    maximized term whose magnitude or value keeps growing (unbounded maximization).

    Args:
        every_n_steps: measure every this many optimizer steps; default: the trainer's
            `log_every_n_steps`.
        groups: group name to submodule names (``"encoder"``, ``"decoder.0"``) or
            parameter-name patterns (``"*.bias"``). Default: one group per top-level child
            module with trainable parameters, plus ``all``. Suggested weights use the group
            ``all`` if present, else all monitored parameters together.
        norm_type: the p of the p-norm, > 0, ``float("inf")`` allowed.
        log_cosine: log the pairwise cosine similarities.
        log_histograms: log histograms of the weighted gradients (TensorBoard only).
        warn_share: warn when a term's share of a group stays above this for 3 measurements.

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
    ) -> None:
        owner = "GradientMonitor"
        self.every_n_steps = (
            None if every_n_steps is None else check_int(every_n_steps, "every_n_steps", owner, 1)
        )
        if groups is not None:
            if not isinstance(groups, Mapping) or not groups:
                raise LossMixError(
                    f"{owner}: `groups` should be a non-empty mapping of group name to module "
                    f"names or parameter patterns, e.g. {{'encoder': ['encoder']}}. "
                    f"Found `groups = {groups!r}`."
                )
            groups = {
                check_name(name, f"{owner} group"): [patterns]
                if isinstance(patterns, str)
                else list(patterns)
                for name, patterns in groups.items()
            }
            for name, patterns in groups.items():
                if not patterns or not all(isinstance(p, str) and p for p in patterns):
                    raise LossMixError(
                        f"{owner}: group {name!r} should list submodule names or parameter-name "
                        f"patterns, e.g. ['encoder'] or ['*.bias']. Found {patterns!r}."
                    )
        self.groups = groups
        norm_type = float(norm_type) if norm_type == math.inf else norm_type
        if norm_type != math.inf and check_finite_float(norm_type, "norm_type", owner) <= 0:
            raise LossMixError(
                f"{owner}: `norm_type` should be > 0 (2.0 for the Euclidean norm). "
                f"Found `norm_type = {norm_type}`."
            )
        self.norm_type = float(norm_type)
        self.log_cosine = log_cosine
        self.log_histograms = log_histograms
        self.warn_share = check_finite_float(warn_share, "warn_share", owner)
        if not 0.0 < self.warn_share <= 1.0:
            raise LossMixError(
                f"{owner}: `warn_share` should be in (0, 1] (1.0 turns the warning off). "
                f"Found `warn_share = {warn_share}`."
            )
        #: The figures of the latest measurement, by tag.
        self.last_metrics: dict[str, float] = {}
        self._enabled = False
        self._mixes: list[LossMix] = []
        self._mix: LossMix | None = None  # the one being measured
        self._active: set[int] = set()  # monitored parameters trainable in this measurement
        self._every = 50
        self._measured_step = -1
        self._parameters: list[nn.Parameter] = []
        self._group_indices: dict[str, list[int]] = {}
        self._buffer: Tensor | None = None
        self._buffer_output: LossMixOutput | None = None
        self._derived: int | None = None
        self._pending_backward: tuple[list[tuple[int, nn.Parameter]], float] | None = None
        self._reference_norms: dict[str, float] = {}
        self._derived_reached: set[int] = set()
        self._layout_written = False
        self._donated_buffer: bool | None = None
        self._warned: set[str] = set()
        self._share_streaks: dict[str, int] = {}
        self._growth: dict[str, deque[tuple[float, float]]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, groups=self.groups)

    def __repr__(self) -> str:
        return (
            f"GradientMonitor(every_n_steps={self.every_n_steps!r}, groups={self.groups!r}, "
            f"norm_type={self.norm_type!r}, log_cosine={self.log_cosine!r}, "
            f"log_histograms={self.log_histograms!r}, warn_share={self.warn_share!r})"
        )

    # -- set-up ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._mixes = [module for module in pl_module.modules() if isinstance(module, LossMix)]
        if not self._mixes:
            raise LossMixError(
                f"GradientMonitor needs a LossMix in {type(pl_module).__name__}; found none. "
                "Subclass LossMixModule, or hold a LossMix as an attribute "
                "(self.loss_mix = LossMix(terms)) and call it in training_step."
            )
        self._resolve_groups(pl_module)
        self._every = self.every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50
        # Per-fit state: a monitor may serve several fits.
        self._buffer, self._buffer_output, self._pending_backward = None, None, None
        self._layout_written = False
        self._active, self._derived_reached = set(), set()
        strategy = type(trainer.strategy).__name__
        self._enabled = not any(name in strategy for name in _UNSUPPORTED_STRATEGIES)
        if not self._enabled:
            rank_zero_warn(
                f"GradientMonitor: per-term gradient figures are not available with {strategy}: "
                "its parameters are sharded, so a per-term gradient cannot be measured without "
                "gathering them. Nothing will be logged; use DDP or a single device to measure."
            )
        # Measuring needs `retain_graph=True`; AOTAutograd's donated buffers (torch.compile)
        # forbid that, so they are turned off while a monitor is in use.
        functorch_config = getattr(torch, "_functorch", None)
        if functorch_config is not None and hasattr(functorch_config.config, "donated_buffer"):
            self._donated_buffer = functorch_config.config.donated_buffer
            functorch_config.config.donated_buffer = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._donated_buffer is not None:
            torch._functorch.config.donated_buffer = self._donated_buffer
            self._donated_buffer = None

    def _resolve_groups(self, pl_module: pl.LightningModule) -> None:
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        index = {id(p): i for i, (_, p) in enumerate(trainable)}
        children = {
            name: [p for p in child.parameters() if p.requires_grad]
            for name, child in pl_module.named_children()
        }
        children = {name: params for name, params in children.items() if params}
        if self.groups is None:
            resolved = {name: [index[id(p)] for p in params] for name, params in children.items()}
            resolved["all"] = list(range(len(trainable)))
        else:
            modules = dict(pl_module.named_modules())
            resolved = {}
            for group, patterns in self.groups.items():
                chosen: set[int] = set()
                for pattern in patterns:
                    if pattern in modules and pattern:
                        found = [
                            index[id(p)] for p in modules[pattern].parameters() if id(p) in index
                        ]
                    else:
                        found = [
                            i for i, (n, _) in enumerate(trainable) if fnmatch.fnmatch(n, pattern)
                        ]
                    if not found:
                        raise LossMixError(
                            f"GradientMonitor: the pattern {pattern!r} of group {group!r} matches "
                            "no trainable parameter. Use a submodule name (top-level: "
                            f"{sorted(children)}) or a parameter-name pattern such as 'encoder.*'."
                        )
                    chosen.update(found)
                resolved[group] = sorted(chosen)
        used = sorted({i for indices in resolved.values() for i in indices})
        position = {i: k for k, i in enumerate(used)}
        self._parameters = [trainable[i][1] for i in used]  # type: ignore[misc]
        self._group_indices = {g: [position[i] for i in idx] for g, idx in resolved.items()}

    # -- measurement ----------------------------------------------------------------------------

    def _is_measured_step(self, trainer: pl.Trainer) -> bool:
        # The step Lightning logs a batch's train metrics at; see `_LoggerConnector`.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        return self._enabled and (step + 1) % self._every == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for mix in self._mixes:
            mix.last_output = None  # so that a stale output is never measured

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self._mixes or not self._is_measured_step(trainer):
            return
        # With players, each player's LossMix is called, then backpropagated, in turn: the one
        # holding an output is the one being backpropagated; it is consumed here.
        called = [mix for mix in self._mixes if mix.last_output is not None]
        output = called[-1].last_output if called else None
        if output is None:
            self._warn_once(
                "no-output",
                "GradientMonitor: the LossMix was not called in this training step, so nothing "
                "was measured. Call it in training_step and backpropagate its `.total`.",
            )
            return
        self._mix = called[-1]
        self._mix.last_output = None
        active = [(i, p) for i, p in enumerate(self._parameters) if p.requires_grad]
        if not active:  # manual optimization with all monitored parameters toggled off
            return
        self._active.update(i for i, _ in active)
        scale = _loss_scale(trainer)
        micro_batches = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        if self._buffer is None:
            dtype = torch.promote_types(self._parameters[0].dtype, torch.float32)
            numel = sum(p.numel() for p in self._parameters)
            self._buffer = torch.zeros(
                len(output.values), numel, dtype=dtype, device=self._parameters[0].device
            )
            self._derived = self._choose_derived(output)
        views = self._buffer.split([p.numel() for p in self._parameters], dim=1)
        weights = list(output.signed_weights.values())
        # The derived term's row collects the weighted total of all terms, read off the normal
        # backward (see `on_after_backward`), so that term needs no backward of its own. That
        # holds only if the loss being backpropagated is the mix's total, which is checked.
        expected = output.total.detach() * (scale / micro_batches)
        backpropagates_total = _scales(loss, output.total) and bool(
            torch.allclose(loss.detach(), expected, rtol=1e-6, atol=0)
        )
        if trainer.world_size > 1:  # every process must fill the rows the same way
            backpropagates_total = trainer.strategy.reduce_boolean_decision(backpropagates_total)
        derive_now = self._derived is not None and backpropagates_total
        inputs = [p for _, p in active]
        for t, value in enumerate(output.values.values()):
            if t == self._derived and derive_now:
                continue
            grads = torch.autograd.grad(
                value * scale if scale != 1.0 else value,
                inputs,
                retain_graph=True,
                allow_unused=True,
            )
            for (i, _), grad in zip(active, grads, strict=True):
                if grad is None:
                    continue
                if t != self._derived:
                    views[i][t].add_(grad.reshape(-1), alpha=1.0 / (scale * micro_batches))
                if self._derived is not None and not derive_now:
                    views[i][self._derived].add_(
                        grad.reshape(-1), alpha=weights[t] / (scale * micro_batches)
                    )
                    if t == self._derived:
                        self._derived_reached.add(i)
        if derive_now:
            # Only the parameters the derived term reaches: elsewhere its gradient is exactly
            # zero, where a subtraction would leave rounding noise.
            assert self._derived is not None
            value = list(output.values.values())[self._derived]
            reached = {id(p) for p in F.reached_parameters(value)}
            active = [(i, p) for i, p in active if id(p) in reached]
            # Subtract the gradient already accumulated, and add it back after the backward:
            # the row receives exactly this backward's contribution, with no copy.
            for i, p in active:
                if p.grad is not None:
                    views[i][self._derived].sub_(p.grad.reshape(-1), alpha=1.0 / scale)
            self._pending_backward = (active, scale)
            self._derived_reached.update(i for i, _ in active)
        self._buffer_output = output

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_backward is None or self._buffer is None or self._derived is None:
            return
        active, scale = self._pending_backward
        self._pending_backward = None
        views = self._buffer.split([p.numel() for p in self._parameters], dim=1)
        for i, p in active:
            if p.grad is not None:
                views[i][self._derived].add_(p.grad.reshape(-1), alpha=1.0 / scale)

    def _choose_derived(self, output: LossMixOutput) -> int | None:
        """Pick the term whose gradient is read off the normal backward: the strongest one.

        Its gradient comes out of a subtraction, whose rounding error is relative to the total:
        small for the term that dominates, which the previous measurement tells. None when a
        term is opposed: the backpropagated total then also holds its opposition surrogate.
        """
        if self._mix is not None and any(term.opposed_by for term in self._mix.terms):
            return None
        pulls = [
            abs(weight) * self._reference_norms.get(name, 1.0)
            for name, weight in output.signed_weights.items()
        ]
        strongest = max(range(len(pulls)), key=pulls.__getitem__)
        return strongest if pulls[strongest] > 0 else None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._buffer is None or self._buffer_output is None:
            return
        buffer, output = self._buffer, self._buffer_output
        self._buffer, self._buffer_output, self._pending_backward = None, None, None
        if getattr(pl_module, "skipping_step", False):  # LossMixModule drops this step
            self._derived_reached, self._active = set(), set()
            return
        if trainer.world_size > 1:
            buffer = trainer.strategy.reduce(buffer, reduce_op="mean")
        weights = list(output.signed_weights.values())
        if self._derived is not None:  # its row holds the weighted total: take the others out
            derived = buffer[self._derived]
            for t, weight in enumerate(weights):
                if t != self._derived and weight != 0:
                    derived.sub_(buffer[t], alpha=weight)
            derived.div_(weights[self._derived])
            reached = torch.zeros(len(self._parameters), device=buffer.device)
            reached[sorted(self._derived_reached)] = 1.0
            if trainer.world_size > 1:  # reached on any process: the gradient is global
                reached = trainer.strategy.reduce(reached, reduce_op="sum")
            views = derived.split([p.numel() for p in self._parameters])
            for view, hit in zip(views, reached.tolist(), strict=True):
                if not hit:
                    view.zero_()
            self._derived_reached = set()
        names = list(output.values)
        metrics = self._measure(buffer, output, names)
        if metrics is None:  # a non-finite gradient
            bad = [n for n in names if not math.isfinite(self._reference_norms[n])]
            if self._derived is not None and len(bad) > 1:
                # The derived term is computed from the others: their NaN spreads to it.
                bad.remove(names[self._derived])
            if _scaler(trainer) is None:  # under a GradScaler, overflow is routine
                for name in bad:
                    self._warn_once(
                        f"nonfinite:{name}",
                        f"GradientMonitor: the gradient of term {name!r} is not finite at "
                        f"step {trainer.global_step}; the weights are being corrupted. Look "
                        "for a log or division near zero in that term, or clip gradients.",
                    )
            for name in names:
                self._reference_norms.pop(name, None)
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        # Players are measured one after the other at the same step: keep them all.
        self.last_metrics = (
            {**self.last_metrics, **metrics} if step == self._measured_step else metrics
        )
        self._measured_step = step
        _log_metrics(trainer, metrics, step)
        if trainer.is_global_zero:
            self._write_tensorboard_extras(trainer, buffer, output, names, step)
        self._check_warnings(metrics, output, names, trainer.global_step)

    def _measure(
        self, buffer: Tensor, output: LossMixOutput, names: list[str]
    ) -> dict[str, float] | None:
        sizes = [p.numel() for p in self._parameters]
        weights = torch.tensor([output.signed_weights[n] for n in names], dtype=buffer.dtype)
        weights = weights.to(buffer.device)
        # Which way each parameter pulls each term: +1 down (its update descends the term),
        # -1 up; parameters that play against an opposed term pull it the other way.
        assert self._mix is not None
        modes = {term.name: term.sign for term in self._mix.terms}
        signs = torch.tensor([modes[n] for n in names], dtype=buffer.dtype, device=buffer.device)
        signs = signs.repeat(len(sizes), 1)
        opposed = self._opposed_indices(names)
        for t, indices in opposed.items():
            signs[indices, t] *= -1.0
        grams = F.signed_grams(F.gram_by_parameter(buffer, sizes), signs)  # (P, T, T)
        # The groups with a trainable parameter now (another player's, or frozen ones, are left
        # out), and last the reference for suggested weights: `all`, else every active one.
        groups = [g for g, idx in self._group_indices.items() if self._active.intersection(idx)]
        rows = [self._group_indices[g] for g in groups]
        rows.append(self._group_indices["all"] if "all" in groups else sorted(self._active))
        self._active = set()
        membership = torch.zeros(len(rows), len(sizes), dtype=buffer.dtype, device=buffer.device)
        for row, indices in enumerate(rows):
            membership[row, indices] = 1.0
        group_grams = torch.einsum("gp,ptu->gtu", membership, grams)  # (G + 1, T, T)
        if self.norm_type == 2:
            raw = group_grams.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        else:
            raw = torch.stack(
                [F.grad_magnitudes(buffer, sizes, idx, self.norm_type) for idx in rows]
            )
        magnitudes = weights.abs() * raw[:-1]  # (G, T)
        tags: list[str] = []
        pieces: list[Tensor] = []
        for kind, figure in (("magnitude", magnitudes), ("share", F.grad_shares(magnitudes))):
            tags += [f"grad_{kind}/{g}/{n}" for g in groups for n in names]
            pieces.append(figure.flatten())
        for t in opposed:
            for g, indices in zip(groups, rows, strict=False):
                tags.append(f"grad_direction/{g}/{names[t]}")
                pieces.append(F.grad_directions(grams[indices], signs[indices])[t : t + 1])
        if self.log_cosine and len(names) > 1:
            first, second = torch.triu_indices(len(names), len(names), offset=1).tolist()
            cosines = F.grad_cosines(group_grams[:-1], torch.ones_like(weights))
            tags += [
                f"grad_cosine/{g}/{names[a]}_vs_{names[b]}"
                for g in groups
                for a, b in zip(first, second, strict=True)
            ]
            pieces.append(cosines[:, first, second].flatten())
        reference = raw[-1]
        tags += [f"grad_suggested_weight/{n}" for n in names]
        pieces += [F.suggested_weights(reference, weights.abs() * reference), reference]
        values = torch.cat(pieces).tolist()  # one device sync
        norms = dict(zip(names, values[-len(names) :], strict=True))
        self._reference_norms.update(norms)  # players are measured in turn: keep them all
        if not all(math.isfinite(norm) for norm in norms.values()):
            return None
        figures = zip(tags, values[: -len(names)], strict=True)
        return {tag: value for tag, value in figures if not math.isnan(value)}

    def _opposed_indices(self, names: list[str]) -> dict[int, list[int]]:
        """Term position to the positions of the monitored parameters that play against it."""
        if self._mix is None:
            return {}
        position = {id(p): i for i, p in enumerate(self._parameters)}
        opposed = {}
        for t, name in enumerate(names):
            indices = [
                position[id(p)] for p in self._mix.opposed_parameters(name) if id(p) in position
            ]
            if indices:
                opposed[t] = indices
        return opposed

    def _write_tensorboard_extras(
        self,
        trainer: pl.Trainer,
        buffer: Tensor,
        output: LossMixOutput,
        names: list[str],
        step: int,
    ) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in loggers:
            writer = logger.experiment
            if not self._layout_written:
                writer.add_custom_scalars(self._layout(names))
            if self.log_histograms:
                views = buffer.split([p.numel() for p in self._parameters], dim=1)
                for group, indices in self._group_indices.items():
                    for t, name in enumerate(names):
                        values = torch.cat([views[i][t] for i in indices])
                        weighted = values * output.signed_weights[name]
                        writer.add_histogram(f"grad_histogram/{group}/{name}", weighted, step)
        self._layout_written = self._layout_written or bool(loggers)

    def _layout(self, names: list[str]) -> dict[str, dict[str, list[Any]]]:
        layout: dict[str, dict[str, list[Any]]] = {}
        for group in self._group_indices:
            charts = {
                f"grad_magnitude/{group}": ["Multiline", [rf"^grad_magnitude/{re.escape(group)}/"]],
                f"grad_share/{group}": ["Multiline", [rf"^grad_share/{re.escape(group)}/"]],
            }
            if self.log_cosine and len(names) > 1:
                charts[f"grad_cosine/{group}"] = [
                    "Multiline",
                    [rf"^grad_cosine/{re.escape(group)}/"],
                ]
            layout[f"gradients: {group}"] = charts
        layout["gradients: suggested weights"] = {
            "grad_suggested_weight": ["Multiline", [r"^grad_suggested_weight/"]]
        }
        return layout

    # -- warnings -------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _check_warnings(
        self, metrics: dict[str, float], output: LossMixOutput, names: list[str], step: int
    ) -> None:
        for name in names:
            if self._reference_norms[name] == 0.0:
                self._warn_once(
                    f"dead:{name}",
                    f"GradientMonitor: term {name!r} has a zero gradient on every monitored "
                    f"parameter at step {step}: it trains nothing. Check that it depends on the "
                    "model's outputs through differentiable operations (no argmax, rounding or "
                    "saturated activation) and that its inputs are not detached.",
                )
        if len(names) > 1:
            for group in self._group_indices:
                # Only terms that pull on the group can be drowned there.
                pulling = sum(metrics.get(f"grad_magnitude/{group}/{n}", 0.0) > 0 for n in names)
                for name in names:
                    key = f"{group}/{name}"
                    share = metrics.get(f"grad_share/{key}", 0.0)
                    drowning = share > self.warn_share and pulling > 1
                    streak = self._share_streaks.get(key, 0) + 1 if drowning else 0
                    self._share_streaks[key] = streak
                    if streak >= _SHARE_STREAK:
                        suggested = {
                            n: float(f"{metrics[f'grad_suggested_weight/{n}']:.3g}")
                            for n in names
                            if f"grad_suggested_weight/{n}" in metrics
                        }
                        self._warn_once(
                            f"share:{key}",
                            f"GradientMonitor: term {name!r} has {share:.1%} of the gradient "
                            f"magnitude on group {group!r} for {streak} measurements in a row: "
                            "it drowns the other terms, which barely train there. Rebalance the "
                            f"weights; suggested weights at step {step}: {suggested}.",
                        )
        for term in self._mix.terms if self._mix is not None else ():
            if term.mode != "max":
                continue
            history = self._growth.setdefault(term.name, deque(maxlen=_GROWTH_WINDOW))
            magnitude = metrics.get(f"grad_magnitude/all/{term.name}")
            if magnitude is None:
                magnitude = abs(output.signed_weights[term.name]) * self._reference_norms[term.name]
            history.append((magnitude, float(output.values[term.name].detach())))
            if len(history) == _GROWTH_WINDOW and _keeps_growing(history):
                self._warn_once(
                    f"growth:{term.name}",
                    f"GradientMonitor: maximized term {term.name!r} keeps growing (its gradient "
                    f"magnitude or value rose at each of the last {_GROWTH_WINDOW} measurements "
                    "without slowing down): it looks unbounded, and maximizing it will blow up "
                    "the weights. Maximize a bounded quantity instead (e.g. tanh(x), a "
                    "probability, an entropy) or clip it.",
                )

    # -- state ----------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "warned": sorted(self._warned),
            "share_streaks": dict(self._share_streaks),
            "growth": {name: list(h) for name, h in self._growth.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = set(state_dict["warned"])
        self._share_streaks = dict(state_dict["share_streaks"])
        self._growth = {
            name: deque(map(tuple, h), maxlen=_GROWTH_WINDOW)
            for name, h in state_dict["growth"].items()
        }


def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log through every logger; to TensorBoard, as one event rather than one per scalar.

    A measurement has tens of figures; one ``add_scalar`` event each costs more than the
    gradients themselves on a small model. One Summary holding them all is what TensorBoard
    reads back the same way, in the logger's own run directory.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_metrics(metrics, step=step)
        elif trainer.is_global_zero:
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
            values = [Summary.Value(tag=prefix + k, simple_value=v) for k, v in metrics.items()]
            logger.experiment._get_file_writer().add_summary(Summary(value=values), step)


def _scales(loss: Tensor, total: Tensor) -> bool:
    """Whether `loss` is `total`, or `total` multiplied or divided by constants.

    Lightning divides the loss by `accumulate_grad_batches` and a GradScaler multiplies it;
    anything else (a term added in `training_step`, even one whose value is zero) fails.
    """
    node, target = loss.grad_fn, total.grad_fn
    for _ in range(4):
        if node is None or node is target:
            return node is target
        if type(node).__name__ not in ("MulBackward0", "DivBackward0"):
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:  # a product of two graph tensors, not a scaling
            return False
        node = inputs[0]
    return node is target


def _scaler(trainer: pl.Trainer) -> Any:
    """Return the enabled GradScaler of 16-mixed precision, or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _loss_scale(trainer: pl.Trainer) -> float:
    """Return the GradScaler's current scale under 16-mixed precision, else 1."""
    scaler = _scaler(trainer)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def _keeps_growing(history: deque[tuple[float, float]]) -> bool:
    """Whether the magnitude doubled while rising, or the value rose without slowing down."""
    magnitudes = [m for m, _ in history]
    values = [v for _, v in history]
    rising = all(b > a for a, b in pairwise(magnitudes))
    if rising and magnitudes[-1] >= 2 * magnitudes[0]:
        return True
    # Rising at every measurement without slowing down much: linear or faster growth. A
    # bounded term that saturates slows down geometrically and falls below half.
    steps = [b - a for a, b in pairwise(values)]
    return all(d > 0 for d in steps) and steps[-1] >= 0.5 * steps[0]
