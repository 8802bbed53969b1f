"""Dense index: faiss IVF and HNSW against exact Flat search — recall@10 and queries/s, 1 thread.

Work (synthetic, for speed): ``--n`` unit vectors of dimension ``--dim`` from a Gaussian mixture
(``--clusters`` random centres of norm 1, isotropic noise of total norm ``--noise``, then
normalised: clustered like text embeddings, so IVF's cells have structure) and ``--queries``
queries drawn from the same mixture. Every index is a ``bmray.models.retrieval.dense_index``
``DenseIndex`` (faiss underneath), inner product.

Rows: Flat (``IndexFlatIP``, exact: the reference), IVF (``IVF{nlist},Flat``, k-means on every
vector, one row per ``--nprobe``), HNSW (``HNSW{m},Flat``, efConstruction ``--ef-construction``,
one row per ``--ef-search``). Search-time parameters are changed on the built index
(``DenseIndex.tune``), so each kind is built once; build time is one build on 1 thread.

Timing: ``faiss.omp_set_num_threads(1)``; per round every row searches the whole query batch
(k = 10) once after a warm-up batch, in a rotating order (``bench.common.balanced_order``).
QPS = queries / seconds. "× Flat" = the row's median QPS over Flat's, with a 90% bootstrap
interval over rounds (``bench.common``). recall@10 = mean |top-10 ∩ Flat's top-10| / 10.
Goal: recall@10 ≥ 0.95 at ≥ 5× Flat's QPS (rows marked ``*``).

Real row (``--real``): all-MiniLM-L6-v2 (mean pooling, unit vectors) embeddings of CISI and
Medline; nDCG@10 / MAP@100 / recall@100 of Flat, IVF and HNSW on the judged queries, recall@10
vs Flat, and bm25s (Lucene BM25, k1 1.5, b 0.75, English stop words, Snowball stemmer) for
reference.

    .venv/bin/python bench/dense_index.py                      # full run (100k x 384)
    .venv/bin/python bench/dense_index.py --quick --out /tmp/dense_index.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import bm25s
import faiss
import numpy as np
import Stemmer
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (balanced_order, environment, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, write_json)
from bmray.models.retrieval.collections import LOADERS  # noqa: E402
from bmray.models.retrieval.dense_index import (DenseIndex, DenseIndexConfig,  # noqa: E402
                                                recall_at_k)
from bmray.models.retrieval.encoder import load_minilm_encoder  # noqa: E402
from bmray.models.retrieval.metrics import evaluate  # noqa: E402
from bmray.models.retrieval.types import to_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10
GOAL_RECALL, GOAL_SPEEDUP = 0.95, 5.0


def mixture(n: int, dim: int, centres: np.ndarray, noise: float, rng) -> np.ndarray:
    """``n`` unit vectors: a random centre plus isotropic noise of expected norm ``noise``."""
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal((n, dim)).astype(np.float32) * (noise / math.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    docs = np.concatenate([mixture(min(50_000, args.n - i), args.dim, centres, args.noise, rng)
                           for i in range(0, args.n, 50_000)])
    return docs, mixture(args.queries, args.dim, centres, args.noise, rng)


def timed_build(ids, vectors, config: DenseIndexConfig) -> tuple[DenseIndex, float]:
    t0 = time.perf_counter()
    index = DenseIndex.build(ids, vectors, config)
    return index, time.perf_counter() - t0


def search_qps(index: DenseIndex, queries: np.ndarray) -> float:
    t0 = time.perf_counter()
    index.search_arrays(queries, K)
    return len(queries) / (time.perf_counter() - t0)


def synthetic_rows(args) -> dict[str, Any]:
    docs, queries = synthetic(args)
    ids = [str(i) for i in range(len(docs))]
    nlist = args.nlist or int(4 * math.sqrt(args.n))
    flat, t_flat = timed_build(ids, docs, DenseIndexConfig(kind="flat"))
    ivf, t_ivf = timed_build(ids, docs, DenseIndexConfig(kind="ivf", nlist=nlist, nprobe=1,
                                                         seed=args.seed))
    hnsw, t_hnsw = timed_build(ids, docs, DenseIndexConfig(
        kind="hnsw", m=args.m, ef_construction=args.ef_construction, ef_search=16))
    rows: dict[str, dict[str, Any]] = {"Flat": {"index": flat, "params": {}, "build_s": t_flat}}
    for p in args.nprobe:
        rows[f"IVF{nlist} nprobe={p}"] = {"index": ivf, "params": {"nlist": nlist, "nprobe": p},
                                         "build_s": t_ivf}
    for ef in args.ef_search:
        rows[f"HNSW{args.m} efSearch={ef}"] = {
            "index": hnsw, "params": {"m": args.m, "ef_construction": args.ef_construction,
                                      "ef_search": ef}, "build_s": t_hnsw}

    def ready(name: str) -> DenseIndex:
        row = rows[name]
        return row["index"].tune(nprobe=row["params"].get("nprobe"),
                                 ef_search=row["params"].get("ef_search"))

    for name in rows:
        rows[name]["recall@10"] = recall_at_k(ready(name), flat, queries, K)
    qps: dict[str, list[list[float]]] = {name: [] for name in rows}
    warm = queries[: max(1, len(queries) // 10)]
    for name in balanced_order(list(rows), args.rounds):
        index = ready(name)
        index.search_arrays(warm, K)
        qps[name].append([search_qps(index, queries)])
    out = {}
    for name, row in rows.items():
        ratio = ratio_with_interval(qps[name], qps["Flat"])
        out[name] = {"kind": row["index"].config.kind, "params": row["params"],
                     "build_s": row["build_s"], "recall@10": row["recall@10"],
                     "qps_rounds": qps[name], "qps": pooled_median(qps[name]),
                     "qps_vs_flat": ratio,
                     "meets_goal": row["recall@10"] >= GOAL_RECALL
                     and ratio["ratio"] >= GOAL_SPEEDUP}
    return {"n": args.n, "dim": args.dim, "queries": args.queries, "nlist": nlist, "rows": out}


def print_synthetic(res: dict[str, Any], args) -> None:
    print(f"\n{res['n']} x {res['dim']} synthetic unit vectors ({args.clusters} clusters, noise "
          f"{args.noise}), {res['queries']} queries, top-{K}, 1 thread, {args.rounds} rounds; "
          f"'× Flat' = QPS ratio, 90% bootstrap interval over rounds; * = recall@10 ≥ "
          f"{GOAL_RECALL} at ≥ {GOAL_SPEEDUP:g}× Flat")
    print(f"{'index':26s} {'build s':>8s} {'QPS':>9s} {'× Flat':>7s} {'90% interval':>15s} "
          f"{'recall@10':>9s}")
    for name, r in res["rows"].items():
        lo, hi = r["qps_vs_flat"]["interval"]
        print(f"{name:26s} {r['build_s']:8.2f} {r['qps']:9.0f} {r['qps_vs_flat']['ratio']:7.2f} "
              f"{lo:7.2f}–{hi:6.2f} {r['recall@10']:9.4f} {'*' if r['meets_goal'] else ''}")
    met = [n for n, r in res["rows"].items() if r["meets_goal"]]
    print(f"goal: recall@10 ≥ {GOAL_RECALL} at ≥ {GOAL_SPEEDUP:g}× Flat QPS → "
          f"{'met by ' + ', '.join(met) if met else 'NOT met'}")


def bm25s_run(coll, doc_ids: list[str], qids: list[str], k: int):
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(bm25s.tokenize([coll.documents[d] for d in doc_ids], stopwords="en",
                                   stemmer=stemmer, show_progress=False), show_progress=False)
    q_tokens = bm25s.tokenize([coll.queries[q] for q in qids], stopwords="en", stemmer=stemmer,
                              show_progress=False)
    res, scores = retriever.retrieve(q_tokens, k=min(k, len(doc_ids)), show_progress=False)
    return {q: {doc_ids[int(d)]: float(s) for d, s in zip(rr, ss)}
            for q, rr, ss in zip(qids, res, scores)}


def real_rows(args) -> dict[str, Any]:
    encoder = load_minilm_encoder()
    out = {}
    for name in ("cisi", "medline"):
        coll = LOADERS[name]()
        doc_ids = list(coll.documents)[: args.real_max_docs or None]
        queries = coll.judged_queries
        qids = list(queries)
        t0 = time.perf_counter()
        docs = encoder.encode([coll.documents[d] for d in doc_ids], batch_size=64)
        embed_s = time.perf_counter() - t0
        qvec = encoder.encode([queries[q] for q in qids], batch_size=64)
        nlist = max(1, int(math.sqrt(len(doc_ids))))
        flat = DenseIndex.build(doc_ids, docs)
        nprobe = max(1, nlist // 4)
        systems = {
            "MiniLM Flat": flat,
            f"MiniLM IVF{nlist} nprobe={nprobe}": DenseIndex.build(
                doc_ids, docs, DenseIndexConfig(kind="ivf", nlist=nlist, nprobe=nprobe)),
            "MiniLM HNSW32 efSearch=64": DenseIndex.build(
                doc_ids, docs, DenseIndexConfig(kind="hnsw", m=32, ef_search=64))}
        rows = {}
        for sname, index in systems.items():
            run = to_run(qids, index.search_vectors(qvec, 100))
            rows[sname] = {**evaluate(run, coll.qrels), "recall@10_vs_flat":
                           recall_at_k(index, flat, qvec, K)}
        rows["bm25s (reference)"] = evaluate(bm25s_run(coll, doc_ids, qids, 100), coll.qrels)
        out[name] = {"documents": len(doc_ids), "judged_queries": len(qids),
                     "embed_docs_s": embed_s, "rows": rows}
    return out


def print_real(res: dict[str, Any]) -> None:
    for name, r in res.items():
        print(f"\n{name}: {r['documents']} documents, {r['judged_queries']} judged queries "
              f"(MiniLM embedding {r['embed_docs_s']:.1f} s, 1 thread)")
        metrics = [m for m in next(iter(r["rows"].values()))]
        print(f"{'system':30s} " + " ".join(f"{m:>17s}" for m in metrics))
        for sname, row in r["rows"].items():
            print(f"{sname:30s} " + " ".join(f"{row.get(m, float('nan')):17.4f}" for m in metrics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.8)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=0, help="0: 4·sqrt(n)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--real-max-docs", type=int, default=0, help="0: every document")
    ap.add_argument("--out", default=os.path.join(REPO, "bench/results/dense_index.json"))
    args = parse_args(ap, {"n": 20_000, "clusters": 200, "queries": 200, "rounds": 3,
                           "real_max_docs": 150})
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    t_start = time.time()
    synth = synthetic_rows(args)
    print_synthetic(synth, args)
    real = real_rows(args) if args.real else None
    if real is not None:
        print_real(real)
    write_json(args.out, {
        "bench": "dense_index", "args": vars(args), "k": K,
        "reference": "faiss IndexFlatIP (exact inner product), 1 thread",
        "synthetic": synth,
        "goal": {"recall@10": GOAL_RECALL, "qps_vs_flat": GOAL_SPEEDUP,
                 "met_by": [n for n, r in synth["rows"].items() if r["meets_goal"]]},
        "real": real, "wall_s": time.time() - t_start,
        **environment(faiss=faiss.__version__)}, default=float)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
