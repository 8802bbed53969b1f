"""Decoder-only left-to-right language model (GPT, Radford et al. 2018/2019; layout as nanoGPT).

``embed`` (token + position) -> ``blocks`` (pre-LN, causal self-attention) -> ``ln_f`` ->
``lm_head``. With ``tie_embeddings`` the output projection *is* the token embedding matrix
(Press & Wolf 2017), as in GPT-2.

Labels are already aligned with positions (``labels[t]`` is the target for position ``t``; -100
is ignored): the objective (``models.objectives.CausalLM``) shifts, the model does not.

KV cache: ``past_key_values`` is a list (one per block) of ``(k, v)`` shaped
[B, n_heads, T_past, d_head]; with it ``input_ids`` holds only the new tokens and positions
continue from the cache length. ``attention_mask`` ([B, T] or, with a cache, [B, T_past + T];
1 = real token) masks padded keys and, when given, derives positions from the number of real
tokens before each one (see ``models.layers.blocks.positions_for``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bmray.models.layers.blocks import (BLOCK_TP_PLAN, Embeddings, TransformerBlock, init_weights,
                                        moe_for_layer, positions_for)
from bmray.models.config import ModelConfig
from bmray.models.layers.losses import lm_loss_and_metrics
from bmray.models.outputs import ModelOutput
from bmray.models.structure import TensorParallelPlan


def sum_aux(aux_losses: list[Tensor | None], weight: float) -> Tensor | None:
    """Weighted sum of the MoE load-balancing losses of the blocks that have one (None if none)."""
    present = [a for a in aux_losses if a is not None]
    return weight * torch.stack(present).sum() if present else None


def full_mask(attention_mask: Tensor | None, past_len: int, new_len: int) -> Tensor | None:
    """Key padding mask over cached + new keys; a mask over only the new tokens gets ones prepended."""
    if attention_mask is None:
        return None
    if attention_mask.size(1) == past_len + new_len:
        return attention_mask
    if attention_mask.size(1) == new_len:
        ones = attention_mask.new_ones(attention_mask.size(0), past_len)
        return torch.cat([ones, attention_mask], dim=1)
    raise ValueError(f"attention_mask has {attention_mask.size(1)} columns; expected {new_len} "
                     f"(new tokens) or {past_len + new_len} (cached + new)")


class GPT(nn.Module):
    """forward(input_ids, labels=None, past_key_values=None, use_cache=False, attention_mask=None)."""

    block_lists = ("blocks",)   # where pipeline / ZeRO-3 find the per-layer modules
    # tensor parallelism: Megatron's blocks, the token embedding and the output layer split over
    # the vocabulary (the loss then runs on logit shards)
    tp_plan = TensorParallelPlan(BLOCK_TP_PLAN, {"embed.tok": "vocab", "lm_head": "column"})

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg.vocab_size, cfg.d_model, cfg.max_seq_len, cfg.pos_encoding, cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, causal=True,
                             moe=moe_for_layer(cfg.moe, i))
            for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False, attention_mask: Tensor | None = None) -> ModelOutput:
        cfg = self.config
        past_len = past_key_values[0][0].size(2) if past_key_values is not None else 0
        mask = full_mask(attention_mask, past_len, input_ids.size(1))
        x = self.embed(input_ids, positions_for(input_ids, past_len, mask))
        presents, auxes = [], []
        for i, block in enumerate(self.blocks):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, aux = block(x, key_padding_mask=mask, past_kv=past, use_cache=use_cache)
            presents.append(present)
            auxes.append(aux)
        logits = self.lm_head(self.ln_f(x))
        aux_loss = sum_aux(auxes, cfg.moe.aux_loss_weight) if cfg.moe else None
        loss, metrics = None, {}
        if labels is not None:
            loss, metrics = lm_loss_and_metrics(logits, labels, aux_loss, cfg.label_smoothing)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                           past_key_values=presents if use_cache else None, metrics=metrics)
