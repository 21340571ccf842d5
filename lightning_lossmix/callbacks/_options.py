"""The arguments of `GradientMonitor`, checked where they enter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_lossmix._engine import Batched
from lightning_lossmix._errors import LossMixError, check_finite_float, check_name

_OWNER = "GradientMonitor"


def check_groups(groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]] | None:
    """Validate the `groups` argument of `GradientMonitor`; return it as lists."""
    if groups is None:
        return None
    if not isinstance(groups, Mapping) or not groups:
        raise LossMixError(
            "GradientMonitor: `groups` should be a non-empty mapping of group name to module "
            f"names or parameter patterns, e.g. {{'encoder': ['encoder']}}. "
            f"Found `groups = {groups!r}`."
        )
    checked = {
        check_name(name, "GradientMonitor group"): [patterns]
        if isinstance(patterns, str)
        else list(patterns)
        for name, patterns in groups.items()
    }
    for name, patterns in checked.items():
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise LossMixError(
                f"GradientMonitor: group {name!r} should list submodule names or parameter-name "
                f"patterns, e.g. ['encoder'] or ['*.bias']. Found {patterns!r}."
            )
    return checked


def check_norm_type(norm_type: float) -> float:
    """Return `norm_type` as a float > 0 (``inf`` allowed)."""
    norm_type = float(norm_type) if norm_type == math.inf else norm_type
    if norm_type != math.inf and check_finite_float(norm_type, "norm_type", _OWNER) <= 0:
        raise LossMixError(
            f"{_OWNER}: `norm_type` should be > 0 (2.0 for the Euclidean norm). "
            f"Found `norm_type = {norm_type}`."
        )
    return float(norm_type)


def check_warn_share(warn_share: float) -> float:
    """Return `warn_share`, in (0, 1]."""
    checked = check_finite_float(warn_share, "warn_share", _OWNER)
    if not 0.0 < checked <= 1.0:
        raise LossMixError(
            f"{_OWNER}: `warn_share` should be in (0, 1] (1.0 turns the warning off). "
            f"Found `warn_share = {warn_share}`."
        )
    return checked


def check_batched(batched: Batched) -> Batched:
    """Return `batched`: True, False or ``"auto"``."""
    if batched not in (True, False, "auto"):
        raise LossMixError(
            f"{_OWNER}: `batched` should be True, False or 'auto'. Found `batched = {batched!r}`."
        )
    return batched
