"""The figures of one measurement, as tags, from the per-term gradients of a step."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
    grams = [back[s * square : (s + 1) * square] for s in range(len(chunks))]
    if segments.signs is not None:  # the Gram matrices of the pulls, sign * gradient
        grams = [
            [gram[a * count + b] * sign[a] * sign[b] for a in range(count) for b in range(count)]
            for gram, sign in zip(grams, segments.signs, strict=True)
        ]
    # Per group, then the reference: the Gram matrix of the pulls, flat (sums of the runs').
    group_grams = [
        [math.fsum(c) for c in zip(*(grams[s] for s in runs), strict=True)]
        for runs in segments.members
    ]
    if norm_type == 2:
        raw = [[_root(gram[t * count + t]) for t in range(count)] for gram in group_grams]
    else:
        tail = back[len(chunks) * square :]
        raw = [tail[k * count : (k + 1) * count] for k in range(len(group_grams))]
    values = _Values(
        raw=raw,
        magnitudes=[[abs(w) * r for w, r in zip(weights, row, strict=True)] for row in raw[:-1]],
        cosines=[],
        directions={},
        suggested={},
    )
    if log_cosine and count > 1:
        # Without opposition the runs' Gram matrices are of the raw gradients: sign them here.
        signs = [1.0] * count if segments.signs is not None else list(modes)
        values.cosines = [_cosines(gram, signs, count) for gram in group_grams[:-1]]
    for t in opposed:
        assert segments.signs is not None
        values.directions[t] = [
            _direction(
                [grams[s][t * count + t] for s in runs], [segments.signs[s][t] for s in runs]
            )
            for runs in segments.members[:-1]
        ]
    eligible = [t for t, w in enumerate(weights) if w != 0]
    if len(eligible) > 1:  # one term: the suggestion is always 1
        target = math.fsum(abs(weights[t]) * raw[-1][t] for t in eligible) / len(eligible)
        values.suggested = {
            t: target / raw[-1][t] if raw[-1][t] > 0 else math.nan for t in eligible
        }
    return _tags(step.names, groups, values)


@dataclass
class _Values:
    """The numbers of a measurement, before they are named (see `compute_figures`)."""

    raw: list[list[float]]  # (G + 1, T): per group, then the reference
    magnitudes: list[list[float]]  # (G, T)
    cosines: list[list[float]]  # (G, T * T) flat, or empty
    directions: dict[int, list[float]]  # opposed term to (G,)
    suggested: dict[int, float]  # term to its suggested weight


def _root(square: float) -> float:
    """``sqrt(max(square, 0))``, NaN kept (like ``clamp_min(0).sqrt()``)."""
    return math.sqrt(square) if square > 0 else (square if math.isnan(square) else 0.0)


def _cosines(gram: list[float], signs: list[float], count: int) -> list[float]:
    """`functional.grad_cosines` on one flat Gram matrix: NaN where a norm is zero."""
    norms = [_root(gram[t * count + t]) for t in range(count)]
    return [
        gram[a * count + b] * signs[a] * signs[b] / (norms[a] * norms[b])
        if norms[a] * norms[b] > 0
        else math.nan
        for a in range(count)
        for b in range(count)
    ]


def _direction(squares: list[float], signs: list[float]) -> float:
    """`functional.grad_directions` of one term on one group, from its runs' squared norms."""
    total = math.fsum(squares)
    pushed = math.fsum(q * sign for q, sign in zip(squares, signs, strict=True))
    return pushed / total if total > 0 else 0.0


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


def _tags(names: Sequence[str], groups: list[str], values: _Values) -> Figures:
    """Name the informative values: a term that does not reach a group has no tags there."""
    tags = _tag_names(tuple(names), tuple(groups))
    count, raw = len(names), values.raw
    reached = [[t for t in range(count) if raw[k][t] != 0] for k in range(len(groups))]
    metrics: dict[str, float] = {}
    for k, reach in enumerate(reached):
        for t in reach:
            metrics[tags["magnitude"][k][t]] = values.magnitudes[k][t]
    for k, reach in enumerate(reached):
        if len(reach) > 1:  # a share of one term is always 1
            total = math.fsum(values.magnitudes[k])
            for t in reach:
                share = values.magnitudes[k][t] / total if total > 0 else 0.0
                metrics[tags["share"][k][t]] = share
    for k, cosines in enumerate(values.cosines):
        for i, a in enumerate(reached[k]):
            for b in reached[k][i + 1 :]:
                if not math.isnan(cosines[a * count + b]):
                    metrics[tags["cosine"][k][a * count + b]] = cosines[a * count + b]
    for t, directions in values.directions.items():
        for k, direction in enumerate(directions):
            if raw[k][t] != 0:  # elsewhere a constant 0 that says nothing
                metrics[tags["direction"][k][t]] = direction
    for t, weight in values.suggested.items():
        if not math.isnan(weight):
            metrics[tags["suggested"][t]] = weight
    norms = dict(zip(names, raw[-1], strict=True))
    raw_by_group = {g: {names[t]: raw[k][t] for t in reached[k]} for k, g in enumerate(groups)}
    return Figures(metrics, norms, groups, raw_by_group)
