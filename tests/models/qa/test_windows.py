"""Overlapping windows: equal to HF's own overflow windows, answers map back to their
characters, consecutive windows overlap by the stride, bad input is a clear error."""
import pytest
import torch

from bmray.models.qa.windows import SpanTokenizer, collate, make_windows


def test_windows_equal_hf_overflowing_tokens(minilm_tokenizer, world_qa):
    tok = SpanTokenizer.from_hf(minilm_tokenizer)
    for r in world_qa[:10]:
        ours = make_windows(r["question"], r["context"], tok, max_length=40, doc_stride=8)
        peer = minilm_tokenizer(r["question"], r["context"], truncation="only_second",
                                max_length=40, stride=8, return_overflowing_tokens=True,
                                return_offsets_mapping=True)
        assert len(ours) > 1
        assert [w.input_ids for w in ours] == peer["input_ids"]
        assert [w.token_type_ids for w in ours] == peer["token_type_ids"]
        for w, offs, types in zip(ours, peer["offset_mapping"], peer["token_type_ids"]):
            assert [o for o in w.offsets if o is not None] == \
                [tuple(o) for o, t in zip(offs[1:-1], types[1:-1]) if t == 1]


@pytest.mark.parametrize("which", ["minilm", "bpe"])
def test_every_answer_maps_back_and_windows_overlap(which, minilm_tokenizer, bpe_tokenizer,
                                                    world_qa):
    tok = (SpanTokenizer.from_hf(minilm_tokenizer) if which == "minilm"
           else SpanTokenizer.from_bmray(bpe_tokenizer))
    # the tiny BPE splits finer; an answer wholly in a window needs stride >= its length - 1
    stride, max_length = (6, 36) if which == "minilm" else (20, 80)
    n_multi = 0
    for i, r in enumerate(world_qa):
        ws = make_windows(r["question"], r["context"], tok, max_length=max_length, doc_stride=stride,
                          answer=(r["answer_start"], r["answer_end"]), example=i)
        n_multi += len(ws) > 1
        hits = [w for w in ws if w.start_position]
        assert hits, r["id"]
        for w in hits:
            assert 0 < w.start_position <= w.end_position < len(w.input_ids) - 1
            assert w.span_text(r["context"], w.start_position, w.end_position) == r["answer"]
        for w in ws:                       # a window without the whole answer points at [CLS]
            lo, hi = w.context_range
            inside = lo <= r["answer_start"] and r["answer_end"] <= hi
            assert bool(w.start_position) == inside
            assert (w.start_position == 0) == (w.end_position == 0)
        for a, b in zip(ws, ws[1:]):       # the last `stride` context tokens repeat
            ctx_a = [t for t, o in zip(a.input_ids, a.offsets) if o is not None]
            ctx_b = [t for t, o in zip(b.input_ids, b.offsets) if o is not None]
            oa = [o for o in a.offsets if o is not None]
            ob = [o for o in b.offsets if o is not None]
            assert ctx_a[-stride:] == ctx_b[:stride] and oa[-stride:] == ob[:stride]
            assert len(a.input_ids) == max_length
        # the windows cover the whole context
        assert ws[0].context_range[0] == 0 and ws[-1].context_range[1] >= len(r["context"].rstrip()) - 1
    assert n_multi > 0.9 * len(world_qa)     # most contexts need several windows


def test_unanswerable_labels_cls_and_collate(minilm_tokenizer, world_qa):
    tok = SpanTokenizer.from_hf(minilm_tokenizer)
    r = world_qa[0]
    ws = make_windows(r["question"], r["context"], tok, max_length=40, doc_stride=8)
    assert all(w.start_position == w.end_position == 0 for w in ws)
    b = collate(ws, tok.pad_id)
    assert b["input_ids"].shape == (len(ws), 40)
    last = len(ws[-1].input_ids)
    assert torch.equal(b["attention_mask"][-1, last:], torch.zeros(40 - last, dtype=torch.long))
    assert int(b["context_mask"][0].sum()) == sum(o is not None for o in ws[0].offsets)


def test_bad_input_is_a_clear_error(minilm_tokenizer):
    tok = SpanTokenizer.from_hf(minilm_tokenizer)
    long_q = "why " * 40
    with pytest.raises(ValueError, match="question has 40 tokens"):
        make_windows(long_q, "some context here", tok, max_length=32, doc_stride=4)
    with pytest.raises(ValueError, match="doc_stride"):
        make_windows("who?", "some context here", tok, max_length=16, doc_stride=12)
    with pytest.raises(ValueError, match="not inside the context"):
        make_windows("who?", "abc", tok, max_length=16, doc_stride=2, answer=(2, 9))
