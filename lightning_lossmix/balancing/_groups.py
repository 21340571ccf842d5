"""The parameter group a gradient-based balancer measures: named, or the last shared layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lightning_lossmix._errors import LossMixError
from lightning_lossmix.functional import reached_parameters


def check_on(on: str | Sequence[str] | None, owner: str) -> tuple[str, ...] | None:
    """Validate the `on` argument: a name, a sequence of names, or None."""
    if on is None:
        return None
    names = (on,) if isinstance(on, str) else tuple(on)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise LossMixError(
            f"{owner}: `on` should name a submodule, a parameter or a parameter-name pattern, "
            "e.g. 'decoder.conv_out', 'decoder.conv_out.weight' or 'trunk.*', or a list of "
            f"them. Found `on = {on!r}`."
        )
    return names


def resolve_named(
    module: nn.Module, on: Sequence[str], owner: str, *, frozen_too: bool = False
) -> list[nn.Parameter]:
    """Return the trainable parameters `on` names in `module`, in the module's order.

    Each entry is a submodule (all its trainable parameters), a parameter's full name
    (``"decoder.conv_out.weight"``: that tensor alone) or an `fnmatch` pattern on parameter
    names (``"trunk.*"``). With `frozen_too`, the frozen parameters they name come too, and an
    entry may name only frozen ones (a part frozen until later in the fit).

    Raises:
        LossMixError: for an entry that matches no trainable parameter (no parameter at all,
            with `frozen_too`).
    """
    named = list(module.named_parameters())
    # Every name a submodule or parameter is reachable by (one registered twice, as
    # `self.features = self.net.features`, has two), not only the first.
    modules = dict(module.named_modules(remove_duplicate=False))
    aliases = list(module.named_parameters(remove_duplicate=False))
    chosen: set[int] = set()
    for entry in on:
        if entry in modules:
            found = {id(p) for p in modules[entry].parameters()}
        else:
            found = {id(p) for name, p in aliases if fnmatch.fnmatchcase(name, entry)}
        chosen |= found
        if not any((frozen_too or p.requires_grad) for _, p in named if id(p) in found):
            kind = "parameter" if frozen_too else "trainable parameter"
            children = sorted(
                name
                for name, child in module.named_children()
                if (_has_parameters(child) if frozen_too else _trains(child))
            )
            raise LossMixError(
                f"{owner}: `on` names {entry!r}, which matches no {kind} of "
                f"{type(module).__name__}. Name a submodule (top-level: {children}), a "
                "parameter ('decoder.conv_out.weight') or a pattern ('decoder.*')."
            )
    return [p for _, p in named if id(p) in chosen and (frozen_too or p.requires_grad)]


def last_shared_layer(
    values: Sequence[Tensor], module: nn.Module | None, owner: str
) -> tuple[str, list[nn.Parameter]]:
    """Return the last layer that every value reaches: its name and its reached parameters.

    "Last" is measured on the autograd graph: a parameter's depth is the length of the
    longest path from the values down to it. A layer used after another in the forward pass
    sits on every path to the earlier one, so its depth is smaller, skip connections
    included. The layer is the submodule owning the shallowest parameter that every value
    reaches; the group is that submodule's own parameters (weight and bias, not its
    children's) that every value reaches. Ties go to the later parameter in `module`'s order.

    Raises:
        LossMixError: without a module, or when no parameter of `module` is reached by all.
    """
    if module is None:
        raise LossMixError(
            f"{owner}: finding the last shared layer needs the module: bind the mix "
            "(`self.loss_mix.bind(self)`; LossMixModule does it), or name the group with `on=`."
        )
    reached = [{id(p) for p in reached_parameters(value)} for value in values]
    common = set.intersection(*reached) if reached else set()
    owners = {
        id(p): (name, sub)
        for name, sub in module.named_modules()
        for p in sub.parameters(recurse=False)
        if id(p) in common
    }
    if not owners:
        raise LossMixError(
            f"{owner}: the balanced terms reach no common trainable parameter of "
            f"{type(module).__name__}, so their pulls cannot be compared on one layer. Balance "
            "terms that share a part of the model, or name a group each of them reaches with "
            "`on=`."
        )
    depths = _depths(values)
    order = {id(p): i for i, p in enumerate(module.parameters())}
    last = min(owners, key=lambda key: (depths.get(key, 0), -order.get(key, 0)))
    name, layer = owners[last]
    params = [p for p in layer.parameters(recurse=False) if id(p) in common]
    return name or type(module).__name__, params


def check_reached(
    values: Mapping[str, Tensor], params: Sequence[Tensor], group: str, owner: str
) -> None:
    """Raise if a value's graph reaches none of `params`."""
    wanted = {id(p) for p in params}
    for name, value in values.items():
        if not any(id(p) in wanted for p in reached_parameters(value)):
            raise LossMixError(
                f"{owner}: the term {name!r} does not reach the group {group!r}, so its pull "
                "there is zero and no weight can balance it. Name a group that every balanced "
                "term reaches with `on=` (leave `on` out for the last layer they share), or "
                "leave the term out with `terms=[...]`."
            )


def _depths(values: Sequence[Tensor]) -> dict[int, int]:
    """Return, per parameter id, the longest path length from the values' graph roots."""
    roots = [value.grad_fn for value in values if value.grad_fn is not None]
    children: dict[object, list[object]] = {}
    indegree: dict[object, int] = {}
    stack: list[object] = list(roots)
    while stack:
        node = stack.pop()
        if node in children:
            continue
        following = [n for n, _ in getattr(node, "next_functions", ()) if n is not None]
        children[node] = following
        for child in following:
            indegree[child] = indegree.get(child, 0) + 1
            stack.append(child)
    depth = {node: 0 for node in children}
    ready = [node for node in children if indegree.get(node, 0) == 0]
    while ready:  # Kahn's order: a node is settled once all its parents are
        node = ready.pop()
        for child in children[node]:
            depth[child] = max(depth[child], depth[node] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    found: dict[int, int] = {}
    for node, level in depth.items():
        variable = getattr(node, "variable", None)
        if isinstance(variable, nn.Parameter):
            found[id(variable)] = level
    return found


def _same(found: Sequence[Tensor], kept: Sequence[Tensor]) -> bool:
    """Return whether two lists hold the same tensors (``==`` would compare their values)."""
    return len(found) == len(kept) and all(a is b for a, b in zip(found, kept, strict=True))


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class ParameterGroup:
    """The group a balancer measures: resolved by name at binding, or found at the first step.

    Args:
        on: see `check_on`; None for the last shared layer.
        owner: the balancer's name, for errors.
    """

    def __init__(self, on: str | Sequence[str] | None, owner: str) -> None:
        self.on = check_on(on, owner)
        self.owner = owner
        self.name = "" if self.on is None else ",".join(self.on)
        self.params: list[nn.Parameter] | None = None  # what the last call measured
        self._named: list[nn.Parameter] | None = None  # all that `on` names, frozen or not
        self._module: tuple[nn.Module] | None = None

    def bind(self, module: nn.Module | None) -> None:
        """Resolve a named group in `module` now (bad names fail here); forget the old one."""
        self._module = None if module is None else (module,)
        self.params = self._named = None
        if module is not None and self.on is not None:
            self._named = resolve_named(module, self.on, self.owner, frozen_too=True)

    def resolve(self, values: Mapping[str, Tensor]) -> list[nn.Parameter]:
        """Return the group's trainable parameters; check that every value reaches them.

        The check (a walk of the graph) runs when the trainable parameters change: a part
        of a named group frozen or unfrozen during the fit is left out or taken back, and
        the last shared layer, once one of its parameters is frozen, is found again.
        """
        params = self.params
        if self.on is None:
            if params is not None and all(p.requires_grad for p in params):
                return params
            module = None if self._module is None else self._module[0]
            self.name, params = last_shared_layer(list(values.values()), module, self.owner)
        else:
            if self._named is None:
                raise LossMixError(
                    f"{self.owner}: `on` names parameters of the module, but the mix is not "
                    "bound to one: call `self.loss_mix.bind(self)` first (LossMixModule does "
                    "it)."
                )
            trained = [p for p in self._named if p.requires_grad]
            if params is not None and _same(trained, params):
                return params
            if not trained:
                raise LossMixError(
                    f"{self.owner}: every parameter of the group {self.name!r} is frozen "
                    "(requires_grad=False), so the terms pull on nothing there. Keep part of "
                    "it trainable, or name a trained group with `on=`."
                )
            params = trained
        check_reached(values, params, self.name, self.owner)
        self.params = params
        return params
