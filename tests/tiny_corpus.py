"""A tiny real corpus for training tests: a BPE tokenizer trained on it and its packed blocks."""
from __future__ import annotations

from bmray.models.data import pack_corpus
from bmray.models.tokenizer import train_bpe

BLOCK = 17
COLORS, SIZES = ["red", "blue", "green", "black"], ["big", "small", "odd"]


def corpus_texts() -> list[str]:
    return [f"the {COLORS[i % 4]} cat number {i} sat on the {SIZES[i % 3]} mat and said "
            f"{i * 7 % 13}." for i in range(160)]


def build_pack(root, eval_blocks: int) -> tuple[str, int]:
    """(pack path, vocab size) under ``root``."""
    tok = train_bpe(corpus_texts(), vocab_size=300, family="gpt")
    pack_corpus(corpus_texts(), tok, block_len=BLOCK, out_path=str(root / "pack"),
                eval_blocks=eval_blocks, row_group_size=16, source="test")
    return str(root / "pack"), tok.vocab_size
