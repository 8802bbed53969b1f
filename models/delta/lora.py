"""LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021).

For a site ``y = W x + b`` (W: [out, in]) LoRA adds ``(alpha / r) · B A dropout(x)`` with
A: [r, in] (Kaiming-uniform, a = √5, as PEFT) and B: [out, r] (zeros), so the model starts as the
base and only r·(in + out) parameters per site train. ``merge`` folds ``(alpha / r) · B A`` into W
for inference at the base's speed; ``unmerge`` restores W bit-exactly from a copy kept aside
while merged (memory: one copy of every merged weight), or, with ``exact=False``, subtracts the
update again (equal up to float rounding, no copy needed afterwards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bmray.models.delta.base import Delta, DeltaConfig, SiteDelta, match_modules, site_name
from bmray.models.delta.rows import add_at_rows
from bmray.models.typed_config import ConfigError

__all__ = ["LoraConfig", "LoraSite", "LoraDelta"]


@dataclass(frozen=True)
class LoraConfig(DeltaConfig):
    """``rank`` r, ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the LoRA input."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    method: ClassVar[str] = "lora"
    site_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

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
    """A [r, in], B [out, r] beside one ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(config.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout)
        self.merged = False
        self.saved_weight: Tensor | None = None   # the original weight while merged (exact unmerge)

    def update(self) -> Tensor:
        """(alpha / r) · B A: the [out, in] change of the weight."""
        return (self.B @ self.A) * self.scale

    def lora(self, x: Tensor) -> Tensor:
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.t() @ self.B.t()) * self.scale

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
             rows: Tensor | None) -> Any:
        if self.merged:
            return output
        x = args[0] if args else kwargs["input"]
        return add_at_rows(output, rows, self.lora, x)


class LoraDelta(Delta):
    """LoRA on every matched ``nn.Linear``; see the module docstring."""

    config: LoraConfig

    def attach(self, model: nn.Module) -> "LoraDelta":
        """Check every matched layer can take rank r (r ≤ min(in, out)) before building."""
        modules = dict(model.named_modules())
        for name in match_modules(model, self.config.targets, LoraConfig.site_types):
            layer = modules[name]
            if self.config.rank > min(layer.in_features, layer.out_features):
                raise ConfigError(f"delta.rank: {self.config.rank} exceeds min(in, out) = "
                                  f"{min(layer.in_features, layer.out_features)} of layer {name!r} "
                                  f"({layer.in_features} -> {layer.out_features})")
        return super().attach(model)

    def build_site(self, name: str, module: nn.Module) -> LoraSite:
        return LoraSite(module.in_features, module.out_features, self.config)

    def site_from_tensors(self, tensors: dict[str, Tensor]) -> LoraSite:
        """An empty site shaped like saved tensors (``A``, ``B``): loading without a base."""
        return LoraSite(tensors["A"].shape[1], tensors["B"].shape[0], self.config)

    @property
    def merged(self) -> bool:
        return any(site.merged for site in self.sites.values())

    def _layers(self) -> list[tuple[LoraSite, nn.Linear]]:
        if not self._base_ref:
            raise RuntimeError("lora delta is not attached: nothing to merge into")
        modules = dict(self._base_ref[0].named_modules())
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
