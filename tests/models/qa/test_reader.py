"""The span reader: loss against F.cross_entropy by hand, decode against brute force,
the null threshold and its tuning against an exhaustive search."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bmray.models.qa.reader import (best_span, decode, read, tune_threshold)
from bmray.models.qa.windows import SpanTokenizer, Window, collate, make_windows


def test_loss_is_mean_of_start_and_end_cross_entropy(bpe_tokenizer, world_qa, tiny_reader):
    tok = SpanTokenizer.from_bmray(bpe_tokenizer)
    reader = tiny_reader(bpe_tokenizer)
    ws = [w for i, r in enumerate(world_qa[:4])
          for w in make_windows(r["question"], r["context"], tok, 64, 16,
                                answer=(r["answer_start"], r["answer_end"]), example=i)]
    b = collate(ws, tok.pad_id)
    out = reader(**b)
    hidden = reader.encoder.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    raw = hidden @ reader.qa_outputs.weight.T + reader.qa_outputs.bias     # [B, T, 2]
    allowed = b["context_mask"].bool()
    allowed[:, 0] = True
    loss = 0.0
    for r in range(len(ws)):      # CE written out: -log softmax over the allowed positions
        for k, gold in ((0, b["start_positions"][r]), (1, b["end_positions"][r])):
            z = raw[r, :, k][allowed[r]]
            pos = int(allowed[r, :gold].sum())          # gold's index among allowed positions
            loss += -(z[pos] - torch.logsumexp(z, 0)) / 2
    torch.testing.assert_close(out.loss, loss / len(ws), rtol=1e-4, atol=1e-5)
    assert any(w.start_position for w in ws) and any(not w.start_position for w in ws)
    out.loss.backward()
    assert reader.qa_outputs.weight.grad.abs().sum() > 0


def brute_force(windows, logits, context, max_tokens):
    best, null = None, math.inf
    for w, lg in zip(windows, logits):
        null = min(null, float(lg[0, 0]) + float(lg[0, 1]))
        ctx = [i for i, o in enumerate(w.offsets) if o is not None]
        for s, e in itertools.product(ctx, ctx):
            if s <= e and e - s + 1 <= max_tokens:
                score = float(lg[s, 0]) + float(lg[e, 1])
                if best is None or score > best[0]:
                    best = (score, context[w.offsets[s][0]:w.offsets[e][1]])
    return best, null


def test_decode_equals_brute_force(minilm_tokenizer, world_qa):
    tok = SpanTokenizer.from_hf(minilm_tokenizer)
    g = torch.Generator().manual_seed(0)
    for r in world_qa[:12]:
        ws = make_windows(r["question"], r["context"], tok, 40, 10)
        logits = torch.randn(len(ws), 40, 2, generator=g) * 3
        for max_tokens in (1, 3, 30):
            (score, text), null = brute_force(ws, logits, r["context"], max_tokens)
            p = decode(ws, logits, r["context"], max_tokens, threshold=0.0)
            assert p.text == text and p.score == pytest.approx(score, abs=1e-5)
            assert p.null_score == pytest.approx(null, abs=1e-5)
            assert p.answer == ("" if null - score > 0.0 else text)
            t = null - score
            assert decode(ws, logits, r["context"], max_tokens, threshold=t - 1e-3).answer == ""
            assert decode(ws, logits, r["context"], max_tokens, threshold=t + 1e-3).answer == text


def test_best_span_respects_order_length_and_context():
    start = torch.tensor([9., 0., 0., 5., 0.])
    end = torch.tensor([9., 4., 0., 0., 1.])
    ctx = torch.tensor([False, True, True, True, True])
    assert best_span(start, end, ctx, 30) == (6.0, 3, 4)        # s <= e (3, 1 is not a span)
    assert best_span(start, end, ctx, 1) == (5.0, 3, 3)
    assert best_span(start, end, torch.zeros(5, dtype=torch.bool), 3) is None


def test_tune_threshold_equals_exhaustive_search():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(25, generator=g).round(decimals=1).tolist()      # ties included
    ans = torch.rand(25, generator=g).tolist()
    null = (torch.rand(25, generator=g) > 0.5).float().tolist()
    t, best = tune_threshold(d, ans, null)
    grid = [x / 100 for x in range(-400, 400)]
    exhaustive = max(sum(n if di > th else a for di, a, n in zip(d, ans, null)) / 25
                     for th in grid)
    assert best == pytest.approx(exhaustive)
    assert best == pytest.approx(sum(n if di > t else a for di, a, n in zip(d, ans, null)) / 25)


def test_read_end_to_end_shapes(bpe_tokenizer, world_qa, tiny_reader):
    tok = SpanTokenizer.from_bmray(bpe_tokenizer)
    reader = tiny_reader(bpe_tokenizer)
    rs = world_qa[:3]
    preds = read(reader, tok, [r["question"] for r in rs], [r["context"] for r in rs],
                 max_length=64, doc_stride=16, batch_size=4)
    for p, r in zip(preds, rs):
        assert p.text == r["context"][p.start:p.end] and p.text
    with pytest.raises(ValueError, match="2 questions but 1 contexts"):
        read(reader, tok, ["a", "b"], ["c"])
