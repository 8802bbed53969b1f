"""BM25 on CISI: bmray's eager sparse index against bm25s, queries/s at equal nDCG@10; and the
index sharded over 2 Ray actors against 1.

Same work on both sides: CISI's 1,460 documents and all 112 queries (repeated ``--repeat`` times
per timed pass, ~1-2 s), k = ``--k``, the same analyzer (bmray's: lower-case, Lucene's English
stop words, Porter stemmer) and BM25 Lucene variant with the same k1, b. bm25s (``BM25(method=
"lucene")``) indexes our token lists; at query time each side starts from the query texts:
ours ``BM25Index.search(texts, k)``; bm25s ``retrieve(analyzer.tokens_batch(texts), k)`` (the
same warm analyzer) in its recommended fast configuration: the numba backend when numba is
installed (``pip install -e '.[bench]'``; else its numpy backend, recorded in the JSON),
``n_threads=0`` (sequential), no progress bar. numpy / scipy / numba run on one thread
(OMP/OpenBLAS/MKL/NUMBA limits set before import); numba's compilation is in the warm-up pass. Before timing,
nDCG@10 (trec_eval's, models/retrieval/metrics.py) of both on the 76 judged queries must agree
within 1e-6.

Timing: one process, the sides alternate in rounds (``bench.common.balanced_order``), each
round one warm-up pass then ``--steps`` timed passes; "× bm25s" = ours QPS / bm25s QPS with a
90% bootstrap interval over rounds (``bench.common``). Sharded: ``ShardedIndex`` on 1 and on 2
actors (1 CPU each, an embedded Ray of ``--ray-cpus``), scatter-gather with the exact merge,
same passes, "× 1 shard" likewise; its nDCG@10 must equal the unsharded index's.

    .venv/bin/python bench/bm25.py                 # full run -> bench/results/bm25.json
    .venv/bin/python bench/bm25.py --quick --out /tmp/bm25.json

Goal: ours ≥ 1.0 × bm25s QPS at equal nDCG@10.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import scipy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (balanced_order, connect_ray, environment, parse_args,  # noqa: E402
                          pooled_median, ratio_with_interval, result_path, write_json)
from bmray.cluster.sharded_index import ShardedIndex  # noqa: E402
from bmray.models.retrieval.bm25 import BM25Config, BM25Index  # noqa: E402
from bmray.models.retrieval.collections import load_cisi  # noqa: E402
from bmray.models.retrieval.metrics import evaluate  # noqa: E402
from bmray.models.retrieval.types import Hits, to_run  # noqa: E402

try:                                      # bm25s's recommended fast backend
    import numba  # noqa: E402,F401
    PEER_BACKEND = "numba"
except ImportError:
    PEER_BACKEND = "numpy"

OURS, PEER, ONE, TWO = "bmray", "bm25s", "1 shard", "2 shards"
Search = Callable[[list[str]], list[Hits]]


def time_sides(sides: dict[str, Search], queries: list[str], rounds: int, steps: int
               ) -> dict[str, list[list[float]]]:
    """QPS samples per side per round (one sample = one pass over ``queries``)."""
    qps: dict[str, list[list[float]]] = {s: [] for s in sides}
    for name in balanced_order(list(sides), rounds):
        sides[name](queries)                                  # warm-up after the switch
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            sides[name](queries)
            samples.append(len(queries) / (time.perf_counter() - t0))
        qps[name].append(samples)
    return qps


def ndcg(search: Search, collection, k: int) -> float:
    qids = list(collection.judged_queries)
    run = to_run(qids, search(list(collection.judged_queries.values())))
    return evaluate(run, collection.qrels, [f"ndcg@{k}"])[f"ndcg@{k}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--k1", type=float, default=0.9)
    ap.add_argument("--b", type=float, default=0.4)
    ap.add_argument("--repeat", type=int, default=30, help="passes of the 112 queries per call")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="timed passes per side per round")
    ap.add_argument("--ray-cpus", type=int, default=3)
    ap.add_argument("--no-shards", action="store_true", help="skip the sharded comparison")
    ap.add_argument("--out", default=result_path(__file__, "bm25.json"))
    args = parse_args(ap, {"repeat": 3, "rounds": 2, "steps": 1})
    t_start = time.time()

    cisi = load_cisi()
    ids, texts = list(cisi.documents), list(cisi.documents.values())
    config = BM25Config(args.k1, args.b)
    t0 = time.perf_counter()
    ours = BM25Index.build(ids, texts, config=config)
    build_ours = time.perf_counter() - t0
    analyzer = ours.analyzer
    t0 = time.perf_counter()
    peer = bm25s.BM25(method="lucene", k1=args.k1, b=args.b, backend=PEER_BACKEND)
    peer.index(analyzer.tokens_batch(texts), show_progress=False)     # same tokens
    build_peer = time.perf_counter() - t0

    def search_ours(qs: list[str]) -> list[Hits]:
        return ours.search(qs, args.k)

    def search_peer(qs: list[str]) -> list[Hits]:
        docs, scores = peer.retrieve(analyzer.tokens_batch(qs), k=args.k, show_progress=False,
                                     n_threads=0, backend_selection=PEER_BACKEND)
        return [[(ids[d], float(s)) for d, s in zip(dr, sr) if s > 0]
                for dr, sr in zip(docs.tolist(), scores.tolist())]

    def search_peer_raw(qs: list[str]):
        return peer.retrieve(analyzer.tokens_batch(qs), k=args.k, show_progress=False,
                             n_threads=0, backend_selection=PEER_BACKEND)

    quality = {OURS: ndcg(search_ours, cisi, args.k), PEER: ndcg(search_peer, cisi, args.k)}
    assert abs(quality[OURS] - quality[PEER]) < 1e-6, quality
    queries = list(cisi.queries.values()) * args.repeat
    # the peer is timed returning its raw arrays (doc positions, scores): no id mapping counted
    qps = time_sides({OURS: search_ours, PEER: search_peer_raw}, queries, args.rounds,
                     args.steps)
    rows = {n: {"qps": pooled_median(qps[n]), f"ndcg@{args.k}": quality[n]} for n in qps}
    rows[OURS]["vs_bm25s"] = ratio_with_interval(qps[OURS], qps[PEER])
    runs = {"single": {"qps": qps, "rows": rows,
                       "build_s": {OURS: build_ours, PEER: build_peer}}}

    if not args.no_shards:
        connect_ray(args.ray_cpus)
        sharded = {ONE: ShardedIndex.build(ids, texts, 1, config=config),
                   TWO: ShardedIndex.build(ids, texts, 2, config=config)}
        shard_quality = {n: ndcg(lambda qs, s=s: s.search(qs, args.k), cisi, args.k)
                         for n, s in sharded.items()}
        assert all(abs(v - quality[OURS]) < 1e-9 for v in shard_quality.values()), shard_quality
        shard_qps = time_sides({n: (lambda qs, s=s: s.search(qs, args.k))
                                for n, s in sharded.items()}, queries, args.rounds, args.steps)
        srows = {n: {"qps": pooled_median(shard_qps[n]), f"ndcg@{args.k}": shard_quality[n]}
                 for n in sharded}
        srows[TWO]["vs_1_shard"] = ratio_with_interval(shard_qps[TWO], shard_qps[ONE])
        runs["sharded"] = {"qps": shard_qps, "rows": srows}
        for s in sharded.values():
            s.shutdown()
        ray.shutdown()

    print(f"\nBM25 (Lucene variant, k1={args.k1}, b={args.b}) on CISI: {len(queries)} queries "
          f"per pass ({len(cisi.queries)} x {args.repeat}), k={args.k}, one thread; "
          f"{args.rounds} rounds x {args.steps} passes, alternating; ratio = QPS / peer QPS "
          f"(> 1: faster), 90% bootstrap interval over rounds")
    print(f"{'side':10s} {'QPS':>9s} {'ratio':>7s} {'90% interval':>13s} {f'nDCG@{args.k}':>9s}")
    table = [(n, r, r.get("vs_bm25s")) for n, r in runs["single"]["rows"].items()]
    if "sharded" in runs:
        table += [(n, r, r.get("vs_1_shard")) for n, r in runs["sharded"]["rows"].items()]
    for name, r, ratio in table:
        rr = (f"{ratio['ratio']:7.3f} {ratio['interval'][0]:6.3f}–{ratio['interval'][1]:6.3f}"
              if ratio else f"{'':7s} {'':13s}")
        print(f"{name:10s} {r['qps']:9.0f} {rr} {r[f'ndcg@{args.k}']:9.4f}")
    speed = rows[OURS]["vs_bm25s"]["ratio"]
    goal = {"speed_ratio": speed, "met": speed >= 1.0}
    print(f"goal: ≥ 1.0 × bm25s QPS at equal nDCG@{args.k} → "
          f"{'met' if goal['met'] else 'NOT met'} ({speed:.2f}×)")
    write_json(args.out, {
        "bench": "bm25", "args": vars(args),
        "data": "data/ir/cisi (1,460 documents, 112 queries, 76 judged)",
        "ours_config": {"BM25Config": {"k1": args.k1, "b": args.b},
                        "analyzer": analyzer.config.to_dict(),
                        "search": "BM25Index.search(texts, k): eager CSR, Q @ M, top-k"},
        "peer_config": {"bm25s.BM25": {"method": "lucene", "k1": args.k1, "b": args.b},
                        "index": "our analyzer's token lists",
                        "retrieve": {"n_threads": 0, "backend_selection": PEER_BACKEND,
                                     "show_progress": False},
                        "backend": PEER_BACKEND},
        "quality": quality, "runs": runs, "goal": goal, "wall_s": time.time() - t_start,
        **environment(bm25s=bm25s.__version__, numpy=np.__version__, scipy=scipy.__version__,
                      ray=ray.__version__)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
