"""One tokenizer interface for prompts, over a `transformers` tokenizer or our BPE `Tokenizer`.

A template is encoded part by part, so the interface needs: ids of a text with no specials,
whether the tokenizer is space-sensitive (byte-level BPE: " great" and "great" differ; WordPiece:
they do not), the framing the model was trained with (``[CLS] ... [SEP]``, ``<s> ...``), and
the mask / pad / unknown ids. T5-style models fill a span with the first sentinel
(``<extra_id_0>``, Raffel et al. 2020), so for them ``mask_id`` is that sentinel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bmray.models.tokenizer import Tokenizer

PROBE = "a"     # a text every tokenizer encodes to a short, special-free id sequence

# Framing of our families (the special ids are fixed: models/tokenizer.py).
_FAMILY_FRAMING = {"bert": ((5,), (6,)), "electra": ((5,), (6,)), "gpt": ((1,), ()),
                   "t5": ((), (2,))}


@dataclass(frozen=True)
class PromptTokenizer:
    """What templates and verbalizers need from a tokenizer (build with ``wrap``)."""
    encode_fn: Callable[[str], list[int]]
    decode_fn: Callable[[list[int]], str]
    vocab_size: int
    mask_id: int | None
    pad_id: int
    unk_id: int | None
    eos_id: int | None
    prefix_ids: tuple[int, ...]         # framing before the text ([CLS] / <s>)
    suffix_ids: tuple[int, ...]         # framing after it ([SEP] / </s>)
    space_sensitive: bool

    def encode(self, text: str, space_before: bool = False) -> list[int]:
        """Ids of ``text`` without specials; a space-sensitive tokenizer sees the space that
        separated the text from what came before it."""
        if not text:
            return []
        return list(self.encode_fn((" " + text) if space_before and self.space_sensitive else text))

    def decode(self, ids: list[int]) -> str:
        return self.decode_fn(list(ids))


def wrap(tokenizer: Any) -> PromptTokenizer:
    """A `PromptTokenizer` for our `Tokenizer` or a `transformers` tokenizer (or one as is)."""
    if isinstance(tokenizer, PromptTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        ids = tokenizer.special_ids()
        prefix, suffix = _FAMILY_FRAMING[tokenizer.family]
        mask = ids["sentinel_ids"][0] if tokenizer.family == "t5" and ids["sentinel_ids"] else ids["mask_id"]
        return PromptTokenizer(tokenizer.encode, tokenizer.decode, tokenizer.vocab_size, mask,
                               ids["pad_id"], ids["unk_id"], ids["eos_id"], prefix, suffix,
                               _space_sensitive(tokenizer.encode))
    if hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "encode"):
        return _wrap_transformers(tokenizer)
    raise TypeError(f"cannot use a {type(tokenizer).__name__} as a prompt tokenizer: expected a "
                    "bmray Tokenizer, a transformers tokenizer or a PromptTokenizer")


def _space_sensitive(encode: Callable[[str], list[int]]) -> bool:
    return list(encode(" " + PROBE)) != list(encode(PROBE))


def _wrap_transformers(tok: Any) -> PromptTokenizer:
    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids)

    bare, framed = encode(PROBE), tok.encode(PROBE, add_special_tokens=True)
    start = next(i for i in range(len(framed) - len(bare) + 1) if framed[i:i + len(bare)] == bare)
    mask = tok.mask_token_id
    if mask is None and "<extra_id_0>" in tok.get_vocab():
        mask = tok.convert_tokens_to_ids("<extra_id_0>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return PromptTokenizer(encode, decode, len(tok), mask, pad, tok.unk_token_id, tok.eos_token_id,
                           tuple(framed[:start]), tuple(framed[start + len(bare):]),
                           _space_sensitive(encode))
