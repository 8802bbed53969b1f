"""Evaluate saved indexes on a collection's judgments: one row per index, one column per metric.

    bmray evaluate --index runs/index/cisi-bm25 [--index DIR ...] --collection cisi \
        [--metrics ndcg@10 map@100 ...] [--json out.json]

Each index must have been built from the collection's documents (the corpus hash in its
manifest is checked). Queries are the collection's judged queries; every index retrieves the
largest cut-off of the metrics. Metrics are trec_eval's (models/retrieval/metrics.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bmray.models.retrieval.artifact import load_index
from bmray.models.retrieval.collections import LOADERS, Collection, world_collection
from bmray.models.retrieval.manifest import IndexArtifactError
from bmray.models.retrieval.metrics import DEFAULT_METRICS, evaluate, format_table, parse_metric
from bmray.models.retrieval.types import to_run
from bmray.models.world.config import WorldConfig
from bmray.models.world.world import World

COLLECTIONS = sorted(LOADERS) + ["world"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmray evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", action="append", required=True, metavar="DIR",
                    help="an index directory (repeat for several)")
    ap.add_argument("--collection", required=True, choices=COLLECTIONS)
    ap.add_argument("--world-entities", type=int, default=200)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--split", choices=["train", "eval"], default=None,
                    help="world only: the queries of one split")
    ap.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    ap.add_argument("--json", default=None, help="also write {index: {metric: value}} here")
    return ap.parse_args(argv)


def collection_of(args: argparse.Namespace) -> Collection:
    if args.collection == "world":
        world = World(WorldConfig(n_entities=args.world_entities, seed=args.world_seed))
        return world_collection(world, args.split)
    return LOADERS[args.collection]()


def row_names(dirs: list[str]) -> list[str]:
    """Each index's directory name, or its path where two names clash."""
    names = [Path(d).name or d for d in dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, dirs)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cuts = [parse_metric(m)[1] for m in args.metrics]
    except ValueError as exc:
        print(f"[bmray] evaluate: {exc}", file=sys.stderr)
        return 2
    collection = collection_of(args)
    queries = collection.judged_queries
    try:
        indexes = [load_index(d, collection.documents, collection.name) for d in args.index]
    except IndexArtifactError as exc:
        print(f"[bmray] evaluate: {exc}", file=sys.stderr)
        return 2
    rows, timing = {}, {}
    for name, index in zip(row_names(args.index), indexes):
        start = time.perf_counter()
        hits = index.search(list(queries.values()), max(cuts))
        timing[name] = time.perf_counter() - start
        rows[name] = evaluate(to_run(list(queries), hits), collection.qrels, args.metrics)
    print(f"{collection.name}: {len(queries)} judged queries", flush=True)
    print(format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"collection": collection.name, "queries": len(queries), "metrics": rows,
                       "search_seconds": timing}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
