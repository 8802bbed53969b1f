"""Ranking metrics at a cut-off k, defined as trec_eval defines them (so pytrec_eval can check us).

For one query with judgments ``rel(d)`` (relevant when > 0), R relevant documents and a run
ranked best first (ties broken as trec_eval does: by document id, descending), with
``r_i = 1`` when the document at rank i is relevant:

* P@k        = sum_{i<=k} r_i / k                              (trec_eval ``P_k``)
* Recall@k   = sum_{i<=k} r_i / R                              (``recall_k``)
* MAP@k      = sum_{i<=k} r_i * P@i / R                        (``map_cut_k``: divided by R, not min(k, R))
* MRR@k      = 1 / (rank of the first relevant) if that rank <= k, else 0
               (``recip_rank`` of the run cut at k)
* NDCG@k     = DCG@k / IDCG@k, DCG@k = sum_{i<=k} rel(d_i) / log2(i + 1), the ideal ranking
               sorting all judged grades descending (``ndcg_cut_k``: linear gains, Järvelin &
               Kekäläinen 2002).

Averages are over the judged queries (at least one relevant document); a judged query the run
does not answer scores 0 (trec_eval ``-c``), and run queries without judgments are ignored.
"""
from __future__ import annotations

import math
from typing import Sequence

from bmray.models.retrieval.types import Qrels, Run

METRICS = ("mrr", "map", "ndcg", "recall", "p")
DEFAULT_METRICS = ("ndcg@10", "map@100", "mrr@10", "recall@100", "p@10")


def parse_metric(spec: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ("ndcg", 10); a bad name or cut-off is a ValueError naming the choices."""
    name, sep, k = spec.lower().partition("@")
    if name not in METRICS or not sep or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric {spec!r}: expected one of {', '.join(m + '@k' for m in METRICS)} "
                         f"with k >= 1")
    return name, int(k)


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids best first, ties by document id descending (trec_eval's order)."""
    return [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def query_metric(name: str, k: int, ranking: Sequence[str], judged: dict[str, int]) -> float:
    """One metric for one query: ``ranking`` best first, ``judged`` doc -> grade."""
    n_rel = sum(1 for g in judged.values() if g > 0)
    if n_rel == 0:
        raise ValueError("query_metric: the query has no relevant document")
    top = ranking[:k]
    hits = [1 if judged.get(d, 0) > 0 else 0 for d in top]
    if name == "p":
        return sum(hits) / k
    if name == "recall":
        return sum(hits) / n_rel
    if name == "map":
        found, total = 0, 0.0
        for i, h in enumerate(hits, 1):
            if h:
                found += 1
                total += found / i
        return total / n_rel
    if name == "mrr":
        return next((1.0 / i for i, h in enumerate(hits, 1) if h), 0.0)
    if name == "ndcg":
        dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 1) for i, d in enumerate(top, 1))
        ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, 1))
        return dcg / idcg
    raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")


def evaluate_per_query(run: Run, qrels: Qrels,
                       metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """``{query id: {metric: value}}`` over the judged queries (absent from the run: zeros)."""
    specs = [(m, *parse_metric(m)) for m in metrics]
    out: dict[str, dict[str, float]] = {}
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        ranking = ranked(run.get(qid, {}))
        out[qid] = {m: query_metric(name, k, ranking, judged) for m, name, k in specs}
    return out


def evaluate(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """The mean of each metric over the judged queries."""
    per_query = evaluate_per_query(run, qrels, metrics)
    if not per_query:
        raise ValueError("evaluate: the judgments have no query with a relevant document")
    return {m: sum(v[m] for v in per_query.values()) / len(per_query) for m in metrics}


def format_table(rows: dict[str, dict[str, float]], digits: int = 4) -> str:
    """A plain-text table: one row per system, one column per metric."""
    metrics = list(next(iter(rows.values())))
    width = max(len(r) for r in rows)
    head = f"{'system':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values[m]:>10.{digits}f}" for m in metrics))
    return "\n".join(lines)
