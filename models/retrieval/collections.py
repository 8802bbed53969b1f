"""Test collections as (documents, queries, judgments): CISI, Medline and the synthetic world.

CISI and MED are SMART-format files from the Glasgow IR group (see data/README.md for sources,
licences and quirks): ``.I n`` starts a record, a line holding only a field marker (``.T``, ``.W``,
...) starts a field, and lines are CRLF with stray trailing spaces, so every line is stripped
before it is matched. A document's text is its title and abstract (``.T`` + ``.W``), the fields
that carry its content; authors, citations and the bibliographic source are left out. Query ids
and document ids are the ``.I`` numbers as strings. Files that do not parse raise with the path
and line, so a truncated copy fails loudly instead of silently losing documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bmray.models.retrieval.types import Qrels
from bmray.models.world.world import World

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "ir"
CONTENT_FIELDS = (".T", ".W")
MARKERS = (".T", ".A", ".W", ".X", ".B", ".C", ".K", ".N")


@dataclass(frozen=True)
class Collection:
    """Documents and queries in file order, and the judgments (only judged queries appear)."""

    name: str
    documents: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels

    @property
    def judged_queries(self) -> dict[str, str]:
        """The queries that have at least one relevant document (the ones a metric averages)."""
        return {q: t for q, t in self.queries.items()
                if any(g > 0 for g in self.qrels.get(q, {}).values())}


def read_smart(path: Path, fields: Iterable[str] = CONTENT_FIELDS) -> dict[str, str]:
    """``{id: text}`` of a SMART file, the text joining ``fields`` in their file order."""
    keep = set(fields)
    records: dict[str, list[str]] = {}
    current: list[str] | None = None
    field = None
    with open(path, "rb") as f:
        for n, data in enumerate(f, 1):
            try:
                line = data.decode("ascii").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not ASCII ({e.reason} at byte {e.start})") from None
            if line.startswith(".I"):
                rid = line[2:].strip()
                if not rid.isdigit():
                    raise ValueError(f"{path}:{n}: a record marker without a number: {line!r}")
                if rid in records:
                    raise ValueError(f"{path}:{n}: record {rid} appears twice")
                current, field = records.setdefault(rid, []), None
            elif line in MARKERS:
                field = line
            elif current is None:
                if line:
                    raise ValueError(f"{path}:{n}: text before the first .I record")
            elif field in keep and line:
                current.append(line)
    if not records:
        raise ValueError(f"{path}: no .I records (not a SMART-format file?)")
    return {rid: " ".join(parts) for rid, parts in records.items()}


def read_qrels(path: Path, query_col: int, doc_col: int, grade_col: int | None) -> Qrels:
    """Whitespace-separated judgment lines; ``grade_col`` None means every listed pair is relevant."""
    qrels: Qrels = {}
    with open(path, encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            need = max(query_col, doc_col, grade_col or 0) + 1
            if len(cols) < need:
                raise ValueError(f"{path}:{n}: expected {need} columns, got {line!r}")
            grade = 1 if grade_col is None else int(cols[grade_col])
            qrels.setdefault(cols[query_col], {})[cols[doc_col]] = grade
    return qrels


def check_ids(name: str, documents: dict, queries: dict, qrels: Qrels) -> None:
    unknown_q = sorted(set(qrels) - set(queries))
    unknown_d = sorted({d for j in qrels.values() for d in j} - set(documents))
    if unknown_q or unknown_d:
        raise ValueError(f"{name}: judgments name unknown queries {unknown_q[:5]} "
                         f"or documents {unknown_d[:5]}")


def load_cisi(root: Path = DATA_DIR / "cisi") -> Collection:
    """CISI: 1,460 library-science abstracts, 112 queries, 76 judged (binary)."""
    docs = read_smart(root / "CISI.ALL")
    queries = read_smart(root / "CISI.QRY")
    qrels = read_qrels(root / "CISI.REL", 0, 1, None)
    check_ids("cisi", docs, queries, qrels)
    return Collection("cisi", docs, queries, qrels)


def load_medline(root: Path = DATA_DIR / "medline") -> Collection:
    """MED: 1,033 MEDLINE abstracts, 30 queries, all judged (binary, TREC qrels layout)."""
    docs = read_smart(root / "MED.ALL")
    queries = read_smart(root / "MED.QRY")
    qrels = read_qrels(root / "MED.REL", 0, 2, 3)
    check_ids("medline", docs, queries, qrels)
    return Collection("medline", docs, queries, qrels)


def world_collection(world: World, split: str | None = None) -> Collection:
    """The synthetic world's pages and retrieval questions, with its graded labels (2 states the
    fact, 1 names the entity); ``split`` keeps only queries of that split ("train" / "eval")."""
    docs = {d["id"]: f'{d["title"]}. {d["text"]}' for d in world.iter_documents()}
    queries, qrels = {}, {}
    for q in world.iter_retrieval():
        if split is not None and q["split"] != split:
            continue
        queries[q["id"]] = q["query"]
        qrels[q["id"]] = {r["doc_id"]: r["relevance"] for r in q["relevant"]}
    return Collection(f"world-{split or 'all'}", docs, queries, qrels)


LOADERS = {"cisi": load_cisi, "medline": load_medline}
