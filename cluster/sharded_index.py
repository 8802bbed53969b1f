"""A BM25 index sharded over Ray actors, queried scatter-gather with an exact top-k merge.

Build (two phases): the corpus is cut into S consecutive slices, one ``BM25Shard`` actor each;
every shard counts its slice's statistics, the driver sums them (``CorpusStats.combine``) and
every shard builds with the global N, df and avgdl, so each (term, doc) score equals the
unsharded index's. Search: each query batch goes to every shard, each returns its local top-k,
and the driver keeps the k best of the k*S candidates (score descending, document id
ascending: the unsharded index's order), which is exactly the unsharded top-k. A shard that
died fails the search with an error naming it; a partial result is never returned.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError

from bmray.actors.retrieval.shard import RemoteBM25Shard
from bmray.models.retrieval.analyzer import AnalyzerConfig
from bmray.models.retrieval.bm25 import BM25Config, BM25Index, CorpusStats
from bmray.models.retrieval.manifest import corpus_hash
from bmray.models.retrieval.types import Hits


class ShardUnavailable(RuntimeError):
    """A shard actor died or cannot be reached; the message names it."""


def slices(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` consecutive [start, end) ranges covering n items, sizes differing by <= 1."""
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be in [1, {n}] (the number of documents), got {shards}")
    bounds = [n * i // shards for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def merge_arrays(per_shard: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> list[Hits]:
    """The k best per query of the shards' [queries, k] id and score arrays ("" / -inf pads):
    one lexsort per row of the k*S candidates, score descending, then document id ascending."""
    ids = np.concatenate([i for i, _ in per_shard], axis=1)
    scores = np.concatenate([s for _, s in per_shard], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    ids = np.take_along_axis(ids, order, 1).tolist()
    scores = np.take_along_axis(scores, order, 1).tolist()
    return [[(d, s) for d, s in zip(ir, sr) if d] for ir, sr in zip(ids, scores)]


class ShardedIndex:
    """A ``Retriever`` over S ``BM25Shard`` actors."""

    def __init__(self, shards: list, sizes: list[int], corpus_hash: str):
        self.shards = shards
        self.sizes = sizes
        self.corpus_hash = corpus_hash

    @classmethod
    def build(cls, doc_ids: Sequence[str], texts: Sequence[str], shards: int,
              analyzer: AnalyzerConfig | None = None, config: BM25Config | None = None,
              num_cpus: float = 1) -> "ShardedIndex":
        if len(doc_ids) != len(texts):
            raise ValueError(f"ShardedIndex.build: {len(doc_ids)} ids but {len(texts)} texts")
        analyzer, config = analyzer or AnalyzerConfig(), config or BM25Config()
        ranges = slices(len(doc_ids), shards)
        actors = [RemoteBM25Shard.options(num_cpus=num_cpus)
                  .remote(i, list(doc_ids[a:b]), list(texts[a:b]), analyzer)
                  for i, (a, b) in enumerate(ranges)]
        index = cls(actors, [b - a for a, b in ranges], corpus_hash(doc_ids, texts))
        stats = CorpusStats.combine(index.gather([s.stats.remote() for s in actors]))
        index.gather([s.build.remote(stats, config) for s in actors])
        return index

    def gather(self, refs: list) -> list:
        """``ray.get`` of one call per shard; a dead shard raises ShardUnavailable naming it."""
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as exc:
                raise ShardUnavailable(
                    f"BM25 shard {i} of {len(self.shards)} ({self.sizes[i]} documents) is "
                    f"unavailable: {type(exc).__name__}") from exc
        return out

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if isinstance(queries, str):
            raise TypeError("search: pass a sequence of query texts, not one string")
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        queries = list(queries)
        return merge_arrays(self.gather([s.search_ids.remote(queries, k)
                                         for s in self.shards]), k)

    def to_index(self) -> BM25Index:
        """The shards' indexes joined into one (equal to the unsharded index), e.g. to save."""
        return BM25Index.merge(self.gather([s.get_index.remote() for s in self.shards]),
                               self.corpus_hash)

    def shutdown(self) -> None:
        for s in self.shards:
            ray.kill(s)
        self.shards = []
