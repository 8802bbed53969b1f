"""Build a retrieval index from a collection and save it as an artifact.

    bmray index --config configs/index_cisi_bm25.yaml [--set index.shards=2 --set output=...]

``collection``: cisi | medline | world (the synthetic world's pages; ``world_entities``,
``world_seed``) | jsonl | parquet (``path``: records with string ``id`` and ``text``).
``index``: kind bm25 with k1, b, the analyzer and ``shards``; or kind dense with ``encoder``
(minilm), ``faiss`` (flat | ivf | hnsw and their parameters) and ``workers`` (Ray actors that embed
the corpus; 0 embeds in this process). With bm25 shards > 1 the index is built
on that many Ray actors (two phases: global statistics, then per-shard scores; an embedded local
Ray unless ``--address`` / RAY_ADDRESS name a cluster) and the shards' indexes are joined into
one before saving: a shard built on global statistics holds exactly the unsharded index's
columns, so one artifact serves any later shard count (as checkpoints load at any world size).
The whole config is checked (ConfigError naming the key, exit 2) before anything is read.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from bmray.cluster import connect
from bmray.cluster.embed_corpus import build_dense_index
from bmray.cluster.sharded_index import ShardedIndex
from bmray.jobs.pretrain import parse_args, run_job
from bmray.models.retrieval.analyzer import Analyzer, AnalyzerConfig
from bmray.models.retrieval.artifact import save_index
from bmray.models.retrieval.bm25 import BM25Config, BM25Index
from bmray.models.retrieval.collections import LOADERS, Collection, world_collection
from bmray.models.retrieval.dense_index import ENCODERS, DenseIndex, DenseIndexConfig
from bmray.models.retrieval.manifest import corpus_hash
from bmray.models.typed_config import (ConfigError, apply_overrides, check_choice, check_int,
                                       from_dict, load_yaml, to_dict)
from bmray.models.world.config import WorldConfig
from bmray.models.world.world import World


@dataclass(frozen=True)
class IndexSection:
    kind: Literal["bm25", "dense"] = "bm25"
    k1: float = 0.9
    b: float = 0.4
    shards: int = 1
    analyzer: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    encoder: str = "minilm"
    faiss: DenseIndexConfig = field(default_factory=DenseIndexConfig)
    workers: int = 0

    def __post_init__(self) -> None:
        check_choice("index.kind", self.kind, ("bm25", "dense"))
        BM25Config(self.k1, self.b)
        check_int("index.shards", self.shards, minimum=1)
        check_int("index.workers", self.workers, minimum=0)
        check_choice("index.encoder", self.encoder, ENCODERS)
        if self.kind == "dense" and self.shards != 1:
            raise ConfigError("index.shards: sharding is for bm25; a dense corpus is embedded by "
                              "`index.workers` Ray actors into one faiss index")


@dataclass(frozen=True)
class IndexJobConfig:
    output: str
    collection: Literal["cisi", "medline", "world", "jsonl", "parquet"] = "cisi"
    path: str | None = None
    world_entities: int = 200
    world_seed: int = 0
    index: IndexSection = field(default_factory=IndexSection)

    def __post_init__(self) -> None:
        check_int("world_entities", self.world_entities, minimum=1)
        if self.collection in ("jsonl", "parquet"):
            if not self.path:
                raise ConfigError(f"path: collection {self.collection} needs a path to its "
                                  f"records")
            if not Path(self.path).is_file():
                raise ConfigError(f"path: no such file {self.path}")
        elif self.path is not None:
            raise ConfigError(f"path: only for collection jsonl or parquet, not "
                              f"{self.collection}")


def read_records(path: str, fmt: str) -> dict[str, str]:
    """``{id: text}`` of a JSONL or Parquet file of {id, text} records (errors name the line)."""
    if fmt == "parquet":
        table = pq.read_table(path)
        missing = {"id", "text"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)}; has {table.column_names}")
        rows = zip(table.column("id").to_pylist(), table.column("text").to_pylist())
        records = [(str(i), t) for i, t in rows]
    else:
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    records.append((str(rec["id"]), rec["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{n}: expected a JSON object with id and text "
                                     f"({exc})") from exc
    docs = dict(records)
    if len(docs) != len(records):
        raise ValueError(f"{path}: duplicate document ids")
    if any(not isinstance(t, str) for t in docs.values()):
        raise ValueError(f"{path}: every text must be a string")
    return docs


def corpus_of(cfg: IndexJobConfig) -> dict[str, str]:
    if cfg.collection in LOADERS:
        return LOADERS[cfg.collection]().documents
    if cfg.collection == "world":
        world = World(WorldConfig(n_entities=cfg.world_entities, seed=cfg.world_seed))
        return world_collection(world).documents
    return read_records(cfg.path, cfg.collection)


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    raw = apply_overrides(load_yaml(path), overrides)
    from_dict(IndexJobConfig, raw, "config")
    return raw


def build_dense(cfg: IndexJobConfig, docs: dict[str, str],
                address: str | None) -> tuple[DenseIndex, str]:
    """Embed the corpus (here, or on ``workers`` actors) into the configured faiss index."""
    ix = cfg.index
    where = "this process"
    if ix.workers > 0:
        info = connect(address, num_cpus=max(ix.workers, os.cpu_count() or 1))
        where = f"{ix.workers} embedding actors on {info['where']}"
    index = build_dense_index(Collection(cfg.collection, docs, {}, {}), ix.encoder, ix.faiss,
                              workers=ix.workers)
    index.corpus_hash = corpus_hash(list(docs), docs.values())
    return index, where


def run(raw: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    cfg = from_dict(IndexJobConfig, raw, "config")
    docs = corpus_of(cfg)
    ids, texts = list(docs), list(docs.values())
    ix = cfg.index
    if ix.kind == "dense":
        start = time.perf_counter()
        index, where = build_dense(cfg, docs, address)
        seconds = time.perf_counter() - start
        save_index(index, cfg.output)
        return {"output": cfg.output, "collection": cfg.collection, "kind": "dense",
                "documents": len(index), "dim": index.dim, "faiss": index.config.kind,
                "build_seconds": seconds, "built_on": where, "config": to_dict(cfg)}
    bm25 = BM25Config(ix.k1, ix.b)
    start = time.perf_counter()
    if ix.shards == 1:
        index = BM25Index.build(ids, texts, Analyzer(ix.analyzer), bm25)
        where = "this process"
    else:
        info = connect(address, num_cpus=max(ix.shards, os.cpu_count() or 1))
        sharded = ShardedIndex.build(ids, texts, ix.shards, ix.analyzer, bm25)
        try:
            index = sharded.to_index()
        finally:
            sharded.shutdown()
        where = f"{ix.shards} shard actors on {info['where']}"
    seconds = time.perf_counter() - start
    save_index(index, cfg.output)
    return {"output": cfg.output, "collection": cfg.collection, "kind": "bm25",
            "documents": len(index),
            "terms": len(index.terms), "postings": int(index.matrix.nnz),
            "build_seconds": seconds, "built_on": where, "config": to_dict(cfg)}


def print_report(report: dict[str, Any]) -> None:
    if report["kind"] == "dense":
        print(f"[bmray] dense {report['faiss']} index of {report['collection']}: "
              f"{report['documents']} vectors of dimension {report['dim']}, built in "
              f"{report['build_seconds']:.2f} s on {report['built_on']} -> {report['output']}",
              flush=True)
        return
    print(f"[bmray] bm25 index of {report['collection']}: {report['documents']} documents, "
          f"{report['terms']} terms, {report['postings']} postings, built in "
          f"{report['build_seconds']:.2f} s on {report['built_on']} -> {report['output']}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray index"), load_config,
                   run, print_report)


if __name__ == "__main__":
    sys.exit(main())
