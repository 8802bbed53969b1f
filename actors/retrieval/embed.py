"""One embedding actor of a Ray Data actor pool: ``{id, text[, path]}`` rows -> ``{id, vector}``.

``ray.data.Dataset.map_batches(EmbedBatch, concurrency=n, fn_constructor_kwargs=...)`` builds
the class once per actor, so the encoder's weights are loaded once per actor, not per batch,
and each actor pins torch to ``threads`` threads (actors share the machine's cores). Every row
keeps its id beside its vector, so the order in which Ray hands batches back does not matter.
A row without text is an error naming its source file (the ``path`` column Ray's readers add
with ``include_paths=True``). ``encoder`` is a weight hash per row: the driver checks that every
actor built the same encoder it will query with.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bmray.models.retrieval.dense_index import EncoderSpec, encoder_identity, make_encoder

__all__ = ["EmbedBatch", "check_rows"]


def check_rows(batch: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The batch's ids (as strings) and texts; a missing or non-text value names its file."""
    paths = batch.get("path")
    for column in ("id", "text"):
        if column not in batch:
            where = f" in {sorted(set(map(str, paths)))}" if paths is not None else ""
            raise ValueError(f"embed: rows without a {column!r} column{where}")
    ids, texts = list(batch["id"]), list(batch["text"])
    for i, (doc_id, text) in enumerate(zip(ids, texts)):
        if doc_id is None or not isinstance(text, str):
            where = paths[i] if paths is not None else "the input"
            what = "a row without an id" if doc_id is None else (
                f"the row with id {str(doc_id)!r} has no text ({text!r})")
            raise ValueError(f"{where}: {what}; expected string 'id' and 'text' columns")
    return [str(i) for i in ids], texts


class EmbedBatch:
    """A ``map_batches`` callable class (numpy batch format)."""

    def __init__(self, encoder: EncoderSpec, batch_size: int = 64, threads: int = 1):
        torch.set_num_threads(threads)
        self.encoder = make_encoder(encoder)
        self.batch_size = batch_size
        self.weights = encoder_identity(self.encoder)["weights_sha256"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, texts = check_rows(batch)
        vectors = self.encoder.encode(texts, self.batch_size)
        return {"id": np.asarray(ids, dtype=object), "vector": vectors,
                "encoder": np.asarray([self.weights] * len(ids), dtype=object)}
