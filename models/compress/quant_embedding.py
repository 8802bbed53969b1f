"""Int8 embedding tables: per-row symmetric codes, only the looked-up rows dequantised.

    names = quantize_embeddings(model, targets=("word_embeddings",))

A transformer's word embedding is often the largest single tensor (the MiniLM's 30522 × 384
is half its parameters) and every Linear technique leaves it in fp32. Row ``i`` is stored as
int8 codes ``q_i = round(w_i / s_i)`` with one fp32 scale ``s_i = max_j |w_ij| / 127`` (the
symmetric absmax rule of quant.py's per-channel weights, applied per token row), so
``|w_ij - q_ij·s_i| ≤ s_i / 2``. A lookup gathers the rows' codes and scales and multiplies:
the table is never dequantised as a whole (memory stays ~1/4 of fp32 at run time, not only
on disk). The codes are buffers: the table is frozen (an embedding being trained stays fp32).

A *tied* embedding — its weight Parameter also held by another module, e.g. an MLM decoder or
a GPT ``lm_head`` — is refused with a ConfigError naming both: the output projection would
need the whole table dequantised (or an int8 GEMM over it), which is quant.py's business, and
quantizing one side silently would untie them. Skip it (``skip``) or untie it first.
docs/compression.md, "Recipes and artifacts".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.compress.quant import quantize_per_channel, replace_module
from bmray.models.delta.base import match_modules
from bmray.models.typed_config import ConfigError

__all__ = ["EmbeddingQuantConfig", "QuantEmbedding", "embedding_targets", "quantize_embeddings"]


@dataclass(frozen=True)
class EmbeddingQuantConfig:
    """``targets``: module-name patterns (as models/delta; empty = every ``nn.Embedding``);
    ``skip``: patterns excluded from them."""

    targets: tuple[str, ...] = ()
    skip: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for key in ("targets", "skip"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{key}: expected a list of module-name patterns, got {value!r}")
            object.__setattr__(self, key, tuple(value))


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` stored as int8 ``codes`` (num, dim) and fp32 row ``scale`` (num,)
    buffers; ``forward(ids) = codes[ids] · scale[ids]`` in fp32. Build one with
    :meth:`from_embedding`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim,
                                                  dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding) -> "QuantEmbedding":
        if emb.max_norm is not None:
            raise ConfigError("max_norm: an embedding that renormalises its rows on lookup "
                              "cannot be stored as fixed int8 codes")
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, scale = quantize_per_channel(emb.weight, 8)
        mod.codes.copy_(q)
        mod.scale.copy_(scale)
        return mod.to(emb.weight.device)

    def dequantized_weight(self) -> Tensor:
        """The whole fp32 table ``q·s`` (for tests and inspection; forward never builds it)."""
        return self.codes.float() * self.scale.unsqueeze(-1)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"QuantEmbedding: indices must be int64 or int32, got {ids.dtype}")
        rows = F.embedding(ids, self.codes)                 # gathers int8 rows only
        return rows.float() * F.embedding(ids, self.scale.unsqueeze(-1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        codes = state_dict.get(prefix + "codes")
        if codes is not None and codes.dtype != torch.int8:
            raise ConfigError(f"{prefix}codes: expected int8 codes, got {codes.dtype} (a float "
                              f"table would be cast silently)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8{pad}"


def _tied_owner(model: nn.Module, emb: nn.Embedding) -> str | None:
    """The name of a parameter outside ``emb`` that is ``emb.weight`` itself, if any."""
    for mname, m in model.named_modules(remove_duplicate=False):
        if m is emb:
            continue
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if p is emb.weight:
                return f"{mname}.{pname}" if mname else pname
    return None


def embedding_targets(model: nn.Module, cfg: EmbeddingQuantConfig) -> list[str]:
    """The ``nn.Embedding`` names ``cfg`` selects (a pattern matching nothing is a ConfigError
    listing the candidates); a tied one is a ConfigError naming both holders."""
    names = match_modules(model, cfg.targets or ("re:.*",), (nn.Embedding,))
    if cfg.skip:
        skipped = set(match_modules(model, cfg.skip, (nn.Embedding,)))
        names = [n for n in names if n not in skipped]
    if not names:
        raise ConfigError("targets: every embedding matched is skipped; nothing to quantize")
    modules = dict(model.named_modules())
    for n in names:
        emb = modules[n]
        if emb.max_norm is not None:
            raise ConfigError(f"targets: {n} has max_norm set; its rows are renormalised on "
                              f"lookup and cannot be fixed int8 codes")
        tied = _tied_owner(model, emb)
        if tied is not None:
            raise ConfigError(f"targets: {n}.weight is tied to {tied} (the same Parameter); "
                              f"int8 rows would untie the output projection — add {n!r} to "
                              f"skip, or untie it first")
    return names


def quantize_embeddings(model: nn.Module, targets: Iterable[str] = (),
                        skip: Iterable[str] = ()) -> list[str]:
    """Replace the selected ``nn.Embedding`` modules of ``model`` by :class:`QuantEmbedding`
    in place (all checked before any is replaced); returns their names."""
    cfg = EmbeddingQuantConfig(*(v if isinstance(v, str) else tuple(v) for v in (targets, skip)))
    names = embedding_targets(model, cfg)
    modules = dict(model.named_modules())
    for n in names:
        replace_module(model, n, QuantEmbedding.from_embedding(modules[n]))
    return names
