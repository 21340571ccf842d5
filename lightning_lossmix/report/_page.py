"""The report's HTML page: one self-contained file, the PNGs embedded."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_lossmix.report._charts import Chart
from lightning_lossmix.report._data import RunData
from lightning_lossmix.report._load import RunLogs

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1500px;
  color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
img { max-width: 100%; } .caption { color: #555; max-width: 60em; }
.missing { color: #a15c00; } .swatch { display: inline-block; width: 0.9em; height: 0.9em; }
"""


def page(
    logs: Sequence[RunLogs],
    runs: Sequence[RunData],
    charts: Sequence[Chart],
    colors: Mapping[str, str],
) -> str:
    """Build the whole page: the runs, the last shares, what is missing, the warnings, charts."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>lightning_lossmix report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>How hard each term pulls: " + html.escape(", ".join(r.name for r in runs)) + "</h1>",
        _runs_table(logs, runs),
        _glance(runs, colors),
        _missing(runs),
        _alerts(runs),
        "<p>Charts: "
        + " &middot; ".join(
            f'<a href="#{html.escape(c.path.stem)}">{html.escape(c.heading)}</a>' for c in charts
        )
        + "</p>",
    ]
    for chart in charts:
        data = base64.b64encode(chart.path.read_bytes()).decode("ascii")
        parts += [
            f'<h2 id="{html.escape(chart.path.stem)}">{html.escape(chart.heading)}</h2>',
            f'<p class="caption">{html.escape(chart.caption)}</p>',
            f'<img alt="{html.escape(chart.heading)}" src="data:image/png;base64,{data}">',
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _runs_table(logs: Sequence[RunLogs], runs: Sequence[RunData]) -> str:
    rows = ["<table><tr><th>run</th><th>folder</th><th>steps</th><th>terms</th></tr>"]
    for log, run in zip(logs, runs, strict=True):
        steps = [s for series in log.scalars.values() for s in series.steps]
        span = f"{min(steps)} to {max(steps)}" if steps else "none yet"
        rows.append(
            f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(_shown(log.path))}</td>"
            f"<td>{span}</td><td>{html.escape(', '.join(run.terms))}</td></tr>"
        )
    return "\n".join([*rows, "</table>"])


def _shown(path: Path) -> str:
    """Show `path` relative to the working directory when it is inside it."""
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def _glance(runs: Sequence[RunData], colors: Mapping[str, str]) -> str:
    """Tabulate the last measured share of each term on each group, one column per run."""
    groups = dict.fromkeys(g for r in runs for g, s in r.shares.items() if len(s) > 1)
    if not groups:
        return ""
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = [f"<h2>Last measured shares</h2><table><tr><th>group</th>{head}</tr>"]
    for group in groups:
        cells = []
        for run in runs:
            shares = run.shares.get(group, {})
            cells.append(
                "<td>"
                + "<br>".join(
                    f'<span class="swatch" style="background:{colors.get(t, "#000")}"></span> '
                    f"{html.escape(t)} {s.values[-1]:.2f} (step {s.steps[-1]})"
                    for t, s in shares.items()
                    if s.steps
                )
                + "</td>"
            )
        rows.append(f"<tr><td>{html.escape(group)}</td>{''.join(cells)}</tr>")
    return "\n".join([*rows, "</table>"])


def _missing(runs: Sequence[RunData]) -> str:
    items = [f"<li>{html.escape(r.name)}: {html.escape(m)}</li>" for r in runs for m in r.missing]
    if not items:
        return ""
    return (
        '<div class="missing"><p>Not drawn, for lack of logs:</p><ul>'
        + "".join(items)
        + "</ul></div>"
    )


def _alerts(runs: Sequence[RunData]) -> str:
    found = [(r.name, a) for r in runs for a in r.alerts]
    if not found:
        return "<p>The monitor raised no warning (no grad_alert tags).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{a.step}</td><td>{html.escape(a.kind)}</td>"
        f"<td>{html.escape(a.term)}</td></tr>"
        for name, a in found
    )
    return (
        f"<h2>Warnings ({len(found)})</h2><table><tr><th>run</th><th>step</th><th>kind</th>"
        f"<th>term</th></tr>{rows}</table>"
    )


def write_page(text: str, out: Path) -> Path:
    """Write the page as ``out/index.html``."""
    path = out / "index.html"
    path.write_text(text, encoding="utf-8")
    return path
