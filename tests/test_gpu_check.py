"""`benchmarks/gpu_check.py`, the script a lent GPU runs, on the CPU: its checks run and pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_passes_on_the_cpu_in_every_eager_precision() -> None:
    command = [sys.executable, str(SCRIPT), "--accelerator", "cpu", "--skip-benchmarks"]
    done = subprocess.run([*command, "--no-compile"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][2:]
    precisions = [row.split(" | ")[0].strip("| ") for row in rows]
    assert precisions == ["32-true"] * 3 + ["16-mixed"] * 3 + ["bf16-mixed"] * 3
    errors = [float(row.split(" | ")[3]) for row in rows]
    assert max(errors) <= 1e-5  # the script's own tolerance, read back from its table
