"""Tokenizer tests: BPE merges against a brute-force pair count, round trip, save/load, specials."""
from __future__ import annotations

import collections
import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers, trainers

from bmray.models.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig, train_bpe
from bmray.models.typed_config import ConfigError


# ---------------------------------------------------------------- brute-force BPE reference
def pair_counts(words: dict[tuple[str, ...], int]) -> collections.Counter:
    """Frequency of every adjacent symbol pair, weighted by word count (Sennrich et al. 2016,
    Fig. 1 ``get_stats``)."""
    counts: collections.Counter = collections.Counter()
    for symbols, freq in words.items():
        for pair in zip(symbols, symbols[1:]):
            counts[pair] += freq
    return counts


def apply_merge(words: dict[tuple[str, ...], int], a: str, b: str) -> dict[tuple[str, ...], int]:
    """Replace every (a, b) by the symbol a+b, left to right (Fig. 1 ``merge_vocab``)."""
    out: dict[tuple[str, ...], int] = {}
    for symbols, freq in words.items():
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        out[tuple(merged)] = out.get(tuple(merged), 0) + freq
    return out


def paper_bpe(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """The paper's Fig. 1 loop verbatim in spirit: ``best = max(pairs, key=pairs.get)``."""
    merges = []
    for _ in range(n_merges):
        counts = pair_counts(words)
        best = max(counts, key=counts.get)
        merges.append(best)
        words = apply_merge(words, *best)
    return merges


def merges_of(backend: HFTokenizer) -> list[tuple[str, str]]:
    """The learned merges, in order, from the serialised BPE model (both json layouts)."""
    raw = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]


def check_greedy(words: dict[tuple[str, ...], int], merges: list[tuple[str, str]]):
    """Replay ``merges``; each must be a most frequent pair at its step. Returns final words."""
    for step, (a, b) in enumerate(merges):
        counts = pair_counts(words)
        best = max(counts.values())
        assert counts[(a, b)] == best, (step, (a, b), counts[(a, b)], best)
        words = apply_merge(words, a, b)
    return words


# ---------------------------------------------------------------- tests
def test_bpe_paper_example_merges():
    """Sennrich et al. 2016 §3.2 / Fig. 1: {low:5, lower:2, newest:6, widest:3} with ``</w>``.

    The `tokenizers` trainer splits a word into characters, so the paper's one-symbol end-of-word
    marker ``</w>`` is written as the single character "·" and mapped back to ``</w>``. At count 9
    there is a three-way tie ("e s", "s t", "t </w>"); the paper's code takes the first pair it
    saw, `tokenizers` the pair with the smallest symbol ids, so from the second merge on the
    *order* within a tie may differ -- but every merge must be a most frequent pair (checked
    against the brute-force count), and after the tie is used up both reach "est</w>".
    """
    marker = "·"
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    words = {tuple(w) + ("</w>",): c for w, c in counts.items()}
    n_merges = 10

    backend = HFTokenizer(hf_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    alphabet = sorted(set("".join(counts)) | {marker})
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges, show_progress=False)
    corpus = " ".join(w + marker for w, c in counts.items() for _ in range(c))
    backend.train_from_iterator([corpus], trainer=trainer)
    learned = [tuple(s.replace(marker, "</w>") for s in m) for m in merges_of(backend)]

    assert len(learned) == n_merges
    check_greedy(words, learned)                         # reference: brute-force pair counts
    reference = paper_bpe(words, n_merges)
    assert reference[:3] == [("e", "s"), ("es", "t"), ("est", "</w>")]   # the paper's text
    assert learned[0] == ("e", "s")
    # After the three tied merges both segmentations of newest/widest end in "est</w>".
    after3 = apply_merge(apply_merge(apply_merge(words, *learned[0]), *learned[1]), *learned[2])
    assert ("n", "e", "w", "est</w>") in after3 and ("w", "i", "d", "est</w>") in after3


def test_train_bpe_merges_are_greedy_most_frequent_pairs():
    """Every merge of our byte-level train_bpe is a most frequent pair, and it stops exactly when
    the vocabulary is full or no pair reaches min_frequency (brute-force reference)."""
    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "mat", "dog", "ran", "über", "naïve", "日本"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(200)]
    tok = train_bpe(texts, vocab_size=300, family="gpt", min_frequency=2)
    words: collections.Counter = collections.Counter()
    for t in texts:
        for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(t):
            words[tuple(piece)] += 1
    merges = merges_of(tok.backend)
    final = check_greedy(dict(words), merges)
    target = 300 - len(SPECIAL_TOKENS) - 256
    remaining = pair_counts(final)
    assert len(merges) == target or max(remaining.values(), default=0) < 2
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 256 + len(merges)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "to", "be", "or", "not", "é", "ß", "\n"]
    texts = ["".join(rng.choice(words) + rng.choice([" ", "  ", "\t", ""]) for _ in range(20))
             for _ in range(100)]
    return train_bpe(texts, vocab_size=320, family="t5", n_sentinels=4)


ROUND_TRIP = [
    "", "a", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
    "naïve façade — 日本語のテキスト 🙂👍🏽", "never-seen: ЖЖЖ ∮ Ω ∞ \x00\x7f", "alphabeta gamma  delta",
    "text with <s> and </s> and <extra_id_2> inside",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.special_ids()["unk_id"] not in ids        # byte-level: nothing is unknown


@pytest.mark.parametrize("uri", [False, True])
def test_save_load_identical(tok, tmp_path, uri):
    where = (tmp_path / "tok").as_uri() if uri else tmp_path / "tok"   # or s3://bucket/run/tok
    tok.save(where)
    again = Tokenizer.load(where)
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size
    assert again.special_ids() == tok.special_ids()
    for text in ROUND_TRIP:
        assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


@pytest.mark.parametrize("family", ["gpt", "bert", "electra", "t5"])
def test_special_ids_fixed(family):
    tok = train_bpe(["a b c d " * 10], vocab_size=300, family=family, n_sentinels=3)
    ids = tok.special_ids()
    for i, (field, token) in enumerate(zip(
            ["pad_id", "bos_id", "eos_id", "unk_id", "mask_id", "cls_id", "sep_id"],
            SPECIAL_TOKENS)):
        assert ids[field] == i == tok.token_to_id(token)
    want = [7, 8, 9] if family == "t5" else []
    assert ids["sentinel_ids"] == want
    assert [tok.token_to_id(f"<extra_id_{i}>") for i in range(len(want))] == want
    # Specials exist only as ids: literal "<mask>" in text is ordinary text (no injection).
    literal = tok.encode("<mask></s>")
    assert not set(literal) & set(range(7 + len(want))) and tok.decode(literal) == "<mask></s>"
    assert tok.decode([1] + tok.encode("hi") + [2], skip_special_tokens=True) == "hi"
    assert tok.decode([1, 4, 2]) == "<s><mask></s>"


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.family"):
        TokenizerConfig(family="llama")
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        train_bpe(["x"], vocab_size=100, family="gpt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
