"""Low-rank factorisation: each targeted linear replaced by two thinner ones from its SVD.

For ``y = W x + b`` with W [out, in] = U S Vᵀ (singular values σ_1 ≥ σ_2 ≥ …), the rank-r
truncation ``W_r = U_r S_r V_rᵀ`` is the best rank-r approximation in Frobenius and spectral norm
(Eckart–Young), with squared Frobenius error ``sum_{i>r} σ_i²``. It becomes two linears,
``in → r`` with weight ``S_r^½ V_rᵀ`` and ``r → out`` with weight ``U_r S_r^½`` and the original
bias (the square root split keeps both factors on one scale for recovery training), costing
``r (in + out)`` weights instead of ``in · out`` (Denton et al. 2014; Sainath et al. 2013).

The rank is per layer: a fixed ``rank`` or the smallest r that retains ``energy`` of the
spectrum, ``sum_{i≤r} σ_i² / sum_i σ_i² ≥ energy``. A layer whose factorised form would not be
smaller (``r (in + out) ≥ in · out``) is left alone and listed in the result's ``skipped``.
A weight shared with another module (tied embeddings) is refused: factorising it would untie
it. docs/compression.md, "Low-rank factorisation".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bmray.models.delta.base import match_modules
from bmray.models.typed_config import ConfigError, check_int

__all__ = ["LowRankConfig", "LowRankLinear", "LowRankResult", "choose_rank", "factorize_linear",
           "lowrank"]


@dataclass(frozen=True)
class LowRankConfig:
    """``targets``: linear module name patterns; exactly one of ``energy`` (in (0, 1]) and
    ``rank`` (≥ 1) picks each layer's rank."""

    targets: tuple[str, ...] = ()
    energy: float | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        p = "lowrank"
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"{p}.targets: expected a non-empty list of patterns, "
                              f"got {self.targets!r}")
        if (self.energy is None) == (self.rank is None):
            raise ConfigError(f"{p}: set exactly one of energy and rank, got energy={self.energy!r}, "
                              f"rank={self.rank!r}")
        if self.energy is not None and (isinstance(self.energy, bool)
                                        or not isinstance(self.energy, (int, float))
                                        or not 0 < self.energy <= 1):
            raise ConfigError(f"{p}.energy: must be a number in (0, 1], got {self.energy!r}")
        if self.rank is not None:
            check_int(f"{p}.rank", self.rank, minimum=1)


class LowRankLinear(nn.Sequential):
    """``second(first(x))``: ``first`` in → rank without bias, ``second`` rank → out with the
    original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)


def choose_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r with ``sum_{i≤r} σ_i² / sum σ_i² ≥ energy`` (σ sorted descending); a zero
    matrix gets rank 1."""
    s2 = singular_values.detach().double() ** 2
    total = s2.sum()
    if total == 0:
        return 1
    ratio = s2.cumsum(0) / total
    return min(int((ratio < energy).sum().item()) + 1, s2.numel())


def factorize_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-``rank`` SVD truncation of ``linear`` as a :class:`LowRankLinear` (computed in
    float64, stored in the layer's dtype and device)."""
    w = linear.weight.detach()
    full = min(w.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}] for a {tuple(w.shape)} weight, got {rank}")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    out = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    out.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.first.weight.copy_(root[:, None] * vh[:rank])
        out.second.weight.copy_(u[:, :rank] * root[None, :])
        if linear.bias is not None:
            out.second.bias.copy_(linear.bias.detach())
    return out


@dataclass
class LowRankResult:
    """Per layer: the rank chosen (``ranks``), or why it was left dense (``skipped``); the
    weight counts of the targeted layers before and after."""

    ranks: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0


def lowrank(model: nn.Module, config: LowRankConfig) -> LowRankResult:
    """Replace every targeted ``nn.Linear`` of ``model`` (in place) by its SVD factorisation;
    every site is checked before any is replaced."""
    names = match_modules(model, config.targets, (nn.Linear,))
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(prefix=mod_name, recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(p_name)
    for n in names:
        tied = owners[id(model.get_submodule(n).weight)]
        if len(tied) > 1:
            others = sorted(set(tied) - {n + ".weight"})
            raise ConfigError(f"lowrank.targets: {n}.weight is shared with {others}; "
                              "factorising it would untie them")
    result = LowRankResult()
    for n in names:
        linear = model.get_submodule(n)
        s = torch.linalg.svdvals(linear.weight.detach().double())
        rank = min(config.rank, s.numel()) if config.rank is not None else choose_rank(s, config.energy)
        dense = linear.in_features * linear.out_features
        small = rank * (linear.in_features + linear.out_features)
        result.params_before += dense
        if small >= dense:
            result.skipped[n] = (f"rank {rank}: {small} weights factorised >= {dense} dense")
            result.params_after += dense
            continue
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, factorize_linear(linear, rank))
        result.ranks[n] = rank
        result.params_after += small
    return result
