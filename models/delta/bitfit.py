"""BitFit: tune only the biases (Ben Zaken et al. 2022, "BitFit: simple parameter-efficient
fine-tuning for transformer-based masked language models").

The base stays frozen: each site gets a zero-initialised trainable ``bias`` delta added to its
output, ``y = f(x; W, b) + δ``. For a module whose bias is added last along the output's last
dimension (``nn.Linear``, ``nn.LayerNorm``, ...) this is exactly training ``b``: the same outputs
for ``b + δ``, the same gradient for δ as ``b`` would get. Sites: any module with a 1-D ``bias``
parameter; a matched module without one is a ConfigError. Convolutions add their bias along the
channel dimension, not the last, and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bmray.models.delta.base import Delta, DeltaConfig, SiteDelta, match_modules
from bmray.models.delta.rows import add_at_rows
from bmray.models.typed_config import ConfigError

__all__ = ["BitFitConfig", "BitFitSite", "BitFitDelta"]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)


@dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    method: ClassVar[str] = "bitfit"
    site_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ConfigError(f"delta.targets: expected a list of patterns, got {self.targets!r}")


class BitFitSite(SiteDelta):
    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def shift(self, output: Tensor) -> Tensor:
        return self.bias

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any,
             rows: Tensor | None) -> Any:
        return add_at_rows(output, rows, self.shift, output)


class BitFitDelta(Delta):
    """A bias delta on every matched module; see the module docstring."""

    config: BitFitConfig

    def attach(self, model: nn.Module) -> "BitFitDelta":
        """Check every matched module has a bias BitFit can tune, before building any site."""
        modules = dict(model.named_modules())
        for name in match_modules(model, self.config.targets):
            module = modules[name]
            bias = getattr(module, "bias", None)
            if not isinstance(bias, nn.Parameter) or bias.dim() != 1:
                raise ConfigError(f"delta.targets: module {name!r} ({type(module).__name__}) has "
                                  f"no bias parameter for BitFit to tune")
            if isinstance(module, CONVOLUTIONS):
                raise ConfigError(f"delta.targets: module {name!r} is a convolution (bias on the "
                                  f"channel dimension); BitFit here adds along the last dimension")
        return super().attach(model)

    def build_site(self, name: str, module: nn.Module) -> BitFitSite:
        return BitFitSite(module.bias.numel())

    def site_from_tensors(self, tensors: dict[str, Tensor]) -> BitFitSite:
        """An empty site shaped like saved tensors: loading without a base."""
        return BitFitSite(tensors["bias"].shape[0])
