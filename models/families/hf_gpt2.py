"""Export our GPT to Hugging Face's ``GPT2LMHeadModel`` (same weights, same logits).

Our GPT has GPT-2's architecture (Radford et al. 2019): token + learned absolute positions,
pre-LN blocks with biases, a final LayerNorm, an output layer tied to the token embedding, and a
1/sqrt(d_head) attention scale. Differences the export maps over: our FFN uses the exact (erf)
GELU, so the HF config gets ``activation_function="gelu"`` instead of GPT-2's tanh
approximation ``gelu_new``; our attention has separate q/k/v ``nn.Linear`` layers, HF one
``Conv1D`` ``c_attn`` whose weight is ``[in, out]`` (the transpose of ``nn.Linear``'s), so q, k, v
are transposed and concatenated. A sinusoidal position table is exported as ``wpe`` (a lookup
table either way). MoE feed-forwards have no GPT-2 counterpart and are refused. Dropout is off in
the export (it is for inference and benchmarks).
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bmray.models.families.gpt import GPT
from bmray.models.layers.moe import FeedForward
from bmray.models.layers.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding


def gpt2_config(model: GPT) -> GPT2Config:
    """The ``GPT2Config`` describing ``model``'s architecture."""
    cfg = model.config
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=model.ln_f.eps, tie_word_embeddings=cfg.tie_embeddings,
                      bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)


@torch.no_grad()
def export_gpt2(model: GPT) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` (eval mode, ``model``'s dtype) holding copies of its weights."""
    if not isinstance(model, GPT):
        raise TypeError(f"export_gpt2 needs a bmray GPT, got {type(model).__name__}")
    if not all(isinstance(b.ffn, FeedForward) for b in model.blocks):
        raise ValueError("export_gpt2: mixture-of-experts blocks have no GPT-2 counterpart")
    if any(b.attn.n_heads * b.attn.d_head != model.config.d_model for b in model.blocks):
        raise ValueError("export_gpt2: pruned or sharded attention heads do not fit GPT-2's layout")
    dtype = model.embed.tok.weight.dtype
    hf = GPT2LMHeadModel(gpt2_config(model)).to(dtype).eval()
    t = hf.transformer
    t.wte.weight.copy_(model.embed.tok.weight)
    pos = model.embed.pos
    if isinstance(pos, LearnedPositionalEmbedding):
        t.wpe.weight.copy_(pos.weight)
    elif isinstance(pos, SinusoidalPositionalEncoding):
        t.wpe.weight.copy_(pos.table)
    else:
        raise ValueError(f"export_gpt2: unsupported positional encoding {type(pos).__name__}")
    for ours, theirs in zip(model.blocks, t.h):
        _copy_ln(ours.ln_1, theirs.ln_1)
        _copy_ln(ours.ln_2, theirs.ln_2)
        a = ours.attn
        theirs.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                   a.v_proj.weight], dim=0).t())
        theirs.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        theirs.attn.c_proj.weight.copy_(a.out_proj.weight.t())
        theirs.attn.c_proj.bias.copy_(a.out_proj.bias)
        theirs.mlp.c_fc.weight.copy_(ours.ffn.up.weight.t())
        theirs.mlp.c_fc.bias.copy_(ours.ffn.up.bias)
        theirs.mlp.c_proj.weight.copy_(ours.ffn.down.weight.t())
        theirs.mlp.c_proj.bias.copy_(ours.ffn.down.bias)
    _copy_ln(model.ln_f, t.ln_f)
    if not model.config.tie_embeddings:
        hf.lm_head.weight.copy_(model.lm_head.weight)
    return hf


def _copy_ln(src: torch.nn.LayerNorm, dst: torch.nn.LayerNorm) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)
