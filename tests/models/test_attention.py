"""Attention, positional encodings and the pre-LN block, checked against torch built-ins and formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmray.models.layers.attention import (MultiHeadAttention, build_attention_mask, causal_mask,
                              scaled_dot_product_attention_reference)
from bmray.models.layers.blocks import TransformerBlock
from bmray.models.layers.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_table

torch.set_num_threads(1)
B, T, S, D, H = 2, 5, 7, 16, 4


def _qkv(seed=0, t_q=T, t_k=S, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, t_q, d, generator=g), torch.randn(B, H, t_k, d, generator=g),
            torch.randn(B, H, t_k, d, generator=g))


def test_reference_sdpa_matches_torch():
    q, k, v = _qkv()
    torch.testing.assert_close(scaled_dot_product_attention_reference(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))


def test_reference_sdpa_masks_match_torch():
    q, k, v = _qkv(1)
    g = torch.Generator().manual_seed(2)
    bool_mask = torch.rand(B, 1, T, S, generator=g) > 0.3
    bool_mask[..., 0] = True                      # every query sees at least one key
    torch.testing.assert_close(scaled_dot_product_attention_reference(q, k, v, attn_mask=bool_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask))
    float_mask = torch.randn(B, 1, T, S, generator=g)
    torch.testing.assert_close(scaled_dot_product_attention_reference(q, k, v, attn_mask=float_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask))
    q, k, v = _qkv(3, t_q=S, t_k=S)
    torch.testing.assert_close(scaled_dot_product_attention_reference(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_reference_sdpa_is_eq1_by_hand():
    """softmax(q k^T / sqrt(d)) v for one query, written with numpy."""
    q, k, v = (t[0, 0].double().numpy() for t in _qkv(4))
    scores = q @ k.T / math.sqrt(q.shape[-1])
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = scaled_dot_product_attention_reference(*(torch.from_numpy(x) for x in (q, k, v)))
    np.testing.assert_allclose(out.numpy(), w @ v, rtol=1e-10)


def test_causal_mask_with_offset_is_brute_force():
    for t_q, t_k in [(4, 4), (1, 6), (3, 7)]:
        m = causal_mask(t_q, t_k)
        for i in range(t_q):
            for j in range(t_k):
                assert bool(m[i, j]) == (j <= t_k - t_q + i)


def _copy_to_torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


def test_mha_matches_torch_multihead_attention_with_padding():
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H).eval()
    ref = _copy_to_torch_mha(ours)
    x = torch.randn(B, T, D)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 3:] = False
    out, _ = ours(x, key_padding_mask=keep)
    expected, _ = ref(x, x, x, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(out, expected)


def test_masked_self_attention_matches_torch_with_causal_mask():
    torch.manual_seed(1)
    ours = MultiHeadAttention(D, H, causal=True).eval()
    ref = _copy_to_torch_mha(ours)
    x = torch.randn(B, T, D)
    forbidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    expected, _ = ref(x, x, x, attn_mask=forbidden, need_weights=False)
    torch.testing.assert_close(ours(x)[0], expected)
    # the explicit-mask path (padding + causality) agrees as well
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, -1] = False
    expected, _ = ref(x, x, x, attn_mask=forbidden, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(ours(x, key_padding_mask=keep)[0][:, :-1], expected[:, :-1])


def test_cross_attention_matches_torch():
    torch.manual_seed(2)
    ours = MultiHeadAttention(D, H).eval()
    ref = _copy_to_torch_mha(ours)
    x, enc = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 4:] = False
    expected, _ = ref(x, enc, enc, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(ours(x, context=enc, key_padding_mask=keep)[0], expected)


def test_kv_cache_step_by_step_equals_full_pass():
    torch.manual_seed(3)
    mha = MultiHeadAttention(D, H, causal=True).eval()
    x = torch.randn(B, T, D)
    full, _ = mha(x)
    out, past = mha(x[:, :2], use_cache=True)          # a 2-token prefill, then one token at a time
    outs = [out]
    for t in range(2, T):
        out, past = mha(x[:, t:t + 1], past_kv=past, use_cache=True)
        outs.append(out)
    assert past[0].shape == (B, H, T, D // H)
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    # a multi-token chunk after a cache uses the offset causal mask
    _, past = mha(x[:, :2], use_cache=True)
    chunk, _ = mha(x[:, 2:], past_kv=past, use_cache=True)
    torch.testing.assert_close(chunk, full[:, 2:])


def test_fully_masked_query_rows_stay_finite():
    """A left-pad query under a causal mask sees no key; it must not poison later layers with NaN."""
    mask = build_attention_mask(3, 3, True, torch.tensor([[0, 0, 1]]), torch.device("cpu"))
    mha = MultiHeadAttention(D, H, causal=True).eval()
    out, _ = mha(torch.randn(1, 3, D), key_padding_mask=torch.tensor([[0, 0, 1]]))
    assert mask[0, 0, 2].tolist() == [False, False, True]
    assert torch.isfinite(out).all()


def test_sinusoidal_table_is_the_formula():
    n, d = 50, 16
    pe = np.zeros((n, d))
    for pos in range(n):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    np.testing.assert_allclose(sinusoidal_table(n, d).numpy(), pe, atol=1e-6)
    enc = SinusoidalPositionalEncoding(n, d)
    assert not list(enc.parameters()) and "table" not in enc.state_dict()
    torch.testing.assert_close(enc(torch.tensor([[3, 7]])), sinusoidal_table(n, d)[[3, 7]][None])


def test_positions_beyond_max_len_raise():
    for module in (SinusoidalPositionalEncoding(8, 4), LearnedPositionalEmbedding(8, 4)):
        with pytest.raises(ValueError, match="max_seq_len"):
            module(torch.arange(9))
    assert LearnedPositionalEmbedding(8, 4).weight.requires_grad


def test_pre_ln_block_is_the_formula():
    torch.manual_seed(4)
    blk = TransformerBlock(D, H, 32, dropout=0.0, causal=True).eval()
    x = torch.randn(B, T, D)
    h = x + blk.attn(blk.ln_1(x))[0]
    expected = h + blk.ffn.down(F.gelu(blk.ffn.up(blk.ln_2(h))))
    torch.testing.assert_close(blk(x)[0], expected)


def test_dropout_is_on_sublayer_outputs_before_the_residual_add():
    """With the residual dropout at p=1 every sub-layer output is zeroed, so x passes unchanged."""
    torch.manual_seed(5)
    blk = TransformerBlock(D, H, 32, dropout=0.5, cross_attention=True).train()
    blk.attn.dropout = blk.cross_attn.dropout = 0.0
    blk.drop.p = 1.0
    x, enc = torch.randn(B, T, D), torch.randn(B, S, D)
    torch.testing.assert_close(blk(x, encoder_hidden=enc)[0], x)
    blk.drop.p = 0.0
    assert not torch.allclose(blk(x, encoder_hidden=enc)[0], x)
