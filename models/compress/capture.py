"""Hidden states and attention maps of a transformer, read from outside by forward hooks.

Distillation compares a student's and a teacher's intermediate layers (TinyBERT, Jiao et al.
2020; MiniLM, Wang et al. 2020) without either model file knowing: a hook on each block
records its output (the hidden state), hooks on the self-attention's query and key
projections record Q and K, and the attention probabilities are computed from them as
``softmax(Q Kᵀ / √d_head + mask)`` (Vaswani et al. 2017, eq. 1) with the model's own mask
convention (``build_attention_mask``: causal and key padding). The blocks are those of
``block_lists`` (our families, ``models.structure.find_blocks``) or, for a ``transformers``
encoder such as the MiniLM, its ``encoder.layer`` list; the attention of a block is our
:class:`MultiHeadAttention` (``attn.q_proj`` / ``attn.k_proj``) or a BERT layer's
``attention.self.query`` / ``.key``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bmray.models.layers.attention import MultiHeadAttention, build_attention_mask
from bmray.models.structure import find_blocks
from bmray.models.typed_config import ConfigError

__all__ = ["AttentionSite", "Capture", "attention_probs", "attention_site", "block_list_paths",
           "blocks_of", "check_layers", "hidden_width", "one_block_list"]

HF_ENCODER_LIST = "encoder.layer"       # a transformers BERT-style encoder's blocks


def block_list_paths(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the model's block lists: ``model.block_lists`` or, for a model without
    one (a ``transformers`` encoder, possibly wrapped), the first ``…encoder.layer`` list."""
    lists = getattr(model, "block_lists", None)
    if lists:
        return tuple(lists)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (name == HF_ENCODER_LIST
                                             or name.endswith("." + HF_ENCODER_LIST)):
            return (name,)
    raise ValueError(f"{type(model).__name__} has no `block_lists` and no "
                     f"'{HF_ENCODER_LIST}' ModuleList: pass block_list= naming its blocks")


def one_block_list(model: nn.Module, block_list: str | None = None) -> str:
    """The one block list distillation reads: ``block_list`` if given, else the model's only
    one (a model with several, ELECTRA or T5, must name it)."""
    if block_list is not None:
        return block_list
    paths = block_list_paths(model)
    if len(paths) != 1:
        raise ValueError(f"{type(model).__name__} has block lists {list(paths)}: pass "
                         f"block_list= naming the one to distil")
    return paths[0]


def blocks_of(model: nn.Module, block_list: str | None = None) -> list[nn.Module]:
    """The blocks of the model's one block list (see :func:`one_block_list`), in order."""
    return [b for _, b in find_blocks(model, [one_block_list(model, block_list)])]


@dataclass(frozen=True)
class AttentionSite:
    """Where a block's self-attention computes Q and K, and how it combines them."""

    query: nn.Module
    key: nn.Module
    d_head: int
    causal: bool

    @property
    def n_heads(self) -> int:
        return self.query.out_features // self.d_head


def attention_site(block: nn.Module) -> AttentionSite:
    """The self-attention of one block: ours (``attn``) or a BERT layer's (``attention.self``)."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, MultiHeadAttention):
        return AttentionSite(attn.q_proj, attn.k_proj, attn.d_head, attn.causal)
    self_attn = getattr(getattr(block, "attention", None), "self", None)
    if self_attn is not None and all(hasattr(self_attn, a) for a in
                                     ("query", "key", "attention_head_size")):
        return AttentionSite(self_attn.query, self_attn.key, int(self_attn.attention_head_size),
                             bool(getattr(self_attn, "is_causal", False)))
    raise ValueError(f"{type(block).__name__}: no self-attention found (expected `attn` of type "
                     f"MultiHeadAttention or a BERT layer's `attention.self.query/key`)")


def hidden_width(block: nn.Module) -> int:
    """The width of the residual stream a block reads and writes (its query's input)."""
    return attention_site(block).query.in_features


def attention_probs(q: Tensor, k: Tensor, d_head: int, causal: bool = False,
                    key_padding_mask: Tensor | None = None) -> Tensor:
    """[B, H, T, T] attention probabilities from projected Q, K [B, T, H·d_head]: softmax of
    ``Q Kᵀ / √d_head`` over the visible keys (fp32). A query with no visible key is opened
    to all keys, as the model's own mask does (``build_attention_mask``)."""
    b, t, _ = q.shape
    qh = q.float().view(b, t, -1, d_head).transpose(1, 2)
    kh = k.float().view(b, k.size(1), -1, d_head).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(d_head)
    mask = build_attention_mask(t, kh.size(2), causal, key_padding_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _first(output: Any) -> Tensor:
    """A block's hidden state: the output, or its first element (ours return a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Capture:
    """Hooks on ``layers`` of a model's blocks recording their hidden states (``hidden``:
    layer → [B, T, D]) and their Q / K (for :meth:`attention`). Records stay attached to the
    autograd graph (a student's losses back-propagate through them); :meth:`clear` drops
    them, :meth:`remove` takes the hooks off (the model is then as before)."""

    def __init__(self, model: nn.Module, layers: Iterable[int], *, hidden: bool = True,
                 attention: bool = False, block_list: str | None = None) -> None:
        blocks = blocks_of(model, block_list)
        self.layers = list(layers)
        bad = [i for i in self.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} are outside {type(model).__name__}'s "
                             f"{len(blocks)} blocks")
        self.hidden: dict[int, Tensor] = {}
        self.q: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}
        self.sites: dict[int, AttentionSite] = {}
        self._handles: list[RemovableHandle] = []
        for i in self.layers:
            if hidden:
                self._handles.append(blocks[i].register_forward_hook(self._record(self.hidden, i)))
            if attention:
                site = attention_site(blocks[i])
                self.sites[i] = site
                self._handles.append(site.query.register_forward_hook(self._record(self.q, i)))
                self._handles.append(site.key.register_forward_hook(self._record(self.k, i)))

    @staticmethod
    def _record(store: dict[int, Tensor], i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[i] = _first(output)
        return hook

    def attention(self, layer: int, key_padding_mask: Tensor | None = None) -> Tensor:
        """Layer ``layer``'s attention probabilities [B, H, T, T] of the last forward."""
        if layer not in self.q or layer not in self.k:
            raise KeyError(f"no attention recorded for layer {layer} (recorded: "
                           f"{sorted(self.q)}); was attention=True and did a forward run?")
        site = self.sites[layer]
        return attention_probs(self.q[layer], self.k[layer], site.d_head, site.causal,
                               key_padding_mask)

    def clear(self) -> None:
        self.hidden.clear()
        self.q.clear()
        self.k.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_layers(layers: Sequence[int], n_blocks: int, key: str) -> list[int]:
    """``layers`` as a list of distinct ints in [0, n_blocks), else ConfigError naming ``key``."""
    out = list(layers)
    if not out:
        raise ConfigError(f"{key}: at least one layer is needed")
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks:
            raise ConfigError(f"{key}: {i!r} is not a layer index in [0, {n_blocks})")
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: {out} repeats a layer")
    return out
