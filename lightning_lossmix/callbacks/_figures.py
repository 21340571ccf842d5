"""The figures of one measurement, as tags, from the per-term gradients of a step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


def compute_figures(
    step: StepGradients,
    weights: Sequence[float],
    signs: Tensor,
    opposed: Sequence[int],
    group_indices: Mapping[str, list[int]],
    norm_type: float = 2.0,
    log_cosine: bool = True,
) -> Figures:
    """Compute every figure of a measurement with one read-back from the device.

    Args:
        step: the per-term gradients (`TermGradientEngine.take`).
        weights: each term's signed effective weight, in row order.
        signs: ``(P, T)`` pull signs (`TermGradientEngine.pull_signs`).
        opposed: the rows of terms declared with `opposed_by`.
        group_indices: group name to parameter positions.
        norm_type: the p of the p-norm.
        log_cosine: include the pairwise cosines.
    """
    names, buffer, active = step.names, step.gradients, set(step.active)
    absolute = torch.tensor([abs(w) for w in weights], dtype=buffer.dtype, device=buffer.device)
    grams = F.signed_grams(F.gram_by_parameter(buffer, step.sizes), signs)  # (P, T, T)
    groups = [g for g, idx in group_indices.items() if active.intersection(idx)]
    rows = [group_indices[g] for g in groups]
    rows.append(group_indices["all"] if "all" in groups else sorted(active))
    membership = torch.zeros(len(rows), len(step.sizes), dtype=buffer.dtype, device=buffer.device)
    for row, indices in enumerate(rows):
        membership[row, indices] = 1.0
    group_grams = torch.einsum("gp,ptu->gtu", membership, grams)  # (G + 1, T, T)
    if norm_type == 2:
        raw = group_grams.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    else:
        raw = torch.stack([F.grad_magnitudes(buffer, step.sizes, idx, norm_type) for idx in rows])
    magnitudes = absolute * raw[:-1]  # (G, T)
    pieces = [raw.flatten(), magnitudes.flatten(), F.grad_shares(magnitudes).flatten()]
    pairs = torch.triu_indices(len(names), len(names), offset=1).tolist()
    if log_cosine and len(names) > 1:
        cosines = F.grad_cosines(group_grams[:-1], torch.ones_like(absolute))
        pieces.append(cosines[:, pairs[0], pairs[1]].flatten())
    for t in opposed:
        pieces += [F.grad_directions(grams[idx], signs[idx])[t : t + 1] for idx in rows[:-1]]
    eligible = [t for t, w in enumerate(weights) if w != 0]
    suggest = eligible if len(eligible) > 1 else []  # one term: the suggestion is always 1
    if suggest:
        reference = raw[-1, suggest]
        pieces.append(F.suggested_weights(reference, absolute[suggest] * reference))
    values = iter(torch.cat(pieces).tolist())  # one device sync
    return _tags(names, groups, values, pairs, log_cosine, opposed, suggest)


def _tags(
    names: Sequence[str],
    groups: list[str],
    values: object,
    pairs: list[list[int]],
    log_cosine: bool,
    opposed: Sequence[int],
    suggest: list[int],
) -> Figures:
    it = iter(values)  # type: ignore[call-overload]
    raw = [[next(it) for _ in names] for _ in range(len(groups) + 1)]
    norms = dict(zip(names, raw[-1], strict=True))
    raw_by_group = {
        g: {n: raw[k][t] for t, n in enumerate(names) if raw[k][t] != 0}
        for k, g in enumerate(groups)
    }
    reach = {g: list(norms) for g, norms in raw_by_group.items()}
    metrics: dict[str, float] = {}
    for kind in ("magnitude", "share"):
        for g in groups:
            for n in names:
                value = next(it)
                if n in reach[g] and (kind == "magnitude" or len(reach[g]) > 1):
                    metrics[f"grad_{kind}/{g}/{n}"] = value
    if log_cosine and len(names) > 1:
        for g in groups:
            for a, b in zip(*pairs, strict=True):
                value = next(it)
                if names[a] in reach[g] and names[b] in reach[g] and not math.isnan(value):
                    metrics[f"grad_cosine/{g}/{names[a]}_vs_{names[b]}"] = value
    for t in opposed:
        for g in groups:
            value = next(it)
            if names[t] in reach[g]:  # elsewhere a constant 0 that says nothing
                metrics[f"grad_direction/{g}/{names[t]}"] = value
    for t in suggest:
        value = next(it)
        if not math.isnan(value):
            metrics[f"grad_suggested_weight/{names[t]}"] = value
    return Figures(metrics, norms, groups, raw_by_group)
