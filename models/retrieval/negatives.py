"""Hard negatives mined from a retriever, refreshed from the model being trained (ANCE).

A hard negative is a document the retriever ranks high for a query but that is not judged
relevant (grade <= 0 or unjudged). Static mining asks a fixed first stage once (BM25 negatives,
as in DPR, Karpukhin et al. 2020); ANCE (Xiong et al. 2021) re-encodes the corpus with the
current checkpoint every so often and mines from that index instead, so the negatives stay
the ones the model currently confuses. ``NegativeMiner`` does both: ``retriever_factory()``
builds the retriever to mine from (a fixed one, or an index over the current encoder) and
``maybe_refresh(step)`` rebuilds it every ``refresh_every`` optimizer steps (0: never).
Documents judged relevant are never returned, whatever the retriever ranks.
"""
from __future__ import annotations

from typing import Callable, Mapping

from bmray.models.retrieval.types import Qrels, Retriever

__all__ = ["mine_negatives", "NegativeMiner"]


def mine_negatives(retriever: Retriever, queries: Mapping[str, str], qrels: Qrels,
                   depth: int = 100) -> dict[str, list[str]]:
    """``{qid: [doc, ...]}``: the retriever's ``depth`` best per query minus judged relevant."""
    if depth < 1:
        raise ValueError(f"mine_negatives: depth must be >= 1, got {depth}")
    qids = list(queries)
    hits = retriever.search([queries[q] for q in qids], depth)
    if len(hits) != len(qids):
        raise ValueError(f"mine_negatives: the retriever answered {len(hits)} lists for "
                         f"{len(qids)} queries")
    out = {}
    for q, h in zip(qids, hits):
        relevant = {d for d, g in qrels.get(q, {}).items() if g > 0}
        out[q] = [d for d, _ in h if d not in relevant]
    return out


class NegativeMiner:
    """The current hard-negative candidates per query, rebuilt every ``refresh_every`` steps.

    ``candidates``: ``{qid: [doc, ...]}`` best first. ``builds`` counts retriever builds (the
    first at construction), ``refreshed_at`` the step of the last one.
    """

    def __init__(self, retriever_factory: Callable[[], Retriever], queries: Mapping[str, str],
                 qrels: Qrels, refresh_every: int = 0, depth: int = 100) -> None:
        if not callable(retriever_factory):
            raise TypeError("NegativeMiner: retriever_factory must be a zero-argument callable "
                            "returning a Retriever")
        if not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"NegativeMiner: refresh_every must be an int >= 0, got "
                             f"{refresh_every!r}")
        self.factory, self.queries, self.qrels = retriever_factory, dict(queries), qrels
        self.refresh_every, self.depth = refresh_every, depth
        self.builds, self.refreshed_at = 0, 0
        self.candidates: dict[str, list[str]] = {}
        self.refresh(0)

    def refresh(self, step: int) -> None:
        """Build a retriever now and mine every query's candidates from it."""
        retriever = self.factory()
        self.candidates = mine_negatives(retriever, self.queries, self.qrels, self.depth)
        self.builds += 1
        self.refreshed_at = step

    def due(self, step: int) -> bool:
        return bool(self.refresh_every) and step - self.refreshed_at >= self.refresh_every

    def maybe_refresh(self, step: int) -> bool:
        """Refresh when ``refresh_every`` steps have passed since the last build."""
        if self.due(step):
            self.refresh(step)
            return True
        return False
