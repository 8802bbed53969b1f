"""Stop sequences for generation: when a row stops, where its output is cut, what is safe to stream.

A row stops as soon as its generated tokens end with one of the stop sequences: token-id lists
are compared on ids; strings are compared on the decoded text of the generated tokens (so a stop
string may span token boundaries or end inside a token). As in the OpenAI API, the stop sequence
is *not* part of the output: the row is cut before the first token that overlaps the match (for
strings, ``truncate_text`` cuts the text exactly at the match). Hugging Face's ``stop_strings``
keep the stop text; we follow OpenAI.

Streaming must never emit a token that a later stop match would cut, so ``safe_length`` holds
back the tokens whose tail could still grow into a stop sequence (and, for strings, a trailing
incomplete UTF-8 character, which decodes to U+FFFD).
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"       # what a byte-level decoder returns for an incomplete UTF-8 sequence

Decode = Callable[[Sequence[int]], str]


class StopSequences:
    """Stop sequences of one kind: token-id lists, or strings (then ``decode`` is required)."""

    def __init__(self, stop: Sequence[str] | Sequence[Sequence[int]], decode: Decode | None = None):
        self.strings = [s for s in stop if isinstance(s, str)]
        self.ids = [list(s) for s in stop if not isinstance(s, str)]
        if self.strings and self.ids:
            raise ValueError("stop: give either strings or token-id lists, not both")
        if any(len(s) == 0 for s in [*self.strings, *self.ids]):
            raise ValueError("stop: a stop sequence must not be empty")
        if self.strings and decode is None:
            raise ValueError("stop strings need a tokenizer to decode the generated tokens; pass "
                             "tokenizer= (anything with .decode(ids) -> str)")
        self.decode = decode

    def __bool__(self) -> bool:
        return bool(self.strings or self.ids)

    def cut(self, tokens: Sequence[int]) -> int | None:
        """Where to cut ``tokens`` if they end a stop sequence (tokens[:cut] is kept), else None."""
        if self.ids:
            for s in self.ids:
                if len(tokens) >= len(s) and list(tokens[-len(s):]) == s:
                    return len(tokens) - len(s)
            return None
        text = self.decode(tokens)
        starts = [p for p in (text.find(s) for s in self.strings) if p >= 0]
        if not starts:
            return None
        start = min(starts)
        n = len(tokens)
        while n > 0 and len(self.decode(tokens[:n])) > start:
            n -= 1
        return n

    def safe_length(self, tokens: Sequence[int], floor: int = 0) -> int:
        """How many leading tokens no later stop match can cut (at least ``floor``, which must
        be a count already known safe)."""
        if self.ids:
            hold = 0
            for s in self.ids:
                for k in range(min(len(s) - 1, len(tokens)), hold, -1):
                    if list(tokens[-k:]) == s[:k]:
                        hold = k
                        break
            return max(floor, len(tokens) - hold)
        text = self.decode(tokens)
        hold = 0
        for s in self.strings:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        limit = len(text) - hold
        n = len(tokens)
        while n > floor:
            prefix = self.decode(tokens[:n])
            if len(prefix) <= limit and not prefix.endswith(REPLACEMENT):
                break
            n -= 1
        return n


def truncate_text(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (excluding) the first occurrence of any stop string (OpenAI's behaviour)."""
    starts = [p for p in (text.find(s) for s in stop if s) if p >= 0]
    return text[:min(starts)] if starts else text
