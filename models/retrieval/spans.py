"""Contrastive span pairs from unlabelled documents: Contriever's independent cropping.

Izacard et al. 2022 ("Unsupervised dense information retrieval with contrastive learning",
sec. 3.2): two spans cropped independently from the same document are a positive pair; the
spans of the other documents in the batch are the negatives; the loss is the dual encoder's
InfoNCE (models/retrieval/contrastive.py). Chosen over Condenser because it trains exactly
the model and loss we fine-tune afterwards (a mean-pooled, shared encoder with InfoNCE) and
needs no architecture change, where Condenser adds a head over early-layer states that is
thrown away; Contriever reports the cropping beats inverse-cloze pairs. Each span's length is
a uniform fraction in [min_ratio, max_ratio] of the document's words (the paper: 0.1-0.5 of
tokens; words here so any tokenizer sees the same text), its start uniform, independently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bmray.models.typed_config import ConfigError

__all__ = ["SpanConfig", "crop", "SpanObjective"]


@dataclass(frozen=True)
class SpanConfig:
    min_ratio: float = 0.1
    max_ratio: float = 0.5
    min_words: int = 4              # a span is never shorter (whole document if it is shorter)

    def __post_init__(self) -> None:
        if not 0.0 < self.min_ratio <= self.max_ratio <= 1.0:
            raise ConfigError(f"spans: need 0 < min_ratio <= max_ratio <= 1, got "
                              f"{self.min_ratio!r}, {self.max_ratio!r}")
        if not isinstance(self.min_words, int) or self.min_words < 1:
            raise ConfigError(f"spans.min_words: an int >= 1, got {self.min_words!r}")


def crop(words: Sequence[str], cfg: SpanConfig, generator: torch.Generator) -> tuple[int, int]:
    """[start, end) of one random span of ``words``."""
    n = len(words)
    u = float(torch.rand((), generator=generator))
    length = round(n * (cfg.min_ratio + u * (cfg.max_ratio - cfg.min_ratio)))
    length = min(n, max(cfg.min_words, length))
    start = int(torch.randint(n - length + 1, (1,), generator=generator))
    return start, start + length


@dataclass
class SpanObjective:
    """Rows (document indices) -> a dual-encoder batch of two independent crops per document:
    ``{q_*, p_*, exclude}``, with ``exclude`` masking a duplicate of the same document."""

    documents: Sequence[str]
    tokenize: Callable[..., dict[str, Tensor]]
    cfg: SpanConfig = SpanConfig()

    def __post_init__(self) -> None:
        self.words = [d.split() for d in self.documents]
        if not self.words or any(not w for w in self.words):
            raise ValueError("SpanObjective: documents must be non-empty texts")

    def pairs(self, indices: Sequence[int], generator: torch.Generator
              ) -> list[tuple[str, str]]:
        out = []
        for i in indices:
            w = self.words[i]
            (a0, a1), (b0, b1) = crop(w, self.cfg, generator), crop(w, self.cfg, generator)
            out.append((" ".join(w[a0:a1]), " ".join(w[b0:b1])))
        return out

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        g = generator or torch.Generator().manual_seed(0)
        idx = blocks[:, 0].tolist()
        pairs = self.pairs(idx, g)
        same = torch.tensor(idx)
        exclude = (same[:, None] == same[None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
        qt = self.tokenize([a for a, _ in pairs])
        pt = self.tokenize([b for _, b in pairs])
        return {**{f"q_{k}": v for k, v in qt.items()}, **{f"p_{k}": v for k, v in pt.items()},
                "exclude": exclude}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["q_input_ids"].size(0))
