"""The command line: ``lightning-lossmix report RUN [RUN ...] -o OUT``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.report._write import write_report


def parser() -> argparse.ArgumentParser:
    """Build the ``lightning-lossmix`` parser with its ``report`` command."""
    main = argparse.ArgumentParser(
        prog="lightning-lossmix", description="Tools for lightning_lossmix runs."
    )
    commands = main.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="draw how hard each loss term pulls, from runs' logs, into an HTML page",
        description="Draw one HTML page (and PNG files) from the logs of one or more runs: "
        "the terms' shares of each group's pull, magnitudes, cosines, weights against "
        "suggested weights, term values and the monitor's warnings, runs side by side.",
    )
    report.add_argument(
        "runs", nargs="+", metavar="RUN",
        help="a run folder (TensorBoard event files or a CSVLogger metrics.csv), a folder of "
        "runs, or a log file",
    )  # fmt: skip
    report.add_argument(
        "-o", "--out", default="lossmix_report",
        help="the folder to write index.html and the PNGs into (default: lossmix_report)",
    )  # fmt: skip
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (2 for a run that cannot be reported)."""
    args = parser().parse_args(argv)
    try:
        page = write_report(args.runs, args.out)
    except LossMixError as err:
        print(f"lightning-lossmix: error: {err}", file=sys.stderr)
        return 2
    print(f"Report: {page}")
    return 0
