"""Classification examples as the Trainer's block batches: fixed-length LongTensor rows.

The training loop streams ``LongTensor[b, L]`` blocks and an objective turns them into the
model's keyword arguments. A classification example becomes one row ``[ids (max_length,
right-padded) | label id]``; :class:`ClassificationObjective` splits it back into
``{input_ids, attention_mask, labels}``. A prompt model reads text, not ids, so its rows are
``[example index | label id]`` and :class:`ExampleObjective` hands the model the examples.
:class:`RowStream` is an endless, resumable stream of shuffled rows, one global batch per
step, each rank taking its own contiguous slice (so N ranks see exactly what one process sees).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from bmray.models.data.classification import Example


def encode_rows(examples: Sequence[Example], encode: Callable[[Example], list[int]],
                max_length: int, labels: Sequence[str], pad_id: int) -> Tensor:
    """[n, max_length + 1]: each example's ids (cut to ``max_length``, padded with ``pad_id``)
    and its label's index in ``labels``. A label not in ``labels`` is a ValueError naming it."""
    index = {label: i for i, label in enumerate(labels)}
    rows = torch.full((len(examples), max_length + 1), pad_id, dtype=torch.long)
    for r, ex in enumerate(examples):
        if ex.label not in index:
            raise ValueError(f"example {r}: label {ex.label!r} is not one of {list(labels)}")
        ids = encode(ex)[:max_length]
        rows[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        rows[r, -1] = index[ex.label]
    return rows


def index_rows(examples: Sequence[Example], labels: Sequence[str]) -> Tensor:
    """[n, 2]: ``[example index | label id]`` (the rows of a prompt model's stream)."""
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([[i, index[ex.label]] for i, ex in enumerate(examples)], dtype=torch.long)


@dataclass
class ClassificationObjective:
    """Rows ``[ids | label]`` → ``{input_ids, attention_mask, labels}``; every row is one
    target (the micro-batch weight is its row count)."""

    pad_id: int = 0

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor]:
        ids = blocks[:, :-1]
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long(),
                "labels": blocks[:, -1]}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())


@dataclass
class ExampleObjective:
    """Rows ``[example index | label]`` → ``{examples: [Example, ...], labels}``."""

    examples: Sequence[Example]

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, Any]:
        return {"examples": [self.examples[i] for i in blocks[:, 0].tolist()],
                "labels": blocks[:, -1]}

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())


class RowStream:
    """Endless stream of ``global_batch_size`` rows per step, this rank's slice of each.

    The row order is a concatenation of permutations (one per epoch, seeded by (seed,
    epoch)), so a batch may straddle two epochs and every row is seen once per epoch.
    ``state_dict`` is the position in that order: a resumed run reads the same batches.
    """

    def __init__(self, rows: Tensor, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over "
                             f"{world_size} ranks")
        if len(rows) == 0:
            raise ValueError("RowStream: no rows")
        self.rows, self.batch, self.seed, self.shuffle = rows, global_batch_size, seed, shuffle
        share = global_batch_size // world_size
        self.lo, self.hi = rank * share, (rank + 1) * share
        self.pos = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.rows)
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n)
                                   if self.shuffle else np.arange(n))
        return self._orders[epoch]

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        n = len(self.rows)
        idx = [int(self._order((self.pos + j) // n)[(self.pos + j) % n])
               for j in range(self.lo, self.hi)]
        self.pos += self.batch
        return self.rows[idx]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])


def eval_row_batches(rows: Tensor, batch_size: int, rank: int = 0, world_size: int = 1
                     ) -> list[Tensor]:
    """Every row once, in order: batches of ``batch_size`` rows, this rank's slice of each
    (a rank's slice of the last, short batch may be empty)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out.append(torch.tensor_split(chunk, world_size)[rank])
    return out
