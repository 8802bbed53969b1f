"""Dense retrieval: document vectors in a faiss index (Flat, IVF or HNSW), inner-product search.

A dual encoder maps queries and documents to vectors; relevance is their inner product (cosine for
the unit vectors of ``MeanPoolEncoder``). ``flat`` scans every vector (exact; the reference the
approximate kinds are measured against). ``ivf`` (Jégou et al. 2011) clusters the vectors into
``nlist`` k-means cells and scans the ``nprobe`` cells nearest the query; ``hnsw`` (Malkov &
Yashunin 2018) walks a layered proximity graph of out-degree ``m`` built with beam
``ef_construction`` and searched with beam ``ef_search``. Both trade recall for speed; faiss's
guidelines: nlist ~ 4..16·sqrt(N) with 30..256·nlist training vectors, M 4..64.

An index remembers the identity of the encoder that produced its vectors (class, config and a
SHA-256 of the weights), so querying it through another encoder, or with vectors of another
dimension, is an error naming both instead of silently meaningless scores. With metric ``l2``
the score is the negated squared distance (higher is better, as every ``Retriever``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import faiss
import numpy as np

from bmray.models.delta.base import base_identity
from bmray.models.retrieval.encoder import MeanPoolEncoder, load_minilm_encoder
from bmray.models.retrieval.manifest import (MANIFEST, IndexArtifactError, read_manifest,
                                             write_manifest)
from bmray.models.retrieval.types import Hits
from bmray.models.typed_config import ConfigError, check_choice, check_int

__all__ = ["DenseIndexConfig", "DenseIndex", "ENCODERS", "EncoderSpec", "make_encoder",
           "encoder_identity", "recall_at_k", "KINDS", "METRICS"]

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "l2")
INDEX_FILE, IDS_FILE = "index.faiss", "ids.json"

# An encoder by name (picklable, so Ray actors can build it themselves) or a factory callable.
ENCODERS: dict[str, Callable[[], MeanPoolEncoder]] = {"minilm": load_minilm_encoder}
EncoderSpec = Union[str, Callable[[], MeanPoolEncoder]]


def make_encoder(spec: EncoderSpec) -> MeanPoolEncoder:
    """The encoder a spec names: a key of ``ENCODERS`` or a zero-argument factory."""
    if isinstance(spec, str):
        check_choice("encoder", spec, ENCODERS)
        return ENCODERS[spec]()
    if callable(spec):
        enc = spec()
        if not isinstance(enc, MeanPoolEncoder):
            raise TypeError(f"encoder factory {spec!r} returned {type(enc).__name__}, "
                            "expected a MeanPoolEncoder")
        return enc
    raise TypeError(f"encoder: expected a name in {sorted(ENCODERS)} or a factory, got {spec!r}")


def encoder_identity(encoder: MeanPoolEncoder) -> dict[str, Any]:
    """What produced the vectors: the model's identity plus the pooling settings."""
    return {**base_identity(encoder.model), "pooling": "mean",
            "max_length": encoder.max_length, "normalize": encoder.normalize}


def describe(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "no recorded encoder"
    return f"{identity['class']} (weights sha256 {identity['weights_sha256'][:12]}…)"


@dataclass(frozen=True)
class DenseIndexConfig:
    """Index kind and its parameters (only those of ``kind`` are used).

    ``train_size``: vectors sampled (seeded) to train IVF's k-means; 0 = every vector.
    """

    kind: str = "flat"
    metric: str = "ip"
    nlist: int = 100
    nprobe: int = 8
    train_size: int = 0
    seed: int = 0
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 64

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("metric", self.metric, METRICS)
        for name in ("nlist", "nprobe", "m", "ef_construction", "ef_search"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("train_size", self.train_size, minimum=0)
        check_int("seed", self.seed, minimum=0)
        if self.m < 2:
            raise ConfigError(f"m: HNSW needs at least 2 links per node, got {self.m}")
        if self.nprobe > self.nlist:
            raise ConfigError(f"nprobe: {self.nprobe} exceeds nlist {self.nlist} (cells to scan "
                              "cannot exceed the cells there are)")

    @property
    def faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def params(self) -> dict[str, Any]:
        """The parameters that matter for ``kind`` (what a manifest or a bench row shows)."""
        keep = {"flat": (), "ivf": ("nlist", "nprobe", "train_size", "seed"),
                "hnsw": ("m", "ef_construction", "ef_search")}[self.kind]
        return {"kind": self.kind, "metric": self.metric, **{k: getattr(self, k) for k in keep}}


def as_matrix(vectors: Any, what: str) -> np.ndarray:
    """A C-contiguous float32 [N, d] copy-free view where possible (faiss's input type)."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [N, d], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point vectors, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: vectors contain NaN or infinity")
    return arr


def new_faiss_index(dim: int, config: DenseIndexConfig) -> faiss.Index:
    """An empty faiss index of ``config.kind`` (``index_factory`` owns IVF's coarse quantizer)."""
    spec = {"flat": "Flat", "ivf": f"IVF{config.nlist},Flat", "hnsw": f"HNSW{config.m},Flat"}
    index = faiss.index_factory(dim, spec[config.kind], config.faiss_metric)
    if config.kind == "hnsw":
        index.hnsw.efConstruction = config.ef_construction
    return index


def apply_search_params(index: faiss.Index, config: DenseIndexConfig) -> None:
    if config.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    elif config.kind == "hnsw":
        index.hnsw.efSearch = config.ef_search


class DenseIndex:
    """Document ids and their vectors in a faiss index; a ``Retriever`` when it holds an encoder."""

    def __init__(self, index: faiss.Index, ids: list[str], config: DenseIndexConfig,
                 encoder: MeanPoolEncoder | None = None,
                 identity: dict[str, Any] | None = None, encoder_spec: str | None = None):
        self.index, self.ids, self.config = index, ids, config
        self.encoder = encoder
        self.identity = identity if identity is not None else (
            encoder_identity(encoder) if encoder is not None else None)
        self.encoder_spec = encoder_spec
        self.corpus_hash: str | None = None   # set by whoever knows the texts (manifest.corpus_hash)
        self.id_set = set(ids)
        apply_search_params(index, config)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, doc_ids: Sequence[str], vectors: Any,
              config: DenseIndexConfig = DenseIndexConfig(), encoder: MeanPoolEncoder | None = None, encoder_spec: str | None = None,
              identity: dict[str, Any] | None = None) -> "DenseIndex":
        """Index ``vectors`` [N, d] under ``doc_ids`` (IVF is trained on them first).

        ``encoder``: what produced the vectors (its identity is recorded; ``search`` uses it);
        ``identity`` instead records an encoder's identity without holding it.
        """
        mat = as_matrix(vectors, "vectors")
        ids = [str(i) for i in doc_ids]
        if len(ids) != len(mat):
            raise ValueError(f"build: {len(ids)} ids but {len(mat)} vectors")
        if len(mat) == 0:
            raise ValueError("build: no vectors to index")
        if config.kind == "ivf":
            n_train = len(mat) if config.train_size == 0 else min(config.train_size, len(mat))
            if n_train < config.nlist:
                raise ConfigError(f"nlist: IVF with nlist={config.nlist} needs at least that many "
                                  f"training vectors, got {n_train} (train_size="
                                  f"{config.train_size}, {len(mat)} vectors); lower nlist (faiss suggests 30-256 "
                                  "training vectors per cell)")
        index = new_faiss_index(mat.shape[1], config)
        if config.kind == "ivf":
            train = mat
            if n_train < len(mat):
                rng = np.random.default_rng(config.seed)
                train = mat[np.sort(rng.choice(len(mat), n_train, replace=False))]
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = config.seed
            index.train(train)
        if encoder is not None and identity is None:
            identity = encoder_identity(encoder)
        if encoder is not None and encoder.dim != mat.shape[1]:
            raise ValueError(f"build: the vectors have dimension {mat.shape[1]}, the encoder "
                             f"{describe(encoder_identity(encoder))} makes {encoder.dim}")
        out = cls(index, [], config, encoder, identity, encoder_spec)
        out.add(ids, mat)
        return out

    def add(self, doc_ids: Sequence[str], vectors: Any) -> None:
        """Append documents (ids must be new; vectors of the index's dimension)."""
        mat = as_matrix(vectors, "vectors")
        ids = [str(i) for i in doc_ids]
        if len(ids) != len(mat):
            raise ValueError(f"add: {len(ids)} ids but {len(mat)} vectors")
        self.check_dim(mat, "add")
        dup = [i for i in ids if i in self.id_set]
        if dup or len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = dup or [i for i in ids if i in seen or seen.add(i)]
            raise ValueError(f"add: duplicate document ids, e.g. {dup[:5]}")
        self.index.add(mat)
        self.ids.extend(ids)
        self.id_set.update(ids)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> "DenseIndex":
        """Change the search-time parameters in place (no rebuild); returns self."""
        changes = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.config = replace(self.config, **changes)
        apply_search_params(self.index, self.config)
        return self

    def check_dim(self, mat: np.ndarray, what: str) -> None:
        if mat.shape[1] != self.dim:
            raise ValueError(f"{what}: vectors have dimension {mat.shape[1]}, the index holds "
                             f"{self.dim}-dimensional vectors from {describe(self.identity)}")

    # ------------------------------------------------------------------ search
    def search_arrays(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer: scores [Q, k] (higher is better) and row positions [Q, k] (-1: none)."""
        check_int("k", k, minimum=1)
        mat = as_matrix(queries, "queries")
        self.check_dim(mat, "search")
        scores, pos = self.index.search(mat, min(k, max(len(self), 1)))
        if self.config.metric == "l2":
            scores = -scores
        return scores, pos

    def search_vectors(self, queries: Any, k: int) -> list[Hits]:
        """The ``k`` best documents per query vector, best first."""
        scores, pos = self.search_arrays(queries, k)
        return [[(self.ids[p], float(s)) for s, p in zip(srow, prow) if p >= 0]
                for srow, prow in zip(scores, pos)]

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """``Retriever``: embed the query texts with the index's encoder, then search."""
        if self.encoder is None:
            raise ValueError("search: this index holds no encoder (built from vectors alone); "
                             "use search_vectors, or load it with the encoder that made it "
                             f"({describe(self.identity)})")
        if isinstance(queries, str):
            raise TypeError("search: expected a sequence of query texts, got one string")
        return self.search_vectors(self.encoder.encode(list(queries)), k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """``index.faiss`` + ``ids.json`` + ``manifest.json`` (kind "dense") in ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / INDEX_FILE))
        (d / IDS_FILE).write_text(json.dumps(self.ids))
        write_manifest(d, "dense", (INDEX_FILE, IDS_FILE), faiss_kind=self.config.kind,
                       params=self.config.params(), config=asdict(self.config), dim=self.dim,
                       count=len(self), encoder=self.identity, encoder_spec=self.encoder_spec,
                       corpus_hash=self.corpus_hash)
        return d

    @classmethod
    def load(cls, directory: str | Path, encoder: MeanPoolEncoder | None = None,
             load_encoder: bool = True) -> "DenseIndex":
        """Read an index saved by ``save``; every file is checked against the manifest.

        ``encoder``: must be the one the index was built with (same identity), else an error
        naming both. Without one, the recorded ``encoder_spec`` (e.g. "minilm") is loaded when
        ``load_encoder``; otherwise the index answers ``search_vectors`` only.
        """
        d = Path(directory)
        manifest = read_manifest(d, kind="dense")
        missing = [k for k in ("config", "dim", "count", "encoder") if k not in manifest]
        if missing:
            raise IndexArtifactError(f"{d / MANIFEST}: manifest lacks {missing}")
        try:
            config = DenseIndexConfig(**manifest["config"])
            ids = json.loads((d / IDS_FILE).read_text())
            index = faiss.read_index(str(d / INDEX_FILE))
        except (TypeError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
            raise IndexArtifactError(f"{d}: unreadable dense index ({exc})") from exc
        if not (index.ntotal == len(ids) == manifest["count"]) or index.d != manifest["dim"]:
            raise IndexArtifactError(
                f"{d}: the faiss index holds {index.ntotal} vectors of dimension {index.d}, "
                f"{len(ids)} ids; the manifest says {manifest['count']} of dimension "
                f"{manifest['dim']}")
        recorded = manifest["encoder"]
        spec = manifest.get("encoder_spec")
        if encoder is None and load_encoder and spec is not None:
            encoder = make_encoder(spec)
        if encoder is not None:
            given = encoder_identity(encoder)
            if recorded is not None and given != recorded:
                raise ValueError(f"{d}: the index was built with {describe(recorded)}, the encoder "
                                 f"given is {describe(given)}; rebuild the index with this encoder")
        out = cls(index, list(ids), config, encoder, recorded, spec)
        out.corpus_hash = manifest.get("corpus_hash")
        return out


def recall_at_k(index: DenseIndex, flat: DenseIndex, queries: Any, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|, exact = ``flat``'s."""
    if flat.config.kind != "flat":
        raise ValueError(f"recall_at_k: the reference must be a flat index, got {flat.config.kind}")
    if len(index) != len(flat):
        raise ValueError(f"recall_at_k: the indexes hold {len(index)} and {len(flat)} vectors")
    _, approx = index.search_arrays(queries, k)
    _, exact = flat.search_arrays(queries, k)
    hits = [len({index.ids[p] for p in a if p >= 0} & {flat.ids[p] for p in e if p >= 0})
            / max(int((e >= 0).sum()), 1) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 0.0
