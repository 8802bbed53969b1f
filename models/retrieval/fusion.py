"""Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009) and a hybrid retriever.

    score(d) = sum over rankings r that contain d of 1 / (k + rank_r(d)),   rank from 1, k = 60

Only ranks enter, never scores, so BM25's unbounded scores and a dense index's cosines combine
without any calibration; a document missing from a ranking contributes nothing for it. k = 60
is the paper's value (it damps the head of each list so one system's first hit cannot outvote
agreement lower down). A ``Hits`` list is a ranking as given (position = rank); a ``Run``'s
scores are ranked as trec_eval ranks them (score descending, ties by document id descending).
Fused ties are broken the same way, so the fused order is a pure function of the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bmray.models.retrieval.metrics import ranked
from bmray.models.retrieval.types import Hits, Retriever, Run

__all__ = ["rrf", "rrf_hits", "rrf_runs", "HybridRetriever", "RRF_K"]

RRF_K = 60


def check_k(k: float) -> None:
    if not isinstance(k, (int, float)) or isinstance(k, bool) or k < 0:
        raise ValueError(f"rrf: k must be a number >= 0, got {k!r}")


def rrf_scores(rankings: Sequence[Sequence[str]], k: float = RRF_K) -> dict[str, float]:
    """``{doc: sum_r 1 / (k + rank_r(doc))}`` over rankings given as doc ids best first."""
    check_k(k)
    fused: dict[str, float] = {}
    for ranking in rankings:
        seen = set()
        for rank, doc in enumerate(ranking, 1):
            if doc in seen:
                raise ValueError(f"rrf: document {doc!r} appears twice in one ranking")
            seen.add(doc)
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return fused


def rrf_hits(hit_lists: Sequence[Hits], k: float = RRF_K, depth: int | None = None) -> Hits:
    """One query's rankings fused into one ranked list (the best ``depth``, all if None)."""
    fused = rrf_scores([[doc for doc, _ in hits] for hits in hit_lists], k)
    order = ranked(fused)
    return [(d, fused[d]) for d in (order if depth is None else order[:depth])]


def rrf_runs(runs: Sequence[Run], k: float = RRF_K, depth: int | None = None) -> Run:
    """Runs fused query by query; a query absent from a run contributes no ranking for it."""
    qids = list(dict.fromkeys(q for run in runs for q in run))
    out: Run = {}
    for q in qids:
        fused = rrf_scores([ranked(run[q]) for run in runs if q in run], k)
        order = ranked(fused)
        out[q] = {d: fused[d] for d in (order if depth is None else order[:depth])}
    return out


def rrf(runs_or_hits: Sequence[Run] | Sequence[Hits], k: float = RRF_K,
        depth: int | None = None) -> Run | Hits:
    """Fuse several rankings of the same queries: Runs -> a Run, or one query's Hits -> Hits."""
    items = list(runs_or_hits)
    if not items:
        raise ValueError("rrf: nothing to fuse (no rankings given)")
    if all(isinstance(x, dict) for x in items):
        return rrf_runs(items, k, depth)
    if all(isinstance(x, (list, tuple)) for x in items):
        return rrf_hits(items, k, depth)
    raise TypeError("rrf: give either Runs (dicts query -> doc -> score) or Hits lists "
                    "([(doc, score), ...]), not a mix")


@dataclass
class HybridRetriever:
    """``Retriever`` over several first stages (e.g. BM25 + a dense index), fused by RRF.

    Each retriever is asked for its ``depth`` best per query; the fused list is cut to ``k``.
    """

    retrievers: Sequence[Retriever]
    k_rrf: float = RRF_K
    depth: int = 100

    def __post_init__(self) -> None:
        self.retrievers = list(self.retrievers)
        if not self.retrievers:
            raise ValueError("HybridRetriever: no retrievers given")
        for i, r in enumerate(self.retrievers):
            if not callable(getattr(r, "search", None)):
                raise TypeError(f"HybridRetriever: retrievers[{i}] ({type(r).__name__}) has no "
                                f"search(queries, k) method")
        check_k(self.k_rrf)
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"HybridRetriever: depth must be an int >= 1, got {self.depth!r}")

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if isinstance(queries, str):
            raise TypeError("search: expected a sequence of queries, got one string")
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        depth = max(self.depth, k)
        per_system = [r.search(list(queries), depth) for r in self.retrievers]
        for i, lists in enumerate(per_system):
            if len(lists) != len(queries):
                raise ValueError(f"HybridRetriever: retrievers[{i}] answered {len(lists)} "
                                 f"ranked lists for {len(queries)} queries")
        return [rrf_hits([lists[qi] for lists in per_system], self.k_rrf, k)
                for qi in range(len(queries))]
