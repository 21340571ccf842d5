"""The report's charts with matplotlib (Agg, no pyplot): one figure per chart, runs side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from lightning_lossmix.report._data import RunData
from lightning_lossmix.report._load import Series

_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
_PAIRS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
Draw = Callable[[Axes, RunData], bool]
_LEGEND = 1.9  # inches on the right of the charts for the legend
CONFLICT = -0.1  # a mean cosine below this is boxed: a cosine of -0.01 is noise, not a conflict


def term_colors(runs: Sequence[RunData]) -> dict[str, str]:
    """One colour per term, the same in every run and chart.

    The colours go to the terms in name order, so that they do not depend on the order of the
    runs nor on the format (a CSVLogger sorts its columns, TensorBoard keeps the logged
    order); the legends keep the first-seen order.
    """
    names = list(dict.fromkeys(t for run in runs for t in run.terms))
    index = {t: i for i, t in enumerate(sorted(names))}
    return {t: _PALETTE[index[t] % len(_PALETTE)] for t in names}


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG with the Agg canvas."""
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=90)
    return path


def grid(runs: Sequence[RunData], rows: Sequence[tuple[str, Draw]], title: str) -> Figure:
    """One row per chart kind, one column per run; each `Draw` says whether it drew anything.

    The margins are fixed in inches (matplotlib's constrained layout costs more than the
    drawing): room on the left for tick labels, on the right for the legend.
    """
    width, height = _LEGEND + 4.6 * len(runs), 0.55 + 2.9 * len(rows)
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=0.75 / width, right=1 - _LEGEND / width, bottom=0.5 / height, top=1 - 0.55 / height,
        wspace=0.28, hspace=0.42,
    )  # fmt: skip
    axes = figure.subplots(len(rows), len(runs), squeeze=False)
    figure.suptitle(title, fontsize=12, fontweight="bold", x=0.75 / width, ha="left")
    for r, (label, draw) in enumerate(rows):
        for c, run in enumerate(runs):
            ax = axes[r][c]
            title = f"{run.name}: {label}" if len(runs) > 1 else label
            ax.set_title(title, fontsize=9, y=1.0)  # a fixed y skips a costly auto-placement
            ax.tick_params(labelsize=8)
            if not draw(ax, run):
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", color="#888888")
                ax.set_axis_off()
        _same_scale([ax for ax in axes[r] if ax.axison and ax.lines and not ax.images])
    return figure


def _same_scale(axes: Sequence[Axes]) -> None:
    """Give the line charts of one row the same y range (and scale), to compare the runs."""
    if len(axes) < 2 or len({ax.get_yscale() for ax in axes}) > 1:
        return
    low = min(ax.get_ylim()[0] for ax in axes)
    high = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(low, high)


def legend(figure: Figure, colors: Mapping[Any, str], extra: Sequence[Any] = ()) -> None:
    """Show the terms' (or pairs') colours and `extra` handles to the right of the charts."""
    handles = [
        Patch(color=c, label="\nvs ".join(t) if isinstance(t, tuple) else t)
        for t, c in colors.items()
    ]
    width = figure.get_figwidth()
    figure.legend(
        handles=[*handles, *extra], loc="upper left", fontsize=8, frameon=False,
        bbox_to_anchor=(1 - (_LEGEND - 0.1) / width, 1 - 0.5 / figure.get_figheight()),
    )  # fmt: skip


def mark_alerts(ax: Axes, run: RunData, colors: Mapping[str, str], kind: str | None) -> None:
    """Put a triangle at the top of the chart at each warning's step, in the term's colour."""
    for alert in run.alerts:
        if kind is None or alert.kind == kind:
            ax.plot(
                alert.step, 1.0, marker="v", color=colors.get(alert.term, "k"),
                markeredgecolor="k", markersize=8, clip_on=False,
                transform=ax.get_xaxis_transform(), zorder=5,
            )  # fmt: skip


def lines(
    ax: Axes, series: Mapping[str, Series], colors: Mapping[str, str], style: str = "-"
) -> bool:
    """One line per term; a log scale when every value is positive."""
    drawn = False
    for term, (steps, values) in series.items():
        ax.plot(steps, values, style, color=colors.get(term, "k"), linewidth=1.4)
        drawn = drawn or bool(steps)
    finite = [v for s in series.values() for v in s.values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels within a decade
        ax.yaxis.set_minor_locator(NullLocator())  # minor ticks cost more than the lines
    ax.set_xlabel("step", fontsize=8)
    return drawn


def stacked_shares(ax: Axes, shares: Mapping[str, Series], colors: Mapping[str, str]) -> bool:
    """Stack the terms' shares to 1 over steps."""
    if not shares:
        return False
    steps = next(iter(shares.values())).steps
    values = [s.values for s in shares.values()]
    ax.stackplot(steps, values, colors=[colors[t] for t in shares], alpha=0.9, linewidth=0)
    if len(steps) == 1:  # one measurement: a bar, since an area needs two points
        bottom = 0.0
        for term, value in zip(shares, values, strict=True):
            ax.bar(steps[0], value[0], bottom=bottom, color=colors[term], width=0.8)
            bottom += value[0]
    ax.set_ylim(0, 1)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("share of the pull", fontsize=8)
    return True


def matrix(ax: Axes, run: RunData, group: str) -> bool:
    """Show the mean cosine of each pair over the run; box a conflict (below `CONFLICT`)."""
    found = run.cosine_matrices.get(group)
    if found is None:
        return False
    n = len(found.terms)
    off = [
        [math.nan if i == j else v for j, v in enumerate(row)] for i, row in enumerate(found.values)
    ]
    cmap = colormaps["RdBu"].with_extremes(bad="#f2f2f2")
    ax.imshow(off, cmap=cmap, vmin=-1, vmax=1)
    size = 8 if n <= 4 else 6
    ax.set_xticks(range(n), found.terms, rotation=20 if n <= 4 else 45, ha="right", fontsize=size)
    ax.set_yticks(range(n), found.terms, fontsize=size)
    for i, row in enumerate(off):
        for j, value in enumerate(row):
            if i == j or math.isnan(value):
                continue
            conflict = value < CONFLICT
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=size,
                color="white" if abs(value) > 0.6 else "black",
                fontweight="bold" if conflict else "normal",
            )  # fmt: skip
            if conflict:
                ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, lw=1.5, ec="k"))
    return True


def pair_colors(runs: Sequence[RunData], group: str) -> dict[tuple[str, str], str]:
    """One colour per pair of terms on the group, the same in every run."""
    pairs = dict.fromkeys(pair for run in runs for pair in run.cosines.get(group, {}))
    return {pair: _PAIRS[k % len(_PAIRS)] for k, pair in enumerate(pairs)}


def trend(ax: Axes, run: RunData, group: str, colors: Mapping[tuple[str, str], str]) -> bool:
    """Draw each pair's cosine over steps; below 0 (shaded) the two terms conflict."""
    pairs = run.cosines.get(group, {})
    for pair, (steps, values) in pairs.items():
        ax.plot(steps, values, "-", color=colors[pair], linewidth=1.3, marker=".")
    if not pairs:
        return False
    ax.axhspan(-1.05, 0, color="#d62728", alpha=0.07, linewidth=0)
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step", fontsize=8)
    return True


def style_handles() -> list[Line2D]:
    """Legend entries for the line styles of the weights chart and the warnings."""
    return [
        Line2D([], [], color="k", linestyle="-", label="|effective weight|"),
        Line2D([], [], color="k", linestyle="--", label="suggested weight"),
        Line2D([], [], color="w", marker="v", markeredgecolor="k", label="warning"),
    ]
