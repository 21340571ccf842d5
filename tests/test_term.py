"""LossTerm: validation of name, weight and mode where they enter; signed weights."""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import pytest

from lightning_lossmix import LossMixError, LossTerm, Player
from lightning_lossmix.schedules import Constant, Cyclical, Linear, Piecewise, Schedule


class Returns(Schedule):
    """A schedule that returns fixed `values[step]`, to feed bad values to `weight_at`."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def __call__(self, step: int, total_steps: int | None = None) -> Any:
        return self.values[step]

    def _arguments(self) -> dict[str, Any]:
        return {"values": self.values}

    def __hash__(self) -> int:
        return 0


def test_defaults_and_repr() -> None:
    term = LossTerm("recon")
    assert (term.name, term.weight, term.mode) == ("recon", 1.0, "min")
    assert repr(term) == "LossTerm(name='recon', weight=1.0, mode='min')"


@pytest.mark.parametrize("weight", [0, 3, 0.0, 0.25, 1e6])
def test_constant_weight_is_stored_as_float(weight: float) -> None:
    term = LossTerm("a", weight=weight)
    assert type(term.weight) is float
    assert term.weight == weight
    assert term.weight_at(0) == term.weight_at(10_000) == weight


@pytest.mark.parametrize(("mode", "sign"), [("min", 1.0), ("max", -1.0)])
def test_sign_and_signed_weight(mode: str, sign: float) -> None:
    term = LossTerm("a", weight=0.5, mode=mode)  # type: ignore[arg-type]
    assert term.sign == sign
    assert term.weight_at(7) == 0.5
    assert term.signed_weight(7) == sign * 0.5


@pytest.mark.parametrize("mode", ["min", "max"])
def test_scheduled_weight_follows_schedule(mode: str) -> None:
    schedule = Linear(0.0, 2.0, steps=10, delay=5)
    term = LossTerm("kl", weight=schedule, mode=mode)  # type: ignore[arg-type]
    sign = 1.0 if mode == "min" else -1.0
    for step, expected in [(0, 0.0), (5, 0.0), (10, 1.0), (15, 2.0), (100, 2.0)]:
        assert term.weight_at(step) == pytest.approx(expected)
        assert term.signed_weight(step) == pytest.approx(sign * expected)


def test_schedule_needing_total_steps_receives_it() -> None:
    term = LossTerm("kl", weight=Cyclical(cycles=2, ratio=0.5), mode="max")
    # total 40 steps, 2 cycles: period 20, ramp over 10 steps.
    assert term.signed_weight(5, total_steps=40) == pytest.approx(-0.5)
    assert term.signed_weight(25, total_steps=40) == pytest.approx(-0.5)
    with pytest.raises(LossMixError, match="total_steps"):
        term.weight_at(5)


def test_negative_weight_suggests_mode_max() -> None:
    with pytest.raises(LossMixError) as info:
        LossTerm("kl", weight=-0.5)
    message = str(info.value)
    assert "LossTerm 'kl'" in message
    assert "`weight` should be >= 0" in message
    assert "weight = -0.5" in message
    assert "LossTerm('kl', weight=0.5, mode='max')" in message


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_nonfinite_weight(weight: float) -> None:
    with pytest.raises(LossMixError) as info:
        LossTerm("kl", weight=weight)
    message = str(info.value)
    assert "LossTerm 'kl'" in message
    assert "`weight` should be finite" in message
    assert f"weight = {weight!r}" in message


@pytest.mark.parametrize("weight", [True, False, "0.5", None, [1.0], 1j])
def test_weight_that_is_not_a_real_number(weight: Any) -> None:
    with pytest.raises(LossMixError) as info:
        LossTerm("kl", weight=weight)
    message = str(info.value)
    assert "LossTerm 'kl'" in message
    assert "`weight` should be a real number" in message
    assert type(weight).__name__ in message


@pytest.mark.parametrize("mode", ["maximize", "MIN", "", None, -1])
def test_unknown_mode(mode: Any) -> None:
    with pytest.raises(LossMixError) as info:
        LossTerm("kl", mode=mode)
    message = str(info.value)
    assert "LossTerm 'kl'" in message
    assert "`mode` should be 'min' or 'max'" in message
    assert f"mode = {mode!r}" in message


@pytest.mark.parametrize("name", ["a/b", "with space", "", ".hidden", "-x", "é", "a\nb", 3, None])
def test_name_unusable_as_log_key(name: Any) -> None:
    with pytest.raises(LossMixError) as info:
        LossTerm(name)
    message = str(info.value)
    assert repr(name) in message
    assert "train/loss/<term>" in message
    assert "no '/'" in message


@pytest.mark.parametrize("name", ["kl\n", "kl\r\n", "\nkl", "kl\t"])
@pytest.mark.parametrize("owner", ["LossTerm", "Player", "GradientMonitor group"])
def test_a_name_with_a_trailing_newline_is_refused(owner: str, name: str) -> None:
    # `re.match` with `$` accepts one final "\n": the name would break the log keys.
    from lightning_lossmix import Player
    from lightning_lossmix._errors import check_name

    with pytest.raises(LossMixError, match="cannot be used in log keys") as info:
        if owner == "LossTerm":
            LossTerm(name)
        elif owner == "Player":
            Player(name, terms=("fit",))
        else:
            check_name(name, owner)  # what GradientMonitor calls on each group name
    assert str(info.value).startswith(f"{owner}: the name {name!r}")


@pytest.mark.parametrize("name", ["kl", "recon_x", "_private", "0", "a.b", "x-1", "Term2"])
def test_names_usable_as_log_keys(name: str) -> None:
    assert LossTerm(name).name == name


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-0.25, "-0.25"), (math.nan, "nan"), (math.inf, "inf"), ("1", "'1'"), (None, "None")],
)
def test_schedule_returning_a_bad_value_names_term_and_step(value: Any, shown: str) -> None:
    term = LossTerm("kl", weight=Returns([1.0, 0.5, value]))
    assert term.weight_at(1) == 0.5
    with pytest.raises(LossMixError) as info:
        term.weight_at(2)
    message = str(info.value)
    assert "LossTerm 'kl'" in message
    assert f"returned {shown} at step 2" in message
    assert "mode='max'" in message


def test_decreasing_linear_schedule_going_negative_is_refused_when_declared() -> None:
    with pytest.raises(LossMixError, match=r"LossTerm 'aux'.*goes down to -1.0"):
        LossTerm("aux", weight=Linear(1.0, -1.0, steps=10))


def test_frozen_equal_hashable_and_picklable() -> None:
    term = LossTerm("kl", weight=Piecewise([10], [0.0, 1.0]), mode="max")
    with pytest.raises(dataclasses.FrozenInstanceError):
        term.weight = 2.0  # type: ignore[misc]
    same = LossTerm("kl", weight=Piecewise([10], [0.0, 1.0]), mode="max")
    assert term == same
    assert hash(term) == hash(same)
    assert term != LossTerm("kl", weight=Piecewise([11], [0.0, 1.0]), mode="max")
    assert term != LossTerm("kl", weight=Piecewise([10], [0.0, 1.0]), mode="min")
    restored = pickle.loads(pickle.dumps(term))
    assert restored == term
    assert restored.signed_weight(10) == -1.0


def test_constant_schedule_weight() -> None:
    term = LossTerm("a", weight=Constant(0.3), mode="max")
    assert term.signed_weight(123) == -0.3


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_player_every_n_batches_is_checked(every: object) -> None:
    with pytest.raises(LossMixError, match="Player 'g': `every_n_batches` should be"):
        Player("g", ["fool"], every_n_batches=every)  # type: ignore[arg-type]
