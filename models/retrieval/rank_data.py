"""Judged queries as the Trainer's batches: groups for a cross-encoder, pools for a dual encoder.

The Trainer streams ``LongTensor[b, 1]`` rows (a query's index; ``RowStream`` shuffles and
splits them over ranks) and an objective turns a slice into the model's tensors, drawing its
random choices from the generator the loop seeds per (step, micro-batch, rank), so a resumed
run draws the same. A query's positive is one of its highest-graded relevant documents (the
world's grade 2, "states the fact"); its negatives are drawn from the ``NegativeMiner``'s
current candidates (top ``hard_pool``, never judged relevant), topped up with random
unjudged documents when the first stage found too few.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from bmray.models.retrieval.negatives import NegativeMiner
from bmray.models.retrieval.types import Qrels

__all__ = ["positives_of", "query_rows", "TrainingQueries", "GroupObjective", "PoolObjective",
           "sample_negatives"]

TokenizeFn = Callable[..., dict[str, Tensor]]


def positives_of(qrels: Qrels, qids: Sequence[str]) -> dict[str, list[str]]:
    """Each query's documents of its highest grade (> 0); queries without any are left out."""
    out = {}
    for q in qids:
        judged = {d: g for d, g in qrels.get(q, {}).items() if g > 0}
        if judged:
            top = max(judged.values())
            out[q] = sorted(d for d, g in judged.items() if g == top)
    return out


def query_rows(n: int) -> Tensor:
    """[n, 1]: the row of each training query (its index)."""
    return torch.arange(n, dtype=torch.long).unsqueeze(1)


def pick(items: Sequence[str], n: int, generator: torch.Generator) -> list[str]:
    """``n`` distinct items (all of them when fewer), drawn by ``generator``."""
    order = torch.randperm(len(items), generator=generator)[:n].tolist()
    return [items[i] for i in order]


def sample_negatives(candidates: Sequence[str], relevant: set[str], doc_ids: Sequence[str],
                     n: int, hard_pool: int, generator: torch.Generator) -> list[str]:
    """``n`` negatives: from the top ``hard_pool`` candidates, then random unjudged documents."""
    hard = [d for d in candidates[:hard_pool] if d not in relevant]
    chosen = pick(hard, n, generator)
    while len(chosen) < n:
        d = doc_ids[int(torch.randint(len(doc_ids), (1,), generator=generator))]
        if d not in relevant and d not in chosen:
            chosen.append(d)
    return chosen


@dataclass
class TrainingQueries:
    """The judged training queries and what the objectives read about them."""

    qids: list[str]
    queries: Mapping[str, str]
    documents: Mapping[str, str]
    qrels: Qrels
    positives: dict[str, list[str]] = field(init=False)
    doc_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.positives = positives_of(self.qrels, self.qids)
        missing = [q for q in self.qids if q not in self.positives]
        if missing:
            raise ValueError(f"training queries without a relevant document: {missing[:5]}")
        self.doc_ids = list(self.documents)
        if len(self.doc_ids) < 2:
            raise ValueError("training needs at least two documents")

    def relevant(self, qid: str) -> set[str]:
        return {d for d, g in self.qrels.get(qid, {}).items() if g > 0}


@dataclass
class GroupObjective:
    """Rows -> a cross-encoder's flat batch: per query (positive, n negatives), query-major.

    Returns ``{input_ids, attention_mask[, token_type_ids], group_size}``."""

    data: TrainingQueries
    miner: NegativeMiner
    tokenize: TokenizeFn             # (queries, passages) -> tensors (CrossEncoder.tokenize)
    n_negatives: int = 7
    hard_pool: int = 30

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        g = generator or torch.Generator().manual_seed(0)
        qs, ps = [], []
        for i in blocks[:, 0].tolist():
            q = self.data.qids[i]
            pos = pick(self.data.positives[q], 1, g)[0]
            negs = sample_negatives(self.miner.candidates.get(q, []), self.data.relevant(q),
                                    self.data.doc_ids, self.n_negatives, self.hard_pool, g)
            for d in [pos, *negs]:
                qs.append(self.data.queries[q])
                ps.append(self.data.documents[d])
        return {**self.tokenize(qs, ps), "group_size": 1 + self.n_negatives}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0) // batch["group_size"])


@dataclass
class PoolObjective:
    """Rows -> a dual encoder's batch: B queries, a pool of their B positives followed by
    ``n_hard`` mined negatives each, and ``exclude`` [B, pool]: pool documents judged relevant
    to a query other than its own positive (left out of its softmax, so a shared or another
    relevant document is never pushed away). Returns ``{q_*, p_*, exclude}`` tensors."""

    data: TrainingQueries
    miner: NegativeMiner | None
    tokenize: TokenizeFn             # texts -> tensors (DualEncoder.tokenize)
    n_hard: int = 1
    hard_pool: int = 30

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        g = generator or torch.Generator().manual_seed(0)
        qids = [self.data.qids[i] for i in blocks[:, 0].tolist()]
        pool = [pick(self.data.positives[q], 1, g)[0] for q in qids]
        if self.miner is not None and self.n_hard:
            for q in qids:
                pool += sample_negatives(self.miner.candidates.get(q, []), self.data.relevant(q),
                                         self.data.doc_ids, self.n_hard, self.hard_pool, g)
        exclude = torch.zeros(len(qids), len(pool), dtype=torch.bool)
        for i, q in enumerate(qids):
            rel = self.data.relevant(q)
            for j, d in enumerate(pool):
                exclude[i, j] = j != i and d in rel
        qt = self.tokenize([self.data.queries[q] for q in qids])
        pt = self.tokenize([self.data.documents[d] for d in pool])
        return {**{f"q_{k}": v for k, v in qt.items()}, **{f"p_{k}": v for k, v in pt.items()},
                "exclude": exclude}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["q_input_ids"].size(0))
