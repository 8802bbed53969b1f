"""Scaled dot-product and multi-head attention (Vaswani et al. 2017, sec. 3.2).

* ``scaled_dot_product_attention_reference``: eq. 1, ``softmax(Q K^T / sqrt(d_k)) V``, written out
  so tests can check the fused ``F.scaled_dot_product_attention`` the modules use against it.
* ``MultiHeadAttention``: eq. on p. 5, ``Concat(head_1..head_h) W^O`` with
  ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``. One class covers the three uses in the paper:
  encoder self-attention, masked (causal) decoder self-attention (``causal=True``) and
  encoder-decoder cross-attention (``context=`` the encoder output).

Tensor parallelism is applied from outside (Megatron-LM, Shoeybi et al. 2019): Q/K/V are split by
heads (column parallel) and ``out_proj`` by rows, so the four projections are separate
``nn.Linear`` modules named ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, and the head count is
read from ``q_proj``'s output width at run time (a column-sharded ``q_proj`` holds fewer heads,
and so does one whose heads structured pruning removed: ``n_heads * d_head`` may differ from
``d_model``).

Masks: boolean, ``True`` = may attend (the convention of ``F.scaled_dot_product_attention``).
A padding mask is ``[B, T_k]`` with ``True``/1 for real tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = tuple[Tensor, Tensor]   # (k, v), each [B, n_heads, T, d_head]


class KVBuffer(tuple):
    """A preallocated KV cache of one layer: new keys/values are written in place.

    ``torch.cat`` onto a tuple cache copies the whole cache at every decoding step; a buffer of
    ``capacity`` positions allocated once writes only the new ones (as HF's ``StaticCache``).
    It reads like the ``(k, v)`` tuple: ``buf[0]``, ``buf[1]`` and iteration give views of the
    filled part, and it is a ``tuple`` so code that walks nested tuples of tensors (the memory
    accounting of ``models.compress.streaming``) sees those views. ``MultiHeadAttention``
    appends to it and returns the same object as its present. In place: a buffer belongs to one
    decoding loop.
    """

    k: Tensor
    v: Tensor
    length: int

    def __new__(cls, k: Tensor, v: Tensor, capacity: int) -> "KVBuffer":
        b, h, t, d = k.shape
        if capacity < t:
            raise ValueError(f"KVBuffer: capacity {capacity} < the {t} positions given")
        kb, vb = k.new_empty(b, h, capacity, d), v.new_empty(b, h, capacity, v.size(-1))
        kb[:, :, :t] = k
        vb[:, :, :t] = v
        self = super().__new__(cls, (kb, vb))
        self.k, self.v, self.length = kb, vb, t
        return self

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """Write the new positions after the filled ones; the filled views (old + new)."""
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KVBuffer full: {end} positions > capacity {self.k.size(2)}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self[0], self[1]

    def index_select(self, rows: Tensor) -> "KVBuffer":
        """A new buffer of the same capacity holding rows ``rows`` (beam search reordering)."""
        return KVBuffer(self[0].index_select(0, rows), self[1].index_select(0, rows),
                        self.k.size(2))

    def __getitem__(self, i: int) -> Tensor:
        return (self.k, self.v)[i][:, :, :self.length]

    def __len__(self) -> int:
        return 2

    def __iter__(self):
        return iter((self[0], self[1]))


def scaled_dot_product_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                                           attn_mask: Tensor | None = None,
                                           is_causal: bool = False) -> Tensor:
    """``softmax(Q K^T / sqrt(d_k)) V`` (Vaswani et al. 2017, eq. 1), no fusion, no dropout.

    q: [..., T_q, d], k: [..., T_k, d], v: [..., T_k, d_v]. ``attn_mask`` is boolean (True = attend)
    or additive float, broadcastable to [..., T_q, T_k]. ``is_causal`` masks key j > query i
    (top-left aligned, as ``F.scaled_dot_product_attention`` does).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        t_q, t_k = q.size(-2), k.size(-2)
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """Boolean [t_q, t_k] mask for queries that are the *last* t_q of t_k positions.

    Query i sits at absolute position ``t_k - t_q + i`` (the first ``t_k - t_q`` keys come from a
    KV cache) and may attend to keys ``j <= t_k - t_q + i``: the decoder's "masking out
    (setting to -inf) all values which correspond to illegal connections" (Vaswani et al., 3.2.3).
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def build_attention_mask(t_q: int, t_k: int, causal: bool, key_padding_mask: Tensor | None,
                         device: torch.device) -> Tensor | None:
    """Combine causality and key padding into one boolean mask [B or 1, 1, t_q, t_k], or None.

    A query row with no visible key (e.g. a left-pad query under a causal mask) would make softmax
    produce NaN, which then leaks into every later layer through 0 * NaN; such rows are opened to
    all keys instead. Their outputs are garbage but finite, and they belong to pad positions whose
    outputs nobody reads (their own keys stay masked for every real query).
    """
    mask = None
    if causal:
        mask = causal_mask(t_q, t_k, device)[None, None]
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != t_k:
            raise ValueError(f"key padding mask covers {key_padding_mask.shape[-1]} keys, "
                             f"attention has {t_k}")
        pad = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with an optional KV cache.

    forward(x, context=None, key_padding_mask=None, past_kv=None, use_cache=False)
      x: [B, T_q, D] queries (and keys/values for self-attention).
      context: [B, S, D] keys/values for cross-attention (encoder output); None = self-attention.
      key_padding_mask: [B, T_k] True/1 = real key; for self-attention with a cache it covers the
        cached keys followed by the new ones.
      past_kv: (k, v) [B, H, T_past, d_head] of earlier positions (self-attention only), or a
        ``KVBuffer`` (appended to in place).
    Returns (out [B, T_q, D], present (k, v) including the new positions, or None).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = False,
                 bias: bool = True, d_head: int | None = None):
        super().__init__()
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
            d_head = d_model // n_heads
        self.d_head = d_head
        self.causal = causal
        self.dropout = dropout
        inner = n_heads * d_head        # d_model unless given a d_head (or heads were pruned)
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    @property
    def n_heads(self) -> int:
        """Heads this module holds now (fewer after tensor-parallel sharding or head pruning)."""
        return self.q_proj.out_features // self.d_head

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, H*d_head] -> [B, H, T, d_head]."""
        b, t, _ = x.shape
        return x.view(b, t, -1, self.d_head).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None,
                key_padding_mask: Tensor | None = None, past_kv: KVCache | None = None,
                use_cache: bool = False) -> tuple[Tensor, KVCache | None]:
        src = x if context is None else context
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(src))
        v = self._heads(self.v_proj(src))
        if isinstance(past_kv, KVBuffer):
            k, v = past_kv.append(k, v)
            present = past_kv if use_cache else None
        else:
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)
                v = torch.cat([past_kv[1], v], dim=2)
            present = (k, v) if use_cache else None
        t_q, t_k = q.size(2), k.size(2)
        causal = self.causal and context is None
        dropout_p = self.dropout if self.training else 0.0
        if causal and key_padding_mask is None and t_q == t_k:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # a single new query after a cache sees every key: no mask needed
            causal = causal and t_q > 1
            mask = build_attention_mask(t_q, t_k, causal, key_padding_mask, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(x.size(0), t_q, -1)
        return self.out_proj(out), present
