"""A template language for prompts: text with placeholders in braces, parsed once, encoded per
example (the idea of OpenPrompt's templates, Ding et al. 2022; our own syntax).

    "{text_a:shorten} Question type: {mask}."        "{soft*4} {text_a} {soft:It was} {mask}"
    "{meta:title} {text_b} {soft#0} {mask} {soft#0}"  literal braces: "{{" and "}}"

``{text_a}``, ``{text_b}``, ``{meta:FIELD}`` (add ``:shorten`` to let truncation cut it);
``{mask}``; ``{soft}`` a trainable vector (random init), ``{soft*N}`` N of them, ``{soft:WORDS}``
one per word, each initialised from that word's embedding, ``{soft#K}`` (with ``*N`` or
``:WORDS`` at its first use) a group shared by every use of id K. Truncation cuts only
shortenable parts, longest first, from their end; never text, mask or soft tokens.
The full grammar and the space rule: docs/prompt_learning.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bmray.models.data.classification import Example
from bmray.models.prompt.tokenization import PromptTokenizer, wrap

_SOFT_RE = re.compile(r"soft(?:#(\d+))?(?:\*(\d+))?(?::(.+))?", re.DOTALL)
_INPUT_RE = re.compile(r"(text_a|text_b|meta:[A-Za-z_][A-Za-z0-9_]*)(:shorten)?")
KINDS = ("text", "input", "mask", "soft")


class TemplateError(ValueError):
    """A template that cannot be parsed or encoded; the message names the position or part."""


@dataclass(frozen=True)
class Part:
    """One piece of a parsed template (``kind`` in KINDS)."""
    kind: str
    value: str = ""                      # text: the literal; input: text_a | text_b | meta:FIELD
    shorten: bool = False                # input only: truncation may cut it
    space_before: bool = False           # whitespace separated it from the previous part
    soft_ids: tuple[int, ...] = ()       # soft: rows of the soft-token table
    position: int = 0                    # offset of the part in the template string


@dataclass(frozen=True)
class EncodedPrompt:
    """A template filled with one example and tokenized (framing specials included)."""
    input_ids: list[int]
    attention_mask: list[int]
    mask_positions: list[int]
    soft_positions: list[int]            # positions holding soft tokens (their ids: pad)
    soft_ids: list[int]                  # the soft-token row of each such position
    n_truncated: int                     # tokens cut from shortenable parts


def _error(template: str, pos: int, msg: str) -> TemplateError:
    return TemplateError(f"template position {pos}: {msg}\n  {template}\n  {' ' * pos}^")


class Template:
    """A parsed template; ``soft_words[i]`` is the init word of soft row i (None: random)."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TemplateError(f"a template is a string, got {type(text).__name__}")
        self.text = text
        self.soft_words: list[str | None] = []
        self._groups: dict[int, tuple[tuple[int, ...], tuple[str | None, ...], int]] = {}
        self.parts: tuple[Part, ...] = tuple(self._parse(text))

    # ------------------------------------------------------------------ parsing
    def _parse(self, t: str) -> list[Part]:
        parts, buf, buf_start, i = [], [], 0, 0
        space = False                                   # whitespace before the next part

        def flush_text():
            nonlocal space, buf
            raw = "".join(buf)
            if raw.strip():
                lead = len(raw) - len(raw.lstrip())
                parts.append(Part("text", raw.strip(), space_before=space or lead > 0,
                                  position=buf_start + lead))
                space = raw[-1].isspace()
            elif raw:
                space = True
            buf = []

        while i < len(t):
            c = t[i]
            if t.startswith("{{", i) or t.startswith("}}", i):
                if not buf:
                    buf_start = i
                buf.append(c)
                i += 2
            elif c == "}":
                raise _error(t, i, "'}' without an opening '{' (write '}}' for a literal brace)")
            elif c == "{":
                end = t.find("}", i + 1)
                nested = t.find("{", i + 1)
                if end < 0:
                    raise _error(t, i, "'{' is never closed")
                if 0 <= nested < end:
                    raise _error(t, nested, "'{' inside a placeholder")
                flush_text()
                parts.append(self._placeholder(t, t[i + 1:end], i, space))
                space = False
                i = end + 1
            else:
                if not buf:
                    buf_start = i
                buf.append(c)
                i += 1
        flush_text()
        return parts

    def _placeholder(self, t: str, body: str, pos: int, space: bool) -> Part:
        if body == "mask":
            return Part("mask", space_before=space, position=pos)
        m = _INPUT_RE.fullmatch(body)
        if m:
            return Part("input", m.group(1), shorten=bool(m.group(2)), space_before=space, position=pos)
        m = _SOFT_RE.fullmatch(body)
        if m:
            return Part("soft", space_before=space, soft_ids=self._soft(t, pos, *m.groups()), position=pos)
        raise _error(t, pos, f"unknown placeholder {{{body}}}; expected text_a, text_b, meta:FIELD "
                             "(each optionally :shorten), mask, soft, soft*N, soft:WORDS, soft#K")

    def _soft(self, t: str, pos: int, gid: str | None, count: str | None, words: str | None
              ) -> tuple[int, ...]:
        if count is not None and words is not None:
            raise _error(t, pos, "soft tokens take *N or :WORDS, not both (WORDS gives one per word)")
        if count is not None and int(count) < 1:
            raise _error(t, pos, f"soft*{count}: the count must be >= 1")
        if words is not None and not words.split():
            raise _error(t, pos, "soft:WORDS needs at least one word")
        inits = tuple(words.split()) if words is not None else (None,) * int(count or 1)
        if gid is not None and int(gid) in self._groups:
            rows, first_inits, first_pos = self._groups[int(gid)]
            if (count is not None or words is not None) and inits != first_inits:
                raise _error(t, pos, f"soft#{gid} was defined at position {first_pos} as "
                                     f"{len(first_inits)} token(s) {list(first_inits)}; a later use "
                                     "must repeat that or write just {soft#" + gid + "}")
            return rows
        rows = tuple(range(len(self.soft_words), len(self.soft_words) + len(inits)))
        self.soft_words.extend(inits)
        if gid is not None:
            self._groups[int(gid)] = (rows, inits, pos)
        return rows

    # ------------------------------------------------------------------ properties
    @property
    def n_masks(self) -> int:
        return sum(p.kind == "mask" for p in self.parts)

    @property
    def n_soft(self) -> int:
        """Rows of the soft-token table this template needs."""
        return len(self.soft_words)

    @property
    def mask_is_last(self) -> bool:
        """Nothing follows the (single) mask: what a left-to-right LM needs."""
        return bool(self.parts) and self.parts[-1].kind == "mask" and self.n_masks == 1

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    # ------------------------------------------------------------------ encoding
    def encode(self, example: Example, tokenizer: Any, max_length: int, n_mask: int = 1
               ) -> EncodedPrompt:
        """Fill with ``example``, tokenize, truncate shortenable parts (longest first, from
        their end) to ``max_length`` tokens; each ``{mask}`` becomes ``n_mask`` mask tokens."""
        tok: PromptTokenizer = wrap(tokenizer)
        if n_mask < 1:
            raise TemplateError(f"n_mask must be >= 1, got {n_mask}")
        if self.n_masks and tok.mask_id is None:
            raise TemplateError(f"{self!r} has a mask but the tokenizer has no mask token")
        pieces = [self._piece_ids(p, example, tok, n_mask) for p in self.parts]
        fixed = len(tok.prefix_ids) + len(tok.suffix_ids) + sum(
            len(ids) for p, ids in zip(self.parts, pieces) if not p.shorten)
        excess = fixed + sum(len(ids) for p, ids in zip(self.parts, pieces) if p.shorten) - max_length
        if fixed > max_length:
            raise TemplateError(f"{self!r}: the parts that may not be shortened take {fixed} tokens, "
                                f"more than max_length={max_length}")
        n_cut = max(excess, 0)
        while excess > 0:                   # one token off the longest shortenable part
            j = max((k for k, p in enumerate(self.parts) if p.shorten), key=lambda k: len(pieces[k]))
            pieces[j] = pieces[j][:-1]
            excess -= 1
        ids, masks, soft_pos, soft_ids = list(tok.prefix_ids), [], [], []
        for p, piece in zip(self.parts, pieces):
            if p.kind == "mask":
                masks.extend(range(len(ids), len(ids) + len(piece)))
            elif p.kind == "soft":
                soft_pos.extend(range(len(ids), len(ids) + len(piece)))
                soft_ids.extend(p.soft_ids)
            ids.extend(piece)
        ids.extend(tok.suffix_ids)
        return EncodedPrompt(ids, [1] * len(ids), masks, soft_pos, soft_ids, n_cut)

    def _piece_ids(self, p: Part, example: Example, tok: PromptTokenizer, n_mask: int) -> list[int]:
        if p.kind == "text":
            return tok.encode(p.value, p.space_before)
        if p.kind == "mask":
            return [tok.mask_id] * n_mask
        if p.kind == "soft":
            return [tok.pad_id] * len(p.soft_ids)
        return tok.encode(self._input_value(p, example).strip(), p.space_before)

    def _input_value(self, p: Part, example: Example) -> str:
        if p.value.startswith("meta:"):
            field = p.value[5:]
            if field not in example.meta:
                raise TemplateError(f"{self!r} uses {{{p.value}}} but the example's meta has only "
                                    f"{sorted(example.meta)}")
            return str(example.meta[field])
        value = getattr(example, p.value)
        if value is None:
            raise TemplateError(f"{self!r} uses {{{p.value}}} but the example has no {p.value}")
        return value
