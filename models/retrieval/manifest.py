"""The manifest every index artifact carries, and the checks made when one is read.

Why: an index is only meaningful with the corpus and analyzer it was built from. The manifest
(``manifest.json``) records the index ``kind`` (which loader reads it), the SHA-256 of every file
it wrote (a truncated or swapped file fails loudly) and a hash of the corpus (ids and texts in
order), so evaluating an index against another collection is an error naming both hashes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

MANIFEST = "manifest.json"
FORMAT = 1


class IndexArtifactError(ValueError):
    """An index directory is missing, corrupt, of an unknown kind or of another corpus."""


def corpus_hash(doc_ids: Sequence[str], texts: Iterable[str]) -> str:
    """SHA-256 of the documents in order (id and text, NUL-separated)."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts, strict=True):
        h.update(doc_id.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, kind: str, files: Sequence[str],
                   **meta: Any) -> dict:
    """Write ``manifest.json`` after the ``files`` (names inside ``directory``) are written."""
    directory = Path(directory)
    manifest = {"kind": kind, "format": FORMAT, **meta,
                "files": {name: file_sha256(directory / name) for name in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None) -> dict:
    """The manifest of ``directory``, after checking every file it lists is there and intact."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexArtifactError(f"{directory}: no such index directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexArtifactError(f"{directory}: no {MANIFEST} (not an index directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexArtifactError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or "kind" not in manifest or "files" not in manifest:
        raise IndexArtifactError(f"{path}: expected a mapping with 'kind' and 'files'")
    if kind is not None and manifest["kind"] != kind:
        raise IndexArtifactError(f"{directory}: an index of kind {manifest['kind']!r}, "
                                 f"expected {kind!r}")
    for name, digest in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise IndexArtifactError(f"{directory}: file {name} listed in the manifest is "
                                     f"missing")
        if file_sha256(f) != digest:
            raise IndexArtifactError(f"{f}: corrupt (its SHA-256 differs from the manifest's)")
    return manifest


def check_corpus(manifest: dict, expected_hash: str, where: str, corpus: str) -> None:
    """Raise unless the index in ``where`` was built from the corpus hashing to ``expected``."""
    built = manifest.get("corpus_hash")
    if built != expected_hash:
        raise IndexArtifactError(
            f"{where}: the index was built from another corpus than {corpus} (corpus hash "
            f"{str(built)[:12]} in the manifest, {expected_hash[:12]} for {corpus})")
