"""Embed a corpus in parallel with Ray Data, and build a dense index from it.

    ids, vectors = embed_corpus(["docs-0.jsonl", "docs-1.parquet"], "minilm", workers=4)
    index = build_dense_index(load_cisi(), "minilm", DenseIndexConfig(kind="hnsw"), workers=2)

Shards are Parquet or JSON-lines files with ``id`` and ``text`` string columns, read by Ray Data
(``read_parquet`` / ``read_json``, one read task per file) and embedded by a pool of ``workers``
actors (actors/retrieval/embed.py), each holding one encoder. Every file is checked for the two
columns before any actor starts, so a bad shard fails in a second with its name, not after the
other shards were embedded. Ids travel with their vectors; the result is sorted by id, so it
does not depend on which actor finished first. Duplicate ids across shards are an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray

from bmray.actors.retrieval.embed import EmbedBatch
from bmray.models.retrieval.collections import Collection
from bmray.models.retrieval.dense_index import (DenseIndex, DenseIndexConfig, EncoderSpec,
                                                encoder_identity, make_encoder)
from bmray.models.typed_config import check_int

__all__ = ["embed_corpus", "build_dense_index", "check_shard", "PARQUET", "JSONL"]

PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".json")
COLUMNS = ("id", "text")
# pyarrow's reader (newline-delimited JSON) with both columns read as strings: no type
# inference turning an id "007" into 7 or a date-like text into a timestamp; other keys ignored.
JSON_OPTIONS = pajson.ParseOptions(explicit_schema=pa.schema([(c, pa.string()) for c in COLUMNS]),
                                   unexpected_field_behavior="ignore")


def check_shard(path: str) -> str:
    """The shard's format ("parquet" or "jsonl") after checking it exists and has id and text."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such shard")
    suffix = p.suffix.lower()
    if suffix in PARQUET:
        try:
            names = pq.read_schema(p).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        fmt = "parquet"
    elif suffix in JSONL:
        with open(p, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ValueError(f"{path}: empty shard")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: first line is not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}: first line is not a JSON object")
        names = list(row)
        wrong = [c for c in COLUMNS if c in row and not isinstance(row[c], str)]
        if wrong:
            raise ValueError(f"{path}: {wrong} must be JSON strings, got "
                             f"{ {c: row[c] for c in wrong} } on the first line")
        fmt = "jsonl"
    else:
        raise ValueError(f"{path}: unknown shard format {suffix!r}; expected one of "
                         f"{list(PARQUET + JSONL)}")
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: no {' and no '.join(map(repr, missing))} column "
                         f"(has {names}); a shard needs {list(COLUMNS)}")
    return fmt


def read_shards(paths: Sequence[str]) -> ray.data.Dataset:
    """One dataset of ``{id, text, path}`` rows over every shard (ids as strings)."""
    formats = {p: check_shard(p) for p in paths}
    parts = []
    parquet = [p for p, f in formats.items() if f == "parquet"]
    jsonl = [p for p, f in formats.items() if f == "jsonl"]
    if parquet:
        parts.append(ray.data.read_parquet(parquet, columns=list(COLUMNS), include_paths=True))
    if jsonl:
        parts.append(ray.data.read_json(jsonl, include_paths=True, file_extensions=None,
                                        parse_options=JSON_OPTIONS))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def collect(ds: ray.data.Dataset, spec: EncoderSpec, workers: int, batch_size: int,
            weights: str | None) -> tuple[list[str], np.ndarray]:
    """Run the actor pool over ``ds``; ids and vectors sorted by id."""
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"encoder": spec,
                                                            "batch_size": batch_size},
                         batch_size=batch_size, batch_format="numpy", concurrency=workers,
                         num_cpus=1)
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        if weights is not None and any(w != weights for w in batch["encoder"]):
            raise ValueError("embed_corpus: an actor built an encoder with other weights than "
                             "the driver's (a factory that is not deterministic?)")
        ids.extend(str(i) for i in batch["id"])
        vectors.append(np.asarray(batch["vector"], dtype=np.float32))
    if not ids:
        raise ValueError("embed_corpus: the shards hold no rows")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = sorted({i for i in ids if i in seen or seen.add(i)})
        raise ValueError(f"embed_corpus: duplicate document ids across shards, e.g. {dup[:5]}")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[i] for i in order], np.concatenate(vectors)[order]


def embed_corpus(paths: Sequence[str], encoder: EncoderSpec = "minilm", workers: int = 2,
                 batch_size: int = 64, weights: str | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors [N, d])`` of every row of the Parquet/JSONL ``paths``, embedded by
    ``workers`` actors. ``weights``: the SHA-256 the actors' encoder must have."""
    if isinstance(paths, str) or not paths:
        raise ValueError(f"embed_corpus: expected a non-empty list of shard paths, got {paths!r}")
    check_int("workers", workers, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    return collect(read_shards([str(p) for p in paths]), encoder, workers, batch_size, weights)


def build_dense_index(source: Collection | Sequence[str], encoder: EncoderSpec = "minilm",
                      config: DenseIndexConfig = DenseIndexConfig(), workers: int = 2,
                      batch_size: int = 64) -> DenseIndex:
    """A searchable ``DenseIndex`` of a collection's documents or of Parquet/JSONL shards.

    ``workers`` = 0 embeds a collection in this process; otherwise ``workers`` Ray actors embed
    it (Ray must be initialised). A collection's documents keep its order; shards' rows are
    sorted by id. The index holds the driver's encoder for its queries and
    records its identity (and ``encoder`` when it is a name, so ``DenseIndex.load`` rebuilds it).
    """
    check_int("workers", workers, minimum=0)
    enc = make_encoder(encoder)
    identity = encoder_identity(enc)
    weights = identity["weights_sha256"]
    if isinstance(source, Collection):
        ids = list(source.documents)
        if workers == 0:
            vectors = enc.encode([source.documents[i] for i in ids], batch_size)
        else:
            ds = ray.data.from_items([{"id": i, "text": source.documents[i]} for i in ids])
            got, vectors = collect(ds, encoder, workers, batch_size, weights)
            row = {doc_id: n for n, doc_id in enumerate(got)}
            vectors = vectors[[row[i] for i in ids]]       # the collection's order, as workers=0
    else:
        if workers == 0:
            raise ValueError("build_dense_index: shards are embedded by Ray actors; workers >= 1")
        ids, vectors = embed_corpus(source, encoder, workers, batch_size, weights)
    return DenseIndex.build(ids, vectors, config, encoder=enc, identity=identity,
                            encoder_spec=encoder if isinstance(encoder, str) else None)
