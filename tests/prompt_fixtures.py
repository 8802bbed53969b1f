"""Tiny tokenizers, models and a toy task for the prompt-learning tests."""
from __future__ import annotations

import functools

import torch

from bmray.models.config import ModelConfig
from bmray.models.data.classification import Example
from bmray.models.families.registry import build_model
from bmray.models.tokenizer import Tokenizer, train_bpe

POSITIVE = ["the film was good", "a good and fine story", "good acting and a good plot",
            "i liked it , good", "fine work , good cast"]
NEGATIVE = ["the film was bad", "a bad and dull story", "bad acting and a bad plot",
            "i hated it , bad", "dull work , bad cast"]


def corpus() -> list[str]:
    return [f"{t} . it was {w} ." for i in range(20) for t, w in
            ((POSITIVE[i % 5], "great"), (NEGATIVE[i % 5], "awful"))]


@functools.lru_cache(maxsize=None)
def tokenizer(family: str) -> Tokenizer:
    return train_bpe(corpus(), vocab_size=300, family=family, n_sentinels=4)


def model(family: str, seed: int = 0, **kw):
    tok = tokenizer(family)
    cfg = dict(family=family, vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_layers=2,
               d_ff=64, max_seq_len=64, dropout=0.0, **tok.special_ids())
    cfg.update(kw)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**cfg))


def toy_examples() -> list[Example]:
    return ([Example(t, label="pos") for t in POSITIVE] + [Example(t, label="neg") for t in NEGATIVE])
