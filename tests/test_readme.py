"""The quick start of the README (and of the docs' home page) runs as it is, pasted alone."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start(page: str = "README.md") -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / page).read_text(), flags=re.M | re.S)
    [block] = [b for b in blocks if "class Classifier(LossMixModule)" in b]
    return block


def test_the_docs_home_page_shows_the_same_block() -> None:
    assert quick_start("docs/index.md") == quick_start()


def test_the_readme_quick_start_is_one_block_that_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = quick_start()
    assert "trainer.fit(Classifier(), train, val)" in block
    # The block as written, shortened to 2 epochs so that the test stays fast.
    assert block.count("max_epochs=10") == 1
    script = tmp_path / "quick_start.py"
    script.write_text(block.replace("max_epochs=10", "max_epochs=2, enable_progress_bar=False"))
    monkeypatch.chdir(tmp_path)  # lightning_logs/ goes here
    namespace = runpy.run_path(str(script), run_name="__main__")
    trainer = namespace["trainer"]
    assert trainer.current_epoch == 2 and trainer.global_step == 28
    metrics = trainer.callback_metrics
    assert {"train/loss/fit", "train/weight/entropy", "val/loss"} <= metrics.keys()
    assert float(metrics["train/weight/entropy"]) == pytest.approx(-0.1 * 27 / 100)
    assert (tmp_path / "lightning_logs" / "version_0").is_dir()
