"""Fused projections: sibling linears that read the same input run as one matrix multiply.

Attention's query, key and value projections all read the same hidden states. Computing them
as one layer whose weight is the three weights stacked by rows (``[W_q; W_k; W_v] x``, the
fused ``qkv`` of Megatron-LM and GPT-NeoX) gives the same numbers and does the per-call work
once: for a w8a8 layer one per-token quantization of ``x`` and one int8 GEMM instead of three;
both are fixed costs that dominate at batch 1 (docs/compression.md, "Quantization").

:func:`fuse_projections` applies it from outside, without editing any forward: the group's
layers are stacked into one :class:`FusedProjection` registered on their parent, and each
original child is replaced by a :class:`ProjectionSlice` that returns its columns of the fused
output. The first slice called with an input computes the whole product and keeps it until
every slice of the group has taken its part of that same input; a slice called with any other
input (cross-attention's keys read the encoder) computes the product on it, so results never
depend on the call order. Per-channel quantization scales each output row on its own, so the
stacked int8 codes and scales are the separate layers' ones concatenated: the fused output
equals the unfused one.
"""
from __future__ import annotations

import fnmatch
import threading
from typing import Any

import torch
from torch import Tensor, nn

from bmray.models.compress.quant import QuantLinear, replace_module
from bmray.models.typed_config import ConfigError

__all__ = ["PROJECTION_GROUPS", "FusedProjection", "ProjectionSlice", "stack_linears",
           "fuse_projections"]

# child names of one module that read the same input: HF BERT's self-attention, our layers'
PROJECTION_GROUPS: tuple[tuple[str, ...], ...] = (("query", "key", "value"),
                                                  ("q_proj", "k_proj", "v_proj"))


def _concat_bias(layers: list[nn.Module]) -> Tensor | None:
    if all(m.bias is None for m in layers):
        return None
    return torch.cat([m.bias.detach().float() if m.bias is not None
                      else torch.zeros(m.out_features, device=_device(m)) for m in layers])


def _device(m: nn.Module) -> torch.device:
    return m.weight_q.device if isinstance(m, QuantLinear) else m.weight.device


@torch.no_grad()
def stack_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer computing ``layers`` side by side: rows (output features) concatenated in
    order; a missing bias is zeros. All ``nn.Linear`` or all :class:`QuantLinear` of one
    scheme (and group size), with one ``in_features``; anything else is a ConfigError."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1 or not kinds <= {nn.Linear, QuantLinear}:
        raise ConfigError(f"fuse: layers must be all nn.Linear or all QuantLinear, got "
                          f"{[type(m).__name__ for m in layers]}")
    in_f = {m.in_features for m in layers}
    if len(in_f) != 1:
        raise ConfigError(f"fuse: layers read inputs of different widths {sorted(in_f)}")
    widths = [m.out_features for m in layers]
    bias = _concat_bias(layers)
    if kinds == {nn.Linear}:
        weight = torch.cat([m.weight.detach() for m in layers])
        out = nn.Linear(in_f.pop(), sum(widths), bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
            out.bias.requires_grad_(any(m.bias is not None and m.bias.requires_grad
                                        for m in layers))
        out.weight.requires_grad_(any(m.weight.requires_grad for m in layers))
        return out
    schemes = {(m.scheme, m.group_size if m.scheme == "int4" else None) for m in layers}
    if len(schemes) != 1:
        raise ConfigError(f"fuse: QuantLinear layers of different schemes {sorted(schemes)}")
    scheme, group = schemes.pop()
    out = QuantLinear(in_f.pop(), sum(widths), bias is not None, scheme, group or 128)
    out.weight_q = torch.cat([m.weight_q for m in layers])
    out.weight_scale = torch.cat([m.weight_scale for m in layers])
    out.bias = bias
    return out


class FusedProjection(nn.Module):
    """``layer`` (the stacked weight) and the output widths of the projections it holds."""

    def __init__(self, layer: nn.Module, widths: tuple[int, ...]):
        super().__init__()
        self.layer = layer
        self.widths = tuple(widths)
        bounds = [0]
        for w in self.widths:
            bounds.append(bounds[-1] + w)
        self.bounds = tuple(bounds)
        self._cache: dict[int, list[Any]] = {}     # thread id → [x, version, output, taken]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def part(self, x: Tensor, index: int) -> Tensor:
        """Projection ``index`` of ``x``: columns of the fused output, computed once per input
        and kept until every projection of the group has taken its part."""
        key = threading.get_ident()
        version = None if x.is_inference() else x._version
        entry = self._cache.get(key)
        if entry is None or entry[0] is not x or entry[1] != version or index in entry[3]:
            entry = self._cache[key] = [x, version, self.layer(x), set()]
        entry[3].add(index)
        out = entry[2][..., self.bounds[index]:self.bounds[index + 1]]
        if len(entry[3]) == len(self.widths):      # every part taken: drop the references
            del self._cache[key]
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def extra_repr(self) -> str:
        return f"widths={self.widths}"


class ProjectionSlice(nn.Module):
    """Stands in for one projection of a fused group: output columns ``bounds[i]:bounds[i+1]``
    of its :class:`FusedProjection` (held by reference, not as a child: its weights are saved
    once, under the parent's fused name)."""

    def __init__(self, fused: FusedProjection, index: int, fused_name: str):
        super().__init__()
        self.__dict__["fused"] = fused               # not a submodule
        self.index, self.fused_name = index, fused_name
        self.in_features = fused.layer.in_features
        self.out_features = fused.widths[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        lo, hi = self.fused.bounds[self.index], self.fused.bounds[self.index + 1]
        return f"{self.fused_name}[..., {lo}:{hi}]"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def fuse_projections(model: nn.Module,
                     groups: tuple[tuple[str, ...], ...] = PROJECTION_GROUPS,
                     skip: tuple[str, ...] = ("*cross*",)) -> list[str]:
    """Fuse every module's children named as one of ``groups`` (all present, each an
    ``nn.Linear`` or a :class:`QuantLinear`) into ``<parent>.<a>_<b>_<c>``; modules whose
    dotted name matches a ``skip`` glob are left alone (cross-attention: its query reads
    another input than its key and value). Returns the fused modules' names. Every group is
    checked before the first one changes; a model with no such group, or a group whose layers
    differ in kind, scheme or input width, or carry hooks (an attached delta), is a
    ConfigError."""
    plan: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        for group in groups:
            children = [getattr(module, c, None) for c in group]
            if not all(isinstance(c, (nn.Linear, QuantLinear)) for c in children):
                continue
            where = f"{name or type(model).__name__}.{{{','.join(group)}}}"
            if any(_has_hooks(c) for c in children):
                raise ConfigError(f"fuse: {where} carries hooks (an attached delta?); "
                                  f"detach them before fusing")
            plan.append((name, module, group))
    if not plan:
        raise ConfigError(f"fuse: {type(model).__name__} has no module with children "
                          f"{' or '.join('/'.join(g) for g in groups)}")
    built = []
    for name, module, group in plan:
        children = [getattr(module, c) for c in group]
        try:
            layer = stack_linears(children)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {name or type(model).__name__})") from None
        built.append((name, module, group, layer, children))
    fused_names = []
    for name, module, group, layer, children in built:
        leaf = "_".join(group)
        fused = FusedProjection(layer, tuple(c.out_features for c in children))
        setattr(module, leaf, fused)
        full = f"{name}.{leaf}" if name else leaf
        for i, child in enumerate(group):
            replace_module(module, child, ProjectionSlice(fused, i, full))
        fused_names.append(full)
    return fused_names
