"""The BM25 index sharded over Ray actors returns exactly the unsharded index's top-k."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from bmray.cluster.sharded_index import ShardedIndex, ShardUnavailable, merge_arrays, slices
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.collections import load_cisi

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cisi():
    c = load_cisi()
    ids, texts = list(c.documents), list(c.documents.values())
    return ids, texts, list(c.queries.values()), BM25Index.build(ids, texts)


@pytest.mark.parametrize("shards", [2, 3])
def test_equals_unsharded(ray_session, cisi, shards):
    ids, texts, queries, full = cisi
    sharded = ShardedIndex.build(ids, texts, shards, num_cpus=0.5)
    try:
        for k in (10, 100):
            want, got = full.search(queries, k), sharded.search(queries, k)
            assert [[d for d, _ in h] for h in got] == [[d for d, _ in h] for h in want]
            assert all(np.allclose([s for _, s in g], [s for _, s in w], rtol=1e-6)
                       for g, w in zip(got, want))
        merged = sharded.to_index()                  # what `bmray index` saves
        assert merged.doc_ids == full.doc_ids and (merged.matrix != full.matrix).nnz == 0
        if shards == 3:
            ray.kill(sharded.shards[1])
            with pytest.raises(ShardUnavailable, match="BM25 shard 1 of 3 .* unavailable"):
                sharded.search(queries[:2], 10)
    finally:
        sharded.shutdown()


def test_merge_and_slices():
    assert slices(7, 3) == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(ValueError, match="shards must be in"):
        slices(2, 3)
    # score descending, ties by document id ascending, pads ("" / -inf) dropped
    ninf = -np.inf
    a = (np.array([["b", "a"], ["x", ""]]), np.array([[2.0, 1.0], [3.0, ninf]]))
    b = (np.array([["c", "a0"], ["", ""]]), np.array([[2.0, 1.0], [ninf, ninf]]))
    assert merge_arrays([a, b], 3) == [[("b", 2.0), ("c", 2.0), ("a", 1.0)], [("x", 3.0)]]
