"""The shapes every retriever, metric and fusion step agrees on.

A run and judgments are nested dicts keyed by string ids, as TREC tools (trec_eval, pytrec_eval,
ir_measures) hold them, so any of them can be read or checked against ours without conversion:

* ``Qrels``: query id -> document id -> graded relevance (int; > 0 is relevant);
* ``Run``: query id -> document id -> score (higher is better);
* ``Hits``: one query's ranked list ``[(doc_id, score), ...]``, best first.

A ``Retriever`` answers a batch of query texts with a ranked list per query. BM25, the dense
index, the sharded index and hybrid fusion all implement it, so re-rankers, the open-domain QA
pipeline and the metric table take any of them.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]
Hits = list[tuple[str, float]]


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """The ``k`` best documents per query, best first (fewer if the corpus has fewer)."""
        ...


def to_run(query_ids: Sequence[str], hits: Sequence[Hits]) -> Run:
    """Pair each query id with its ranked list: the ``Run`` the metrics read."""
    if len(query_ids) != len(hits):
        raise ValueError(f"to_run: {len(query_ids)} query ids but {len(hits)} ranked lists")
    return {qid: {doc: float(score) for doc, score in h} for qid, h in zip(query_ids, hits)}
