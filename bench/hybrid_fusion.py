"""Hybrid retrieval quality: BM25, the MiniLM dual encoder, and their reciprocal rank fusion.

    .venv/bin/python bench/hybrid_fusion.py [--quick] [--out bench/results/hybrid_fusion.json]

On CISI, Medline and the synthetic world's eval split (300 entities): nDCG@10, MRR@10, MAP@100
and Recall@100 of our BM25 (models/retrieval/bm25.py: Lucene's variant, k1 = 0.9, b = 0.4,
Lucene's stop words, Porter stemmer), of bm25s (the peer, for reference: k1 = 1.5, b = 0.75,
English stop words, Snowball stemmer) and of the offline MiniLM (exact inner product over its
unit vectors), and of each BM25 fused with the MiniLM by ``HybridRetriever`` (RRF, k = 60,
depth 100). Quality
only — no timings — so the figures do not depend on the machine's load. ``--quick``: Medline
only. Docs: docs/retrieval.md, "Re-ranking, fusion and training".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bm25s
import Stemmer
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment  # noqa: E402
from bmray.models.retrieval.bm25 import BM25Index  # noqa: E402
from bmray.models.retrieval.collections import load_cisi, load_medline, world_collection  # noqa: E402
from bmray.models.retrieval.contrastive import ExactDenseRetriever  # noqa: E402
from bmray.models.retrieval.encoder import load_minilm_encoder  # noqa: E402
from bmray.models.retrieval.fusion import HybridRetriever  # noqa: E402
from bmray.models.retrieval.metrics import evaluate, format_table  # noqa: E402
from bmray.models.retrieval.types import to_run  # noqa: E402
from bmray.models.world import World, WorldConfig  # noqa: E402

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@100")


class Bm25sRetriever:
    """bm25s behind the ``Retriever`` protocol (the peer)."""

    def __init__(self, documents: dict[str, str]):
        self.ids = list(documents)
        self.stemmer = Stemmer.Stemmer("english")
        self.model = bm25s.BM25()
        self.model.index(bm25s.tokenize(list(documents.values()), stopwords="en",
                                        stemmer=self.stemmer, show_progress=False),
                         show_progress=False)

    def search(self, queries, k):
        tokens = bm25s.tokenize(list(queries), stopwords="en", stemmer=self.stemmer,
                                show_progress=False)
        docs, scores = self.model.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False)
        return [[(self.ids[int(d)], float(s)) for d, s in zip(dr, sr)]
                for dr, sr in zip(docs, scores)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Medline only")
    ap.add_argument("--out", default="bench/results/hybrid_fusion.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    collections = [load_medline()] if args.quick else [
        load_cisi(), load_medline(), world_collection(World(WorldConfig(n_entities=300)), "eval")]
    encoder = load_minilm_encoder()
    results, rows = {}, {}
    for coll in collections:
        qids = list(coll.judged_queries)
        texts = [coll.queries[q] for q in qids]
        ours = BM25Index.build(list(coll.documents), list(coll.documents.values()))
        peer = Bm25sRetriever(coll.documents)
        dense = ExactDenseRetriever(encoder, coll.documents)
        systems = {"bm25": ours, "bm25s": peer, "minilm": dense,
                   "rrf(bm25, minilm)": HybridRetriever([ours, dense], k_rrf=60, depth=100),
                   "rrf(bm25s, minilm)": HybridRetriever([peer, dense], k_rrf=60, depth=100)}
        results[coll.name] = {}
        for name, retriever in systems.items():
            scores = evaluate(to_run(qids, retriever.search(texts, 100)), coll.qrels, METRICS)
            results[coll.name][name] = scores
            rows[f"{coll.name}: {name}"] = scores
    print(format_table(rows), flush=True)
    out = {"config": {"metrics": METRICS, "k_rrf": 60, "depth": 100, "quick": args.quick,
                      "bm25": "ours: lucene, k1=0.9, b=0.4, Lucene stop words, Porter stemmer",
                      "bm25s": "lucene, k1=1.5, b=0.75, English stop words, Snowball stemmer",
                      "minilm": "all-MiniLM-L6-v2, mean pooling, exact inner product"},
           "environment": environment(bm25s=bm25s.__version__), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
