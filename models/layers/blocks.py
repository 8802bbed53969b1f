"""The pieces every family is built from: embeddings, the pre-LN transformer block, weight init.

Pre-LN block (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; as in
GPT-2 and T5): each sub-layer normalises its input and adds its (dropped-out) output to the
residual stream,

    x = x + Dropout(SelfAttn(LN(x)))
    x = x + Dropout(CrossAttn(LN(x), encoder))      (decoder of an encoder-decoder only)
    x = x + Dropout(FFN(LN(x)))                      (FFN is dense or mixture-of-experts)

"dropout to the output of each sub-layer, before it is added to the sub-layer input" is Vaswani
et al. 2017, sec. 5.4. The stack ends with a final LayerNorm (``ln_f`` in each model), which a
pre-LN stack needs because the residual stream itself is never normalised.

Layout for parallelism applied from outside: attention projections are ``attn.{q,k,v,out}_proj``,
feed-forward ``ffn.up`` / ``ffn.down`` (MoE: ``ffn.router`` and ``ffn.experts[i].up/down``);
models keep their blocks in an ``nn.ModuleList`` so pipeline stages and ZeRO-3 can cut and wrap
them one block at a time. ``FeedForward`` is defined in ``models.layers.moe`` (its experts are
FeedForwards) and re-exported here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bmray.models.layers.attention import KVCache, MultiHeadAttention
from bmray.models.config import MoEConfig
from bmray.models.layers.moe import FeedForward, MoEFeedForward
from bmray.models.layers.positional import LearnedPositionalEmbedding, build_positional

__all__ = ["BLOCK_TP_PLAN", "Embeddings", "FeedForward", "TransformerBlock", "init_weights",
           "moe_for_layer", "positions_for"]

# Megatron-LM's split of a TransformerBlock (models.structure.TensorParallelPlan.blocks;
# docs/tensor_parallel.md): q/k/v and the FFN's first layer by output features, the attention
# output and the FFN's second layer by input features; LayerNorms stay whole. A block without
# cross-attention skips those entries; an MoE feed-forward has no ``up`` / ``down`` of its own.
BLOCK_TP_PLAN = {
    "attn.q_proj": "column", "attn.k_proj": "column", "attn.v_proj": "column",
    "attn.out_proj": "row",
    "cross_attn.q_proj": "column", "cross_attn.k_proj": "column", "cross_attn.v_proj": "column",
    "cross_attn.out_proj": "row",
    "ffn.up": "column", "ffn.down": "row",
}


def moe_for_layer(moe: MoEConfig | None, layer: int) -> MoEConfig | None:
    """The MoE config if block ``layer`` (0-based) gets an MoE FFN: every ``moe.every``-th block."""
    if moe is None or layer % moe.every != moe.every - 1:
        return None
    return moe


def positions_for(input_ids: Tensor, past_len: int = 0, attention_mask: Tensor | None = None) -> Tensor:
    """Position ids [B, T] of the new tokens.

    Without a mask: ``past_len, ..., past_len + T - 1`` (continuing after a KV cache). With a mask
    over the past and new tokens ([B, past_len + T], 1 = real), a token's position is the number of
    real tokens before it, so a left-padded row gets the positions it would have unpadded (the
    Hugging Face convention for batched generation).
    """
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.arange(past_len, past_len + t, device=input_ids.device).expand(b, t)
    pos = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return pos[:, -t:]


class Embeddings(nn.Module):
    """Token + absolute position (+ segment, for BERT) embeddings, then dropout.

    ``tok`` is the matrix the output projection ties to (Press & Wolf 2017; GPT, BERT, T5).
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int, pos_encoding: str,
                 dropout: float, n_token_types: int = 0):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = build_positional(pos_encoding, max_len, d_model)
        self.segment = nn.Embedding(n_token_types, d_model) if n_token_types else None
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, positions: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        h = self.tok(input_ids) + self.pos(positions)
        if self.segment is not None:
            h = h + self.segment(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        return self.drop(h)


class TransformerBlock(nn.Module):
    """One pre-LN block: self-attention, optional cross-attention, dense or MoE feed-forward.

    forward(x, key_padding_mask=None, encoder_hidden=None, encoder_mask=None, past_kv=None,
            use_cache=False) -> (x, present_kv or None, moe_aux_loss or None)
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 causal: bool = False, cross_attention: bool = False, moe: MoEConfig | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, causal=causal)
        self.ln_cross = nn.LayerNorm(d_model) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout) if cross_attention else None
        self.ln_2 = nn.LayerNorm(d_model)
        if moe is None:
            self.ffn = FeedForward(d_model, d_ff)
        else:
            self.ffn = MoEFeedForward(d_model, d_ff, moe.num_experts, moe.top_k, moe.capacity_factor)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                encoder_hidden: Tensor | None = None, encoder_mask: Tensor | None = None,
                past_kv: KVCache | None = None, use_cache: bool = False
                ) -> tuple[Tensor, KVCache | None, Tensor | None]:
        a, present = self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, past_kv=past_kv,
                               use_cache=use_cache)
        x = x + self.drop(a)
        if self.cross_attn is not None:
            if encoder_hidden is None:
                raise ValueError("a cross-attention block needs encoder_hidden")
            c, _ = self.cross_attn(self.ln_cross(x), context=encoder_hidden, key_padding_mask=encoder_mask)
            x = x + self.drop(c)
        h = self.ffn(self.ln_2(x))
        aux = None
        if isinstance(h, tuple):        # MoE: (output, load-balancing loss)
            h, aux = h
        x = x + self.drop(h)
        return x, present, aux


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, LayerNorm (1, 0); the projections
    that write into the residual stream (``out_proj``, ``down``) get std / sqrt(2 * n_layers)
    so the stream's variance does not grow with depth (Radford et al. 2019, sec. 2.3)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scaled = name.endswith("out_proj") or name.endswith("down")
            nn.init.normal_(module.weight, std=std / math.sqrt(2 * n_layers) if scaled else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, LearnedPositionalEmbedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
