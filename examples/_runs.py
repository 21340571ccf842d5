"""A fresh folder for each invocation of an example: a re-run never appends to old curves."""

from __future__ import annotations

import re
from pathlib import Path


def new_run_folder(logdir: str | Path) -> Path:
    """Create and return ``logdir/version_N``, N one more than the largest already there.

    TensorBoard draws each run folder as its own run: writing a second invocation into the
    folder of the first would mix their curves (and TensorBoard drops the earlier steps).
    """
    root = Path(logdir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    number = max(taken, default=-1) + 1
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another invocation took it meanwhile
            number += 1
