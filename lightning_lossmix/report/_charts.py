"""Which charts the report has, and how each is drawn from the runs' data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes

from lightning_lossmix.report import _draw as draw
from lightning_lossmix.report._data import RunData


@dataclass(frozen=True)
class Chart:
    """One PNG of the report: where it is, its heading and how to read it."""

    path: Path
    heading: str
    caption: str


def all_groups(runs: Sequence[RunData]) -> list[str]:
    """Return the groups of every run, in first-seen order, ``all`` last."""
    return sorted(dict.fromkeys(g for run in runs for g in run.groups), key=lambda g: g == "all")


def draw_charts(runs: Sequence[RunData], out: Path) -> list[Chart]:
    """Draw every chart of the runs into `out` (PNG files); return them in page order."""
    colors = draw.term_colors(runs)
    charts = []
    for group in all_groups(runs):
        if any(len(run.shares.get(group, {})) > 1 for run in runs):  # one term: always 1
            charts.append(_shares(runs, group, colors, out))
        charts.append(_magnitudes(runs, group, colors, out))
        if any(group in run.cosines for run in runs):
            charts.append(_cosines(runs, group, out))
    charts.append(_weights(runs, colors, out))
    charts.append(_losses(runs, colors, out))
    return charts


def _shares(runs: Sequence[RunData], group: str, colors: Mapping[str, str], out: Path) -> Chart:
    def panel(ax: Axes, run: RunData) -> bool:
        drawn = draw.stacked_shares(ax, run.shares.get(group, {}), colors)
        draw.mark_alerts(ax, run, colors, f"drowns_{group}")
        return drawn

    figure = draw.grid(runs, [("share of the pull", panel)], f"Shares of the pull on {group!r}")
    draw.legend(figure, _present(colors, runs, "shares", group), draw.style_handles()[2:])
    return Chart(
        draw.save(figure, out / f"shares_{group}.png"),
        f"Shares of the pull on {group}",
        "Each term's share of how hard the terms pull on the group's parameters (weight times "
        "gradient norm), stacked to 1. A thin band is a term the group barely learns from; a "
        "triangle marks a step at which the monitor warned that a term drowns the others.",
    )


def _magnitudes(runs: Sequence[RunData], group: str, colors: Mapping[str, str], out: Path) -> Chart:
    def panel(ax: Axes, run: RunData) -> bool:
        return draw.lines(ax, run.magnitudes.get(group, {}), colors)

    figure = draw.grid(
        runs, [("pull (log scale)", panel)], f"How hard each term pulls on {group!r}"
    )
    draw.legend(figure, _present(colors, runs, "magnitudes", group))
    return Chart(
        draw.save(figure, out / f"magnitudes_{group}.png"),
        f"Magnitudes on {group}",
        "grad_magnitude: each term's weight times the norm of its gradient on the group, on a "
        "log scale. A term absent from a chart does not reach the group.",
    )


def _cosines(runs: Sequence[RunData], group: str, out: Path) -> Chart:
    colors = draw.pair_colors(runs, group)
    rows = [
        ("mean cosine over the run", lambda ax, run: draw.matrix(ax, run, group)),
        ("cosine over steps", lambda ax, run: draw.trend(ax, run, group, colors)),
    ]
    figure = draw.grid(runs, rows, f"Do the terms agree on {group!r}?")
    draw.legend(figure, colors)
    return Chart(
        draw.save(figure, out / f"cosines_{group}.png"),
        f"Cosines on {group}",
        "The cosine between two terms' pulls on the group: +1 they push the same way, 0 they are "
        "unrelated, below 0 they conflict (shaded below the line; a mean below "
        f"{draw.CONFLICT} is boxed in the matrix).",
    )


def _weights(runs: Sequence[RunData], colors: Mapping[str, str], out: Path) -> Chart:
    def panel(ax: Axes, run: RunData) -> bool:
        effective = {
            t: s._replace(values=tuple(map(abs, s.values))) for t, s in run.weights.items()
        }
        drawn = draw.lines(ax, effective, colors)
        drawn = draw.lines(ax, run.suggested, colors, "--") or drawn
        return drawn

    figure = draw.grid(runs, [("weights", panel)], "Effective against suggested weights")
    draw.legend(figure, colors, draw.style_handles()[:2])
    return Chart(
        draw.save(figure, out / "weights.png"),
        "Weights",
        "Solid: the weight each term had (train/weight, in absolute value). Dashed: the weight "
        "that would give it the mean pull of all terms (grad_suggested_weight). Far apart "
        "means the term pulls much more or much less than the others.",
    )


def _losses(runs: Sequence[RunData], colors: Mapping[str, str], out: Path) -> Chart:
    def train(ax: Axes, run: RunData) -> bool:
        drawn = draw.lines(ax, run.losses, colors)
        draw.mark_alerts(ax, run, colors, None)
        return drawn

    def val(ax: Axes, run: RunData) -> bool:
        return draw.lines(ax, {k: s for k, s in run.val.items()}, _val_colors(run, colors))

    rows = [("train value / first value", train), ("validation mean", val)]
    figure = draw.grid(runs, rows, "Term values")
    draw.legend(figure, colors, draw.style_handles()[2:])
    return Chart(
        draw.save(figure, out / "losses.png"),
        "Term values",
        "Top: each term's raw training value (train/loss) over its first value, so that terms "
        "of any scale share one axis; a triangle marks a warning about the term. Bottom: the "
        "validation means (val/loss).",
    )


def _val_colors(run: RunData, colors: Mapping[str, str]) -> dict[str, str]:
    """Give a validation key (``term`` or ``term/dataloader_idx_N``) its term's colour."""
    return {key: colors.get(key.split("/", 1)[0], "k") for key in run.val}


def _present(
    colors: Mapping[str, str], runs: Sequence[RunData], kind: str, group: str
) -> dict[str, str]:
    """Keep the colours of the terms that appear in some run's `kind` chart of the group."""
    found = {t for run in runs for t in getattr(run, kind).get(group, {})}
    return {t: c for t, c in colors.items() if t in found}
