"""The contract every delta method follows: sites found by name, hooks, per-row routing.

A *delta* (Ding et al. 2023, "Parameter-efficient fine-tuning of large-scale pre-trained
language models") is a small set of trainable parameters applied to a frozen base model from
outside. Here one :class:`Delta` holds, for every *site* (a module of the base matched by name,
as OpenDelta's name-based addressing and PEFT's ``target_modules``), a :class:`SiteDelta` with
that site's parameters and what it does there: rewrite the module's inputs (``pre``) and/or its
output (``post``). The base is never edited: attaching registers forward hooks, detaching
removes them, so the base's parameters, buffers, ``state_dict`` keys and outputs are restored
bit-exactly.

Per-row routing (a mixed batch, one delta per row for multi-tenant serving): ``Delta.rows`` is
None (every row) or a 1-D LongTensor of batch rows this delta applies to; an empty tensor
skips the delta. Each ``SiteDelta`` honours ``rows`` so that a mixed batch equals each row run
with its own delta alone. docs/delta_tuning.md has the methods and their formulas.
"""
from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from bmray.models.typed_config import ConfigError

__all__ = ["DeltaConfig", "SiteDelta", "Delta", "match_modules", "base_identity", "site_key",
           "site_name", "bound_arguments"]

Hook = Callable[..., Any]
_SIGNATURES: dict[type, inspect.Signature] = {}    # forward's signature, per module class


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward call's arguments as one keyword dict (positional ones named by the signature),
    so a pre-hook can rewrite any of them and hand them back as ``((), kwargs)``."""
    sig = _SIGNATURES.get(type(module)) if "forward" not in vars(module) else None
    if sig is None:
        sig = inspect.signature(module.forward)
        if "forward" not in vars(module):          # not patched on this instance
            _SIGNATURES[type(module)] = sig
    out = dict(sig.bind(*args, **kwargs).arguments)
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
    return out


@dataclass(frozen=True)
class DeltaConfig:
    """What every method's config has: the target patterns. Subclasses add their own fields
    (``rank``, ``bottleneck``, ...) and set ``method`` (the registry name) and
    ``site_types`` (the module classes a pattern may select; ``()`` = any module)."""

    targets: tuple[str, ...] = ()
    method: ClassVar[str] = ""
    site_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}


def _matches(pattern: str, name: str) -> bool:
    """``re:<regex>``: the regex matches the whole dotted name; otherwise a glob (fnmatch)
    that matches the whole name or its tail after a dot (``q_proj`` selects every
    ``….q_proj``, as PEFT's suffix match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def match_modules(model: nn.Module, patterns: Iterable[str],
                  site_types: tuple[type[nn.Module], ...] = ()) -> list[str]:
    """Dotted names of the modules of ``model`` that a pattern selects, in ``named_modules``
    order. A pattern that selects nothing raises a ConfigError listing the names it could have
    selected (the modules of ``site_types``), so a typo is caught before any compute."""
    patterns = list(patterns)
    if not patterns:
        raise ConfigError("targets: at least one module name pattern is needed")
    candidates = [n for n, m in model.named_modules()
                  if n and (not site_types or isinstance(m, site_types))]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if _matches(pattern, n)]
        if not hits:
            kinds = "/".join(t.__name__ for t in site_types) or "module"
            shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
            raise ConfigError(f"targets: {pattern!r} matches no {kinds} of "
                              f"{type(model).__name__}; candidates: {shown}")
        chosen += [n for n in hits if n not in chosen]
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


def site_key(name: str) -> str:
    """A dotted module name as an ``nn.ModuleDict`` key (keys may not contain dots)."""
    return name.replace(".", ":")


def site_name(key: str) -> str:
    return key.replace(":", ".")


class SiteDelta(nn.Module):
    """A delta's parameters at one site and what it does there. Both hooks receive ``rows``
    (None = all rows, else the batch rows to change) and return their rewritten value."""

    def pre(self, module: nn.Module, args: tuple, kwargs: dict, rows: Tensor | None
            ) -> tuple[tuple, dict]:
        return args, kwargs

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
             rows: Tensor | None) -> Any:
        return output


class Delta(nn.Module):
    """One delta: a config, one :class:`SiteDelta` per matched site, and the hooks that apply
    them. Subclasses implement :meth:`build_site`; methods that act on the whole model (soft
    prompts rewrite the root's inputs) may override :meth:`attach`."""

    def __init__(self, config: DeltaConfig):
        super().__init__()
        self.config = config
        self.sites = nn.ModuleDict()
        self.rows: Tensor | None = None
        self._handles: list[Any] = []
        self._base_ref: list[nn.Module] = []          # a list: not registered as a submodule

    # ------------------------------------------------------------------ to implement
    def build_site(self, name: str, module: nn.Module) -> SiteDelta:
        raise NotImplementedError

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> "Delta":
        """Build the sites on first attach (shapes come from the matched modules), then hook
        them. Re-attaching to the same base reuses the trained parameters."""
        if self.attached:
            raise RuntimeError(f"{self.config.method} delta is already attached; detach first")
        names = match_modules(model, self.config.targets, type(self.config).site_types)
        modules = dict(model.named_modules())
        if not len(self.sites):
            for name in names:
                self.sites[site_key(name)] = self.build_site(name, modules[name])
            ref = next((p for p in model.parameters()), None)
            if ref is not None:
                self.to(device=ref.device)
        elif sorted(site_name(k) for k in self.sites) != sorted(names):
            raise ConfigError(f"{self.config.method} delta was built for sites "
                              f"{sorted(site_name(k) for k in self.sites)}, this model has {names}")
        for key, site in self.sites.items():
            self._hook(modules[site_name(key)], site)
        self._bind(model)
        return self

    def _bind(self, model: nn.Module) -> None:
        self._base_ref[:] = [model]

    @property
    def base(self) -> nn.Module | None:
        """The model this delta is attached to (None when detached)."""
        return self._base_ref[0] if self._base_ref else None

    def _hook(self, module: nn.Module, site: SiteDelta) -> None:
        def pre(mod, args, kwargs):
            return site.pre(mod, args, kwargs, self.rows) if self._active() else None

        def post(mod, args, kwargs, output):
            return site.post(mod, args, kwargs, output, self.rows) if self._active() else None

        if type(site).pre is not SiteDelta.pre:
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if type(site).post is not SiteDelta.post:
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _active(self) -> bool:
        return self.rows is None or self.rows.numel() > 0

    def detach(self) -> None:
        """Remove every hook; the base is as it was before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._base_ref.clear()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def base_identity(model: nn.Module) -> dict[str, Any]:
    """The base model's identity for a delta's manifest: its class, its config when it has one
    (our families' ``config`` dataclass or a ``transformers`` config) and a SHA-256 over its
    parameters and buffers (names, shapes, dtypes and bytes, in ``state_dict`` order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        cfg = asdict(cfg)
    return {"class": type(model).__name__,
            "config": json.loads(json.dumps(cfg, default=str)) if cfg is not None else None,
            "weights_sha256": h.hexdigest()}
