"""The data behind each chart of the report: pure functions of a run's scalars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from lightning_lossmix.report._load import RunLogs, Series


class Alert(NamedTuple):
    """A warning of the monitor, logged as ``grad_alert/<kind>/<term>`` at its step.

    Examples:
        >>> Alert(120, "drowns_encoder", "recon_pixels").kind
        'drowns_encoder'
    """

    step: int
    kind: str  # drowns_<group>, zero_gradient, nonfinite_gradient or unbounded
    term: str


@dataclass(frozen=True)
class CosineMatrix:
    """The mean cosine of each pair of terms over a run, NaN where a pair was never measured.

    Examples:
        >>> from lightning_lossmix.report import Series, cosine_matrix
        >>> cosine_matrix({("a", "b"): Series((0, 1), (-0.5, -0.3))}, ["a", "b"]).values
        ((1.0, -0.4), (-0.4, 1.0))
    """

    terms: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class RunData:
    """Everything the report draws for one run.

    Attributes:
        name: the run's name.
        terms: its terms, in the order they were declared.
        groups: its monitored groups, ``all`` last.
        shares: group to term to its share of the group's pull (summing to 1 at each step).
        magnitudes: group to term to how hard it pulls (``grad_magnitude``).
        cosines: group to ``(a, b)`` to their cosine over steps (``grad_cosine``).
        cosine_matrices: group to the pairs' mean cosine over the run.
        weights: term to its effective weight (``train/weight``, signed).
        suggested: term to the monitor's suggested weight (``grad_suggested_weight``).
        losses: term to its raw value divided by its first finite non-zero value, in absolute.
        val: term (with ``/dataloader_idx_N`` if several loaders) to its validation mean.
        alerts: the monitor's warnings, by step.
        missing: what the logs lack, in words.

    Example:
        ```python
        from lightning_lossmix.report import load_runs, run_data

        equal, boosted = [run_data(logs) for logs in load_runs(["runs/vae_digits/version_0"])]
        equal.shares["encoder"]["recon_label"].values  # its share at each measured step
        ```
    """

    name: str
    terms: tuple[str, ...]
    groups: tuple[str, ...]
    shares: dict[str, dict[str, Series]] = field(default_factory=dict)
    magnitudes: dict[str, dict[str, Series]] = field(default_factory=dict)
    cosines: dict[str, dict[tuple[str, str], Series]] = field(default_factory=dict)
    cosine_matrices: dict[str, CosineMatrix] = field(default_factory=dict)
    weights: dict[str, Series] = field(default_factory=dict)
    suggested: dict[str, Series] = field(default_factory=dict)
    losses: dict[str, Series] = field(default_factory=dict)
    val: dict[str, Series] = field(default_factory=dict)
    alerts: tuple[Alert, ...] = ()
    missing: tuple[str, ...] = ()


def by_prefix(scalars: Mapping[str, Series], prefix: str) -> dict[str, Series]:
    """Return the tags under `prefix`, keyed by the rest of the tag."""
    return {tag[len(prefix) :]: s for tag, s in scalars.items() if tag.startswith(prefix)}


def term_names(scalars: Mapping[str, Series]) -> tuple[str, ...]:
    """Return the run's terms: from ``train/weight/``, then any other tag that names one."""
    names = dict.fromkeys(by_prefix(scalars, "train/weight/"))
    names.update(dict.fromkeys(by_prefix(scalars, "train/loss/")))
    for kind in ("magnitude", "share"):
        names.update(
            dict.fromkeys(k.rsplit("/", 1)[1] for k in by_prefix(scalars, f"grad_{kind}/"))
        )
    names.update(dict.fromkeys(by_prefix(scalars, "grad_suggested_weight/")))
    return tuple(names)


def group_names(scalars: Mapping[str, Series]) -> tuple[str, ...]:
    """Return the monitored groups, in logged order, ``all`` last."""
    groups = dict.fromkeys(k.rsplit("/", 1)[0] for k in by_prefix(scalars, "grad_magnitude/"))
    groups.update(dict.fromkeys(k.rsplit("/", 1)[0] for k in by_prefix(scalars, "grad_share/")))
    return tuple(sorted(groups, key=lambda g: g == "all"))


def shares(scalars: Mapping[str, Series], group: str, terms: Sequence[str]) -> dict[str, Series]:
    """Each term's share of the group's pull, on every measured step, summing to 1.

    The logged ``grad_share`` where the monitor wrote it (a term absent at a step has share 0
    there); at a step where it wrote only magnitudes (one term reached the group), or where
    several measurements met (players: each player's shares sum to 1, and a player with one
    term logs none), each magnitude over their sum.

    Examples:
        >>> from lightning_lossmix.report import Series
        >>> logged = {
        ...     "grad_share/all/a": Series((0,), (0.75,)),
        ...     "grad_share/all/b": Series((0,), (0.25,)),
        ...     "grad_magnitude/all/a": Series((0, 5), (3.0, 2.0)),  # at 5, a alone reached it
        ... }
        >>> shares(logged, "all", ["a", "b"])["a"]
        Series(steps=(0, 5), values=(0.75, 1.0))
    """
    logged = _at_steps(by_prefix(scalars, f"grad_share/{group}/"))
    pulls = _at_steps(by_prefix(scalars, f"grad_magnitude/{group}/"))
    present = {t for step in (*logged.values(), *pulls.values()) for t in step}
    names = [t for t in terms if t in present]
    out: dict[str, list[float]] = {t: [] for t in names}
    steps = sorted(set(logged) | set(pulls))
    for step in steps:
        row, pull = logged.get(step), pulls.get(step)
        if pull is not None and (
            row is None or set(pull) - set(row) or sum(row.values()) > 1 + 1e-6
        ):
            total = sum(pull.values())
            row = {t: v / total for t, v in pull.items()} if total > 0 else {}
        for t in names:
            out[t].append((row or {}).get(t, 0.0))
    return {t: Series(tuple(steps), tuple(v)) for t, v in out.items()}


def _at_steps(series: Mapping[str, Series]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for name, (steps, values) in series.items():
        for step, value in zip(steps, values, strict=True):
            rows.setdefault(step, {})[name.rsplit("/", 1)[-1]] = value
    return rows


def cosines(
    scalars: Mapping[str, Series], group: str, terms: Sequence[str]
) -> dict[tuple[str, str], Series]:
    """Return each measured pair's cosine on the group (``grad_cosine/<group>/<a>_vs_<b>``)."""
    pairs = {f"{a}_vs_{b}": (a, b) for i, a in enumerate(terms) for b in terms[i + 1 :]}
    out = {}
    for rest, series in by_prefix(scalars, f"grad_cosine/{group}/").items():
        a, _, b = rest.partition("_vs_")
        out[pairs.get(rest, (a, b))] = series
    return out


def cosine_matrix(pairs: Mapping[tuple[str, str], Series], terms: Sequence[str]) -> CosineMatrix:
    """Average each pair's finite cosines: symmetric, 1 on the diagonal, NaN if unmeasured.

    Examples:
        >>> from lightning_lossmix.report import Series
        >>> pairs = {("a", "b"): Series((0, 1), (0.2, float("nan")))}
        >>> cosine_matrix(pairs, ["a", "b", "c"]).values[0]  # c: never measured
        (1.0, 0.2, nan)
    """
    names = list(dict.fromkeys([*terms, *(t for pair in pairs for t in pair)]))
    mean = {pair: _mean(s.values) for pair, s in pairs.items()}
    rows = tuple(
        tuple(1.0 if a == b else mean.get((a, b), mean.get((b, a), math.nan)) for b in names)
        for a in names
    )
    return CosineMatrix(tuple(names), rows)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def relative(series: Series) -> Series:
    """Divide the series by the absolute value of its first finite non-zero value.

    Examples:
        >>> from lightning_lossmix.report import Series
        >>> relative(Series((0, 1, 2), (0.0, -2.0, -1.0)))
        Series(steps=(0, 1, 2), values=(0.0, -1.0, -0.5))
    """
    first = next((v for v in series.values if math.isfinite(v) and v != 0), 1.0)
    return Series(series.steps, tuple(v / abs(first) for v in series.values))


def alerts(scalars: Mapping[str, Series]) -> tuple[Alert, ...]:
    """Return the warnings: where a ``grad_alert/<kind>/<term>`` tag is not 0, by step."""
    found = []
    for rest, series in by_prefix(scalars, "grad_alert/").items():
        kind, _, term = rest.rpartition("/")
        found += [Alert(s, kind, term) for s, v in zip(*series, strict=True) if v != 0]
    return tuple(sorted(found))


def run_data(logs: RunLogs) -> RunData:
    """Everything the report draws for one run, from its scalars alone."""
    scalars = logs.scalars
    terms, groups = term_names(scalars), group_names(scalars)
    pairs = {g: cosines(scalars, g, terms) for g in groups}
    magnitudes = {g: by_prefix(scalars, f"grad_magnitude/{g}/") for g in groups}
    return RunData(
        name=logs.name,
        terms=terms,
        groups=groups,
        shares={g: shares(scalars, g, terms) for g in groups},
        magnitudes={g: {t: m[t] for t in terms if t in m} for g, m in magnitudes.items()},
        cosines={g: p for g, p in pairs.items() if p},
        cosine_matrices={g: cosine_matrix(p, terms) for g, p in pairs.items() if p},
        weights=by_prefix(scalars, "train/weight/"),
        suggested=by_prefix(scalars, "grad_suggested_weight/"),
        losses={t: relative(s) for t, s in by_prefix(scalars, "train/loss/").items()},
        val=by_prefix(scalars, "val/loss/"),
        alerts=alerts(scalars),
        missing=missing(scalars),
    )


_EXPECTED = {
    "train/loss/": "term values (train/loss/<term>): is this a LossMixModule's or LossMix's run?",
    "train/weight/": "effective weights (train/weight/<term>)",
    "grad_magnitude/": (
        "gradient figures (grad_*): add lightning_lossmix.callbacks.GradientMonitor() to the "
        "Trainer's callbacks to see how hard each term pulls"
    ),
    "grad_cosine/": "cosines (grad_cosine/...): the monitor's log_cosine=False, or one term",
    "grad_suggested_weight/": "suggested weights (grad_suggested_weight/<term>)",
    "val/loss/": "validation means (val/loss/<term>): the fit had no validation data",
}


def missing(scalars: Mapping[str, Series]) -> tuple[str, ...]:
    """Say what the report cannot draw for lack of tags (empty when all is there)."""
    if not scalars:
        return ("no scalars yet: the run has just started, or logs nothing",)
    absent = [text for prefix, text in _EXPECTED.items() if not by_prefix(scalars, prefix)]
    if any(text.startswith("gradient figures") for text in absent):
        absent = [t for t in absent if not t.startswith(("cosines", "suggested"))]
    return tuple(f"no {text}" for text in absent)
