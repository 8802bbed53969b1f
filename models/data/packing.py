"""Tokenize a corpus once into packed fixed-length blocks stored as Parquet.

Packing (as in GPT-2/3 and RoBERTa's FULL-SENTENCES, Liu et al. 2019 §4.2): documents are
tokenized, each followed by ``</s>``, and the resulting single token stream is cut into
consecutive blocks of ``block_len`` tokens. No padding is ever needed; a block may span
documents (the ``</s>`` marks where one ends). Only the final partial block (< block_len tokens)
is dropped, so concatenating the blocks gives back the token stream up to its tail.

A pack is a directory (local path or pyarrow filesystem URI)::

    train.parquet   column "tokens": fixed_size_list<int32>[block_len], row groups of
                    ``row_group_size`` blocks (the unit BlockStream reads)
    eval.parquet    the last ``eval_blocks`` blocks of the stream (may be empty), held out
    meta.json       block_len, n_train_blocks, n_eval_blocks, tokenizer_hash, source, ...

``meta.json`` is written last, so a pack without it is incomplete and is rebuilt. When a pack
already exists, `pack_corpus` reuses it if its metadata matches (same tokenizer hash, block_len,
source, eval_blocks) and otherwise raises ``PackMismatchError`` naming what differs (or rebuilds
with ``if_mismatch="repack"``): training on blocks made by another tokenizer would silently
produce garbage.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bmray.models.typed_config import ConfigError, check_choice

PACK_VERSION = 1
TOKENS_COLUMN = "tokens"
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.parquet", "eval": "eval.parquet"}


class PackMismatchError(ConfigError):
    """An existing pack was made with another tokenizer / block_len / source."""


@dataclass
class PackMeta:
    """Contents of ``meta.json``."""
    block_len: int
    n_train_blocks: int
    n_eval_blocks: int
    tokenizer_hash: str
    source: str
    row_group_size: int
    n_docs: int
    n_tokens: int           # tokens in the stream (documents + separators), tail included
    n_dropped_tail: int     # tokens of the final partial block that were dropped
    eos_id: int
    version: int = PACK_VERSION

    def n_blocks(self, split: str = "train") -> int:
        check_choice("split", split, SPLIT_FILES)
        return self.n_train_blocks if split == "train" else self.n_eval_blocks


def pack_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, directory) for a pack path or URI."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def read_pack_meta(path: str) -> PackMeta:
    """Metadata of the pack at ``path``; FileNotFoundError naming it if none (complete) is there."""
    fs, root = pack_fs(str(path))
    meta_path = f"{root}/{META_FILE}"
    if fs.get_file_info(meta_path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no packed corpus at {path!r} (missing {META_FILE}); "
                                f"run pack_corpus first")
    with fs.open_input_stream(meta_path) as fh:
        return PackMeta(**json.loads(fh.read().decode("utf-8")))


def split_path(path: str, split: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, parquet file path) of one split of a pack."""
    check_choice("split", split, SPLIT_FILES)
    fs, root = pack_fs(str(path))
    return fs, f"{root}/{SPLIT_FILES[split]}"


def pack_corpus(reader: Iterable[str], tokenizer, block_len: int, out_path: str, *,
                row_group_size: int = 1024, eval_blocks: int = 0, source: str | None = None,
                if_mismatch: str = "error", batch_docs: int = 256) -> PackMeta:
    """Tokenize ``reader``'s documents into blocks of ``block_len`` tokens under ``out_path``.

    ``tokenizer``: a models.tokenizer.Tokenizer (uses encode_batch, special_ids, hash).
    ``source``: recorded in the metadata; defaults to ``reader.source`` (CorpusReader has one).
    ``eval_blocks``: the last k blocks go to ``eval.parquet`` instead of ``train.parquet``.
    ``if_mismatch``: "error" (PackMismatchError) or "repack" when an existing pack differs.
    Returns the pack's metadata (the existing one when reused).
    """
    check_choice("data.pack.if_mismatch", if_mismatch, ("error", "repack"))
    for name, value in (("block_len", block_len), ("row_group_size", row_group_size),
                        ("batch_docs", batch_docs)):
        if value <= 0:
            raise ConfigError(f"data.pack.{name}: must be > 0, got {value}")
    if eval_blocks < 0:
        raise ConfigError(f"data.pack.eval_blocks: must be >= 0, got {eval_blocks}")
    source = str(source if source is not None else getattr(reader, "source", ""))
    wanted = {"tokenizer_hash": tokenizer.hash, "block_len": block_len, "source": source,
              "eval_blocks": eval_blocks}

    try:
        existing = read_pack_meta(out_path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        have = {"tokenizer_hash": existing.tokenizer_hash, "block_len": existing.block_len,
                "source": existing.source, "eval_blocks": existing.n_eval_blocks,
                "version": existing.version}
        diff = {k: (have[k], v) for k, v in {**wanted, "version": PACK_VERSION}.items()
                if have[k] != v}
        if not diff:
            return existing
        if if_mismatch == "error":
            detail = "; ".join(f"{k}: pack has {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise PackMismatchError(f"packed corpus at {out_path!r} was made differently "
                                    f"({detail}); delete it, pick another path, or set "
                                    f"if_mismatch='repack'")

    fs, root = pack_fs(str(out_path))
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(f"{root}/{META_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{META_FILE}")           # the pack is incomplete from here on

    eos = tokenizer.special_ids()["eos_id"]
    schema = pa.schema([(TOKENS_COLUMN, pa.list_(pa.int32(), block_len))])
    writers = {s: pq.ParquetWriter(f"{root}/{f}", schema, filesystem=fs)
               for s, f in SPLIT_FILES.items()}
    stats = {"n_docs": 0, "n_tokens": 0}
    counts = {"train": 0, "eval": 0}
    pending: list[np.ndarray] = []                    # full blocks not yet written to train
    held: collections.deque = collections.deque()     # the last eval_blocks blocks seen so far

    def emit_train(block: np.ndarray) -> None:
        pending.append(block)
        if len(pending) == row_group_size:
            _write_blocks(writers["train"], pending, block_len)
            counts["train"] += len(pending)
            pending.clear()

    try:
        tail = np.zeros(0, dtype=np.int32)
        for ids in _token_stream(reader, tokenizer, eos, batch_docs, stats):
            tail = np.concatenate([tail, ids])
            n_full = len(tail) // block_len
            for b in range(n_full):
                held.append(tail[b * block_len:(b + 1) * block_len])
                if len(held) > eval_blocks:
                    emit_train(held.popleft())
            tail = tail[n_full * block_len:]
        if pending:
            _write_blocks(writers["train"], pending, block_len)
            counts["train"] += len(pending)
        for i in range(0, len(held), row_group_size):
            chunk = list(held)[i:i + row_group_size]
            _write_blocks(writers["eval"], chunk, block_len)
        counts["eval"] = len(held)
    finally:
        for w in writers.values():
            w.close()

    if counts["train"] == 0:
        raise ConfigError(f"data.pack: the corpus {source!r} gives {counts['eval']} block(s) of "
                          f"{block_len} tokens, too few for training plus eval_blocks="
                          f"{eval_blocks}; lower block_len or eval_blocks")
    meta = PackMeta(block_len=block_len, n_train_blocks=counts["train"],
                    n_eval_blocks=counts["eval"], tokenizer_hash=tokenizer.hash, source=source,
                    row_group_size=row_group_size, n_docs=stats["n_docs"],
                    n_tokens=stats["n_tokens"], n_dropped_tail=len(tail), eos_id=eos)
    with fs.open_output_stream(f"{root}/{META_FILE}") as fh:
        fh.write((json.dumps(asdict(meta), indent=2) + "\n").encode("utf-8"))
    return meta


def _token_stream(reader: Iterable[str], tokenizer, eos: int, batch_docs: int,
                  stats: dict) -> Iterator[np.ndarray]:
    """Per batch of documents: their ids, each document followed by ``</s>``."""
    batch: list[str] = []

    def flush() -> np.ndarray:
        ids = [np.append(np.asarray(x, dtype=np.int32), np.int32(eos))
               for x in tokenizer.encode_batch(batch)]
        stats["n_docs"] += len(batch)
        out = np.concatenate(ids)
        stats["n_tokens"] += len(out)
        batch.clear()
        return out

    for doc in reader:
        batch.append(doc)
        if len(batch) == batch_docs:
            yield flush()
    if batch:
        yield flush()


def _write_blocks(writer: pq.ParquetWriter, blocks: list[np.ndarray], block_len: int) -> None:
    """Write ``blocks`` as one row group."""
    flat = pa.array(np.concatenate(blocks), type=pa.int32())
    column = pa.FixedSizeListArray.from_arrays(flat, block_len)
    writer.write_table(pa.table({TOKENS_COLUMN: column}), row_group_size=len(blocks))
