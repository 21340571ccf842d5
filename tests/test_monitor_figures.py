"""The monitor's figures (runs of parameters, Python floats) against `functional`'s formulas."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_lossmix import functional as F
from lightning_lossmix._engine import StepGradients
from lightning_lossmix.callbacks._figures import compute_figures, plan_segments
from lightning_lossmix.callbacks._writer import Summaries, log_figures
from tests._tensorboard import read_scalars

SIZES = [6, 3, 5, 2, 4, 1]
NAMES = ("fit", "aux", "bounded", "reg")


def reference(
    buffer: Tensor,
    weights: list[float],
    signs: Tensor,
    groups: dict[str, list[int]],
    active: list[int],
    opposed: list[int],
    norm_type: float,
) -> dict[str, float]:
    """Every tag, in float64, with `functional`'s tensor formulas (per-parameter Gram matrices)."""
    buffer = buffer.double()
    signs = signs.double()
    grams = F.signed_grams(F.gram_by_parameter(buffer, SIZES), signs)
    absolute = torch.tensor([abs(w) for w in weights], dtype=torch.float64)
    measured = {g: idx for g, idx in groups.items() if set(idx) & set(active)}
    figures: dict[str, float] = {}
    rows = {}
    for group, idx in measured.items():
        raw = F.grad_magnitudes(buffer, SIZES, idx, norm_type)
        reach = [t for t in range(len(NAMES)) if raw[t] != 0]
        rows[group] = (raw, reach)
        magnitudes = absolute * raw
        for t in reach:
            figures[f"grad_magnitude/{group}/{NAMES[t]}"] = float(magnitudes[t])
    for group, (raw, reach) in rows.items():
        shares = F.grad_shares(absolute * raw)
        for t in reach if len(reach) > 1 else []:
            figures[f"grad_share/{group}/{NAMES[t]}"] = float(shares[t])
    for group, idx in measured.items():
        cosines = F.grad_cosines(grams[idx].sum(0), torch.ones(len(NAMES), dtype=torch.float64))
        reach = rows[group][1]
        for i, a in enumerate(reach):
            for b in reach[i + 1 :]:
                figures[f"grad_cosine/{group}/{NAMES[a]}_vs_{NAMES[b]}"] = float(cosines[a, b])
    for t in opposed:
        for group, idx in measured.items():
            if t in rows[group][1]:
                direction = F.grad_directions(grams[idx], signs[idx])[t]
                figures[f"grad_direction/{group}/{NAMES[t]}"] = float(direction)
    eligible = [t for t, w in enumerate(weights) if w != 0]
    if len(eligible) > 1:
        norms = F.grad_magnitudes(buffer, SIZES, groups["all"], norm_type)[eligible]
        suggested = F.suggested_weights(norms, absolute[eligible] * norms)
        for t, weight in zip(eligible, suggested.tolist(), strict=True):
            if not math.isnan(weight):
                figures[f"grad_suggested_weight/{NAMES[t]}"] = weight
    return figures


def gradients(seed: int) -> Tensor:
    """Four terms' gradients on six parameters; some terms do not reach some parameters."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn(len(NAMES), sum(SIZES), generator=generator)
    views = buffer.split(SIZES, dim=1)
    views[4][1] = 0.0  # aux does not reach parameter 4
    views[5][1] = 0.0
    views[0][3] = views[1][3] = views[2][3] = 0.0  # reg reaches parameters 3 to 5 only
    views[5][:] = 0.0  # parameter 5 is reached by `reg` alone
    views[5][3] = 1.5
    return buffer


GROUPS = {  # parameters 0-1 side by side, a group split in two runs, one reached by one term
    "encoder": [0, 1],
    "split": [1, 3, 4],
    "last": [5],
    "all": [0, 1, 2, 3, 4, 5],
}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("opposition", [False, True])
def test_figures_equal_functional_formulas(seed: int, norm_type: float, opposition: bool):
    buffer = gradients(seed)
    weights = [1.0, 3.0, -0.5, 0.0]  # `bounded` maximized, `reg` of weight 0
    modes = [1.0, 1.0, -1.0, 1.0]
    signs = torch.tensor(modes).repeat(len(SIZES), 1)
    opposed = []
    if opposition:  # parameters 0 and 3 play against `fit`
        signs[[0, 3], 0] *= -1
        opposed = [0]
    active = [0, 1, 2, 3, 4, 5]
    step = StepGradients(buffer, NAMES, SIZES, active)
    segments = plan_segments(step, GROUPS, signs.tolist() if opposition else None)
    figures = compute_figures(step, weights, modes, segments, opposed, GROUPS, norm_type)
    # Without opposition the gradients are signed by the modes, as `signed_grams` does.
    expected = reference(buffer, weights, signs, GROUPS, active, opposed, norm_type)
    assert set(figures.metrics) == set(expected), sorted(set(figures.metrics) ^ set(expected))
    for tag, value in expected.items():
        assert figures.metrics[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag
    assert "grad_share/last/reg" not in figures.metrics  # one term reaches `last`
    assert figures.raw["last"] == {"reg": pytest.approx(1.5)}


def test_frozen_parameters_leave_their_groups_out() -> None:
    buffer = gradients(2)
    buffer[:, :9] = 0.0  # parameters 0 and 1 were not trainable this step (another player's)
    active = [2, 3, 4, 5]
    step = StepGradients(buffer, NAMES, SIZES, active)
    groups = {g: idx for g, idx in GROUPS.items() if g != "all"}  # the reference: the active
    segments = plan_segments(step, groups, None)
    assert segments.groups == ["split", "last"]
    weights = [1.0, 3.0, -0.5, 0.5]
    figures = compute_figures(step, weights, [1.0, 1.0, -1.0, 1.0], segments, [], groups)
    signs = torch.tensor([1.0, 1.0, -1.0, 1.0]).repeat(len(SIZES), 1)
    expected = reference(buffer, weights, signs, {**groups, "all": active}, active, [], 2.0)
    expected = {t: v for t, v in expected.items() if "/all/" not in t}
    assert set(figures.metrics) == set(expected)
    for tag, value in expected.items():
        assert figures.metrics[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag


def test_runs_join_adjacent_parameters_with_the_same_groups_and_signs() -> None:
    step = StepGradients(gradients(0), NAMES, SIZES, [0, 1, 2, 3, 4, 5])
    segments = plan_segments(step, {"a": [0, 1, 2], "b": [4, 5], "all": list(range(6))}, None)
    assert segments.columns == [(0, 14), (14, 16), (16, 21)]  # 0-2, 3, 4-5
    assert segments.members == [[0], [2], [0, 1, 2], [0, 1, 2]]  # the groups, the reference
    sign_rows = [[1.0] * 4] * 6
    sign_rows[1] = [-1.0, 1.0, 1.0, 1.0]  # parameter 1 plays against `fit`
    segments = plan_segments(step, {"a": [0, 1, 2], "all": list(range(6))}, sign_rows)
    assert segments.columns == [(0, 6), (6, 9), (9, 14), (14, 21)]
    assert segments.signs is not None and segments.signs[1] == (-1.0, 1.0, 1.0, 1.0)


def test_log_figures_refills_one_summary_per_set_of_tags(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False
    )
    summaries = Summaries()
    log_figures(trainer, {"grad_magnitude/all/a": 1.0, "grad_magnitude/all/b": 2.0}, 1, summaries)
    log_figures(trainer, {"grad_magnitude/all/a": 3.0, "grad_magnitude/all/b": 4.0}, 2, summaries)
    log_figures(trainer, {"grad_magnitude/all/a": 5.0}, 3, summaries)  # another set of tags
    assert len(summaries.cache) == 2
    logger.experiment.flush()
    scalars = read_scalars(tmp_path)
    assert scalars["grad_magnitude/all/a"] == [(1, 1.0), (2, 3.0), (3, 5.0)]
    assert scalars["grad_magnitude/all/b"] == [(1, 2.0), (2, 4.0)]
    metrics = trainer.callback_metrics
    assert (
        metrics["grad_magnitude/all/a"].shape == () and float(metrics["grad_magnitude/all/a"]) == 5
    )
    assert float(metrics["grad_magnitude/all/b"]) == 4.0
