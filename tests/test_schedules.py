"""Schedules: values against their formulas, argument checks, repr, pickling, equality."""

from __future__ import annotations

import itertools
import math
import pickle
from typing import Any

import pytest

import lightning_lossmix.schedules as schedules
from lightning_lossmix import LossMixError
from lightning_lossmix.schedules import (
    Constant,
    Cosine,
    Cyclical,
    Linear,
    Piecewise,
    Schedule,
    Sigmoid,
)

# --- independent references, written from the formulas ---------------------------------------


def ramp_progress(step: int, steps: int, delay: int) -> float:
    return min(max((step - delay) / steps, 0.0), 1.0)


def linear_reference(start: float, end: float, steps: int, delay: int, step: int) -> float:
    return start + (end - start) * ramp_progress(step, steps, delay)


def cosine_reference(start: float, end: float, steps: int, delay: int, step: int) -> float:
    p = ramp_progress(step, steps, delay)
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


def sigmoid_reference(
    start: float, end: float, steps: int, delay: int, sharpness: float, step: int
) -> float:
    def logistic(x: float) -> float:
        return 1 / (1 + math.exp(-sharpness * (x - 0.5)))

    p = ramp_progress(step, steps, delay)
    return start + (end - start) * (logistic(p) - logistic(0)) / (logistic(1) - logistic(0))


def cyclical_reference(start: float, end: float, period: int, ratio: float, step: int) -> float:
    """Fu et al. (2019), eq. 4, generalised from [0, 1] to [start, end] (step is t - 1)."""
    tau = (step % period) / period
    return start + (end - start) * tau / ratio if tau <= ratio else end


# --- ramps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end", "steps", "delay"), [(0, 1, 10, 0), (2, 0.5, 7, 3)])
def test_linear_matches_formula(start: float, end: float, steps: int, delay: int) -> None:
    schedule = Linear(start, end, steps=steps, delay=delay)
    for step in range(delay + steps + 5):
        assert schedule(step) == pytest.approx(linear_reference(start, end, steps, delay, step))
    assert schedule(delay) == start
    assert schedule(delay + steps) == end
    assert schedule(10**9) == end


def test_linear_key_steps() -> None:
    warmup = Linear(0.0, 1.0, steps=100, delay=10)
    assert [warmup(s) for s in (0, 10, 35, 60, 110, 500)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(("start", "end", "steps", "delay"), [(1, 0, 100, 0), (0, 3, 9, 4)])
def test_cosine_matches_formula(start: float, end: float, steps: int, delay: int) -> None:
    schedule = Cosine(start, end, steps=steps, delay=delay)
    for step in range(delay + steps + 5):
        assert schedule(step) == pytest.approx(cosine_reference(start, end, steps, delay, step))
    assert schedule(delay) == start
    assert schedule(delay + steps) == end


def test_cosine_is_flat_at_the_ends_and_steepest_in_the_middle() -> None:
    decay = Cosine(1.0, 0.0, steps=100)
    assert decay(50) == pytest.approx(0.5)
    first, middle = decay(0) - decay(1), decay(50) - decay(51)
    assert middle > 10 * first > 0


@pytest.mark.parametrize("sharpness", [1.0, 10.0, 30.0])
def test_sigmoid_matches_formula(sharpness: float) -> None:
    schedule = Sigmoid(0.5, 2.5, steps=20, delay=2, sharpness=sharpness)
    for step in range(30):
        assert schedule(step) == pytest.approx(sigmoid_reference(0.5, 2.5, 20, 2, sharpness, step))
    assert schedule(2) == 0.5
    assert schedule(12) == pytest.approx(1.5, abs=1e-12)  # midpoint
    assert schedule(22) == 2.5


def test_sigmoid_sharpness_makes_the_middle_more_abrupt() -> None:
    gentle, sharp = Sigmoid(0, 1, steps=100, sharpness=2), Sigmoid(0, 1, steps=100, sharpness=30)
    assert sharp(25) < gentle(25)
    assert sharp(75) > gentle(75)
    assert sharp(55) - sharp(45) > gentle(55) - gentle(45)


@pytest.mark.parametrize("ramp", [Linear, Cosine, Sigmoid])
def test_ramps_are_monotone_and_need_no_total_steps(ramp: type[Schedule]) -> None:
    schedule = ramp(0.0, 1.0, steps=50)  # type: ignore[call-arg]
    values = [schedule(step) for step in range(60)]
    assert values == sorted(values)
    assert not schedule.needs_total_steps


# --- Cyclical (Fu et al., 2019) ------------------------------------------------------------


def test_cyclical_docstring_values() -> None:
    beta = Cyclical(cycles=4, ratio=0.5)
    assert [beta(s, total_steps=800) for s in (0, 50, 100, 150, 199, 200, 250, 799)] == [
        0.0,
        0.5,
        1.0,
        1.0,
        1.0,
        0.0,
        0.5,
        1.0,
    ]


@pytest.mark.parametrize(
    ("total_steps", "cycles", "ratio"), [(800, 4, 0.5), (60, 3, 0.25), (12, 1, 1.0), (30, 5, 0.8)]
)
def test_cyclical_with_total_steps_matches_paper(
    total_steps: int, cycles: int, ratio: float
) -> None:
    schedule = Cyclical(start=0.0, end=1.0, cycles=cycles, ratio=ratio)
    assert schedule.needs_total_steps
    period = total_steps // cycles
    for step in range(total_steps):
        expected = cyclical_reference(0.0, 1.0, period, ratio, step)
        assert schedule(step, total_steps) == pytest.approx(expected), step


def test_cyclical_ramps_for_ratio_of_each_cycle_then_holds() -> None:
    schedule = Cyclical(start=0.2, end=0.8, cycles=2, ratio=0.5)
    # 40 steps, 2 cycles: each cycle ramps over 10 steps then holds 0.8 for 10.
    values = [schedule(step, total_steps=40) for step in range(40)]
    for cycle in (0, 20):
        assert values[cycle] == 0.2
        assert values[cycle + 5] == pytest.approx(0.5)
        assert all(value == 0.8 for value in values[cycle + 10 : cycle + 20])


def test_cyclical_with_period_repeats_forever() -> None:
    schedule = Cyclical(start=1.0, end=3.0, ratio=0.4, period=10)
    assert not schedule.needs_total_steps
    for step in range(100):
        expected = cyclical_reference(1.0, 3.0, 10, 0.4, step)
        assert schedule(step) == pytest.approx(expected)
        assert schedule(step, total_steps=7) == schedule(step)  # the period wins
    assert Cyclical(period=10)(15) == 1.0
    assert Cyclical(period=10)(12) == pytest.approx(0.4)


def test_cyclical_without_period_needs_total_steps() -> None:
    with pytest.raises(LossMixError) as info:
        Cyclical(cycles=4)(10)
    message = str(info.value)
    assert "Cyclical(" in message
    assert "needs `total_steps`" in message
    assert "total_steps = None" in message
    assert "max_steps" in message
    assert "max_epochs" in message


# --- Piecewise and Constant --------------------------------------------------------------------


def test_piecewise_switches_at_boundaries() -> None:
    schedule = Piecewise(boundaries=[10, 20, 35], values=[0.0, 1.0, 0.5, 2.0])
    expected = {0: 0.0, 9: 0.0, 10: 1.0, 19: 1.0, 20: 0.5, 34: 0.5, 35: 2.0, 10**6: 2.0}
    assert {step: schedule(step) for step in expected} == expected


def test_piecewise_without_boundaries_is_constant() -> None:
    schedule = Piecewise(boundaries=[], values=[0.7])
    assert schedule(0) == schedule(1000) == 0.7


def test_constant() -> None:
    assert Constant(2)(0) == Constant(2)(10**6) == 2.0
    assert not Constant(2).needs_total_steps


# --- constructor arguments -------------------------------------------------------------------


@pytest.mark.parametrize("ramp", [Linear, Cosine, Sigmoid])
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"steps": 0}, ["`steps` should be >= 1", "steps = 0"]),
        ({"steps": 2.5}, ["`steps` should be an int", "steps = 2.5", "float"]),
        ({"steps": True}, ["`steps` should be an int", "bool"]),
        ({"delay": -1}, ["`delay` should be >= 0", "delay = -1"]),
        ({"start": math.nan}, ["`start` should be finite", "start = nan"]),
        ({"end": "1"}, ["`end` should be a real number", "end = '1'", "str"]),
        ({"end": math.inf}, ["`end` should be finite"]),
    ],
)
def test_ramp_argument_errors(ramp: type, kwargs: dict[str, Any], expected: list[str]) -> None:
    arguments = {"start": 0.0, "end": 1.0, "steps": 10, **kwargs}
    with pytest.raises(LossMixError) as info:
        ramp(**arguments)
    message = str(info.value)
    assert message.startswith(f"{ramp.__name__}: ")
    for part in expected:
        assert part in message


@pytest.mark.parametrize("sharpness", [0.0, -1.0])
def test_sigmoid_sharpness_should_be_positive(sharpness: float) -> None:
    with pytest.raises(LossMixError, match=r"Sigmoid: `sharpness` should be > 0"):
        Sigmoid(0, 1, steps=10, sharpness=sharpness)
    with pytest.raises(LossMixError, match=r"Sigmoid: `sharpness` should be finite"):
        Sigmoid(0, 1, steps=10, sharpness=math.inf)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"ratio": 0.0}, "`ratio` should be in (0, 1]. Found `ratio = 0.0`"),
        ({"ratio": 1.5}, "`ratio` should be in (0, 1]. Found `ratio = 1.5`"),
        ({"ratio": math.nan}, "`ratio` should be finite"),
        ({"cycles": 0}, "`cycles` should be >= 1. Found `cycles = 0`"),
        ({"cycles": 2.0}, "`cycles` should be an int"),
        ({"period": 0}, "`period` should be >= 1. Found `period = 0`"),
        ({"period": 2.5}, "`period` should be an int"),
        ({"start": None}, "`start` should be a real number"),
    ],
)
def test_cyclical_argument_errors(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(LossMixError) as info:
        Cyclical(**kwargs)
    assert str(info.value).startswith("Cyclical: ")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("boundaries", "values", "expected"),
    [
        ([10], [1.0], "one more entry than `boundaries`. Found `len(boundaries) = 1` and "),
        ([10], [1.0, 2.0, 3.0], "`len(values) = 3`"),
        ([10, 10], [0.0, 1.0, 2.0], "strictly increasing. Found `boundaries = [10, 10]`"),
        ([20, 10], [0.0, 1.0, 2.0], "strictly increasing. Found `boundaries = [20, 10]`"),
        ([-1], [0.0, 1.0], "`boundaries[0]` should be >= 0. Found `boundaries[0] = -1`"),
        ([5, 7.5], [0.0, 1.0, 2.0], "`boundaries[1]` should be an int"),
        ([5], [0.0, math.nan], "`values[1]` should be finite"),
    ],
)
def test_piecewise_argument_errors(boundaries: Any, values: Any, expected: str) -> None:
    with pytest.raises(LossMixError) as info:
        Piecewise(boundaries, values)
    assert str(info.value).startswith("Piecewise: ")
    assert expected in str(info.value)


@pytest.mark.parametrize("value", [math.inf, True, "1"])
def test_constant_argument_errors(value: Any) -> None:
    with pytest.raises(LossMixError, match=r"^Constant: `value` should be"):
        Constant(value)


def test_schedule_is_abstract() -> None:
    with pytest.raises(TypeError):
        Schedule()  # type: ignore[abstract]


# --- repr, pickling, equality ----------------------------------------------------------------

EXAMPLES = [
    Constant(0.5),
    Linear(0.0, 1.0, steps=100),
    Linear(2, 0.5, steps=7, delay=3),
    Cosine(1.0, 0.0, steps=50, delay=10),
    Sigmoid(0.0, 1.0, steps=100, sharpness=4.0),
    Cyclical(),
    Cyclical(start=0.1, end=0.9, cycles=3, ratio=0.25),
    Cyclical(period=10, ratio=1.0),
    Piecewise(boundaries=[10, 20], values=[0.0, 1.0, 0.5]),
]


def assert_same_values(a: Schedule, b: Schedule) -> None:
    for step in (0, 1, 5, 12, 33, 99, 250):
        assert a(step, total_steps=200) == b(step, total_steps=200)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_repr_round_trips(schedule: Schedule) -> None:
    text = repr(schedule)
    assert text.startswith(f"{type(schedule).__name__}(")
    rebuilt = eval(text, vars(schedules))
    assert type(rebuilt) is type(schedule)
    assert rebuilt == schedule
    assert repr(rebuilt) == text
    assert_same_values(rebuilt, schedule)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_pickle_round_trips(schedule: Schedule) -> None:
    restored = pickle.loads(pickle.dumps(schedule))
    assert type(restored) is type(schedule)
    assert restored == schedule
    assert hash(restored) == hash(schedule)
    assert restored.needs_total_steps == schedule.needs_total_steps
    assert_same_values(restored, schedule)


def test_repr_shows_every_argument() -> None:
    assert repr(Linear(0, 1, steps=100)) == "Linear(start=0.0, end=1.0, steps=100, delay=0)"
    assert repr(Sigmoid(0, 1, steps=5)) == (
        "Sigmoid(start=0.0, end=1.0, steps=5, delay=0, sharpness=10.0)"
    )
    assert repr(Cyclical(period=8)) == (
        "Cyclical(start=0.0, end=1.0, cycles=4, ratio=0.5, period=8)"
    )
    assert repr(Piecewise([3], [0, 1])) == "Piecewise(boundaries=[3], values=[0.0, 1.0])"


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_equal_arguments_mean_equal_schedules_with_equal_hashes(schedule: Schedule) -> None:
    twin = eval(repr(schedule), vars(schedules))
    assert twin is not schedule
    assert twin == schedule
    assert hash(twin) == hash(schedule)
    assert len({schedule, twin}) == 1
    assert schedule != repr(schedule)
    assert schedule != 0.5


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Linear(0, 1, steps=10), Linear(0, 1, steps=11)),
        (Linear(0, 1, steps=10), Linear(0, 1, steps=10, delay=1)),
        (Linear(0, 1, steps=10), Cosine(0, 1, steps=10)),
        (Sigmoid(0, 1, steps=10), Sigmoid(0, 1, steps=10, sharpness=5)),
        (Cyclical(), Cyclical(period=100)),
        (Piecewise([1], [0, 1]), Piecewise([2], [0, 1])),
        (Constant(1.0), Constant(2.0)),
    ],
)
def test_different_schedules_are_not_equal(a: Schedule, b: Schedule) -> None:
    assert a != b
    assert b != a


def test_int_and_float_arguments_give_the_same_schedule() -> None:
    assert Linear(0, 1, steps=10) == Linear(0.0, 1.0, steps=10)
    assert hash(Linear(0, 1, steps=10)) == hash(Linear(0.0, 1.0, steps=10))
    assert Piecewise([5], [0, 1]) == Piecewise([5], [0.0, 1.0])


def test_values_are_python_floats() -> None:
    for schedule in EXAMPLES:
        for step in (0, 3, 1000):
            assert type(schedule(step, total_steps=100)) is float


def test_cyclical_follows_fu_et_al_eq_4_when_cycles_do_not_divide_the_fit() -> None:
    # T = 10, M = 4: tau = mod(t, ceil(T / M)) / (T / M) = mod(t, 3) / 2.5, ramp over tau < 0.5.
    beta = Cyclical(cycles=4, ratio=0.5)
    assert [beta(t, total_steps=10) for t in range(7)] == pytest.approx(
        [0.0, 0.8, 1.0, 0.0, 0.8, 1.0, 0.0]
    )


def _logistic_reference(sharpness: float, progress: float) -> float:
    """The rescaled logistic in exact rational arithmetic on the float inputs (via Decimal)."""
    from decimal import Decimal, getcontext

    getcontext().prec = 60

    def logistic(x: float) -> Decimal:
        return 1 / (1 + (-Decimal(sharpness) * (Decimal(x) - Decimal("0.5"))).exp())

    if sharpness < 1e-20:  # the curve is a straight line up to O(sharpness**2)
        return progress
    low, high = logistic(0.0), logistic(1.0)
    return float((logistic(progress) - low) / (high - low))


@pytest.mark.parametrize(
    "sharpness", [5e-324, 1e-300, 1e-12, 1e-3, 1.0, 10.0, 700.0, 1500.0, 2000.0, 1e6, 1e308]
)
def test_sigmoid_is_finite_monotone_and_exact_at_every_step_for_extreme_sharpness(
    sharpness: float,
) -> None:
    # exp(sharpness / 2) overflowed from sharpness ~1420 on: an OverflowError mid-fit.
    ramp = Sigmoid(0.25, 4.0, steps=200, delay=3, sharpness=sharpness)
    values = [ramp(step) for step in range(0, 210)]
    assert all(math.isfinite(v) and 0.25 <= v <= 4.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[:4] == [0.25] * 4 and values[203:] == [4.0] * 7
    if sharpness <= 5e3:  # Decimal's exp is exact enough here; beyond, the ramp is a step
        for step in range(3, 204, 10):
            progress = (step - 3) / 200
            expected = 0.25 + 3.75 * _logistic_reference(sharpness, progress)
            assert values[step] == pytest.approx(expected, rel=1e-9, abs=1e-12), step
    else:
        assert values[103] == pytest.approx(0.25 + 3.75 * 0.5, rel=1e-9)  # the middle
        assert values[50] == 0.25 and values[150] == 4.0
