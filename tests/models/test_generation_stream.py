"""Stop sequences, token streaming and text chunks.

References: the unstopped generation searched by plain Python for the first stop match (tokens:
list slices; strings: ``str.find`` on the decoded text) — the stopped run must equal it cut
before the match (OpenAI's convention); ``generate`` for ``stream`` (same tokens per row); the
tokenizer's one-shot ``decode`` for the text chunks.
"""
from __future__ import annotations

import pytest
import torch

from bmray.models.config import ModelConfig
from bmray.models.families.gpt import GPT
from bmray.models.generation import GenerationConfig, generate, pad_prompts, stream
from bmray.models.stopping import REPLACEMENT, StopSequences, truncate_text
from bmray.models.text_stream import TextChunker, text_chunks
from bmray.models.tokenizer import train_bpe
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)

V, PAD, EOS = 16, 0, 2
PROMPTS = [[9, 10, 11, 12], [13], [14, 15, 9]]
# a toy byte-level vocabulary: ids 7..15 are byte pieces, 8 and 9 together are "é" (c3 a9)
PIECES = {i: b"" for i in range(7)} | {7: b"a", 8: b"\xc3", 9: b"\xa9", 10: b"b", 11: b" ",
                                       12: b"ab", 13: b"\n", 14: b"c", 15: b"ba"}


class ToyTokenizer:
    def decode(self, ids) -> str:
        return b"".join(PIECES[int(i)] for i in ids).decode("utf-8", errors="replace")


def make_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(family="gpt", vocab_size=V, d_model=32, n_heads=4, n_layers=1,
                            d_ff=64, max_seq_len=64, dropout=0.0)).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def rows_of(out: torch.Tensor, width: int) -> list[list[int]]:
    return out[:, width:].tolist()


def first_match(tokens: list[int], stops: list[list[int]]) -> int | None:
    """Start of the earliest-ending occurrence of any stop sequence in ``tokens``."""
    for end in range(1, len(tokens) + 1):
        for s in stops:
            if end >= len(s) and tokens[end - len(s):end] == s:
                return end - len(s)
    return None


def sampled(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 12, "pad_id": PAD, "strategy": "sample",
                               "seed": 3, "temperature": 1.3, **kw})


# ---------------------------------------------------------------------------------------------
# Stop sequences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_token_stop_sequences_cut_each_row_before_its_first_match(strategy):
    model = make_gpt()
    ids, mask = pad_prompts(PROMPTS, PAD)
    base = sampled(strategy=strategy)
    free = rows_of(generate(model, ids, base, attention_mask=mask), ids.size(1))
    stops = [free[0][3:5], free[2][1:2]]          # sequences the unstopped run produces
    out = generate(model, ids, sampled(strategy=strategy, stop=stops), attention_mask=mask)
    got = rows_of(out, ids.size(1))
    for b in range(len(PROMPTS)):
        cut = first_match(free[b], stops)
        expected = free[b] if cut is None else free[b][:cut]
        assert got[b][:len(expected)] == expected and all(t == PAD for t in got[b][len(expected):])
    assert first_match(free[0], stops) is not None


def test_string_stops_cut_before_the_token_that_starts_the_match():
    model = make_gpt(seed=1)
    tok = ToyTokenizer()
    base = sampled(max_new_tokens=16)
    free = rows_of(generate(model, PROMPTS, base), max(map(len, PROMPTS)))
    text = tok.decode(free[0])
    stop = text[5:7] if REPLACEMENT not in text[5:7] else text[2:3]
    out = rows_of(generate(model, PROMPTS, sampled(max_new_tokens=16, stop=[stop]), tokenizer=tok),
                  max(map(len, PROMPTS)))
    assert sum(tok.decode(f).find(stop) >= 0 for f in free) >= 2
    for b in range(len(PROMPTS)):
        full = tok.decode(free[b])
        start = full.find(stop)
        if start < 0:
            assert out[b][:len(free[b])] == free[b]
            continue
        # the reference cut: the longest token prefix whose text ends at or before the match
        n = max(k for k in range(len(free[b]) + 1) if len(tok.decode(free[b][:k])) <= start)
        kept = [t for t in out[b]]
        assert kept[:n] == free[b][:n] and all(t == PAD for t in kept[n:])
        assert truncate_text(full, [stop]) == full[:start]
        assert stop not in tok.decode(free[b][:n])


def test_stop_config_errors_name_the_key():
    for bad, key in [(["a", [3]], "generation.stop"), ([""], r"generation.stop\[0\]"),
                     ([[3, -1]], r"generation.stop\[0\]\[1\]"), ([[]], r"generation.stop\[0\]"),
                     ("abc", "generation.stop")]:
        with pytest.raises(ConfigError, match=key):
            GenerationConfig(stop=bad)
    assert from_dict(GenerationConfig, {"stop": ["\n\n"]}, "generation").stop == ["\n\n"]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(make_gpt(), [[5]], GenerationConfig(stop=["x"]))


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_beam_search_with_a_one_token_stop_is_eos_beam_search_without_the_token(alpha):
    model = make_gpt(seed=3)
    width = max(map(len, PROMPTS))
    beam = dict(strategy="beam", num_beams=3, max_new_tokens=8, pad_id=PAD, length_penalty=alpha)
    free = rows_of(generate(model, PROMPTS, GenerationConfig(**beam)), width)
    t = free[0][2]                          # a token the unstopped search produces
    with_eos = rows_of(generate(model, PROMPTS, GenerationConfig(**beam, eos_id=t)), width)
    with_stop = rows_of(generate(model, PROMPTS, GenerationConfig(**beam, stop=[[t]])), width)
    for e, s in zip(with_eos, with_stop):
        if t in e:
            e = e[:e.index(t)]              # the eos run keeps t, the stop run cuts it
        assert s[:len(e)] == e and all(x == PAD for x in s[len(e):])
    assert with_stop != free


def test_safe_length_holds_back_only_what_a_stop_could_still_cut():
    ids = StopSequences([[4, 5, 6]])
    assert ids.safe_length([1, 4, 5]) == 1 and ids.safe_length([1, 4]) == 1
    assert ids.safe_length([1, 5]) == 2 and ids.cut([1, 4, 5, 6]) == 1
    text = StopSequences(["b\n"], ToyTokenizer().decode)
    assert text.safe_length([7, 10]) == 1            # "ab": the "b" may start "b\n"
    assert text.safe_length([7, 8]) == 1             # "a" + half of "é"
    assert text.safe_length([7, 8, 9]) == 3
    inside = StopSequences(["a\n"], ToyTokenizer().decode)
    assert inside.cut([7, 15, 13]) == 1              # "a" "ba" "\n": the match starts inside "ba"


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "eos", "ids", "strings"])
def test_stream_yields_exactly_what_generate_returns(kind):
    model = make_gpt(seed=2)
    tok = ToyTokenizer()
    width = max(map(len, PROMPTS))
    free = rows_of(generate(model, PROMPTS, sampled()), width)
    config = {"plain": GenerationConfig(max_new_tokens=10, pad_id=PAD),
              "eos": GenerationConfig(max_new_tokens=10, pad_id=PAD, eos_id=EOS),
              "ids": sampled(stop=[free[0][4:7], free[2][2:3]]),
              "strings": sampled(stop=[tok.decode(free[1])[3:5], "é"])}[kind]
    out = generate(model, PROMPTS, config, tokenizer=tok)
    if kind in ("ids", "strings"):
        assert out[:, width:].tolist() != free           # a stop sequence did cut something
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    steps = 0
    for step in stream(model, PROMPTS, config, tokenizer=tok):
        assert len(step) == len(PROMPTS)
        for row, new in zip(streamed, step):
            row.extend(new)
        steps += 1
    assert steps <= config.max_new_tokens
    for b, row in enumerate(out[:, width:].tolist()):
        assert row[:len(streamed[b])] == streamed[b]
        assert all(t == PAD for t in row[len(streamed[b]):])


def test_stream_refuses_beam_search():
    with pytest.raises(ConfigError, match="greedy or sample"):
        next(stream(make_gpt(), [[5]], GenerationConfig(strategy="beam", num_beams=2)))


def test_text_chunks_never_split_a_character_and_join_to_the_decoded_text():
    tok = train_bpe(["plain ascii words only, nothing else here"] * 20, vocab_size=300,
                    family="gpt")
    text = "héllo wörld ✓ 日本語 🙂 plain"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())               # multi-byte characters span tokens
    chunker = TextChunker(tok.decode)
    chunks = [chunker.push(0, [i]) for i in ids] + [chunker.flush(0)]
    assert all(REPLACEMENT not in c for c in chunks)
    assert "".join(chunks) == text == tok.decode(ids)
    assert any(c == "" for c in chunks)               # something was held back mid-character
    per_step = list(text_chunks([[[i], []] for i in ids], tok.decode))
    assert "".join(s[0] for s in per_step) == text and all(s[1] == "" for s in per_step)
