"""Bottleneck adapters: a small down-project / non-linearity / up-project module at a site.

* ``sequential`` (Houlsby et al. 2019, "Parameter-efficient transfer learning for NLP"): on the
  site's output h, ``h ← h + s · up(act(down(h)))``.
* ``parallel`` (He et al. 2022, "Towards a unified view of parameter-efficient transfer
  learning"): beside the site, reading its input x, ``h ← h + s · up(act(down(x)))``.

``down``: [bottleneck, d] with bias (nn.Linear's default init); ``up``: [d_out, bottleneck] with
bias, both zero, so an adapter starts as the identity and the model as the base. The scale s is 1
in Houlsby's form; He et al. tune it for the parallel form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.delta.base import Delta, DeltaConfig, SiteDelta
from bmray.models.delta.rows import add_at_rows
from bmray.models.typed_config import ConfigError, check_choice

__all__ = ["AdapterConfig", "AdapterSite", "AdapterDelta"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class AdapterConfig(DeltaConfig):
    bottleneck: int = 64
    style: Literal["sequential", "parallel"] = "sequential"
    activation: Literal["relu", "gelu"] = "relu"
    scale: float = 1.0
    method: ClassVar[str] = "adapter"
    site_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ConfigError(f"delta.targets: expected a list of patterns, got {self.targets!r}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) \
                or self.bottleneck < 1:
            raise ConfigError(f"delta.bottleneck: must be an integer >= 1, got {self.bottleneck!r}")
        check_choice("delta.style", self.style, ("sequential", "parallel"))
        check_choice("delta.activation", self.activation, tuple(ACTIVATIONS))


class AdapterSite(SiteDelta):
    """down: d_in → bottleneck, up: bottleneck → d_out (zero-initialised)."""

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig):
        super().__init__()
        self.down = nn.Linear(d_in, config.bottleneck)
        self.up = nn.Linear(config.bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.activation]
        self.scale = config.scale
        self.parallel = config.style == "parallel"

    def adapter(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))) * self.scale

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
             rows: Tensor | None) -> Any:
        x = (args[0] if args else kwargs["input"]) if self.parallel else output
        return add_at_rows(output, rows, self.adapter, x)


class AdapterDelta(Delta):
    """A bottleneck adapter on every matched ``nn.Linear``; see the module docstring."""

    config: AdapterConfig

    def build_site(self, name: str, module: nn.Module) -> AdapterSite:
        d_in = module.in_features if self.config.style == "parallel" else module.out_features
        return AdapterSite(d_in, module.out_features, self.config)

    def site_from_tensors(self, tensors: dict[str, Tensor]) -> AdapterSite:
        """An empty site shaped like saved tensors: loading without a base."""
        return AdapterSite(tensors["down.weight"].shape[1], tensors["up.weight"].shape[0],
                           self.config)
