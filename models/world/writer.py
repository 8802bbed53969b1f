"""`write_world`: stream a `World` to JSON Lines and/or Parquet files, chunk by chunk.

Why chunked: a world may be gigabytes. Records are rendered a chunk of entities at a time (one
chunk = one JSONL write and one Parquet row group) and written in entity order, so memory stays
flat whatever the size. Chunks are independent, so ``num_workers`` processes can render them
while this process writes them in order: the files are byte-identical for any worker count.
Files go through a pyarrow filesystem, so ``out_dir`` may be a local path or a URI (``s3://``,
``gs://``). Nothing time- or host-dependent is written: the same config gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections import deque
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bmray.models.typed_config import ConfigError, check_choice
from bmray.models.world import schema
from bmray.models.world.config import WorldConfig
from bmray.models.world.world import World, dumps

PARTS = ("entities", "documents", "qa", "retrieval")
FORMATS = ("jsonl", "parquet")
CHUNK_ENTITIES = 1000

_S, _I64 = pa.string(), pa.int64()
SCHEMAS = {
    "entities": pa.schema([("id", _I64), ("type", _S), ("name", _S), ("attributes", _S)]),
    "documents": pa.schema([("id", _S), ("entity_id", _I64), ("title", _S), ("text", _S),
                            ("label", _S), ("region", _S), ("split", _S)]),
    "qa": pa.schema([("id", _S), ("question", _S), ("answer", _S), ("answer_start", _I64),
                     ("answer_end", _I64), ("context_id", _S), ("context", _S),
                     ("entity_id", _I64), ("attribute", _S), ("split", _S)]),
    "retrieval": pa.schema([("id", _S), ("query", _S), ("entity_id", _I64), ("attribute", _S),
                            ("answer", _S),
                            ("relevant", pa.list_(pa.struct([("doc_id", _S),
                                                             ("relevance", pa.int8())]))),
                            ("split", _S)]),
}


def _filesystem(out_dir: str) -> tuple[pafs.FileSystem, str]:
    if "://" in out_dir:
        return pafs.FileSystem.from_uri(out_dir)
    return pafs.LocalFileSystem(), os.path.abspath(out_dir)


def _parquet_row(part: str, rec: dict) -> dict:
    if part == "entities":                    # attributes differ per type: keep them as JSON text
        return {**rec, "attributes": json.dumps(rec["attributes"], separators=(",", ":"))}
    return rec


def _render_chunk(world: World, part: str, start: int, stop: int, formats: tuple[str, ...]):
    """Records of entities [start, stop) of one part -> (rows, JSONL bytes, Arrow table)."""
    records = list({"entities": world.iter_entities, "documents": world.iter_documents,
                    "qa": world.iter_qa, "retrieval": world.iter_retrieval}[part](start, stop))
    text = "".join(dumps(r) + "\n" for r in records).encode() if "jsonl" in formats else None
    table = (pa.Table.from_pylist([_parquet_row(part, r) for r in records], SCHEMAS[part])
             if "parquet" in formats else None)
    return len(records), text, table


_WORKER_WORLD: World | None = None


def _init_worker(config: WorldConfig) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = World(config)


def _worker_chunk(args):
    return _render_chunk(_WORKER_WORLD, *args)


def _chunks(world: World, part: str, formats: tuple[str, ...], pool, num_workers: int) -> Iterable:
    """Rendered chunks in entity order; with a pool, at most 2 per worker are in flight."""
    spans = [(a, min(a + CHUNK_ENTITIES, world.n_entities))
             for a in range(0, world.n_entities, CHUNK_ENTITIES)]
    if pool is None:
        for a, b in spans:
            yield _render_chunk(world, part, a, b, formats)
        return
    pending: deque = deque()
    todo = iter(spans)
    window = 2 * num_workers
    for a, b in todo:
        pending.append(pool.apply_async(_worker_chunk, ((part, a, b, formats),)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def write_world(config: WorldConfig | World, out_dir: str,
                formats: Iterable[str] = ("jsonl",), parts: Iterable[str] = PARTS,
                num_workers: int = 1) -> dict:
    """Write ``<part>.<format>`` for each part and format, plus ``world.json`` (the manifest).

    ``num_workers`` > 1 renders chunks in that many processes (spawned, so safe beside Ray or
    torch threads); the bytes written do not depend on it. Returns the manifest: config, entity
    counts, label names and, per file, rows and bytes.
    """
    world = config if isinstance(config, World) else World(config)
    formats, parts = tuple(formats), tuple(parts)
    for i, f in enumerate(formats):
        check_choice(f"write_world.formats[{i}]", f, FORMATS)
    for i, p in enumerate(parts):
        check_choice(f"write_world.parts[{i}]", p, PARTS)
    if not formats:
        raise ConfigError(f"write_world.formats: give at least one of {list(FORMATS)}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"write_world.num_workers: must be an integer >= 1, got {num_workers!r}")
    fs, root = _filesystem(out_dir)
    fs.create_dir(root, recursive=True)
    # Workers get the resolved entity count, so they skip re-estimating it from size_bytes.
    resolved = dataclasses.replace(world.config, n_entities=world.n_entities, size_bytes=None)
    pool = (multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (resolved,))
            if num_workers > 1 else None)
    files = {}
    try:
        for part in parts:
            jsonl = fs.open_output_stream(f"{root}/{part}.jsonl") if "jsonl" in formats else None
            writer = (pq.ParquetWriter(f"{root}/{part}.parquet", SCHEMAS[part], filesystem=fs)
                      if "parquet" in formats else None)
            n = 0
            try:
                for rows, text, table in _chunks(world, part, formats, pool, num_workers):
                    n += rows
                    if jsonl is not None:
                        jsonl.write(text)
                    if writer is not None:
                        writer.write_table(table)
            finally:
                if jsonl is not None:
                    jsonl.close()
                if writer is not None:
                    writer.close()
            for fmt in formats:
                name = f"{part}.{fmt}"
                files[name] = {"rows": n, "bytes": fs.get_file_info(f"{root}/{name}").size}
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = {"config": dataclasses.asdict(world.config), "n_entities": world.n_entities,
                "type_counts": world.type_counts, "labels": list(schema.TYPES),
                "regions": list(schema.REGIONS), "files": files}
    with fs.open_output_stream(f"{root}/world.json") as fh:
        fh.write((json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
