"""Cross-layer weight sharing (ALBERT, Lan et al. 2020): the blocks of a group use one set of
parameters.

``share_layers`` makes every module of a group hold the *same* ``nn.Parameter`` objects,
initialised as the average of the group's weights or as its first module's (``init``). Applying
the same weights at several depths is ALBERT's all-shared scheme (groups of consecutive blocks
generalise it, as Takase & Kiyono 2021's "sequence" sharing). Because the objects are shared:

* ``model.parameters()`` yields each shared parameter once, so the parameter count shrinks and
  an optimizer (the Trainer's AdamW) updates it once;
* autograd adds the gradients of its uses: d loss / d W_shared = sum over the group's layers;
* ``state_dict`` drops the aliases (only the group's first module keeps its keys) and
  ``load_state_dict`` fills them back from it, so a saved model shrinks and loads strictly.

A short recovery fine-tune then trains the shared set. Buffers are not shared (blocks hold
none that train). docs/compression.md, "Weight sharing".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bmray.models.typed_config import ConfigError, check_choice

__all__ = ["SharingConfig", "SharingResult", "consecutive_groups", "share_layers"]

INITS = ("average", "first")


@dataclass(frozen=True)
class SharingConfig:
    """``groups``: lists of module names (``blocks.0``) whose parameters become one set;
    ``init``: "average" of the group's weights or the "first" module's."""

    groups: tuple[tuple[str, ...], ...] = ()
    init: str = "average"

    def __post_init__(self) -> None:
        check_choice("sharing.init", self.init, INITS)
        if isinstance(self.groups, str) or not self.groups:
            raise ConfigError(f"sharing.groups: expected a non-empty list of module-name lists, "
                              f"got {self.groups!r}")
        seen: set[str] = set()
        for i, group in enumerate(self.groups):
            if isinstance(group, str) or len(group) < 2:
                raise ConfigError(f"sharing.groups[{i}]: a group needs at least two module names, "
                                  f"got {group!r}")
            for name in group:
                if name in seen:
                    raise ConfigError(f"sharing.groups[{i}]: {name!r} is in more than one group")
                seen.add(name)


def consecutive_groups(prefix: str, n_layers: int, group_size: int) -> tuple[tuple[str, ...], ...]:
    """``prefix.0 … prefix.{n-1}`` in runs of ``group_size`` (``group_size = n_layers``: ALBERT's
    all-shared); a last run of one module is left unshared."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"sharing.group_size: must be an integer >= 2, got {group_size!r}")
    runs = [tuple(f"{prefix}.{j}" for j in range(i, min(i + group_size, n_layers)))
            for i in range(0, n_layers, group_size)]
    return tuple(r for r in runs if len(r) >= 2)


@dataclass
class SharingResult:
    """Parameter counts (unique) before and after, and each alias key → the key that holds it."""

    params_before: int
    params_after: int
    aliases: dict[str, str] = field(default_factory=dict)


def _unique_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def share_layers(model: nn.Module, config: SharingConfig) -> SharingResult:
    """Tie the parameters of each group of ``model``'s modules (in place); every group is
    checked (names exist, same parameter names and shapes, no module inside another) before
    anything is tied."""
    modules = dict(model.named_modules())
    plans = []
    for i, group in enumerate(config.groups):
        missing = [n for n in group if n not in modules]
        if missing:
            shown = ", ".join(n for n in modules if n and n.count(".") <= missing[0].count("."))[:600]
            raise ConfigError(f"sharing.groups[{i}]: no module {missing[0]!r} in "
                              f"{type(model).__name__}; candidates: {shown}")
        for a in group:
            for b in group:
                if a != b and b.startswith(a + "."):
                    raise ConfigError(f"sharing.groups[{i}]: {b!r} is inside {a!r}")
        params = [dict(modules[n].named_parameters(remove_duplicate=False)) for n in group]
        shapes = {k: tuple(v.shape) for k, v in params[0].items()}
        for n, p in zip(group[1:], params[1:]):
            other = {k: tuple(v.shape) for k, v in p.items()}
            if other != shapes:
                diff = sorted(set(shapes.items()) ^ set(other.items()))[:4]
                raise ConfigError(f"sharing.groups[{i}]: {n!r} does not have {group[0]!r}'s "
                                  f"parameters (differ: {diff})")
        if not shapes:
            raise ConfigError(f"sharing.groups[{i}]: {group[0]!r} has no parameters to share")
        plans.append((group, params))
    before = _unique_count(model)
    aliases: dict[str, str] = {}
    for group, params in plans:
        for pname in params[0]:
            members = [p[pname] for p in params]
            with torch.no_grad():
                value = (torch.stack([m.detach() for m in members]).mean(dim=0)
                         if config.init == "average" else members[0].detach().clone())
            shared = nn.Parameter(value, requires_grad=members[0].requires_grad)
            for mname in group:
                owner, _, leaf = f"{mname}.{pname}".rpartition(".")
                setattr(model.get_submodule(owner), leaf, shared)
                if mname != group[0]:
                    aliases[f"{mname}.{pname}"] = f"{group[0]}.{pname}"
    _install_state_dict_hooks(model, aliases)
    return SharingResult(before, _unique_count(model), aliases)


def _install_state_dict_hooks(model: nn.Module, aliases: dict[str, str]) -> None:
    """Drop alias keys from ``state_dict``; copy them back from their holder on load."""
    table = getattr(model, "shared_parameter_aliases", None)
    if table is None:
        table = {}
        model.shared_parameter_aliases = table       # plain attribute: read by the hooks

        def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            for alias in table:
                state.pop(prefix + alias, None)

        def fill(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
            for alias, holder in table.items():
                if prefix + alias not in state and prefix + holder in state:
                    state[prefix + alias] = state[prefix + holder]

        model.register_state_dict_post_hook(drop)
        model.register_load_state_dict_pre_hook(fill)
    table.update(aliases)
