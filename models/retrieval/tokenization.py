"""Our byte-level BPE behind the call signature of a ``transformers`` tokenizer.

The dual encoder (``MeanPoolEncoder``) and the cross-encoder call their tokenizer as
``tok(texts, pairs=None, padding=True, truncation=True, max_length=L, return_tensors="pt")``,
which the offline MiniLM's tokenizer already answers. ``BertTextTokenizer`` gives our BERT
family the same: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (BERT's input layout, Devlin
et al. 2019, sec. 3), segment ids 0 for a and 1 for b, right padding with ``<pad>``. Pairs too
long are cut one token at a time from the longer side, as ``truncation=True``
("longest_first") does in ``transformers``, so the query is kept whole next to a long passage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bmray.models.tokenizer import Tokenizer


def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Cut the longer of ``a`` / ``b`` one token at a time until their lengths sum to ``budget``."""
    if b is None:
        return a[:max(budget, 0)], None
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


@dataclass
class BertTextTokenizer:
    """``tokenizer(texts, pairs=None, ...) -> {input_ids, attention_mask, token_type_ids}``."""

    tokenizer: Tokenizer
    model_max_length: int = 512

    def __post_init__(self) -> None:
        ids = self.tokenizer.special_ids()
        self.pad_id, self.cls_id, self.sep_id = ids["pad_id"], ids["cls_id"], ids["sep_id"]

    def __call__(self, texts: Sequence[str] | str, pairs: Sequence[str] | str | None = None,
                 padding: bool = True, truncation: bool | str = True,
                 max_length: int | None = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(pairs, str):
            pairs = [pairs]
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"tokenizer: {len(texts)} texts but {len(pairs)} pair texts")
        if return_tensors != "pt":
            raise ValueError(f"tokenizer: only return_tensors='pt' is supported, got {return_tensors!r}")
        limit = min(max_length or self.model_max_length, self.model_max_length)
        first = self.tokenizer.encode_batch(list(texts))
        second = self.tokenizer.encode_batch(list(pairs)) if pairs is not None else [None] * len(first)
        rows, types = [], []
        for a, b in zip(first, second):
            specials = 2 if b is None else 3
            if truncation:
                a, b = truncate_pair(a, b, limit - specials)
            ids = [self.cls_id, *a, self.sep_id]
            seg = [0] * len(ids)
            if b is not None:
                ids += [*b, self.sep_id]
                seg += [1] * (len(b) + 1)
            rows.append(ids)
            types.append(seg)
        width = max(len(r) for r in rows) if rows else 0
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, types)):
            input_ids[i, :len(r)] = torch.tensor(r)
            token_type_ids[i, :len(s)] = torch.tensor(s)
            attention_mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids}
