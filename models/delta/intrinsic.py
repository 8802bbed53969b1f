"""Intrinsic prompt tuning (Qin et al. 2021, "Exploring Universal Intrinsic Task Subspace via
Prompt Tuning").

Soft prompts trained on several tasks are found to lie near a common low-dimensional subspace;
a new task then tunes only ``d_I`` coordinates in it: ``prompt = mean + U z`` with ``U``
[P*D, d_I] fixed and only ``z`` [d_I] trainable (the paper reaches most of prompt tuning's
accuracy with d_I = 250).

Finding the subspace: the paper trains a nonlinear autoencoder on the task prompts. We take its
linear optimum instead: for a linear autoencoder with squared reconstruction error, the best
d_I-dimensional code spans the top d_I principal directions of the centred prompts (Baldi &
Hornik 1989), i.e. the first right-singular vectors of the SVD. That is closed-form,
deterministic and needs no training or tuning on the handful of prompts a user usually has
(where a nonlinear decoder would overfit); a prompt inside the span is reconstructed exactly.
The price: n prompts span at most n - 1 centred directions, so d_I <= n - 1.

``IntrinsicPrompt`` is a :class:`SoftPrompt` whose vectors come from ``z``; it hooks in, routes
rows and treats positions exactly as a soft prompt. ``U`` and the mean are buffers left out of
the delta's state (the delta saves ``z`` alone); the subspace is its own safetensors file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bmray.models.delta.base import SiteDelta
from bmray.models.delta.soft_prompt import SoftPrompt, SoftPromptConfig
from bmray.models.typed_config import ConfigError, check_int

__all__ = ["IntrinsicSubspace", "IntrinsicPromptConfig", "IntrinsicPrompt", "IntrinsicSite"]

FORMAT = "bmray.intrinsic_subspace"


class IntrinsicSubspace:
    """``mean`` [P, D] and an orthonormal ``basis`` [P*D, dim] of trained soft prompts."""

    def __init__(self, mean: Tensor, basis: Tensor):
        if mean.dim() != 2 or basis.dim() != 2 or basis.size(0) != mean.numel():
            raise ValueError(f"subspace: mean [P, D] and basis [P*D, dim] expected, got "
                             f"{tuple(mean.shape)} and {tuple(basis.shape)}")
        self.mean, self.basis = mean.float(), basis.float()

    @property
    def length(self) -> int:
        return self.mean.size(0)

    @property
    def width(self) -> int:
        return self.mean.size(1)

    @property
    def dim(self) -> int:
        return self.basis.size(1)

    @classmethod
    def fit(cls, prompts: list[Tensor], dim: int) -> "IntrinsicSubspace":
        """PCA of the flattened prompts (each [P, D], one per task): mean + top-``dim``
        right-singular vectors of the centred matrix."""
        check_int("intrinsic_prompt.dim", dim, minimum=1)
        if len(prompts) < 2:
            raise ValueError(f"subspace: at least 2 task prompts are needed, got {len(prompts)}")
        shapes = {tuple(p.shape) for p in prompts}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"subspace: every prompt must be [P, D] of one shape, got {shapes}")
        if dim > len(prompts) - 1:
            raise ConfigError(f"intrinsic_prompt.dim: {dim} > {len(prompts)} prompts - 1; "
                              f"{len(prompts)} centred prompts span at most {len(prompts) - 1} "
                              f"directions (fit more task prompts or lower dim)")
        x = torch.stack([p.detach().double().reshape(-1) for p in prompts])
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        return cls(mean.view(prompts[0].shape), vh[:dim].T.contiguous())

    def project(self, prompt: Tensor) -> Tensor:
        """z = U^T (vec(prompt) - mean)."""
        return self.basis.T @ (prompt.float() - self.mean).reshape(-1)

    def reconstruct(self, z: Tensor) -> Tensor:
        """mean + U z, [P, D]."""
        return self.mean + (self.basis @ z).view_as(self.mean)

    def save(self, path: str | Path) -> None:
        save_file({"mean": self.mean.contiguous(), "basis": self.basis.contiguous()}, str(path),
                  metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: str | Path) -> "IntrinsicSubspace":
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path} is not an intrinsic subspace file (format "
                                 f"{(f.metadata() or {}).get('format')!r})")
        t = load_file(str(path))
        return cls(t["mean"], t["basis"])


@dataclass(frozen=True)
class IntrinsicPromptConfig(SoftPromptConfig):
    """``dim``: d_I; ``subspace``: the saved subspace file (or pass the subspace itself)."""

    dim: int = 250
    subspace: str = ""
    method: ClassVar[str] = "intrinsic_prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{self.method}.dim", self.dim, minimum=1)


class IntrinsicSite(SiteDelta):
    """Only ``z`` trains; the prompt is ``mean + U z``."""

    def __init__(self, subspace: IntrinsicSubspace, dtype: torch.dtype):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(subspace.dim, dtype=dtype))
        self.register_buffer("mean", subspace.mean.to(dtype), persistent=False)
        self.register_buffer("basis", subspace.basis.to(dtype), persistent=False)

    def vectors(self) -> Tensor:
        return self.mean + (self.basis @ self.z).view_as(self.mean)


class IntrinsicPrompt(SoftPrompt):
    """A soft prompt with d_I free parameters in a fitted subspace (z = 0: the mean prompt)."""

    config: IntrinsicPromptConfig

    def __init__(self, config: IntrinsicPromptConfig, subspace: IntrinsicSubspace | None = None):
        super().__init__(config)
        if subspace is None:
            if not config.subspace:
                raise ConfigError(f"{config.method}.subspace: give a subspace file or the "
                                  f"IntrinsicSubspace itself")
            subspace = IntrinsicSubspace.load(config.subspace)
        if (subspace.dim, subspace.length) != (config.dim, config.length):
            raise ConfigError(f"{config.method}: config says dim={config.dim}, "
                              f"length={config.length}; the subspace has dim={subspace.dim}, "
                              f"length={subspace.length}")
        self.subspace = subspace

    def build_site(self, name: str, module: nn.Module) -> IntrinsicSite:
        if module.weight.size(1) != self.subspace.width:
            raise ConfigError(f"{self.config.method}: the subspace's prompts are "
                              f"{self.subspace.width} wide, {name} embeds "
                              f"{module.weight.size(1)}")
        return IntrinsicSite(self.subspace, module.weight.dtype)
