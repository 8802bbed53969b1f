"""Save any index to a directory and load it back by the ``kind`` its manifest names.

Why a registry: ``bmray evaluate``, open-domain QA and serving take "an index directory" without
knowing what is inside; ``load_index`` reads the manifest (checking every file's hash, see
manifest.py) and calls the loader registered for its kind. A new index type adds one entry to
``INDEX_KINDS`` (its loader ``load(dir) -> Retriever``) and writes its manifest with that kind.
Given the documents it will be evaluated on, ``load_index`` also refuses an index built from
another corpus (the corpus hashes differ).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.dense_index import DenseIndex
from bmray.models.retrieval.manifest import (IndexArtifactError, check_corpus, corpus_hash,
                                             read_manifest)
from bmray.models.retrieval.types import Retriever

INDEX_KINDS: dict[str, Callable[[Path], Retriever]] = {"bm25": BM25Index.load,
                                                      "dense": DenseIndex.load}


def save_index(index, directory: str | Path) -> Path:
    """Write ``index`` (anything with ``save(dir)`` writing files and a manifest) to a dir."""
    save = getattr(index, "save", None)
    if save is None:
        raise TypeError(f"save_index: {type(index).__name__} has no save(dir)")
    save(Path(directory))
    return Path(directory)


def index_manifest(directory: str | Path) -> dict:
    """The checked manifest of an index directory (files present and intact, kind known)."""
    manifest = read_manifest(directory)
    if manifest["kind"] not in INDEX_KINDS:
        raise IndexArtifactError(f"{directory}: unknown index kind {manifest['kind']!r}; "
                                 f"known kinds are {sorted(INDEX_KINDS)}")
    return manifest


def load_index(directory: str | Path, documents: Mapping[str, str] | None = None,
               corpus: str = "the given documents") -> Retriever:
    """The index in ``directory``; with ``documents`` ({id: text} in corpus order) it must have
    been built from exactly them (``corpus`` names them in the error)."""
    manifest = index_manifest(directory)
    if documents is not None:
        check_corpus(manifest, corpus_hash(list(documents), documents.values()),
                     str(directory), corpus)
    return INDEX_KINDS[manifest["kind"]](Path(directory))
