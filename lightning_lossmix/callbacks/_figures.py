"""The figures of one measurement, as tags, from the per-term gradients of a step."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_lossmix import functional as F
from lightning_lossmix._engine import StepGradients


@dataclass(frozen=True)
class Figures:
    """One measurement.

    Attributes:
        metrics: tag to value: only charts that carry information (a term that does not reach
            a group has no tags there; a group reached by one term has no share or cosine).
        norms: each term's raw gradient norm on the reference parameters (``all``, else every
            monitored one trainable at this step).
        groups: the groups measured (those with a parameter trainable at this step).
        raw: group to the raw (unweighted) gradient norm of each term that reaches it.
    """

    metrics: dict[str, float]
    norms: dict[str, float]
    groups: list[str]
    raw: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def reach(self) -> dict[str, list[str]]:
        """Group to the terms whose gradient there is not zero."""
        return {group: list(norms) for group, norms in self.raw.items()}

    @property
    def finite(self) -> bool:
        """Whether every term's gradient is finite."""
        return all(math.isfinite(n) for n in self.norms.values())


@dataclass(frozen=True)
class Segments:
    """The monitored parameters as runs of adjacent buffer columns with the same groups and signs.

    A group's Gram matrix is the sum of the Gram matrices of its runs: one matrix product per
    run (a module's parameters lie side by side) instead of one per parameter. Cut once per
    layout (trainable parameters, groups, opposition), not at every measurement.

    Attributes:
        groups: the groups measured (those with a parameter trainable at this step).
        columns: each run's ``(start, end)`` columns in the buffer.
        members: per group, then the reference (``all``, else every trainable monitored
            parameter), the runs it holds.
        signs: per run, the pull sign of each term, or None when no term is opposed (then a
            term's sign is its mode on every parameter).
    """

    groups: list[str]
    columns: list[tuple[int, int]]
    members: list[list[int]]
    signs: list[tuple[float, ...]] | None


def plan_segments(
    step: StepGradients,
    group_indices: Mapping[str, list[int]],
    sign_rows: Sequence[Sequence[float]] | None,
) -> Segments:
    """Cut the step's trainable parameters into `Segments`.

    Args:
        step: the per-term gradients (only their layout is read).
        group_indices: group name to parameter positions.
        sign_rows: per parameter, its pull sign for each term (None: no term is opposed).
    """
    active = set(step.active)
    groups = [g for g, idx in group_indices.items() if active.intersection(idx)]
    rows = [set(group_indices[g]) for g in groups]
    rows.append(set(group_indices["all"]) if "all" in groups else active)
    offsets = [0, *itertools.accumulate(step.sizes)]
    runs: list[list[Any]] = []  # [first parameter, end parameter, key]
    for i in sorted(active):
        key = (tuple(i in row for row in rows), None if sign_rows is None else tuple(sign_rows[i]))
        if runs and runs[-1][1] == i and runs[-1][2] == key:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, key])
    return Segments(
        groups=groups,
        columns=[(offsets[first], offsets[end]) for first, end, _ in runs],
        members=[[s for s, run in enumerate(runs) if run[2][0][k]] for k in range(len(rows))],
        signs=None if sign_rows is None else [run[2][1] for run in runs],
    )


class Layouts:
    """The `Segments` of the steps measured, cut once per layout.

    A fit's layout (the terms, the trainable parameters, the groups, who opposes whom) rarely
    changes; players alternate between a few. The last `size` layouts are kept.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.cache: dict[tuple[Any, ...], Segments] = {}

    def segments(
        self,
        step: StepGradients,
        group_indices: Mapping[str, list[int]],
        modes: Sequence[float],
        opposed: Sequence[Sequence[Tensor]],
        pull_signs: Callable[[Sequence[float], Sequence[Sequence[Tensor]], torch.dtype], Tensor],
    ) -> Segments:
        """Return the step's `Segments`.

        Args:
            step: the per-term gradients (only their layout is read).
            group_indices: group name to parameter positions.
            modes: each term's sign, +1 minimized and -1 maximized, in row order.
            opposed: per term, the parameters that play against it.
            pull_signs: `TermGradientEngine.pull_signs`, called when a term is opposed.
        """
        key = (
            step.names,
            tuple(step.active),
            tuple(modes),
            tuple(tuple(id(p) for p in parameters) for parameters in opposed),
            tuple(group_indices),
        )
        segments = self.cache.get(key)
        if segments is None:
            signs = None
            if any(opposed):
                signs = pull_signs(modes, opposed, step.gradients.dtype).tolist()
            segments = plan_segments(step, group_indices, signs)
            if len(self.cache) >= self.size:
                self.cache.clear()
            self.cache[key] = segments
        return segments


def compute_figures(
    step: StepGradients,
    weights: Sequence[float],
    modes: Sequence[float],
    segments: Segments,
    opposed: Sequence[int],
    group_indices: Mapping[str, list[int]],
    norm_type: float = 2.0,
    log_cosine: bool = True,
) -> Figures:
    """Compute every figure of a measurement with one read-back from the device.

    On the device: the Gram matrix of each run of `segments` (``S`` products ``(T, n) @ (n, T)``,
    the only pass over the gradients). Read back: those ``S x T x T`` numbers. On the CPU, in
    float64: the formulas of `functional` (`grad_magnitudes`, `grad_shares`, `grad_cosines`,
    `grad_directions`, `suggested_weights`; a test checks that both agree) on these few numbers,
    as Python floats: a measurement has about a hundred of them, and a tensor operation each
    would cost more than the matrix products.

    Args:
        step: the per-term gradients (`TermGradientEngine.take`).
        weights: each term's signed effective weight, in row order.
        modes: each term's sign, +1 minimized and -1 maximized, in row order.
        segments: the step's `Segments` (`plan_segments`).
        opposed: the rows of terms declared with `opposed_by`.
        group_indices: group name to parameter positions (for a norm other than 2).
        norm_type: the p of the p-norm.
        log_cosine: include the pairwise cosines.
    """
    buffer, groups, count = step.gradients, segments.groups, len(step.names)
    chunks = [buffer[:, start:end] for start, end in segments.columns]
    pieces = [torch.stack([chunk @ chunk.T for chunk in chunks]).flatten()]
    if norm_type != 2:
        rows = [group_indices[g] for g in groups]
        rows.append(group_indices["all"] if "all" in groups else sorted(step.active))
        pieces += [F.grad_magnitudes(buffer, step.sizes, idx, norm_type) for idx in rows]
    back = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).tolist()  # one device sync
    square = count * count
    grams = [back[s * square : (s + 1) * square] for s in range(len(chunks))]  # flat (T, T)
    if segments.signs is not None:  # the Gram matrices of the pulls, sign * gradient
        grams = [
            [gram[a * count + b] * sign[a] * sign[b] for a in range(count) for b in range(count)]
            for gram, sign in zip(grams, segments.signs, strict=True)
        ]
    # Per group, then the reference: the sum of its runs' Gram matrices.
    group_grams = [
        grams[runs[0]]
        if len(runs) == 1
        else [sum(c) for c in zip(*(grams[s] for s in runs), strict=True)]
        for runs in segments.members
    ]
    diagonal = range(0, square, count + 1)
    norms = [[_root(gram[i]) for i in diagonal] for gram in group_grams]
    if norm_type == 2:
        raw = norms
    else:
        tail = back[len(chunks) * square :]
        raw = [tail[k * count : (k + 1) * count] for k in range(len(group_grams))]
    tags = _tag_names(step.names, tuple(groups))
    reached = [[t for t in range(count) if row[t] != 0] for row in raw[:-1]]
    magnitudes = [[abs(w) * r for w, r in zip(weights, row, strict=True)] for row in raw[:-1]]
    metrics: dict[str, float] = {}
    for k, reach in enumerate(reached):
        metrics.update((tags["magnitude"][k][t], magnitudes[k][t]) for t in reach)
    for k, reach in enumerate(reached):
        if len(reach) > 1:  # the share of a single term is always 1
            total = sum(magnitudes[k])  # `functional.grad_shares`
            metrics.update(
                (tags["share"][k][t], magnitudes[k][t] / total if total > 0 else 0.0) for t in reach
            )
    if log_cosine:  # `functional.grad_cosines`; unsigned runs are signed by the modes here
        signs = [1.0] * count if segments.signs is not None else modes
        for k, reach in enumerate(reached):
            gram, norm = group_grams[k], norms[k]
            for i, a in enumerate(reach):
                for b in reach[i + 1 :]:
                    if norm[a] * norm[b] > 0:
                        cosine = gram[a * count + b] * signs[a] * signs[b] / (norm[a] * norm[b])
                        if not math.isnan(cosine):
                            metrics[tags["cosine"][k][a * count + b]] = cosine
    for t in opposed:  # `functional.grad_directions`, from the runs' squared norms and signs
        assert segments.signs is not None
        for k, runs in enumerate(segments.members[:-1]):
            if raw[k][t] != 0:  # elsewhere a constant 0 that says nothing
                squares = [grams[s][t * (count + 1)] for s in runs]
                pushed = sum(q * segments.signs[s][t] for q, s in zip(squares, runs, strict=True))
                total = sum(squares)
                metrics[tags["direction"][k][t]] = pushed / total if total > 0 else 0.0
    eligible = [t for t, w in enumerate(weights) if w != 0]
    if len(eligible) > 1:  # `functional.suggested_weights`; one term: the suggestion is 1
        reference = raw[-1]
        target = sum(abs(weights[t]) * reference[t] for t in eligible) / len(eligible)
        metrics.update(
            (tags["suggested"][t], target / reference[t]) for t in eligible if reference[t] > 0
        )
    raw_by_group = {g: {step.names[t]: raw[k][t] for t in reached[k]} for k, g in enumerate(groups)}
    return Figures(metrics, dict(zip(step.names, raw[-1], strict=True)), groups, raw_by_group)


def _root(square: float) -> float:
    """``sqrt(max(square, 0))``, NaN kept (like ``clamp_min(0).sqrt()``)."""
    return math.sqrt(square) if square > 0 else (square if math.isnan(square) else 0.0)


@functools.lru_cache(maxsize=16)
def _tag_names(names: tuple[str, ...], groups: tuple[str, ...]) -> dict[str, Any]:
    """Return the tags of a measurement (built once per set of terms and groups)."""
    return {
        kind: [[f"grad_{kind}/{g}/{n}" for n in names] for g in groups]
        for kind in ("magnitude", "share", "direction")
    } | {
        "cosine": [[f"grad_cosine/{g}/{a}_vs_{b}" for a in names for b in names] for g in groups],
        "suggested": [f"grad_suggested_weight/{n}" for n in names],
    }
