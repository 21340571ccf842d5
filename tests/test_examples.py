"""Every example runs end to end in its fast mode and reports measured figures."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def run(name: str, tmp_path: Path, *extra: str) -> Any:
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.main(["--fast", "--logdir", str(tmp_path), *extra])


def test_min_max(tmp_path: Path) -> None:
    result = run("min_max", tmp_path)
    assert result["after"]["fit"] < result["before"]["fit"]  # the min term went down
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_vae_digits(tmp_path: Path) -> None:
    equal, boosted = run("vae_digits", tmp_path)
    for result in (equal, boosted):
        assert 0.0 <= result["label_accuracy"] <= 1.0
        assert result["suggested/recon_label"] > 0  # the monitor measured
    assert {p.parent.name for p in tmp_path.rglob("events.out.tfevents.*")} == {
        "equal_weights",
        "label_x20",
    }


def test_dann_digits(tmp_path: Path) -> None:
    results = run("dann_digits", tmp_path)
    assert set(results) == {"source only", "DANN"}
    assert all(0.0 <= r["target_accuracy"] <= 1.0 for r in results.values())


def test_gan_ring(tmp_path: Path) -> None:
    result = run("gan_ring", tmp_path)
    assert 0 <= result["modes"] <= 8


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_is_covered(script: str) -> None:
    covered = {"min_max.py", "vae_digits.py", "dann_digits.py", "gan_ring.py"}
    helpers = {"_data.py", "cli.py"}  # cli.py: tests/test_cli.py
    assert script in covered | helpers
