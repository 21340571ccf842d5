"""Read scalars back from real TensorBoard event files, as TensorBoard itself would."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar tag under `logdir` as ``tag -> [(step, value), ...]``, sorted by step.

    All event files below `logdir` (any depth) are read, with no sampling
    (``size_guidance`` 0 keeps every event), and their scalars are merged.
    """
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"No TensorBoard event files under {logdir}.")
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            scalars[tag].extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return {tag: sorted(events) for tag, events in scalars.items()}
