"""Draw a run's balance: the report of how hard each loss term pulls, from its logs.

``lightning-lossmix report RUN [RUN ...] -o OUT`` (or ``python -m lightning_lossmix report``)
reads TensorBoard event files and CSVLogger's ``metrics.csv`` and writes one HTML page with
PNG charts. Drawing needs matplotlib: ``pip install "lightning-lossmix[report]"``. Reading the
logs and the data behind each chart (`load_runs`, `run_data`) do not.

Examples:
    >>> from lightning_lossmix.report import Series, relative
    >>> relative(Series(steps=(0, 10), values=(4.0, 1.0))).values
    (1.0, 0.25)
"""

from lightning_lossmix.report._cli import main
from lightning_lossmix.report._data import (
    Alert,
    CosineMatrix,
    RunData,
    cosine_matrix,
    relative,
    run_data,
    shares,
)
from lightning_lossmix.report._load import RunLogs, Series, load_runs
from lightning_lossmix.report._write import write_report

__all__ = [
    "Alert",
    "CosineMatrix",
    "RunData",
    "RunLogs",
    "Series",
    "cosine_matrix",
    "load_runs",
    "main",
    "relative",
    "run_data",
    "shares",
    "write_report",
]
