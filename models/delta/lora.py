"""LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021).

For a site ``y = W x + b`` (W: [out, in]) LoRA adds ``(alpha / r) · B A dropout(x)`` with
A: [r, in] (Kaiming-uniform, a = √5, as PEFT) and B: [out, r] (zeros), so the model starts as the
base and only r·(in + out) parameters per site train. ``merge`` folds ``(alpha / r) · B A`` into W
for inference at the base's speed; ``unmerge`` restores W bit-exactly from a copy kept aside
while merged (memory: one copy of every merged weight), or, with ``exact=False``, subtracts the
update again (equal up to float rounding, no copy needed afterwards).

A site may also be a :class:`ShardedLinear` (a tensor-parallel layer holding one shard of W):
A and B are drawn full-size (the single process's draws), then the factor matching W's split is
cut to this rank's shard (``LoraSite.shard``); the layer computes the rank-r code ``x Aᵀ``
whole on every rank. docs/tensor_parallel.md ("LoRA on parallel layers") has the split.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bmray.models.delta.base import (Delta, DeltaConfig, SiteDelta, match_modules, site_key,
                                     site_name)
from bmray.models.delta.rows import add_at_rows
from bmray.models.typed_config import ConfigError

__all__ = ["LoraConfig", "LoraSite", "LoraDelta", "ShardedLinear", "WeightShard"]


@dataclass(frozen=True)
class WeightShard:
    """The part of a full weight W [out, in] a sharded linear holds: rows (``dim`` 0, output
    features) or columns (``dim`` 1, input features) ``[start, start + size)``."""

    dim: int
    start: int
    size: int


@runtime_checkable
class ShardedLinear(Protocol):
    """A linear layer holding one shard of a full weight W [out_features, in_features] (a
    tensor-parallel layer); ``in_features``/``out_features`` are the full sizes. LoRA asks it:

    * ``weight_shard()``: which rows or columns of W it holds (a ConfigError if LoRA cannot
      follow its layout);
    * ``low_rank(x, A, dropout)``: ``dropout(X) Aᵀ`` for the layer's full input X, whole on every
      rank with correct gradients for x and A, from this rank's input x and A (full when W is
      split by rows, its columns when W is split by columns)."""

    def weight_shard(self) -> WeightShard: ...

    def low_rank(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor: ...


@dataclass(frozen=True)
class LoraConfig(DeltaConfig):
    """``rank`` r, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the LoRA input."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    method: ClassVar[str] = "lora"
    site_types: ClassVar[tuple[type, ...]] = (nn.Linear, ShardedLinear)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ConfigError(f"delta.targets: expected a list of patterns, got {self.targets!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"delta.rank: must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"delta.alpha: must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"delta.dropout: must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraSite(SiteDelta):
    """A [r, in], B [out, r] beside one ``nn.Linear`` — or, after :meth:`shard`, this rank's
    part of them beside a :class:`ShardedLinear` (``tp_dims``: factor name -> split dim, the
    attribute tensor-parallel checkpoints read to gather the shards)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(config.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout)
        self.merged = False
        self.saved_weight: Tensor | None = None   # the original weight while merged (exact unmerge)
        self.split: WeightShard | None = None   # set by shard()

    @torch.no_grad()
    def shard(self, shard: WeightShard) -> None:
        """Keep this rank's part: W split by rows (output features) splits B's rows, W split by
        columns (input features) splits A's columns; the other factor stays whole. Then
        ``update() = B A`` is exactly this rank's shard of the full update."""
        if self.split is not None:
            raise RuntimeError(f"lora site is already sharded ({self.split})")
        name = "B" if shard.dim == 0 else "A"
        full = getattr(self, name)
        part = full.narrow(shard.dim, shard.start, shard.size).clone()
        setattr(self, name, nn.Parameter(part, requires_grad=full.requires_grad))
        self.split, self.tp_dims = shard, {name: shard.dim}

    def update(self) -> Tensor:
        """(alpha / r) · B A: the [out, in] change of the weight (of this rank's shard of it)."""
        return (self.B @ self.A) * self.scale

    def lora(self, x: Tensor, module: nn.Module | None = None) -> Tensor:
        if self.split is not None:                 # the layer makes the code whole
            code = module.low_rank(x.to(self.A.dtype), self.A, self.dropout)
            return (code @ self.B.t()) * self.scale
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.t() @ self.B.t()) * self.scale

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
             rows: Tensor | None) -> Any:
        if self.merged:
            return output
        x = args[0] if args else kwargs["input"]
        if self.split is not None:                 # a tensor-parallel shard: the layer's own path
            return add_at_rows(output, rows, functools.partial(self.lora, module=module), x)
        if rows is None and output.dtype == self.A.dtype:
            return self.add_fused(output, x)
        return add_at_rows(output, rows, self.lora, x, inplace=True)

    def add_fused(self, output: Tensor, x: Tensor) -> Tensor:
        """``output + scale · (dropout(x) Aᵀ) Bᵀ`` as one ``addmm``: the scale and the sum ride
        in the second matmul (no [tokens, out] temporaries for them, forward or backward); in
        place on the layer's fresh output when autograd is off."""
        xa = (self.dropout(x) @ self.A.t()).reshape(-1, self.A.shape[0])
        flat = output.reshape(-1, output.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(flat, xa, self.B.t(), alpha=self.scale).view(output.shape)
        return flat.addmm_(xa, self.B.t(), alpha=self.scale).view(output.shape)


class LoraDelta(Delta):
    """LoRA on every matched ``nn.Linear`` or ``ShardedLinear``; see the module docstring."""

    config: LoraConfig

    def attach(self, model: nn.Module) -> "LoraDelta":
        """Check before building: every matched layer can take rank r (r ≤ min(in, out), full
        sizes for a sharded layer) and a sharded layer's layout is one LoRA can follow.
        Re-attaching full-size sites to sharded layers (the base was made tensor-parallel in
        between) cuts them to this rank's shard; other shape mismatches are refused."""
        if self.attached:
            return super().attach(model)                     # refuses
        modules = dict(model.named_modules())
        names = match_modules(model, self.config.targets, LoraConfig.site_types)
        to_cut = []
        for name in names:
            layer = modules[name]
            if self.config.rank > min(layer.in_features, layer.out_features):
                raise ConfigError(f"delta.rank: {self.config.rank} exceeds min(in, out) = "
                                  f"{min(layer.in_features, layer.out_features)} of layer {name!r} "
                                  f"({layer.in_features} -> {layer.out_features})")
            shard = layer.weight_shard() if isinstance(layer, ShardedLinear) else None
            site = self.sites[site_key(name)] if site_key(name) in self.sites else None
            if site is None or site.split == shard:
                continue
            full_size = (site.A.shape == (self.config.rank, layer.in_features)
                         and site.B.size(0) == layer.out_features)
            if site.split is not None or not full_size:
                raise ConfigError(f"lora site {name!r} holds A {tuple(site.A.shape)}, B "
                                  f"{tuple(site.B.shape)} (shard {site.split}); the layer there "
                                  f"is {layer.in_features} -> {layer.out_features}, shard {shard}")
            to_cut.append((site, shard))
        if sorted(site_name(k) for k in self.sites) == sorted(names):   # else attach refuses
            for site, shard in to_cut:
                site.shard(shard)
        return super().attach(model)

    def build_site(self, name: str, module: nn.Module) -> LoraSite:
        """Full-size factors (the single process's random draws); cut to this rank's shard
        beside a sharded layer."""
        site = LoraSite(module.in_features, module.out_features, self.config)
        if isinstance(module, ShardedLinear):
            site.shard(module.weight_shard())
        return site

    def site_from_tensors(self, tensors: dict[str, Tensor]) -> LoraSite:
        """An empty site shaped like saved tensors (``A``, ``B``): loading without a base."""
        return LoraSite(tensors["A"].shape[1], tensors["B"].shape[0], self.config)

    @property
    def merged(self) -> bool:
        return any(site.merged for site in self.sites.values())

    def _layers(self) -> list[tuple[LoraSite, nn.Linear]]:
        if self.base is None:
            raise RuntimeError("lora delta is not attached: nothing to merge into")
        modules = dict(self.base.named_modules())
        return [(site, modules[site_name(key)]) for key, site in self.sites.items()]

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + (alpha / r) · B A in place, keeping the original W aside; the hook is off."""
        if self.merged:
            raise RuntimeError("lora delta is already merged")
        for site, layer in self._layers():
            site.saved_weight = layer.weight.detach().clone()
            layer.weight.add_(site.update().to(layer.weight.dtype))
            site.merged = True

    @torch.no_grad()
    def unmerge(self, exact: bool = True) -> None:
        """Restore W: bit-exactly from the kept copy, or (``exact=False``) W - (alpha / r) · B A."""
        for site, layer in self._layers():
            if not site.merged:
                continue
            if exact:
                layer.weight.copy_(site.saved_weight)
            else:
                layer.weight.sub_(site.update().to(layer.weight.dtype))
            site.saved_weight = None
            site.merged = False
