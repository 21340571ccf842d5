"""Which parameters `GradientMonitor` measures, and how they are grouped."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.callbacks._figures import Figures

#: At most this many child groups by default (the largest), next to ``all``.
MAX_DEFAULT_GROUPS = 4
#: Default groups are pruned, smallest first, to write at most this many tags per measurement.
TAG_BUDGET = 40


@dataclass(frozen=True)
class MonitoredGroups:
    """The monitored parameters and each group's positions among them.

    Attributes:
        parameters: the monitored trainable parameters, in the module's order.
        indices: group name to positions in `parameters`.
        complete: whether `parameters` are all the module's trainable parameters (then a term
            with a zero gradient on them trains nothing at all).
    """

    parameters: list[nn.Parameter]
    indices: dict[str, list[int]]
    complete: bool


def default_parts(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the module's parts with trainable parameters, through single-child wrappers.

    ``self.model = nn.Sequential(...)`` gives the Sequential's children (``model.0``, ...), not
    one group ``model`` equal to ``all``.
    """
    prefix, parent = "", module
    while True:
        parts = [
            (f"{prefix}{name}", child)
            for name, child in parent.named_children()
            if any(p.requires_grad for p in child.parameters())
        ]
        if len(parts) != 1:
            return parts
        prefix, parent = f"{parts[0][0]}.", parts[0][1]


def resolve_groups(
    module: nn.Module, groups: Mapping[str, Sequence[str]] | None, strict: bool = True
) -> MonitoredGroups:
    """Resolve `groups` (or the default) to positions among the monitored parameters.

    The default: one group per part (see `default_parts`) when there are two or more, the
    `MAX_DEFAULT_GROUPS` largest ones by number of trainable elements, largest first; then
    ``all``. Not `strict` (parameters frozen during the fit), a pattern of `groups` that
    matches no trainable parameter is skipped, and a group none of whose patterns does is
    left out.

    Raises:
        LossMixError: for a pattern that matches no trainable parameter, if `strict`.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    index = {id(p): i for i, (_, p) in enumerate(trainable)}
    if groups is None:
        parts = default_parts(module)
        sizes = {n: sum(p.numel() for p in c.parameters() if p.requires_grad) for n, c in parts}
        largest = sorted(sizes, key=lambda n: -sizes[n])[:MAX_DEFAULT_GROUPS]
        resolved = {  # largest first
            name: sorted({index[id(p)] for p in child.parameters() if id(p) in index})
            for name, child in sorted(parts, key=lambda part: -sizes[part[0]])
            if name in largest and len(parts) > 1
        }
        resolved["all"] = list(range(len(trainable)))
    else:
        resolved = {}
        for group, patterns in groups.items():
            found: set[int] = set()
            for pattern in patterns:  # during the fit, a frozen pattern drops out alone
                try:
                    found.update(_match(module, trainable, index, group, [pattern]))
                except LossMixError:
                    if strict:
                        raise
            if found:
                resolved[group] = sorted(found)
    used = sorted({i for indices in resolved.values() for i in indices})
    position = {i: k for k, i in enumerate(used)}
    return MonitoredGroups(
        parameters=[trainable[i][1] for i in used],  # type: ignore[misc]
        indices={g: [position[i] for i in idx] for g, idx in resolved.items()},
        complete=len(used) == len(trainable),
    )


def _match(
    module: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    index: dict[int, int],
    group: str,
    patterns: Sequence[str],
) -> list[int]:
    # Every name a submodule or parameter is reachable by (one registered twice, as
    # `self.features = self.net.features`, has two), not only the first.
    modules = dict(module.named_modules(remove_duplicate=False))
    aliases = list(module.named_parameters(remove_duplicate=False))
    chosen: set[int] = set()
    for pattern in patterns:
        if pattern in modules and pattern:
            found = [index[id(p)] for p in modules[pattern].parameters() if id(p) in index]
        else:
            found = [
                index[id(p)] for n, p in aliases if id(p) in index and fnmatch.fnmatch(n, pattern)
            ]
        if not found:
            children = sorted(n for n, c in module.named_children() if _trains(c))
            raise LossMixError(
                f"GradientMonitor: the pattern {pattern!r} of group {group!r} matches no "
                f"trainable parameter. Use a submodule name (top-level: {children}) or a "
                "parameter-name pattern such as 'encoder.*'."
            )
        chosen.update(found)
    return sorted(chosen)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def prune(figures: Figures, indices: MutableMapping[str, list[int]], budget: int) -> Figures:
    """Drop default groups, smallest first, until a measurement has at most `budget` tags.

    Done once per fit, at the first measurement, when it is known which terms reach which
    part; `indices` (largest group first, ``all`` last) loses the dropped groups for the rest
    of the fit. Groups given with `groups` are never pruned.
    """
    count = dict.fromkeys(indices, 0)
    for tag in figures.metrics:
        parts = tag.split("/")
        if len(parts) == 3 and parts[1] in count:
            count[parts[1]] += 1
    total = len(figures.metrics)
    dropped: set[str] = set()
    for group in reversed(list(indices)):
        if total <= budget or group == "all":
            continue
        dropped.add(group)
        total -= count[group]
    for group in dropped:
        del indices[group]
    metrics = {t: v for t, v in figures.metrics.items() if t.split("/")[1] not in dropped}
    raw = {g: v for g, v in figures.raw.items() if g not in dropped}
    groups = [g for g in figures.groups if g not in dropped]
    return Figures(metrics, figures.norms, groups, raw)
