"""Writing a report: read the runs, compute the data, draw the charts, write the page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.report._data import run_data
from lightning_lossmix.report._load import load_runs

INSTALL = 'pip install "lightning-lossmix[report]"'


def require_matplotlib() -> None:
    """Raise a `LossMixError` that says how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise LossMixError(
            "report: drawing the report needs matplotlib, which is not installed. Install it "
            f"with the package's `report` extra: {INSTALL} (or pip install matplotlib)."
        ) from err


def write_report(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Draw the report of `runs` into the folder `out`; return its HTML page.

    The page, ``out/index.html``, embeds every chart, so it works opened from disk or sent
    alone; the charts are also written next to it as PNG files.

    Args:
        runs: run folders, folders of runs, or log files (see `load_runs`).
        out: the folder to write into (created if needed).

    Raises:
        LossMixError: for a path that is not a run, a file that cannot be read, or when
            matplotlib is missing.

    Example:
        ```python
        from lightning_lossmix.report import write_report

        page = write_report(["runs/vae_digits/version_0"], "runs/vae_digits/version_0/report")
        ```
    """
    require_matplotlib()
    from lightning_lossmix.report._charts import draw_charts
    from lightning_lossmix.report._draw import term_colors
    from lightning_lossmix.report._page import page, write_page

    logs = load_runs(runs)
    data = [run_data(log) for log in logs]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(data, folder)
    return write_page(page(logs, data, charts, term_colors(data)), folder)
