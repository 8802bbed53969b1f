"""The model deployments behind the ingress: search over index artifacts, text embeddings.

Why thin: the maths is in models/retrieval (``load_index`` → any ``Retriever``; the MiniLM
``MeanPoolEncoder``); a deployment loads it once per replica and batches concurrent requests
with ``@serve.batch`` (Ray Serve's dynamic batching: wait up to ``batch_wait_timeout_s`` for up
to ``max_batch_size`` requests, then one call). A batch of search requests is grouped by
(index, k) so every request gets exactly what ``index.search(queries, k)`` returns in-process.
Torch threads per replica = its ``num_cpus`` (one thread per reserved core; more only contend).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from ray import serve

from bmray.models.retrieval.artifact import load_index
from bmray.models.retrieval.encoder import load_minilm_encoder
from bmray.models.retrieval.types import Hits, Retriever

MINILM = "all-MiniLM-L6-v2"
SearchCall = tuple[str, list[str], int]


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for a replica holding ``num_cpus`` CPUs (at least one)."""
    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    return n


def search_grouped(indexes: Mapping[str, Retriever],
                   calls: Sequence[SearchCall]) -> list[list[Hits]]:
    """Answer many (index, queries, k) calls with one ``search`` per distinct (index, k)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (name, _, k) in enumerate(calls):
        groups.setdefault((name, k), []).append(i)
    out: list[list[Hits]] = [[] for _ in calls]
    for (name, k), members in groups.items():
        queries = [q for i in members for q in calls[i][1]]
        hits = indexes[name].search(queries, k)
        start = 0
        for i in members:
            n = len(calls[i][1])
            out[i] = hits[start:start + n]
            start += n
    return out


@serve.deployment(name="search")
class SearchDeployment:
    """Index artifacts by name (``{name: directory}``), loaded once per replica."""

    def __init__(self, indexes: Mapping[str, str], num_cpus: float = 1.0,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005) -> None:
        torch_threads(num_cpus)
        self.indexes = {name: load_index(directory) for name, directory in indexes.items()}
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def names(self) -> list[str]:
        return sorted(self.indexes)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def search_batch(self, calls: list[SearchCall]) -> list[list[Hits]]:
        return search_grouped(self.indexes, calls)

    async def search(self, index: str, queries: list[str], k: int) -> list[Hits]:
        """Top-``k`` hits of each query in index ``index`` (a known name: the ingress checks)."""
        if index not in self.indexes:
            raise KeyError(f"unknown index {index!r}; available: {self.names()}")
        return await self.search_batch((index, list(queries), int(k)))


@serve.deployment(name="embed")
class EmbedDeployment:
    """The offline all-MiniLM-L6-v2 mean-pooled, L2-normalised sentence embeddings."""

    def __init__(self, num_cpus: float = 1.0, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.005) -> None:
        torch_threads(num_cpus)
        self.encoder = load_minilm_encoder()
        self.model_name = MINILM
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_batch(self, requests: list[list[str]]) -> list[list[list[float]]]:
        texts = [t for r in requests for t in r]
        vectors = self.encoder.encode(texts).tolist()
        out, start = [], 0
        for r in requests:
            out.append(vectors[start:start + len(r)])
            start += len(r)
        return out

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.embed_batch(list(texts))
