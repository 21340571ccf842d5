"""The balancers' numeric arguments, checked where they enter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_lossmix._errors import LossMixError, check_finite_float


def check_bounds(
    owner: str,
    *,
    positive: Mapping[str, Any] | None = None,
    non_negative: Mapping[str, Any] | None = None,
    hint: str = "",
) -> dict[str, float]:
    """Return the arguments as floats, or raise naming every one that is out of its range.

    Args:
        owner: the balancer's name, for the message.
        positive: name to value, for arguments that must be finite and > 0.
        non_negative: name to value, for arguments that must be finite and >= 0.
        hint: appended to the message (the method's usual values).

    Raises:
        LossMixError: for a value that is not a finite real number, or out of its range.

    Examples:
        >>> check_bounds("FAMO", positive={"lr": 0.025}, non_negative={"weight_decay": 0})
        {'lr': 0.025, 'weight_decay': 0.0}
        >>> try:
        ...     check_bounds("DWA", positive={"temperature": -1.0}, hint="2.0 in the paper.")
        ... except LossMixError as err:
        ...     print(err)
        DWA: `temperature` should be > 0. Found `temperature = -1.0`; 2.0 in the paper.
    """
    strict = dict(positive or {})
    loose = dict(non_negative or {})
    found = {
        name: check_finite_float(value, name, owner) for name, value in {**strict, **loose}.items()
    }
    bad = [n for n in strict if found[n] <= 0] + [n for n in loose if found[n] < 0]
    if not bad:
        return found
    ranges = []
    if strict:
        ranges.append(" and ".join(f"`{n}`" for n in strict) + " should be > 0")
    if loose:
        verb = "" if strict else " should be"
        ranges.append(" and ".join(f"`{n}`" for n in loose) + f"{verb} >= 0")
    shown = ", ".join(f"`{n} = {strict.get(n, loose.get(n))}`" for n in found)
    suffix = f"; {hint}" if hint else "."
    raise LossMixError(f"{owner}: {' and '.join(ranges)}. Found {shown}{suffix}")
