"""Streaming corpus readers: plain text, JSONL and Parquet, local or on any pyarrow filesystem.

A *source* is a local path (file or directory), a glob (``data/*.jsonl``), or a URI that
``pyarrow.fs.FileSystem.from_uri`` understands: ``file:///abs/path``, ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://...``. Remote sources go through exactly the same code as local
ones: the filesystem object is the only thing that changes (tests use a local path and a
``file://`` URI; ``s3://`` works the same way given credentials in the usual AWS environment).

Readers are iterables of documents (``str``) that never hold more than one line (text, JSONL) or
one record batch (Parquet) in memory, so a corpus larger than RAM can be tokenized. Iterating a
reader twice reads the files twice (BPE training, then packing). Compressed files (``.gz``,
``.bz2``, ``.zst``, ...) are decompressed on the fly by pyarrow's stream detection.

Document boundaries: JSONL has one document per line (``text_field``), Parquet one per row
(``text_column``). Plain text has no boundaries of its own; ``doc_sep`` picks them:
``"blank_line"`` (default: paragraphs/articles separated by one or more empty lines, single
newlines stay inside the document), ``"line"`` (one document per line) or ``"file"``.
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bmray.models.typed_config import ConfigError, check_choice

FORMATS = ("text", "jsonl", "parquet")
DOC_SEPS = ("blank_line", "line", "file")
_COMPRESSION_EXT = (".gz", ".bz2", ".zst", ".lz4", ".br")
_EXT_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl",
               ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class CorpusConfig:
    """Where a corpus lives and how to cut it into documents (the ``data.corpus`` YAML section)."""
    source: str
    format: str | None = None      # None: from the file extension
    text_field: str = "text"       # JSONL key / Parquet column holding the document text
    doc_sep: str = "blank_line"    # plain text only, see module docstring

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("data.corpus.format", self.format, FORMATS)
        check_choice("data.corpus.doc_sep", self.doc_sep, DOC_SEPS)


def resolve_files(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted file paths) for a path, directory, glob or URI.

    A directory means every file below it (hidden files and ``_SUCCESS``-style markers skipped).
    Raises FileNotFoundError naming ``source`` when nothing is there.
    """
    if "://" in source:
        fs, path = pafs.FileSystem.from_uri(source)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))
    if any(ch in path for ch in "*?["):
        root = path
        while any(ch in root for ch in "*?["):
            root = root.rsplit("/", 1)[0]
        files = [p for p in _list_dir(fs, root) if fnmatch.fnmatch(p, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            files = _list_dir(fs, path)
        else:
            files = []
    if not files:
        raise FileNotFoundError(f"corpus not found: {source!r} (no file matches)")
    return fs, sorted(files)


def _list_dir(fs: pafs.FileSystem, root: str) -> list[str]:
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [i.path for i in infos if i.type == pafs.FileType.File
            and not i.base_name.startswith((".", "_"))]


def detect_format(path: str) -> str:
    """'text' | 'jsonl' | 'parquet' from the extension (compression suffix ignored)."""
    name = path.lower()
    for ext in _COMPRESSION_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXT_FORMAT:
        raise ConfigError(f"data.corpus.format: cannot tell the format of {path!r} from its "
                          f"extension; set it to one of {list(FORMATS)}")
    return _EXT_FORMAT[ext]


class CorpusReader:
    """Iterable over the documents of a corpus; see the module docstring.

    ``source`` is kept as a string so a pack can record where its blocks came from.
    """

    def __init__(self, source: str, format: str | None = None, text_field: str = "text",
                 doc_sep: str = "blank_line") -> None:
        self.cfg = CorpusConfig(source=str(source), format=format, text_field=text_field,
                                doc_sep=doc_sep)
        self.source = self.cfg.source
        self.fs, self.files = resolve_files(self.source)   # fail early on a missing path

    @classmethod
    def from_config(cls, cfg: CorpusConfig) -> "CorpusReader":
        return cls(cfg.source, cfg.format, cfg.text_field, cfg.doc_sep)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            fmt = self.cfg.format or detect_format(path)
            if fmt == "parquet":
                yield from _parquet_docs(self.fs, path, self.cfg.text_field)
            else:
                with self.fs.open_input_stream(path) as raw:   # compression auto-detected
                    lines = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                    if fmt == "jsonl":
                        yield from _jsonl_docs(lines, path, self.cfg.text_field)
                    else:
                        yield from _text_docs(lines, self.cfg.doc_sep)

    def __repr__(self) -> str:
        return f"CorpusReader({self.source!r}, {len(self.files)} file(s))"


def read_documents(source: str, format: str | None = None, text_field: str = "text",
                   doc_sep: str = "blank_line") -> Iterator[str]:
    """Shorthand: ``iter(CorpusReader(...))``."""
    return iter(CorpusReader(source, format, text_field, doc_sep))


def _text_docs(lines: io.TextIOBase, doc_sep: str) -> Iterator[str]:
    if doc_sep == "file":
        text = lines.read()
        if text.strip():
            yield text.rstrip("\r\n")
        return
    if doc_sep == "line":
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line
        return
    buf: list[str] = []                      # blank_line: accumulate until an empty line
    for line in lines:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).rstrip("\r\n")
            buf = []
    if buf:
        yield "".join(buf).rstrip("\r\n")


def _jsonl_docs(lines: io.TextIOBase, path: str, field: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"data.corpus.text_field: {field!r} not in {path}:{lineno} "
                              f"(keys: {keys})")
        yield record[field]


def _parquet_docs(fs: pafs.FileSystem, path: str, column: str) -> Iterator[str]:
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        if column not in pf.schema_arrow.names:
            raise ConfigError(f"data.corpus.text_field: column {column!r} not in {path} "
                              f"(columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
