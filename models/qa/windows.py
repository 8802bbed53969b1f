"""Long contexts as overlapping windows ``[CLS] question [SEP] context piece [SEP]``.

A context longer than the encoder's input is cut into pieces of ``max_length - |q| - 3``
tokens, consecutive pieces sharing ``doc_stride`` tokens (the stride of BERT's SQuAD recipe,
Devlin et al. 2019, and of HF's ``run_qa.py``: ``doc_stride`` is the overlap). Each window
keeps the character span of every context token (a fast tokenizer's offset mapping, leading
whitespace trimmed), so a predicted token span maps back to the exact context characters.
Labels follow SQuAD v2: the gold span's first/last token in a window that contains it whole,
else the [CLS] position 0 (as for an unanswerable question).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Offsets = list[tuple[int, int]]
CACHED_TEXTS = 1024      # encodings kept: many questions share one long context (read-only)


@dataclass(frozen=True)
class SpanTokenizer:
    """What windowing needs from a tokenizer: ids + character offsets of a text (no specials),
    and the ids of [CLS], [SEP] and padding. ``name`` identifies it in manifests."""

    encode: Callable[[str], tuple[list[int], Offsets]]
    cls_id: int
    sep_id: int
    pad_id: int
    name: str

    @classmethod
    def from_hf(cls, tok: Any, name: str = "hf") -> "SpanTokenizer":
        """A ``transformers`` fast tokenizer (offsets need the Rust backend)."""
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(tok).__name__} is not a fast tokenizer: no offset mapping")

        def encode(text: str) -> tuple[list[int], Offsets]:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return list(enc["input_ids"]), trim_offsets(text, enc["offset_mapping"])
        return cls(functools.lru_cache(maxsize=CACHED_TEXTS)(encode), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, name)

    @classmethod
    def from_bmray(cls, tok: Any) -> "SpanTokenizer":
        """Our byte-level BPE (models/tokenizer.py): its ``tokenizers`` backend's offsets."""
        ids = tok.special_ids()

        def encode(text: str) -> tuple[list[int], Offsets]:
            enc = tok.backend.encode(text, add_special_tokens=False)
            return list(enc.ids), trim_offsets(text, enc.offsets)
        return cls(functools.lru_cache(maxsize=CACHED_TEXTS)(encode), ids["cls_id"], ids["sep_id"], ids["pad_id"], f"bpe:{tok.hash}")


def trim_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> Offsets:
    """Move each span's start past leading whitespace (byte-level BPE folds the space before a
    word into the word's token)."""
    out = []
    for s, e in offsets:
        while s < e and text[s].isspace():
            s += 1
        out.append((int(s), int(e)))
    return out


@dataclass(frozen=True)
class Window:
    """One encoder input. ``offsets[i]`` is token i's context character span, ``None`` for the
    question and the specials; ``start_position``/``end_position`` are the gold token span
    (0, 0 = [CLS]: no answer in this window)."""

    example: int
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start_position: int = 0
    end_position: int = 0

    @property
    def context_range(self) -> tuple[int, int]:
        """[first, last] character covered by this window's context tokens."""
        spans = [o for o in self.offsets if o is not None]
        return spans[0][0], spans[-1][1]

    def span_text(self, context: str, start: int, end: int) -> str:
        """The context characters of token span [start, end] (inclusive)."""
        return context[self.offsets[start][0]:self.offsets[end][1]]


def make_windows(question: str, context: str, tokenizer: SpanTokenizer, max_length: int,
                 doc_stride: int, answer: tuple[int, int] | None = None, example: int = 0
                 ) -> list[Window]:
    """The windows of one (question, context); ``answer`` = (start_char, end_char) or None.

    A question too long to leave more than ``doc_stride`` context tokens per window is a
    ValueError (windows would not advance), as is an answer span outside the context."""
    if doc_stride < 0:
        raise ValueError(f"doc_stride must be >= 0, got {doc_stride}")
    if answer is not None and not 0 <= answer[0] < answer[1] <= len(context):
        raise ValueError(f"example {example}: answer span {answer} is not inside the context "
                         f"of {len(context)} characters")
    q_ids, _ = tokenizer.encode(question)
    room = max_length - len(q_ids) - 3
    if room <= doc_stride:
        raise ValueError(f"example {example}: the question has {len(q_ids)} tokens, leaving "
                         f"{max(room, 0)} context tokens per window of max_length {max_length}; "
                         f"need more than doc_stride={doc_stride}")
    c_ids, c_off = tokenizer.encode(context)
    head = [tokenizer.cls_id, *q_ids, tokenizer.sep_id]
    windows, start = [], 0
    while True:
        stop = min(start + room, len(c_ids))
        ids = head + c_ids[start:stop] + [tokenizer.sep_id]
        offsets = [None] * len(head) + list(c_off[start:stop]) + [None]
        s_pos, e_pos = gold_positions(c_off[start:stop], answer) if answer else (0, 0)
        if s_pos:
            s_pos, e_pos = s_pos + len(head) - 1, e_pos + len(head) - 1
        windows.append(Window(example, ids, [0] * len(head) + [1] * (len(ids) - len(head)),
                              offsets, s_pos, e_pos))
        if stop >= len(c_ids):
            return windows
        start += room - doc_stride


def gold_positions(offsets: Offsets, answer: tuple[int, int]) -> tuple[int, int]:
    """1-based (first, last) token of the answer among ``offsets`` if they cover it whole,
    else (0, 0)."""
    start_char, end_char = answer
    if not offsets or offsets[0][0] > start_char or offsets[-1][1] < end_char:
        return 0, 0
    first = next(i for i, (_, e) in enumerate(offsets) if e > start_char)
    last = max(i for i, (s, _) in enumerate(offsets) if s < end_char)
    return first + 1, last + 1


def collate(windows: Sequence[Window], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors [B, T]: input_ids, attention_mask, token_type_ids, context_mask
    (1 on context tokens: the only valid answer positions) and the gold positions."""
    width = max(len(w.input_ids) for w in windows)
    batch = {k: torch.zeros(len(windows), width, dtype=torch.long)
             for k in ("input_ids", "attention_mask", "token_type_ids", "context_mask")}
    batch["input_ids"].fill_(pad_id)
    for r, w in enumerate(windows):
        n = len(w.input_ids)
        batch["input_ids"][r, :n] = torch.tensor(w.input_ids)
        batch["attention_mask"][r, :n] = 1
        batch["token_type_ids"][r, :n] = torch.tensor(w.token_type_ids)
        batch["context_mask"][r, :n] = torch.tensor([o is not None for o in w.offsets])
    batch["start_positions"] = torch.tensor([w.start_position for w in windows])
    batch["end_positions"] = torch.tensor([w.end_position for w in windows])
    return batch
