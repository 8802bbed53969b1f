"""BM25, Lucene's variant, over an eager sparse index: a query sums score rows, then a top-k.

Score of document d for query q (Lucene >= 8 ``BM25Similarity``; Kamphuis et al., ECIR 2020):

    score(q, d) = sum_{t in q} idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    idf(t)      = ln(1 + (N - df + 0.5) / (df + 0.5))

tf: the term's count in d, dl: d's length in terms, N / df / avgdl: the corpus's statistics.
Lucene >= 8 drops the (k1 + 1) numerator (a constant factor: same ranking); bm25s's "lucene"
method does the same, and so do we, so scores equal bm25s's. A term repeated in the query counts
once per occurrence (Lucene's Boolean clauses, bm25s's column sums). Lengths are exact, not
Lucene's one-byte lossy norms. Defaults k1=0.9, b=0.4 are Anserini/Pyserini's (the BEIR and
MS MARCO baselines), not Lucene's 1.2/0.75.

Eager (as bm25s): every (term, doc) score is computed at build time into a CSR term x doc
matrix (float32); a query adds its terms' rows (times their counts) into a dense row and keeps
the top k, in a loop compiled with numba (bm25_kernel.py). Terms are numbered in sorted order, so any index sums a document's terms in the same
order: a shard built with the *global* statistics (``CorpusStats``) scores bit-for-bit like the
unsharded index. Only documents matching a query term are returned (as Lucene); ties are broken
by document id, ascending.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from bmray.models.retrieval.analyzer import Analyzer, AnalyzerConfig
from bmray.models.retrieval.bm25_kernel import search_csr
from bmray.models.retrieval.manifest import (IndexArtifactError, corpus_hash, read_manifest,
                                             write_manifest)
from bmray.models.retrieval.types import Hits
from bmray.models.typed_config import ConfigError

KIND = "bm25"
MATRIX_FILE, VOCAB_FILE, IDS_FILE = "matrix.npz", "vocab.json", "doc_ids.json"


@dataclass(frozen=True)
class BM25Config:
    """k1: tf saturation; b: length normalisation (0 = none, 1 = full)."""

    k1: float = 0.9
    b: float = 0.4

    def __post_init__(self) -> None:
        if not self.k1 >= 0:
            raise ConfigError(f"index.k1: must be >= 0, got {self.k1!r}")
        if not 0 <= self.b <= 1:
            raise ConfigError(f"index.b: must be in [0, 1], got {self.b!r}")


@dataclass(frozen=True)
class CorpusStats:
    """What BM25 needs of the whole corpus: N, total length (avgdl = total / N), df per term."""

    n_docs: int
    total_length: int
    df: dict[str, int] = field(repr=False)

    @property
    def avgdl(self) -> float:
        return self.total_length / self.n_docs if self.n_docs else 0.0

    @classmethod
    def of(cls, token_lists: Sequence[Sequence[str]]) -> "CorpusStats":
        df: Counter = Counter()
        for toks in token_lists:
            df.update(set(toks))
        return cls(len(token_lists), sum(map(len, token_lists)), dict(df))

    @classmethod
    def combine(cls, parts: Sequence["CorpusStats"]) -> "CorpusStats":
        """The statistics of the union of disjoint slices (the driver's sum over shards)."""
        df: Counter = Counter()
        for p in parts:
            df.update(p.df)
        return cls(sum(p.n_docs for p in parts), sum(p.total_length for p in parts), dict(df))


def idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


class BM25Index:
    """An eager BM25 index (a ``Retriever``): ``build``, ``search``, ``save`` / ``load``."""

    def __init__(self, doc_ids: Sequence[str], vocab: Sequence[str], matrix: sp.csr_matrix,
                 analyzer: Analyzer, config: BM25Config, n_docs_global: int, avgdl: float,
                 corpus_hash: str):
        if matrix.shape != (len(vocab), len(doc_ids)):
            raise ValueError(f"BM25Index: matrix shape {matrix.shape} != (terms {len(vocab)}, "
                             f"documents {len(doc_ids)})")
        self.doc_ids = list(doc_ids)
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.terms = list(vocab)
        self.matrix = matrix
        self.analyzer = analyzer
        self.config = config
        self.n_docs_global = n_docs_global
        self.avgdl = avgdl
        self.corpus_hash = corpus_hash
        ids = np.array(self.doc_ids, dtype=object)
        self.id_rank = np.empty(len(ids), dtype=np.int64)     # tie-break: doc id ascending
        self.id_rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))

    def __len__(self) -> int:
        return len(self.doc_ids)

    # -- build ----------------------------------------------------------------------------
    @classmethod
    def build(cls, doc_ids: Sequence[str], texts: Sequence[str],
              analyzer: Analyzer | None = None, config: BM25Config | None = None,
              corpus_stats: CorpusStats | None = None) -> "BM25Index":
        """Analyse and index ``texts``; with ``corpus_stats`` (a shard) N, df and avgdl are the
        given global ones instead of this slice's."""
        if len(doc_ids) != len(texts):
            raise ValueError(f"BM25Index.build: {len(doc_ids)} ids but {len(texts)} texts")
        analyzer = analyzer or Analyzer()
        tokens = analyzer.tokens_batch(texts)
        return cls.from_tokens(doc_ids, tokens, analyzer, config, corpus_stats,
                               corpus_hash(doc_ids, texts))

    @classmethod
    def from_tokens(cls, doc_ids: Sequence[str], token_lists: Sequence[Sequence[str]],
                    analyzer: Analyzer, config: BM25Config | None = None,
                    corpus_stats: CorpusStats | None = None,
                    corpus_hash: str = "") -> "BM25Index":
        config = config or BM25Config()
        n = len(doc_ids)
        if n == 0:
            raise ValueError("BM25Index.build: no documents")
        if not all(isinstance(d, str) and d for d in doc_ids):
            raise ValueError("BM25Index.build: document ids must be non-empty strings")
        if len(set(doc_ids)) != n:
            dup = next(d for d, c in Counter(doc_ids).items() if c > 1)
            raise ValueError(f"BM25Index.build: document id {dup!r} appears twice")
        vocab = sorted({t for toks in token_lists for t in toks})
        row_of = {t: i for i, t in enumerate(vocab)}
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=n)
        flat_rows = np.fromiter((row_of[t] for toks in token_lists for t in toks),
                                dtype=np.int64, count=int(lengths.sum()))
        flat_docs = np.repeat(np.arange(n, dtype=np.int64), lengths)
        keys, tf = np.unique(flat_rows * n + flat_docs, return_counts=True)   # term-major
        rows, cols = keys // n, keys % n
        if corpus_stats is None:
            corpus_stats = CorpusStats(n, int(lengths.sum()),
                                       dict(zip(vocab, np.bincount(rows, minlength=len(vocab))
                                                .tolist())))
        missing = [t for t in vocab if t not in corpus_stats.df]
        if missing:
            raise ValueError(f"BM25Index.build: corpus_stats lack terms of this slice, e.g. "
                             f"{missing[:3]} (statistics of another corpus?)")
        df = np.array([corpus_stats.df[t] for t in vocab], dtype=np.float64)
        avgdl = corpus_stats.avgdl
        norm = config.k1 * (1 - config.b + config.b * lengths / avgdl) if avgdl else \
            np.full(n, config.k1)
        tf = tf.astype(np.float64)
        data = (idf(df, corpus_stats.n_docs)[rows] * tf / (tf + norm[cols])).astype(np.float32)
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(vocab)), out=indptr[1:])
        matrix = sp.csr_matrix((data, cols.astype(np.int32), indptr), shape=(len(vocab), n))
        return cls(doc_ids, vocab, matrix, analyzer, config, corpus_stats.n_docs, avgdl,
                   corpus_hash)

    @classmethod
    def merge(cls, parts: Sequence["BM25Index"], corpus_hash: str) -> "BM25Index":
        """Concatenate indexes of consecutive slices built with the same global statistics:
        the result is the unsharded index (same matrix, same scores)."""
        first = parts[0]
        for p in parts[1:]:
            if (p.config, p.analyzer.config, p.n_docs_global, p.avgdl) != \
                    (first.config, first.analyzer.config, first.n_docs_global, first.avgdl):
                raise ValueError("BM25Index.merge: parts built with different configs or "
                                 "statistics")
        vocab = sorted(set().union(*(p.vocab for p in parts)))
        row_of = {t: i for i, t in enumerate(vocab)}
        rows, cols, data, offset = [], [], [], 0
        for p in parts:
            coo = p.matrix.tocoo()
            remap = np.array([row_of[t] for t in p.terms], dtype=np.int64)
            rows.append(remap[coo.row])
            cols.append(coo.col.astype(np.int64) + offset)
            data.append(coo.data)
            offset += len(p)
        matrix = sp.csr_matrix((np.concatenate(data), (np.concatenate(rows),
                                                       np.concatenate(cols))),
                               shape=(len(vocab), offset))
        matrix.sort_indices()
        return cls([d for p in parts for d in p.doc_ids], vocab, matrix, first.analyzer,
                   first.config, first.n_docs_global, first.avgdl, corpus_hash)

    # -- search ---------------------------------------------------------------------------
    def query_matrix(self, token_lists: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Query term counts as a CSR (queries x terms), terms in index order."""
        get, n_terms, nq = self.vocab.get, len(self.terms), len(token_lists)
        rows = [[get(t, -1) for t in toks] for toks in token_lists]
        lens = np.fromiter(map(len, rows), dtype=np.int64, count=nq)
        flat = np.fromiter((r for rs in rows for r in rs), dtype=np.int64, count=int(lens.sum()))
        qi = np.repeat(np.arange(nq, dtype=np.int64), lens)
        known = flat >= 0
        keys, counts = np.unique(qi[known] * n_terms + flat[known], return_counts=True)
        indptr = np.zeros(nq + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // n_terms, minlength=nq), out=indptr[1:])
        return sp.csr_matrix((counts.astype(np.float32), (keys % n_terms).astype(np.int32),
                              indptr), shape=(nq, n_terms))

    def scores(self, token_lists: Sequence[Sequence[str]]) -> np.ndarray:
        """Dense scores [queries, documents] of analysed queries."""
        return (self.query_matrix(token_lists) @ self.matrix).toarray()

    def search_arrays(self, token_lists: Sequence[Sequence[str]], k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per analysed query, the k best positive scores, best first, ties by document id:
        document positions [queries, k] (-1 pads rows with fewer matches) and their scores."""
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        get, m = self.vocab.get, self.matrix
        rows = [[i for i in map(get, toks) if i is not None] for toks in token_lists]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)), out=indptr[1:])
        terms = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(indptr[-1]))
        pos = np.empty((len(rows), k), dtype=np.int64)
        top = np.empty((len(rows), k), dtype=np.float32)
        search_csr(m.indptr, m.indices, m.data, indptr, terms, self.id_rank, len(self), k,
                   pos, top)
        return pos, top

    def search_tokens(self, token_lists: Sequence[Sequence[str]], k: int) -> list[Hits]:
        pos, top = self.search_arrays(token_lists, k)
        ids = self.doc_ids
        return [[(ids[p], s) for p, s in zip(pr, sr) if p >= 0]
                for pr, sr in zip(pos.tolist(), top.tolist())]

    def search_ids(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` as two [queries, k] arrays: document ids (str, "" pads) and scores
        (-inf pads) -- compact to send between processes and to merge with numpy."""
        pos, top = self.search_arrays(self.analyzer.tokens_batch(queries), k)
        ids = np.asarray(self.doc_ids, dtype=str)[np.maximum(pos, 0)]
        ids[pos < 0] = ""
        return ids, np.where(pos < 0, -np.inf, top.astype(np.float64))

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """The ``k`` best documents per query text (only documents matching a query term)."""
        if isinstance(queries, str):
            raise TypeError("search: pass a sequence of query texts, not one string")
        return self.search_tokens(self.analyzer.tokens_batch(queries), k)

    # -- persistence ----------------------------------------------------------------------
    def manifest_meta(self) -> dict:
        return {"analyzer": self.analyzer.config.to_dict(), "config": asdict(self.config),
                "n_docs": len(self), "n_terms": len(self.terms), "corpus_hash": self.corpus_hash,
                "stats": {"n_docs": self.n_docs_global, "avgdl": self.avgdl}}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        m = self.matrix
        np.savez(directory / MATRIX_FILE, data=m.data, indices=m.indices, indptr=m.indptr,
                 shape=np.array(m.shape))
        (directory / VOCAB_FILE).write_text(json.dumps(self.terms))
        (directory / IDS_FILE).write_text(json.dumps(self.doc_ids))
        write_manifest(directory, KIND, [MATRIX_FILE, VOCAB_FILE, IDS_FILE],
                       **self.manifest_meta())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "BM25Index":
        directory = Path(directory)
        man = read_manifest(directory, KIND)
        try:
            with np.load(directory / MATRIX_FILE) as z:
                matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]),
                                       shape=tuple(z["shape"]))
            terms = json.loads((directory / VOCAB_FILE).read_text())
            doc_ids = json.loads((directory / IDS_FILE).read_text())
            analyzer = Analyzer(AnalyzerConfig(**man["analyzer"]))
            config = BM25Config(**man["config"])
            stats = man["stats"]
            return cls(doc_ids, terms, matrix, analyzer, config, stats["n_docs"],
                       stats["avgdl"], man["corpus_hash"])
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise IndexArtifactError(f"{directory}: not a readable BM25 index: {exc}") from exc
