"""BM25 (Lucene variant) against the formula written out here and against bm25s (a peer).

bm25s gets our token lists (so both see the same terms) and method="lucene" with the same k1, b.
"""
from __future__ import annotations

import math

import bm25s
import numpy as np
import pytest
import torch

from bmray.models.retrieval.analyzer import Analyzer, AnalyzerConfig
from bmray.models.retrieval.bm25 import BM25Config, BM25Index, CorpusStats
from bmray.models.retrieval.collections import load_cisi, load_medline
from bmray.models.retrieval.metrics import evaluate
from bmray.models.retrieval.types import Retriever, to_run
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
PLAIN = Analyzer(AnalyzerConfig(stopwords="none", stemmer=None))
DOCS = {"d1": "apple banana apple", "d2": "banana cherry", "d3": "cherry cherry cherry date",
        "d4": "apple date elder fig grape"}


def expected(query, docs, k1, b, stats_docs=None):
    """Lucene BM25 by hand: sum over query tokens of idf * tf / (tf + k1 (1 - b + b dl/avgdl)),
    with N, df, avgdl from ``stats_docs`` (default: ``docs`` itself)."""
    stats_docs = stats_docs or docs
    toks = {d: t.split() for d, t in stats_docs.items()}
    n = len(toks)
    avgdl = sum(len(t) for t in toks.values()) / n
    out = {}
    for d, text in docs.items():
        words, s = text.split(), 0.0
        for q in query.split():
            tf = words.count(q)
            if tf == 0:
                continue
            df = sum(q in t for t in toks.values())
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(words) / avgdl))
        if s > 0:
            out[d] = s
    return out


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.2, 0.75), (2.0, 0.0)])
def test_scores_equal_formula(k1, b):
    index = BM25Index.build(list(DOCS), list(DOCS.values()), PLAIN, BM25Config(k1=k1, b=b))
    assert isinstance(index, Retriever)
    for query in ["apple", "cherry date", "apple apple banana", "zebra", "banana fig"]:
        hits = index.search([query], k=10)[0]
        want = expected(query, DOCS, k1, b)
        assert [d for d, _ in hits] == sorted(want, key=lambda d: (-want[d], d))
        assert np.allclose([s for _, s in hits], [want[d] for d, _ in hits], rtol=1e-6)


def test_global_stats_score_like_the_whole_corpus():
    ids, texts = list(DOCS), list(DOCS.values())
    stats = CorpusStats.of([t.split() for t in texts])
    assert (stats.n_docs, stats.total_length, stats.df["cherry"]) == (4, 14, 2)
    part = BM25Index.build(ids[2:], texts[2:], PLAIN, corpus_stats=stats)
    hits = dict(part.search(["cherry apple date"], 10)[0])
    want = expected("cherry apple date", dict(list(DOCS.items())[2:]), 0.9, 0.4, DOCS)
    assert hits.keys() == want.keys()
    assert np.allclose([hits[d] for d in want], list(want.values()), rtol=1e-6)
    with pytest.raises(ValueError, match="corpus_stats lack terms"):
        BM25Index.build(["x"], ["kiwi"], PLAIN, corpus_stats=stats)


def test_ties_k_and_bad_input():
    index = BM25Index.build(["b", "a", "c"], ["xx yy", "xx yy", "zz"], PLAIN)
    assert [d for d, _ in index.search(["xx"], 5)[0]] == ["a", "b"]     # tie: id ascending
    assert [d for d, _ in index.search(["xx"], 1)[0]] == ["a"]
    assert index.search(["nothing here"], 5) == [[]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(["x"], 0)
    with pytest.raises(TypeError, match="sequence of query texts"):
        index.search("x", 3)
    with pytest.raises(ValueError, match="appears twice"):
        BM25Index.build(["a", "a"], ["x", "y"], PLAIN)
    with pytest.raises(ValueError, match="non-empty strings"):
        BM25Index.build(["a", ""], ["xx", "yy"], PLAIN)
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        BM25Index.build(["a", "b"], ["x"], PLAIN)
    with pytest.raises(ConfigError, match="index.b"):
        BM25Config(b=1.5)


def peer(collection, analyzer, config):
    retriever = bm25s.BM25(method="lucene", k1=config.k1, b=config.b)
    retriever.index(analyzer.tokens_batch(list(collection.documents.values())),
                    show_progress=False)
    return retriever


@pytest.fixture(scope="module")
def cisi():
    c = load_cisi()
    return c, BM25Index.build(list(c.documents), list(c.documents.values()))


def test_cisi_top100_equals_bm25s(cisi):
    collection, index = cisi
    ids = list(collection.documents)
    queries = list(collection.queries.values())
    qtoks = index.analyzer.tokens_batch(queries)
    retriever = peer(collection, index.analyzer, index.config)
    ours = index.search(queries, 100)
    for q, toks in enumerate(qtoks):
        full = retriever.get_scores(toks)                     # the peer's score of every doc
        top = np.sort(full[full > 0])[::-1][:100]
        got = np.array([s for _, s in ours[q]])
        assert len(got) == len(top)
        assert np.allclose(got, top, rtol=1e-5)               # same score at every rank
        # and the documents we rank there have those scores under the peer (ties may swap)
        assert np.allclose(full[[ids.index(d) for d, _ in ours[q]]], got, rtol=1e-5)


@pytest.mark.parametrize("name", ["cisi", "medline"])
def test_ndcg_equals_bm25s(name, cisi):
    collection, index = cisi if name == "cisi" else (
        (c := load_medline()), BM25Index.build(list(c.documents), list(c.documents.values())))
    ids = list(collection.documents)
    qids = list(collection.judged_queries)
    qtoks = index.analyzer.tokens_batch(list(collection.judged_queries.values()))
    docs, scores = peer(collection, index.analyzer, index.config).retrieve(
        qtoks, k=100, show_progress=False, n_threads=1)
    theirs = {q: {ids[d]: float(s) for d, s in zip(docs[i], scores[i]) if s > 0}
              for i, q in enumerate(qids)}
    ours = to_run(qids, index.search(list(collection.judged_queries.values()), 100))
    metrics = ("ndcg@10", "map@100", "recall@100")
    a, b = evaluate(ours, collection.qrels, metrics), evaluate(theirs, collection.qrels, metrics)
    for m in metrics:
        assert abs(a[m] - b[m]) < 1e-6, (m, a[m], b[m])
    assert a["ndcg@10"] > 0.3


def test_save_load_round_trip(cisi, tmp_path):
    collection, index = cisi
    queries = list(collection.queries.values())[:20]
    index.save(tmp_path / "idx")
    again = BM25Index.load(tmp_path / "idx")
    assert again.search(queries, 50) == index.search(queries, 50)
    assert again.corpus_hash == index.corpus_hash and again.config == index.config


def test_merge_of_slices_is_the_whole_index(cisi):
    collection, index = cisi
    ids, texts = list(collection.documents), list(collection.documents.values())
    stats = CorpusStats.of(index.analyzer.tokens_batch(texts))
    parts = [BM25Index.build(ids[a:b], texts[a:b], corpus_stats=stats)
             for a, b in [(0, 500), (500, 1000), (1000, len(ids))]]
    merged = BM25Index.merge(parts, index.corpus_hash)
    assert merged.terms == index.terms and merged.doc_ids == index.doc_ids
    assert (merged.matrix != index.matrix).nnz == 0
