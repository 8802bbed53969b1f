"""Encoder-decoder transformer trained T5-style (Raffel et al. 2020; Vaswani et al. 2017 layout).

``shared`` token embedding used by the encoder input, the decoder input and (with
``tie_embeddings``) the output projection, as in T5. Encoder: ``encoder_blocks`` (bidirectional,
pre-LN) -> ``encoder_ln_f``. Decoder: ``decoder_blocks`` (causal self-attention, cross-attention to
the encoder output, FFN) -> ``decoder_ln_f`` -> ``lm_head``.

Differences from the original T5, chosen so all families share one block: absolute positions
(``cfg.pos_encoding``, one table each for encoder and decoder) instead of relative position
buckets; LayerNorm with bias instead of RMSNorm; GELU FFN; no ``d_model ** -0.5`` rescale before
the tied output layer (our embeddings use the 0.02 GPT init, not T5's unit-variance one).

Training is teacher-forced: ``decoder_input_ids = shift_right(labels)`` (the decoder start token
is ``cfg.bos_id``; T5 uses pad), so the decoder at position t sees the labels before t only.
``decode`` with ``use_cache=True`` returns the self-attention K/V cache in GPT's format (a list
per decoder block of ``(k, v)`` [B, H, T_past, d_head]); the cross-attention K/V over the encoder
output are recomputed each step (they never change, so caching them is only a speed-up; keeping
them out keeps the cache format the same as GPT's).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bmray.models.layers.blocks import (BLOCK_TP_PLAN, TransformerBlock, init_weights, moe_for_layer,
                                        positions_for)
from bmray.models.config import ModelConfig
from bmray.models.families.gpt import sum_aux
from bmray.models.layers.losses import IGNORE_INDEX, lm_loss_and_metrics
from bmray.models.outputs import ModelOutput
from bmray.models.structure import TensorParallelPlan
from bmray.models.layers.positional import build_positional


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Teacher-forcing decoder input: ``[start, labels[0], ..., labels[T-2]]``, -100 -> pad."""
    dec = labels.new_full(labels.shape, start_id)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE_INDEX, pad_id)


class T5(nn.Module):
    """forward(input_ids, attention_mask=None, decoder_input_ids=None, labels=None,
    decoder_attention_mask=None) -> ModelOutput(logits [B, T_dec, V], loss)."""

    block_lists = ("encoder_blocks", "decoder_blocks")
    tp_plan = TensorParallelPlan(BLOCK_TP_PLAN)     # embeddings and heads stay replicated

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder_pos = build_positional(cfg.pos_encoding, cfg.max_seq_len, cfg.d_model)
        self.decoder_pos = build_positional(cfg.pos_encoding, cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, moe=moe_for_layer(cfg.moe, i))
            for i in range(cfg.n_layers))
        self.encoder_ln_f = nn.LayerNorm(cfg.d_model)
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, causal=True,
                             cross_attention=True, moe=moe_for_layer(cfg.moe, i))
            for i in range(cfg.decoder_layers))
        self.decoder_ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers + cfg.decoder_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None):
        x = self.drop(self.shared(input_ids) + self.encoder_pos(positions_for(input_ids)))
        auxes = []
        for block in self.encoder_blocks:
            x, _, aux = block(x, key_padding_mask=attention_mask)
            auxes.append(aux)
        return self.encoder_ln_f(x), auxes

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output [B, S, D]."""
        return self._encode(input_ids, attention_mask)[0]

    def _decode(self, decoder_input_ids, encoder_hidden, encoder_mask, past_key_values, use_cache,
                decoder_attention_mask=None):
        past_len = past_key_values[0][0].size(2) if past_key_values is not None else 0
        pos = positions_for(decoder_input_ids, past_len)
        x = self.drop(self.shared(decoder_input_ids) + self.decoder_pos(pos))
        presents, auxes = [], []
        for i, block in enumerate(self.decoder_blocks):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, aux = block(x, key_padding_mask=decoder_attention_mask, encoder_hidden=encoder_hidden,
                                    encoder_mask=encoder_mask, past_kv=past, use_cache=use_cache)
            presents.append(present)
            auxes.append(aux)
        return self.lm_head(self.decoder_ln_f(x)), (presents if use_cache else None), auxes

    def decode(self, decoder_input_ids: Tensor, encoder_hidden: Tensor, encoder_mask: Tensor | None = None,
               past_key_values: Any = None, use_cache: bool = False) -> ModelOutput:
        """Decoder logits for ``decoder_input_ids`` (only the new tokens when a cache is given)."""
        logits, presents, auxes = self._decode(decoder_input_ids, encoder_hidden, encoder_mask,
                                               past_key_values, use_cache)
        aux = sum_aux(auxes, self.config.moe.aux_loss_weight) if self.config.moe else None
        return ModelOutput(logits=logits, aux_loss=aux, past_key_values=presents)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, labels: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None) -> ModelOutput:
        cfg = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, cfg.bos_id, cfg.pad_id)
        enc, enc_aux = self._encode(input_ids, attention_mask)
        logits, _, dec_aux = self._decode(decoder_input_ids, enc, attention_mask, None, False,
                                          decoder_attention_mask)
        aux_loss = sum_aux(enc_aux + dec_aux, cfg.moe.aux_loss_weight) if cfg.moe else None
        loss, metrics = None, {}
        if labels is not None:
            loss, metrics = lm_loss_and_metrics(logits, labels, aux_loss, cfg.label_smoothing)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, metrics=metrics)
