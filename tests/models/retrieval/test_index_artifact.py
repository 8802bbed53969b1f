"""Index artifacts: save, load by kind, and the clear errors for broken or mismatched ones."""
from __future__ import annotations

import json

import pytest

from bmray.models.retrieval.artifact import INDEX_KINDS, load_index, save_index
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.collections import load_medline
from bmray.models.retrieval.manifest import IndexArtifactError

DOCS = {"1": "heart attack in young adults", "2": "kidney stones and diet",
        "3": "diet and heart disease"}


@pytest.fixture
def saved(tmp_path):
    index = BM25Index.build(list(DOCS), list(DOCS.values()))
    return index, save_index(index, tmp_path / "idx")


def test_round_trip_by_kind(saved):
    index, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "bm25" and "bm25" in INDEX_KINDS
    assert manifest["analyzer"]["stemmer"] == "porter" and manifest["n_docs"] == 3
    loaded = load_index(path, documents=DOCS, corpus="toy")
    assert isinstance(loaded, BM25Index)
    assert loaded.search(["heart diet"], 3) == index.search(["heart diet"], 3)


def test_missing_and_corrupt(saved, tmp_path):
    _, path = saved
    with pytest.raises(IndexArtifactError, match="no such index directory"):
        load_index(tmp_path / "nowhere")
    (path / "vocab.json").write_text('["tampered"]')
    with pytest.raises(IndexArtifactError, match="vocab.json: corrupt"):
        load_index(path)
    (path / "vocab.json").unlink()
    with pytest.raises(IndexArtifactError, match="vocab.json listed in the manifest is missing"):
        load_index(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(IndexArtifactError, match="manifest.json: not valid JSON"):
        load_index(path)
    (path / "manifest.json").unlink()
    with pytest.raises(IndexArtifactError, match="no manifest.json"):
        load_index(path)


def test_unknown_kind(saved):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["kind"] = "splade"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexArtifactError, match="unknown index kind 'splade'.*'bm25'"):
        load_index(path)


def test_index_of_another_corpus(saved):
    _, path = saved
    medline = load_medline()
    with pytest.raises(IndexArtifactError, match="built from another corpus than medline"):
        load_index(path, documents=medline.documents, corpus="medline")
    changed = dict(DOCS, **{"3": "diet and heart disease!"})       # one character differs
    with pytest.raises(IndexArtifactError, match="another corpus"):
        load_index(path, documents=changed)
