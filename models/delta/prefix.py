"""Prefix-tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every matched attention module gets ``length`` P trainable key and value vectors in front of
its own: ``head_i = softmax(q_i [P_k; K_i]^T / sqrt(d_head)) [P_v; V_i]``. During training the
prefixes are reparameterised, ``[P_k, P_v] = MLP(E)`` with ``E`` [P, d] and a d -> hidden -> 2d
tanh MLP per site (sec. 4.3: direct optimisation is unstable); :meth:`Prefix.finalize` computes
them once and drops ``E`` and the MLP (its config then says ``reparam_hidden=0``).

Where it hooks in: our ``MultiHeadAttention`` takes the prefix as ``past_kv`` (prepended to a
given cache) with ``key_padding_mask`` extended by P columns; the returned cache drops the
prefix again, so a model's KV cache and its positions never see it. ``transformers``'
``BertSelfAttention`` gets it through its ``cache`` argument (an object whose ``update``
prepends the prefix) and its 4-D attention mask extended by P columns. Rows not routed to the
delta see the prefix columns masked out, so they compute the bare base. docs/delta_prompts.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertSelfAttention

from bmray.models.delta.base import Delta, DeltaConfig, SiteDelta, bound_arguments
from bmray.models.delta.rows import row_flags
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.typed_config import ConfigError, check_int

__all__ = ["PrefixConfig", "Prefix", "PrefixSite", "PrefixCache"]




@dataclass(frozen=True)
class PrefixConfig(DeltaConfig):
    """``length``: prefix vectors per site; ``reparam_hidden``: the MLP's hidden width (0 = the
    prefixes are trained directly)."""

    targets: tuple[str, ...] = ("*",)
    length: int = 10
    reparam_hidden: int = 512
    method: ClassVar[str] = "prefix"
    site_types: ClassVar[tuple[type[nn.Module], ...]] = (MultiHeadAttention, BertSelfAttention)

    def __post_init__(self) -> None:
        check_int("prefix.length", self.length, minimum=1)
        check_int("prefix.reparam_hidden", self.reparam_hidden, minimum=0)


class PrefixCache:
    """Stands in for a ``transformers`` cache: ``update`` returns the prefix followed by the
    layer's keys/values and stores nothing (chained when several prefixes share a layer)."""

    def __init__(self, k: Tensor, v: Tensor, inner: Any = None):
        self.k, self.v, self.inner = k, v, inner

    def update(self, k: Tensor, v: Tensor, layer_idx: Any = None, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(k, v, layer_idx, **kwargs)
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)


class PrefixSite(SiteDelta):
    """The prefix of one attention module: ``E`` + MLP, or the prefix itself ``[2, P, d]``."""

    def __init__(self, d_model: int, d_head: int, length: int, hidden: int, hf: bool):
        super().__init__()
        self.d_head, self.length, self.hf = d_head, length, hf
        if hidden:
            self.embedding = nn.Parameter(torch.randn(length, d_model))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * d_model))
        else:
            self.prefix = nn.Parameter(torch.randn(2, length, d_model) * 0.02)

    def key_values(self) -> tuple[Tensor, Tensor]:
        """(P_k, P_v), each [n_heads, P, d_head]."""
        kv = self.prefix if not hasattr(self, "mlp") else \
            self.mlp(self.embedding).view(self.length, 2, -1).transpose(0, 1)
        kv = kv.view(2, self.length, -1, self.d_head).transpose(1, 2)
        return kv[0], kv[1]

    def finalize(self) -> None:
        with torch.no_grad():
            k, v = self.key_values()
            prefix = torch.stack([k, v]).transpose(1, 2).reshape(2, self.length, -1)
        del self.mlp, self.embedding
        self.prefix = nn.Parameter(prefix.clone())

    def pre(self, module, args, kwargs, rows):
        kw = bound_arguments(module, args, kwargs)
        x = kw["hidden_states"] if self.hf else kw["x"]
        b, p = x.size(0), self.length
        pk, pv = (t.to(x.dtype).unsqueeze(0).expand(b, -1, -1, -1) for t in self.key_values())
        flags = None if rows is None else row_flags(b, rows, x.device)
        if self.hf:
            if kw.get("encoder_hidden_states") is not None or \
                    (kw.get("cache") is not None and not isinstance(kw["cache"], PrefixCache)):
                raise ValueError("prefix-tuning on a transformers attention supports encoder "
                                 "self-attention without a KV cache")
            kw["cache"] = PrefixCache(pk, pv, kw.get("cache"))
            kw["attention_mask"] = extend_4d_mask(kw.get("attention_mask"), flags, b, x.size(1),
                                                  p, x.dtype)
            return (), kw
        past = kw.get("past_kv")
        kw["past_kv"] = (pk, pv) if past is None else (torch.cat([pk, past[0]], 2),
                                                       torch.cat([pv, past[1]], 2))
        mask = kw.get("key_padding_mask")
        if mask is not None or flags is not None:
            src = kw.get("context") if kw.get("context") is not None else x
            t_k = src.size(1) + (past[0].size(2) if past is not None else 0)
            mask = torch.ones(b, t_k, dtype=torch.bool, device=x.device) if mask is None \
                else mask.to(torch.bool)
            cols = (flags if flags is not None else torch.ones(b, dtype=torch.bool,
                                                               device=x.device))
            kw["key_padding_mask"] = torch.cat([cols[:, None].expand(b, p), mask], dim=1)
        return (), kw

    def post(self, module, args, kwargs, output, rows):
        if self.hf or output[1] is None:
            return output
        k, v = output[1]          # the prefixes sit in front: drop this site's P columns
        return output[0], (k[:, :, self.length:], v[:, :, self.length:])


def extend_4d_mask(mask: Tensor | None, flags: Tensor | None, b: int, t_q: int, p: int,
                   dtype: torch.dtype) -> Tensor | None:
    """A ``transformers`` attention mask [B|1, 1, T_q, T_k] (bool: True = attend, or additive
    float) with P prefix columns in front: open for routed rows, closed for the others."""
    if mask is None and flags is None:
        return None
    if mask is None:
        mask = torch.ones(b, 1, t_q, t_q, dtype=torch.bool, device=flags.device)
    mask = mask.expand(b, -1, t_q, -1)
    keep = flags if flags is not None else torch.ones(b, dtype=torch.bool, device=mask.device)
    keep = keep[:, None, None, None].expand(b, 1, t_q, p)
    if mask.dtype == torch.bool:
        cols = keep
    else:
        cols = torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~keep, torch.finfo(mask.dtype).min)
    return torch.cat([cols, mask], dim=-1)


class Prefix(Delta):
    """Prefix-tuning over the matched attention modules (every one by default)."""

    config: PrefixConfig

    def build_site(self, name: str, module: nn.Module) -> PrefixSite:
        cfg = self.config
        if isinstance(module, BertSelfAttention):
            d, d_head, hf = module.all_head_size, module.attention_head_size, True
        else:
            d, d_head, hf = module.k_proj.out_features, module.d_head, False
        return PrefixSite(d, d_head, cfg.length, cfg.reparam_hidden, hf)

    def finalize(self) -> "Prefix":
        """Compute the prefixes once and drop the reparameterising MLP (after training)."""
        if self.config.reparam_hidden:
            if not len(self.sites):
                raise ConfigError("prefix: finalize() needs the delta attached once (its sites "
                                  "are built from the model)")
            for site in self.sites.values():
                site.finalize()
            self.config = replace(self.config, reparam_hidden=0)
        return self
