"""Detokenise streamed token ids into text chunks that never split a character.

Byte-level BPE (GPT-2) can cut one UTF-8 character over several tokens; decoding a prefix that
ends inside a character yields U+FFFD. Like Hugging Face's ``TextStreamer``, ``TextChunker``
decodes the row's whole token list at each step and emits only the new text after the part
already printed, holding back text that ends with U+FFFD until the character is complete (a
stream that ends inside a character flushes what it has). Joined, the chunks equal
``decode(all tokens)``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

from bmray.models.stopping import REPLACEMENT

Decode = Callable[[Sequence[int]], str]


class TextChunker:
    """Per-row incremental detokeniser: ``push(row, ids) -> str`` (possibly empty), ``flush``."""

    def __init__(self, decode: Decode, rows: int = 1):
        self.decode = decode
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [0] * rows

    def push(self, row: int, ids: Iterable[int]) -> str:
        self.tokens[row].extend(int(i) for i in ids)
        text = self.decode(self.tokens[row])
        if text.endswith(REPLACEMENT):
            return ""
        return self._emit(row, text)

    def flush(self, row: int) -> str:
        return self._emit(row, self.decode(self.tokens[row]))

    def _emit(self, row: int, text: str) -> str:
        chunk = text[self.printed[row]:]
        self.printed[row] = len(text)
        return chunk


def text_chunks(steps: Iterable[list[list[int]]], decode: Decode) -> Iterator[list[str]]:
    """Map ``stream``'s per-step token lists (one list per row) to per-step text chunks per row;
    a last item flushes what is held back."""
    chunker: TextChunker | None = None
    for step in steps:
        if chunker is None:
            chunker = TextChunker(decode, len(step))
        yield [chunker.push(row, ids) for row, ids in enumerate(step)]
    if chunker is not None:
        tail = [chunker.flush(row) for row in range(len(chunker.tokens))]
        if any(tail):
            yield tail
