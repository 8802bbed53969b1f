"""Fused q/k/v projections against the unfused layers: torch.nn's own Linear outputs for fp32,
the same int8 codes and scales (and the same outputs) for each quantization scheme, on
transformers' BertSelfAttention and our families' attention; call-order independence
(cross-attention), gradients, state_dict round trips and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from bmray.models.compress.fused import (FusedProjection, ProjectionSlice, fuse_projections,
                                         stack_linears)
from bmray.models.compress.quant import QuantConfig, QuantLinear, quantize_model
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V = 48


def tiny(family, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=64, max_seq_len=32, dropout=0.0,
                                   sentinel_ids=list(range(38, 48)))).eval()


def tiny_hf_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def ids(batch=2, seq=10, seed=2):
    return torch.randint(0, 38, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_stacked_linear_equals_each_linear():
    torch.manual_seed(0)
    layers = [nn.Linear(12, 5), nn.Linear(12, 7, bias=False), nn.Linear(12, 3)]
    x = torch.randn(4, 6, 12)
    fused = stack_linears(layers)
    assert (fused.in_features, fused.out_features) == (12, 15)
    expected = torch.cat([m(x) for m in layers], dim=-1)       # the missing bias is zero
    torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["w8a8", "int8", "int4"])
def test_stacked_quantlinear_has_the_same_codes_and_output(scheme):
    """Per-channel scales are per output row: the stacked codes and scales are the separate
    layers' concatenated, and so (w8a8: the same per-token codes of x) is the product."""
    torch.manual_seed(1)
    cfg = QuantConfig(scheme=scheme, group_size=8)
    layers = [QuantLinear.from_linear(nn.Linear(16, n), cfg) for n in (8, 8, 4)]
    fused = stack_linears(layers)
    assert fused.scheme == scheme and fused.out_features == 20
    assert torch.equal(fused.weight_q, torch.cat([m.weight_q for m in layers]))
    assert torch.equal(fused.weight_scale, torch.cat([m.weight_scale for m in layers]))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = torch.cat([m(x) for m in layers], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)


def attention_groups(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, FusedProjection))


@pytest.mark.parametrize("scheme", [None, "w8a8", "int8", "int4"])
def test_hf_bert_fused_equals_unfused(scheme):
    model = tiny_hf_bert()
    if scheme:
        quantize_model(model, QuantConfig(scheme=scheme, group_size=16))
    fused = copy.deepcopy(model)
    names = fuse_projections(fused)
    assert names == [f"encoder.layer.{i}.attention.self.query_key_value" for i in range(2)]
    assert names == attention_groups(fused)
    att = fused.encoder.layer[0].attention.self
    assert isinstance(att.query, ProjectionSlice) and att.key.out_features == 32
    ref_att = model.encoder.layer[0].attention.self
    if scheme:
        assert torch.equal(att.query_key_value.layer.weight_q,
                           torch.cat([ref_att.query.weight_q, ref_att.key.weight_q,
                                      ref_att.value.weight_q]))
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=mask).last_hidden_state
        got = fused(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not att.query_key_value._cache                     # no input or output kept


@pytest.mark.parametrize("family", ["bert", "gpt"])
@pytest.mark.parametrize("scheme", [None, "w8a8"])
def test_our_families_fused_equal_unfused(family, scheme):
    model = tiny(family)
    if scheme:
        quantize_model(model, QuantConfig(scheme=scheme))
    fused = copy.deepcopy(model)
    assert len(fuse_projections(fused)) == 2
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fused(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_cross_attention_skipped_by_default_and_correct_when_fused():
    """T5's cross-attention reads the decoder state for q and the encoder output for k, v:
    skipped by default; fused anyway, each slice still gets the product of its own input."""
    model = tiny("t5")
    x, dec = ids(seed=3), ids(seed=4)
    with torch.no_grad():
        expected = model(x, decoder_input_ids=dec).logits
    default = copy.deepcopy(model)
    names = fuse_projections(default)
    assert len(names) == 4 and not any("cross" in n for n in names)
    everything = copy.deepcopy(model)
    assert len(fuse_projections(everything, skip=())) == 6
    with torch.no_grad():
        for m in (default, everything):
            torch.testing.assert_close(m(x, decoder_input_ids=dec).logits, expected,
                                       rtol=1e-5, atol=1e-5)


def test_a_part_asked_twice_or_another_input_is_recomputed():
    torch.manual_seed(5)
    layers = [nn.Linear(8, 4) for _ in range(3)]
    parent = nn.Module()
    parent.query, parent.key, parent.value = layers
    ref = copy.deepcopy(layers)
    fuse_projections(parent)
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(parent.query(a), ref[0](a))
    torch.testing.assert_close(parent.query(b), ref[0](b))    # another input
    torch.testing.assert_close(parent.query(b), ref[0](b))    # the same part again
    torch.testing.assert_close(parent.key(a), ref[1](a))
    with torch.no_grad():
        a.mul_(2)                                              # edited in place: new version
    torch.testing.assert_close(parent.value(a), ref[2](a))


def test_gradients_through_fused_projections():
    model = tiny("bert")
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    x = ids()
    model(x).logits.square().sum().backward()
    fused(x).logits.square().sum().backward()
    grads = dict(fused.named_parameters())
    for name, p in model.named_parameters():
        if ".q_proj." in name or ".k_proj." in name or ".v_proj." in name:
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6)
    name = next(n for n in grads if n.endswith("q_proj_k_proj_v_proj.layer.weight"))
    stem = name[:-len("q_proj_k_proj_v_proj.layer.weight")]
    params = dict(model.named_parameters())
    expected = torch.cat([params[f"{stem}{c}.weight"].grad for c in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(grads[name].grad, expected, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_deepcopy():
    cfg = QuantConfig(scheme="w8a8")
    model = tiny_hf_bert()
    quantize_model(model, cfg)
    fuse_projections(model)
    sd = model.state_dict()
    assert "encoder.layer.0.attention.self.query_key_value.layer.weight_q" in sd
    assert not any(".self.query.weight" in k for k in sd)     # saved once, under the fused name
    skeleton = tiny_hf_bert(seed=1)
    quantize_model(skeleton, cfg)
    fuse_projections(skeleton)
    skeleton.load_state_dict(sd, strict=True)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
        torch.testing.assert_close(skeleton(input_ids=x).last_hidden_state, expected)
        copied = copy.deepcopy(skeleton)
        att = copied.encoder.layer[0].attention.self
        assert att.query.fused is att.query_key_value              # still one shared layer
        torch.testing.assert_close(copied(input_ids=x).last_hidden_state, expected)


def test_bad_input_changes_nothing():
    with pytest.raises(ConfigError, match="no module with children"):
        fuse_projections(nn.Sequential(nn.Linear(4, 4)))
    model = tiny_hf_bert()
    quantize_model(model, QuantConfig(scheme="w8a8", targets=("key",)))   # q, v stay fp32
    with pytest.raises(ConfigError, match=r"all nn.Linear or all QuantLinear.*encoder.layer.0"):
        fuse_projections(model)
    assert isinstance(model.encoder.layer[1].attention.self.query, nn.Linear)   # untouched
    model = tiny_hf_bert()
    model.encoder.layer[1].attention.self.value.register_forward_hook(lambda *a: None)
    with pytest.raises(ConfigError, match="hooks"):
        fuse_projections(model)
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)
    mixed = [QuantLinear.from_linear(nn.Linear(16, 4), QuantConfig(scheme=s)) for s in
             ("w8a8", "int8")]
    with pytest.raises(ConfigError, match="different schemes"):
        stack_linears(mixed)
    with pytest.raises(ConfigError, match="different widths"):
        stack_linears([nn.Linear(4, 2), nn.Linear(5, 2)])
