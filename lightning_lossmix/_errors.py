"""The one error type of the package, and the small checks that raise it."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

__all__ = ["LossMixError"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # fullmatch: `$` would accept a final "\n"


class LossMixError(ValueError):
    """Bad input to lightning_lossmix: says what was expected, what was found, and the fix.

    It subclasses `ValueError`, so existing ``except ValueError`` blocks still catch it.

    Examples:
        >>> from lightning_lossmix import LossTerm, LossMixError
        >>> try:
        ...     LossTerm("kl", weight=-1.0)
        ... except LossMixError as err:
        ...     print(str(err).splitlines()[0])
        LossTerm 'kl': `weight` should be >= 0. Found `weight = -1.0`.
    """


def check_finite_float(value: Any, what: str, owner: str) -> float:
    """Return `value` as a float, or raise if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LossMixError(
            f"{owner}: `{what}` should be a real number. Found `{what} = {value!r}` "
            f"of type {type(value).__name__}."
        )
    if not math.isfinite(value):
        raise LossMixError(f"{owner}: `{what}` should be finite. Found `{what} = {value!r}`.")
    return float(value)


def check_int(value: Any, what: str, owner: str, minimum: int) -> int:
    """Return `value` if it is an int >= `minimum`, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LossMixError(
            f"{owner}: `{what}` should be an int. Found `{what} = {value!r}` "
            f"of type {type(value).__name__}."
        )
    if value < minimum:
        raise LossMixError(f"{owner}: `{what}` should be >= {minimum}. Found `{what} = {value}`.")
    return int(value)


def check_name(name: Any, owner: str) -> str:
    """Return `name` if it can be used in a log key such as ``train/loss/<name>``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LossMixError(
            f"{owner}: the name {name!r} cannot be used in log keys such as "
            "`train/loss/<term>`, `train/<player>/loss` or `grad_magnitude/<group>/<term>`. "
            "Use letters, digits, '_', '-' and '.', starting with a letter, digit or '_' "
            "(no '/', no spaces), e.g. 'recon_x' or 'kl'."
        )
    return name


def check_schedule_value(value: Any, schedule: Any, owner: str, step: int) -> float:
    """Return a schedule's value at `step` as a float, or raise if it is not finite and >= 0."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and float(value) >= 0):
        raise LossMixError(
            f"{owner}: its schedule {schedule!r} returned {value!r} at step {step}; it should "
            "be finite and >= 0. Fix the schedule's range; to maximize a term, use mode='max' "
            "with a non-negative schedule."
        )
    return float(value)
