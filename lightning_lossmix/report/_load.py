"""Reading runs' logs: TensorBoard event files (tensorboard's own reader) and metrics.csv."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lightning_lossmix._errors import LossMixError

EVENTS_PREFIX = "events.out.tfevents."
CSV_NAME = "metrics.csv"


class Series(NamedTuple):
    """One scalar over steps: ``steps[i]`` and ``values[i]``, sorted by step.

    Examples:
        >>> Series(steps=(0, 10), values=(1.0, 0.5)).values[-1]
        0.5
    """

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class RunLogs:
    """The scalars of one run, read from every log file of its folder.

    Attributes:
        name: what the report calls the run (its folder, relative to the path given).
        path: the run's folder.
        files: the log files read, TensorBoard event files and ``metrics.csv``.
        scalars: tag to its values; where files repeat a step (a resumed fit), the later wins.

    Example:
        ```python
        from lightning_lossmix.report import load_runs

        (logs,) = load_runs(["lightning_logs/version_0"])
        logs.scalars["train/loss/recon"].values  # every logged value, by step
        ```
    """

    name: str
    path: Path
    files: tuple[Path, ...]
    scalars: Mapping[str, Series]


def is_log_file(path: Path) -> bool:
    """Whether `path` is named like a TensorBoard event file or a CSVLogger's metrics."""
    return path.name.startswith(EVENTS_PREFIX) or path.name == CSV_NAME


def load_runs(paths: Sequence[str | Path]) -> list[RunLogs]:
    """Read the runs under `paths`: each folder holding log files below a path is one run.

    Args:
        paths: run folders, folders of runs (each sub-folder with logs is a run), or log files.

    Raises:
        LossMixError: for a path that does not exist, a folder without logs, or a file that
            cannot be read.
    """
    found: dict[Path, tuple[Path, list[Path]]] = {}
    for given in paths:
        for folder, files in _discover(Path(given)):
            known = found.setdefault(folder.resolve(), (Path(given), []))[1]
            known.extend(f for f in files if f not in known)
    names = _names([(given, folder) for folder, (given, _) in found.items()])
    return [
        RunLogs(name, folder, tuple(files), _read(files))
        for name, (folder, (_, files)) in zip(names, found.items(), strict=True)
    ]


def _discover(path: Path) -> list[tuple[Path, list[Path]]]:
    if not path.exists():
        raise LossMixError(
            f"report: the run {str(path)!r} does not exist (from {Path.cwd()}). Expected a "
            "folder holding TensorBoard event files (events.out.tfevents.*) or a CSVLogger "
            "metrics.csv, a folder of such runs, or one such file. Check the path."
        )
    if path.is_file():
        if not is_log_file(path):
            raise LossMixError(
                f"report: {str(path)!r} is not a log file. Expected a TensorBoard event file "
                f"(named {EVENTS_PREFIX}*) or a CSVLogger {CSV_NAME}, or a folder holding them."
            )
        return [(path.parent, [path])]
    by_folder: dict[Path, list[Path]] = {}
    for file in sorted(p for p in path.rglob("*") if is_log_file(p) and p.is_file()):
        by_folder.setdefault(file.parent, []).append(file)
    if not by_folder:
        raise LossMixError(
            f"report: no logs under {str(path)!r}. Expected TensorBoard event files "
            f"({EVENTS_PREFIX}*) or a CSVLogger {CSV_NAME} in it or below it. Pass the folder "
            "that the logger writes to (e.g. lightning_logs/version_0), or a folder of runs."
        )
    return list(by_folder.items())


def _names(runs: list[tuple[Path, Path]]) -> list[str]:
    """Name each run by its folder relative to the path given (the folder's own name if same).

    Where two runs would get the same name, each is named by the path as the user wrote it.
    """
    names, paths = [], []
    for given, folder in runs:
        root = given if given.is_dir() else given.parent
        inside = folder.is_relative_to(root.resolve())  # not through a symbolic link
        relative = folder.relative_to(root.resolve()) if inside else Path(folder.name)
        names.append(relative.as_posix() if relative.parts else folder.name)
        paths.append((root / relative).as_posix())
    return paths if len(set(names)) < len(names) else names


def _read(files: Iterable[Path]) -> dict[str, Series]:
    merged: dict[str, dict[int, float]] = {}
    # CSV first, then event files in their (time-stamped) name order: the later value wins.
    for file in sorted(files, key=lambda f: (f.name != CSV_NAME, f.name)):
        points = read_csv(file) if file.name == CSV_NAME else read_events(file)
        for tag, values in points.items():
            merged.setdefault(tag, {}).update(values)
    return {
        tag: Series(tuple(sorted(values)), tuple(values[s] for s in sorted(values)))
        for tag, values in _without_logger_prefix(merged).items()
    }


#: The first part of the tags a LossMixModule and GradientMonitor log.
_ROOTS = ("train/", "val/", "test/", "grad_", "balance/")


def _without_logger_prefix(
    points: dict[str, dict[int, float]],
) -> dict[str, dict[int, float]]:
    """Take off the prefix a logger put before every tag (``TensorBoardLogger(prefix="exp")``).

    Lightning's loggers write ``<prefix>-<tag>``. Only when no tag starts as the package's do,
    the prefix found before most of them is taken off every tag that has it. A package tag has
    no "-" before its first "/", so a prefix that itself begins like one (``"grad_run"``) is
    still seen.
    """
    if any(tag.startswith(_ROOTS) and "-" not in tag.split("/", 1)[0] for tag in points):
        return points
    found = Counter(prefix for tag in points if (prefix := _logger_prefix(tag)))
    if not found:
        return points
    prefix = found.most_common(1)[0][0]
    return {tag.removeprefix(prefix): values for tag, values in points.items()}


def _logger_prefix(tag: str) -> str | None:
    """Return what comes before the package's first tag root after a "-", with the "-"."""
    places = [i for root in _ROOTS if (i := tag.find("-" + root)) > 0]
    return tag[: min(places) + 1] if places else None


def _unreadable(path: Path, why: str) -> LossMixError:
    return LossMixError(
        f"report: cannot read {str(path)!r}: {why}. Expected a TensorBoard event file or a "
        f"CSVLogger {CSV_NAME}; remove the file or pass only the runs that can be read."
    )


def read_events(path: Path) -> dict[str, dict[int, float]]:
    """Every scalar of one TensorBoard event file, read by tensorboard (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    try:
        with path.open("rb") as stream:
            empty = not stream.read(1)
    except OSError as err:
        raise _unreadable(path, str(err)) from err
    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()[SCALARS]
    if not empty and not tags and accumulator.file_version is None:
        raise _unreadable(path, "it holds no TensorBoard event (the file is damaged)")
    return {tag: {e.step: float(e.value) for e in accumulator.Scalars(tag)} for tag in tags}


def read_csv(path: Path) -> dict[str, dict[int, float]]:
    """Every value of a CSVLogger's metrics.csv; a half-written last line is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, str(err)) from err
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) > 1 and not text.endswith("\n"):
        rows.pop()  # the logger is still writing it: even one that parses may be cut short
    if not rows:
        return {}
    header = rows[0]
    if "step" not in header:
        raise _unreadable(path, f"its header has no 'step' column (found {header[:5]})")
    at = header.index("step")
    points: dict[str, dict[int, float]] = {}
    for number, row in enumerate(rows[1:], start=2):
        try:
            step = int(float(row[at]))
            values = {
                h: float(v) for h, v in zip(header, row, strict=False) if v != "" and h != "step"
            }
        except (ValueError, IndexError) as err:
            raise _unreadable(path, f"line {number} is not numbers ({err})") from err
        for tag, value in values.items():
            points.setdefault(tag, {})[step] = value
    return points
