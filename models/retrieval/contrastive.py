"""Dual-encoder training with InfoNCE over in-batch and hard negatives (DPR), and an exact index.

One shared encoder embeds queries and passages (mean pooling, unit vectors, as the MiniLM
publishes, so the trained model drops into ``MeanPoolEncoder`` and a faiss inner-product index).
For query i with positive p_i (column i of the pool) and a pool P = the batch's positives plus
every query's mined hard negatives (DPR, Karpukhin et al. 2020, sec. 3.2):

    loss_i = -log( exp(s(q_i, p_i)/tau) / sum_{p in P, not excluded} exp(s(q_i, p)/tau) )

with s the cosine and tau the temperature (0.05, i.e. sentence-transformers'
MultipleNegativesRankingLoss scale 20). ``exclude`` drops pool documents judged relevant to q_i
(another query's positive that answers it too) from its denominator. The same loss with
spans as queries and passages is the span pre-training (models/retrieval/spans.py).
``ExactDenseRetriever`` is a brute-force inner-product ``Retriever`` over an encoder's vectors:
what ANCE's refresh mines from and what the evaluation ranks with on small corpora.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.outputs import ModelOutput
from bmray.models.retrieval.encoder import MeanPoolEncoder, hidden_fn, mean_pool
from bmray.models.retrieval.types import Hits
from bmray.models.typed_config import ConfigError

__all__ = ["DualEncoderConfig", "DualEncoder", "info_nce", "ExactDenseRetriever"]


@dataclass(frozen=True)
class DualEncoderConfig:
    temperature: float = 0.05       # tau; 1/tau = 20 is sentence-transformers' default scale
    max_length: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"dual_encoder.temperature: must be > 0, got {self.temperature!r}")
        if not isinstance(self.max_length, int) or self.max_length < 4:
            raise ConfigError(f"dual_encoder.max_length: an int >= 4, got {self.max_length!r}")


def info_nce(q: Tensor, p: Tensor, temperature: float, exclude: Tensor | None = None) -> Tensor:
    """Mean over queries of the InfoNCE loss; q [B, d], p [P >= B, d], positive of q_i = p_i."""
    if p.size(0) < q.size(0):
        raise ValueError(f"info_nce: {p.size(0)} pool passages for {q.size(0)} queries")
    logits = (q.float() @ p.float().T) / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude.to(logits.device), float("-inf"))
    target = torch.arange(q.size(0), device=q.device)
    return F.cross_entropy(logits, target)


class DualEncoder(nn.Module):
    """forward(q_input_ids, q_attention_mask, p_input_ids, p_attention_mask, exclude=None)
    -> ModelOutput(logits = similarities [B, P], loss = InfoNCE)."""

    def __init__(self, encoder: nn.Module, tokenizer: Callable,
                 cfg: DualEncoderConfig = DualEncoderConfig()):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.hidden = hidden_fn(encoder)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.cfg.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return F.normalize(mean_pool(self.hidden(input_ids, attention_mask), attention_mask), dim=-1)

    def forward(self, q_input_ids: Tensor, q_attention_mask: Tensor, p_input_ids: Tensor,
                p_attention_mask: Tensor, exclude: Tensor | None = None, **_: Any) -> ModelOutput:
        q = self.embed(q_input_ids, q_attention_mask)
        p = self.embed(p_input_ids, p_attention_mask)
        loss = info_nce(q, p, self.cfg.temperature, exclude)
        sims = q @ p.T
        metrics = {"pos_top1": (sims.masked_fill(exclude, float("-inf")) if exclude is not None
                                else sims).argmax(1).eq(torch.arange(q.size(0), device=q.device))
                   .float().mean().detach()}
        return ModelOutput(logits=sims, loss=loss, metrics=metrics)

    def text_encoder(self, max_length: int | None = None) -> MeanPoolEncoder:
        """The trained encoder as the ``MeanPoolEncoder`` that indexes a corpus."""
        return MeanPoolEncoder(model=self.encoder, tokenizer=self.tokenizer, hidden=self.hidden,
                               max_length=max_length or self.cfg.max_length)


class ExactDenseRetriever:
    """Brute-force inner product over ``encoder.encode(documents)`` (faiss Flat's ranking;
    ties by document id descending). The corpus is embedded once, at construction."""

    def __init__(self, encoder: MeanPoolEncoder, documents: Mapping[str, str], batch_size: int = 64):
        if not documents:
            raise ValueError("ExactDenseRetriever: no documents")
        self.encoder = encoder
        self.ids = list(documents)
        self.vectors = encoder.encode([documents[d] for d in self.ids], batch_size)
        self.batch_size = batch_size

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if isinstance(queries, str):
            raise TypeError("search: expected a sequence of queries, got one string")
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        if not len(queries):
            return []
        sims = self.encoder.encode(list(queries), self.batch_size) @ self.vectors.T
        ids = np.asarray(self.ids)
        out = []
        for row in sims:
            order = np.lexsort((ids, row))[::-1][:k]     # score desc, then doc id desc
            out.append([(self.ids[j], float(row[j])) for j in order])
        return out
