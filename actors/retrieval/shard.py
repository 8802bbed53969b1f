"""One shard of a sharded BM25 index, as a Ray actor: a slice of the corpus and its index.

The build has two phases so a shard scores exactly like the unsharded index: ``stats()``
returns the slice's counts (N, total length, df per term), the driver sums them, and
``build(global_stats)`` indexes the slice with the *global* N, df and avgdl. ``search`` returns
the slice's top-k; the driver merges (cluster/sharded_index.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray

from bmray.models.retrieval.analyzer import Analyzer, AnalyzerConfig
from bmray.models.retrieval.bm25 import BM25Config, BM25Index, CorpusStats
from bmray.models.retrieval.types import Hits


class BM25Shard:
    """A slice of the corpus: analysed at construction, indexed by ``build``."""

    def __init__(self, shard: int, doc_ids: Sequence[str], texts: Sequence[str],
                 analyzer: AnalyzerConfig):
        self.shard = shard
        self.doc_ids = list(doc_ids)
        self.analyzer = Analyzer(analyzer)
        self.tokens = self.analyzer.tokens_batch(texts)
        self.index: BM25Index | None = None

    def stats(self) -> CorpusStats:
        return CorpusStats.of(self.tokens)

    def build(self, stats: CorpusStats, config: BM25Config) -> int:
        self.index = BM25Index.from_tokens(self.doc_ids, self.tokens, self.analyzer, config,
                                           stats)
        self.tokens = []
        return len(self.index)

    def built(self) -> BM25Index:
        if self.index is None:
            raise RuntimeError(f"shard {self.shard}: search before build")
        return self.index

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        return self.built().search(queries, k)

    def search_ids(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The slice's top-k as [queries, k] arrays of ids and scores (BM25Index.search_ids)."""
        return self.built().search_ids(queries, k)

    def get_index(self) -> BM25Index:
        return self.built()


RemoteBM25Shard = ray.remote(BM25Shard)
