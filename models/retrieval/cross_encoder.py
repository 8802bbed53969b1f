"""A cross-encoder re-ranker: ``[CLS] query [SEP] passage [SEP]`` -> encoder -> linear -> score.

Query and passage attend to each other in every layer (Nogueira & Cho 2019, "Passage
re-ranking with BERT"), which a dual encoder cannot do, so it is used on a first stage's top
``depth`` only. The score is ``w . pool(h) + b`` with ``pool`` the [CLS] state (or the mean
over real tokens). Training: localised contrastive estimation (LCE, Gao, Dai & Callan 2021,
"Rethink training of BERT rerankers"): per query one relevant passage and n negatives taken
from the first stage's top results that are not judged relevant, and

    loss = mean_q [ logsumexp_j s(q, p_j) - s(q, p_+) ]      (softmax cross-entropy, j over 1+n)

The model's ``forward`` returns that loss from a flat batch of pairs laid out query by query
(positive first), so the one Trainer trains it under any strategy. Encoders: our BERT family
(``encode(ids, mask, token_type_ids)``) or a ``transformers`` BERT such as the offline MiniLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.classifier import pool
from bmray.models.outputs import ModelOutput
from bmray.models.retrieval.encoder import last_hidden
from bmray.models.retrieval.types import Hits, Retriever
from bmray.models.typed_config import ConfigError, check_choice

__all__ = ["CrossEncoderConfig", "CrossEncoder", "CrossEncoderReranker", "lce_loss"]


@dataclass(frozen=True)
class CrossEncoderConfig:
    max_length: int = 256           # query + passage + 3 specials, cut longest side first
    pooling: str = "cls"            # "cls" | "mean"
    dropout: float = 0.1            # on the pooled state, training only

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ConfigError(f"cross_encoder.max_length: an int >= 8, got {self.max_length!r}")
        check_choice("cross_encoder.pooling", self.pooling, ("cls", "mean"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"cross_encoder.dropout: must be in [0, 1), got {self.dropout!r}")


def lce_loss(scores: Tensor) -> Tensor:
    """Softmax cross-entropy with the positive in column 0 of ``scores`` [n_queries, 1 + n]."""
    if scores.dim() != 2 or scores.size(1) < 2:
        raise ValueError(f"lce_loss: scores must be [queries, 1 + negatives >= 2], got "
                         f"{tuple(scores.shape)}")
    target = torch.zeros(scores.size(0), dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


class CrossEncoder(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids=None, group_size=None)
    -> ModelOutput(logits = scores [B], loss = LCE over groups of ``group_size`` when given).

    ``tokenizer`` is called like a ``transformers`` tokenizer on (queries, passages)."""

    def __init__(self, encoder: nn.Module, tokenizer: Callable, hidden_size: int,
                 cfg: CrossEncoderConfig = CrossEncoderConfig()):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, Tensor]:
        if len(queries) != len(passages):
            raise ValueError(f"cross-encoder: {len(queries)} queries but {len(passages)} passages")
        batch = self.tokenizer(list(queries), list(passages), padding=True, truncation=True,
                               max_length=self.cfg.max_length, return_tensors="pt")
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None, group_size: int | None = None,
                **_: Any) -> ModelOutput:
        hidden = last_hidden(self.encoder, input_ids, attention_mask, token_type_ids)
        scores = self.head(self.dropout(pool(hidden, attention_mask, self.cfg.pooling))).squeeze(-1)
        loss, metrics = None, {}
        if group_size is not None:
            if scores.numel() % group_size:
                raise ValueError(f"cross-encoder: {scores.numel()} pairs do not split into "
                                 f"groups of {group_size}")
            grouped = scores.view(-1, group_size)
            loss = lce_loss(grouped)
            metrics["pos_top1"] = (grouped.argmax(1) == 0).float().mean().detach()
        return ModelOutput(logits=scores, loss=loss, metrics=metrics)

    def score(self, queries: Sequence[str], passages: Sequence[str],
              batch_size: int = 64) -> np.ndarray:
        """float32 [N] relevance scores of (query, passage) pairs, eval mode, no gradients."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(queries), batch_size):
                    batch = self.tokenize(queries[i:i + batch_size], passages[i:i + batch_size])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    out.append(self(**batch).logits.float().cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@dataclass
class CrossEncoderReranker:
    """``Retriever``: the first stage's ``depth`` best per query, re-scored by the cross-encoder.

    Only first-stage candidates are returned, ordered by the model's score (ties by doc id
    descending, trec_eval's order); ``documents`` maps the first stage's ids to their text.
    """

    retriever: Retriever
    model: CrossEncoder
    documents: Mapping[str, str]
    depth: int = 100
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not callable(getattr(self.retriever, "search", None)):
            raise TypeError(f"CrossEncoderReranker: the first stage "
                            f"({type(self.retriever).__name__}) has no search(queries, k)")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"CrossEncoderReranker: depth must be an int >= 1, got {self.depth!r}")

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if isinstance(queries, str):
            raise TypeError("search: expected a sequence of queries, got one string")
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        first = self.retriever.search(list(queries), max(self.depth, 1))
        q_texts, p_texts, owners = [], [], []
        for qi, hits in enumerate(first):
            for doc, _ in hits[:self.depth]:
                if doc not in self.documents:
                    raise KeyError(f"CrossEncoderReranker: the first stage returned document "
                                   f"{doc!r}, which is not in the reranker's documents")
                q_texts.append(queries[qi])
                p_texts.append(self.documents[doc])
                owners.append((qi, doc))
        scores = self.model.score(q_texts, p_texts, self.batch_size)
        per_query: list[dict[str, float]] = [{} for _ in queries]
        for (qi, doc), s in zip(owners, scores.tolist()):
            per_query[qi][doc] = s
        return [sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k] for d in per_query]
