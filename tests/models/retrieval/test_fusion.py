"""Reciprocal rank fusion against the formula written out on hand-made rankings."""
from __future__ import annotations

import math

import pytest

from bmray.models.retrieval.fusion import HybridRetriever, rrf
from bmray.models.retrieval.types import Retriever


def by_hand(rankings, k=60):
    """sum over lists containing d of 1/(k + rank), rank from 1 (Cormack et al. 2009, eq. 1)."""
    out = {}
    for ranking in rankings:
        for i, d in enumerate(ranking):
            out[d] = out.get(d, 0.0) + 1.0 / (k + i + 1)
    return out


class ListRetriever:
    """A stand-in first stage: fixed ranked lists per query text."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def search(self, queries, k):
        self.asked.append(k)
        return [self.table[q][:k] for q in queries]


def test_hits_fusion_matches_the_formula_with_a_missing_document():
    a = [("d1", 9.0), ("d2", 5.0), ("d3", 1.0)]
    b = [("d3", 0.9), ("d4", 0.8), ("d1", 0.1)]          # d2 missing, d4 only here
    fused = rrf([a, b])
    expect = {"d1": 1 / 61 + 1 / 63, "d2": 1 / 62, "d3": 1 / 63 + 1 / 61, "d4": 1 / 62}
    assert set(dict(fused)) == set(expect)
    for d, s in fused:
        assert math.isclose(s, expect[d], rel_tol=1e-12)
    # d1 and d3 tie, d2 and d4 tie: ties by document id descending (trec_eval's order)
    assert [d for d, _ in fused] == ["d3", "d1", "d4", "d2"]


def test_only_ranks_count_and_k_changes_the_weights():
    a = [("x", 1e9), ("y", 1e8)]
    b = [("y", 0.51), ("z", 0.5)]
    for k in (0, 1, 60):
        fused = dict(rrf([a, b], k=k))
        expect = by_hand([["x", "y"], ["y", "z"]], k)
        assert fused.keys() == expect.keys()
        assert all(math.isclose(fused[d], expect[d]) for d in expect)
    # with k = 0, y (1/2 + 1/1) beats x (1/1 alone): agreement between lists wins
    assert rrf([a, b], k=0)[0][0] == "y"


def test_runs_fusion_ranks_each_run_by_score_and_handles_missing_queries():
    r1 = {"q1": {"a": 3.0, "b": 2.0, "c": 2.0}, "q2": {"a": 1.0}}
    r2 = {"q1": {"c": 0.7, "d": 0.2}}
    fused = rrf([r1, r2])
    # r1's tie b/c is ranked by doc id descending: a, c, b
    expect_q1 = by_hand([["a", "c", "b"], ["c", "d"]])
    assert fused["q1"].keys() == expect_q1.keys()
    assert all(math.isclose(fused["q1"][d], expect_q1[d]) for d in expect_q1)
    assert fused["q2"] == pytest.approx({"a": 1 / 61})
    assert list(rrf([r1, r2], depth=2)["q1"]) == ["c", "a"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="nothing to fuse"):
        rrf([])
    with pytest.raises(TypeError, match="not a mix"):
        rrf([{"q": {}}, [("d", 1.0)]])
    with pytest.raises(ValueError, match="k must be"):
        rrf([[("d", 1.0)]], k=-1)
    with pytest.raises(ValueError, match="twice"):
        rrf([[("d", 1.0), ("d", 0.5)]])
    with pytest.raises(ValueError, match="no retrievers"):
        HybridRetriever([])
    with pytest.raises(TypeError, match="no search"):
        HybridRetriever([object()])


def test_hybrid_retriever_fuses_its_first_stages_per_query():
    bm25 = ListRetriever({"q": [("d1", 12.0), ("d2", 7.0), ("d5", 1.0)],
                          "r": [("d9", 3.0)]})
    dense = ListRetriever({"q": [("d2", 0.9), ("d3", 0.8), ("d1", 0.7)],
                           "r": [("d8", 0.9), ("d9", 0.5)]})
    hybrid = HybridRetriever([bm25, dense], depth=50)
    assert isinstance(hybrid, Retriever)
    out = hybrid.search(["q", "r"], k=2)
    assert bm25.asked == [50] and dense.asked == [50]
    q = by_hand([["d1", "d2", "d5"], ["d2", "d3", "d1"]])
    best = sorted(q.items(), key=lambda x: (x[1], x[0]), reverse=True)[:2]
    assert [d for d, _ in out[0]] == [d for d, _ in best] == ["d2", "d1"]
    assert [s for _, s in out[0]] == pytest.approx([s for _, s in best])
    assert [d for d, _ in out[1]] == ["d9", "d8"]
