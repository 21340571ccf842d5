"""The warnings of `GradientMonitor`, each also logged as a ``grad_alert/<kind>/<term>`` scalar."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from lightning_lossmix._warnings import Location, warn_at
from lightning_lossmix.callbacks._figures import Figures

SHARE_STREAK = 3  # measurements in a row above `warn_share` before warning
GROWTH_WINDOW = 5  # measurements of a maximized term inspected for unbounded growth
# Steps at least between the measurements of that window: over a few steps a bounded term near
# a saddle (tanh(p)**2 at small p) grows exactly as an unbounded one does.
GROWTH_GAP = 10
_CONSTANT = 1e-4  # relative spread under which a gradient norm counts as constant


class Alerts:
    """Decides the warnings of a measurement; warns once per term and condition on rank zero.

    Args:
        warn_share: a term above this share of a group's magnitude for `SHARE_STREAK`
            measurements in a row, before and after weighting, drowns the others.
    """

    def __init__(self, warn_share: float) -> None:
        self.warn_share = warn_share
        self.location: Location | None = None
        self.warned: set[str] = set()
        self.share_streaks: dict[str, int] = {}
        self.growth: dict[str, deque[tuple[float, float]]] = {}
        self.growth_steps: dict[str, int] = {}  # the step of each term's last growth entry

    def start_fit(self) -> None:
        """Forget the streaks and growth of an earlier fit (what was warned stays warned).

        A resumed fit loads them from its checkpoint after this.
        """
        self.share_streaks, self.growth, self.growth_steps = {}, {}, {}

    def warn_once(self, key: str, message: str) -> bool:
        """Warn (rank zero) at the user's code location unless `key` warned already."""
        if key in self.warned:
            return False
        self.warned.add(key)
        warn_at(message, self.location)
        return True

    def check(
        self,
        figures: Figures,
        weights: Mapping[str, float],
        values: Mapping[str, float],
        maximized: set[str],
        step: int,
        complete: bool,
    ) -> dict[str, float]:
        """Warn about a finite measurement; return its ``grad_alert/...`` scalars."""
        alerts: dict[str, float] = {}
        for name, norm in figures.norms.items():
            # A term at weight 0 trains nothing by design (it may be off the graph until then).
            if norm == 0.0 and weights[name] != 0:
                alerts[f"grad_alert/zero_gradient/{name}"] = 1.0
                self.warn_once(f"dead:{name}", _dead_message(name, step, complete))
        for group in figures.groups:
            raw = figures.raw.get(group, {})
            # Only terms that train (weight not 0) can be drowned, or drown others.
            training = {n: v for n, v in raw.items() if weights[n] != 0}
            total = sum(training.values())
            for name in raw:
                if self._drowns(figures, weights, group, name, step, training, total):
                    alerts[f"grad_alert/drowns_{group}/{name}"] = 1.0
        for name in sorted(maximized):
            if self._grows(name, figures.norms[name], values[name], step):
                alerts[f"grad_alert/unbounded/{name}"] = 1.0
                self.warn_once(
                    f"growth:{name}",
                    f"GradientMonitor: maximized term {name!r} keeps growing at step {step} "
                    f"(its value rose at each of the last {GROWTH_WINDOW} measurements, "
                    f"{GROWTH_GAP} steps apart at least, with a "
                    "constant gradient, or its gradient doubled): it looks unbounded, and "
                    "maximizing it will blow up the weights. Maximize a bounded quantity "
                    "instead (e.g. tanh(x), a probability, an entropy) or clip it. If it is "
                    "bounded already, it is climbing out of a flat region (a sigmoid started "
                    "near 0 grows like this for a while) and this warning does not apply.",
                )
        return alerts

    def nonfinite(self, names: list[str], step: int) -> dict[str, float]:
        """Warn about terms whose gradient is not finite; return their alert scalars."""
        for name in names:
            self.warn_once(
                f"nonfinite:{name}",
                f"GradientMonitor: the gradient of term {name!r} is not finite at step {step}; "
                "the weights are being corrupted. Look for a log, a square root or a division "
                "near zero in that term, or clip gradients.",
            )
        return {f"grad_alert/nonfinite_gradient/{name}": 1.0 for name in names}

    def _drowns(
        self,
        figures: Figures,
        weights: Mapping[str, float],
        group: str,
        name: str,
        step: int,
        raw: Mapping[str, float],
        total: float,
    ) -> bool:
        key = f"{group}/{name}"
        share = figures.metrics.get(f"grad_share/{key}", 0.0)
        # Only terms that train (weight not 0, in `raw`) and reach the group can be drowned
        # there; and only an imbalance the weights do not explain is a surprise: a regularizer
        # weighted down on purpose, or ramping in, is small by choice (the charts still show it).
        raw_share = raw.get(name, 0.0) / total if raw else 0.0
        drowning = share > self.warn_share and raw_share > self.warn_share and len(raw) > 1
        streak = self.share_streaks.get(key, 0) + 1 if drowning else 0
        self.share_streaks[key] = streak
        if streak < SHARE_STREAK:
            return False
        suggested = {
            n: float(f"{figures.metrics[f'grad_suggested_weight/{n}']:.3g}")
            for n in weights
            if f"grad_suggested_weight/{n}" in figures.metrics
        }
        self.warn_once(
            f"share:{key}",
            f"GradientMonitor: term {name!r} has {share:.1%} of the gradient magnitude on group "
            f"{group!r} for {streak} measurements in a row (step {step}), {raw_share:.1%} "
            f"before weighting: it drowns {[n for n in raw if n != name]}, which barely train "
            f"there. Rebalance the weights; suggested weights: {suggested}.",
        )
        return True

    def _grows(self, name: str, norm: float, value: float, step: int) -> bool:
        history = self.growth.setdefault(name, deque(maxlen=GROWTH_WINDOW))
        last = self.growth_steps.get(name)
        if last is not None and step < last + GROWTH_GAP:
            return False  # too close to the last entry to tell a saddle from a blow-up
        self.growth_steps[name] = step
        history.append((norm, value))
        return len(history) == GROWTH_WINDOW and keeps_growing(history)

    def state_dict(self) -> dict[str, Any]:
        """Return the state that keeps warnings from repeating after a resume."""
        return {
            "warned": sorted(self.warned),
            "share_streaks": dict(self.share_streaks),
            "growth": {name: list(h) for name, h in self.growth.items()},
            "growth_steps": dict(self.growth_steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`."""
        self.warned = set(state["warned"])
        self.share_streaks = dict(state["share_streaks"])
        self.growth = {
            name: deque(map(tuple, h), maxlen=GROWTH_WINDOW) for name, h in state["growth"].items()
        }
        # Checkpoints written before the gap existed: the next measurement is read.
        self.growth_steps = dict(state.get("growth_steps", {}))


def keeps_growing(history: deque[tuple[float, float]]) -> bool:
    """Whether a maximized term looks unbounded over the window of (raw norm, value).

    The window's entries are `GROWTH_GAP` steps apart at least.

    Its gradient doubled while rising (super-linear growth), or its value rose at every
    measurement without slowing down while its gradient stayed constant (a linear term such as
    a sum of weights). A bounded term (tanh, an entropy) has a gradient that shrinks or moves as
    it saturates, so it is not flagged while it still climbs.
    """
    norms = [n for n, _ in history]
    values = [v for _, v in history]
    if all(b > a for a, b in pairwise(norms)) and norms[-1] >= 2 * norms[0]:
        return True
    steps = [b - a for a, b in pairwise(values)]
    mean = sum(norms) / len(norms)
    constant = mean > 0 and max(abs(n - mean) for n in norms) <= _CONSTANT * mean
    return constant and all(d > 0 for d in steps) and steps[-1] >= 0.5 * steps[0]


def _dead_message(name: str, step: int, complete: bool) -> str:
    if complete:
        return (
            f"GradientMonitor: term {name!r} has a zero gradient on every monitored parameter "
            f"(all the trainable ones) at step {step}: it trains nothing. Check that it "
            "depends on the model's outputs through differentiable operations (no argmax, "
            "rounding or saturated activation) and that its inputs are not detached."
        )
    return (
        f"GradientMonitor: term {name!r} reaches none of the monitored groups at step {step} "
        "(its gradient there is zero); it may train other parameters. Add them to `groups` to "
        "measure it there."
    )
