"""The ranking metrics against pytrec_eval (trec_eval's C code) on real judgments.

Runs: BM25 from bm25s (a peer, test-only) on CISI and Medline, random scores with many ties on the
world's graded judgments (ties exercise trec_eval's order), and hand-made cases written out.
"""
from __future__ import annotations

import math
import random

import bm25s
import pytest
import pytrec_eval

from bmray.models.retrieval.collections import load_cisi, load_medline, world_collection
from bmray.models.retrieval.metrics import (evaluate, evaluate_per_query, format_table,
                                            parse_metric, query_metric)
from bmray.models.world.config import WorldConfig
from bmray.models.world.world import World

CUTS = (5, 10, 100)
OURS_TO_TREC = {"p": "P_{k}", "recall": "recall_{k}", "map": "map_cut_{k}", "ndcg": "ndcg_cut_{k}"}


def peer_run(collection, k=200):
    ids = list(collection.documents)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(collection.documents.values()), show_progress=False),
                    show_progress=False)
    qids = list(collection.judged_queries)
    texts = [collection.queries[q] for q in qids]
    docs, scores = retriever.retrieve(bm25s.tokenize(texts, show_progress=False), k=k,
                                      show_progress=False)
    return {q: {ids[d]: float(s) for d, s in zip(drow, srow)}
            for q, drow, srow in zip(qids, docs, scores)}


def random_tied_run(collection, seed=0):
    rng = random.Random(seed)
    ids = list(collection.documents)
    return {q: {d: float(rng.randint(0, 3)) for d in rng.sample(ids, 60)} for q in collection.queries}


def compare(run, qrels):
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"P", "recall", "map_cut", "ndcg_cut"})
    theirs = trec.evaluate(run)
    metrics = [f"{m}@{k}" for m in OURS_TO_TREC for k in CUTS]
    ours = evaluate_per_query(run, qrels, metrics)
    assert set(theirs) <= set(ours)
    for qid, values in theirs.items():
        for m in metrics:
            name, k = parse_metric(m)
            assert ours[qid][m] == pytest.approx(values[OURS_TO_TREC[name].format(k=k)], abs=1e-9), (qid, m)
    # MRR@k: trec_eval's recip_rank of the run cut at k (cut in trec_eval's own order: score, then id desc)
    for k in CUTS:
        cut = {q: dict(sorted(s.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]) for q, s in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        mrr = evaluate_per_query(run, qrels, [f"mrr@{k}"])
        for qid, values in rr.items():
            assert mrr[qid][f"mrr@{k}"] == pytest.approx(values["recip_rank"], abs=1e-9), (qid, k)
    return theirs


@pytest.mark.parametrize("loader", [load_cisi, load_medline])
def test_metrics_equal_pytrec_eval_on_real_judgments(loader):
    collection = loader()
    run = peer_run(collection)
    theirs = compare(run, collection.qrels)
    assert len(theirs) == len(collection.judged_queries)


def test_metrics_equal_pytrec_eval_with_ties_and_graded_judgments():
    collection = world_collection(World(WorldConfig(n_entities=60)))
    compare(random_tied_run(collection), collection.qrels)


def test_hand_made_query():
    judged = {"a": 2, "b": 1, "c": 0, "z": 1}
    ranking = ["c", "b", "x", "a"]          # relevant at ranks 2 and 4; "z" never retrieved
    assert query_metric("p", 4, ranking, judged) == pytest.approx(2 / 4)
    assert query_metric("recall", 4, ranking, judged) == pytest.approx(2 / 3)
    assert query_metric("map", 4, ranking, judged) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert query_metric("mrr", 4, ranking, judged) == pytest.approx(1 / 2)
    assert query_metric("mrr", 1, ranking, judged) == 0.0
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert query_metric("ndcg", 4, ranking, judged) == pytest.approx(dcg / idcg)


def test_mean_counts_unanswered_judged_queries_as_zero_and_ignores_unjudged():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    run = {"q1": {"a": 1.0}, "q4": {"a": 1.0}}
    assert evaluate(run, qrels, ["p@1", "mrr@10"]) == {"p@1": 0.5, "mrr@10": 0.5}


@pytest.mark.parametrize("bad", ["ndcg", "ndcg@0", "bleu@10", "map@x"])
def test_bad_metric_names_the_choices(bad):
    with pytest.raises(ValueError, match="expected one of mrr@k"):
        evaluate({}, {"q": {"a": 1}}, [bad])


def test_table():
    text = format_table({"bm25": {"ndcg@10": 0.5, "p@10": 0.25}})
    assert "bm25" in text and "0.5000" in text and "ndcg@10" in text
