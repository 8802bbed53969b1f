"""Stream the blocks of a pack to data-parallel workers, in an order independent of world size.

The order. Epoch e of the stream is a permutation of all blocks, built in two levels so that it
can be read one Parquet row group at a time (the shuffle of a "shuffle buffer" loader, but exact
and reproducible): the row groups are permuted with a generator seeded by (seed, e), and the rows
inside row group g by one seeded by (seed, e, g). The stream is the endless concatenation of
epochs 0, 1, 2, ...; global batch s is blocks [s*G, (s+1)*G) of it (a batch may straddle two
epochs, so no block is ever dropped). Rank r of N takes rows [r*G/N, (r+1)*G/N) of each global
batch. Nothing here depends on N, so N workers together consume exactly the batches one worker
would (the property that makes a run resumable at another world size; as in torchtitan's
stateful dataloader and Megatron's "consumed_samples").

State is (epoch, position): the next global block to read. Every rank has the same state after the
same number of batches, and ``load_state_dict`` makes a new stream continue exactly.

Memory: at most one row group is decoded at a time (``ParquetFile.read_row_group``), never the
whole pack. Each rank reads only the row groups its slices touch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from bmray.models.data.packing import TOKENS_COLUMN, read_pack_meta, split_path
from bmray.models.typed_config import ConfigError


class BlockStream:
    """Endless, resumable, rank-sliced iterator of ``LongTensor[G/N, block_len]`` batches."""

    def __init__(self, path: str, block_len: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 split: str = "train") -> None:
        if global_batch_size <= 0:
            raise ConfigError(f"data.global_batch_size: must be > 0, got {global_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"data: rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise ConfigError(f"data.global_batch_size: {global_batch_size} is not divisible by "
                              f"world_size={world_size}")
        self.path = str(path)
        meta = read_pack_meta(self.path)           # FileNotFoundError naming the path
        if meta.block_len != block_len:
            raise ConfigError(f"data.block_len: {block_len} but the pack at {self.path!r} has "
                              f"blocks of {meta.block_len}; re-pack or change block_len")
        self.block_len = block_len
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.epoch, self.position = 0, 0
        self._file: pq.ParquetFile | None = None
        self._rg_sizes = np.array([self._pf().metadata.row_group(i).num_rows
                                   for i in range(self._pf().num_row_groups)], dtype=np.int64)
        self.n_blocks = int(self._rg_sizes.sum())
        if self.n_blocks == 0:
            hint = " (it was packed with eval_blocks=0)" if split == "eval" else ""
            raise ConfigError(f"data: the {split} split of {self.path!r} has no blocks{hint}")
        self._order_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._rg_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ order
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row groups in read order, cumulative row counts in that order) of ``epoch``."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n_rg = len(self._rg_sizes)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n_rg)
                    if self.shuffle else np.arange(n_rg))
            ends = np.cumsum(self._rg_sizes[perm])
            self._order_cache = (epoch, perm, ends)
        return self._order_cache[1], self._order_cache[2]

    def _row_order(self, epoch: int, rg: int) -> np.ndarray:
        n = int(self._rg_sizes[rg])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, rg]).permutation(n)

    def block_indices(self, epoch: int, start: int, count: int) -> list[tuple[int, int, int]]:
        """Blocks [start, start+count) of the endless order as (epoch, row group, row) triples."""
        out = []
        while count > 0:
            if start >= self.n_blocks:
                epoch, start = epoch + start // self.n_blocks, start % self.n_blocks
            perm, ends = self._epoch_order(epoch)
            k = int(np.searchsorted(ends, start, side="right"))
            rg = int(perm[k])
            begin = int(ends[k - 1]) if k else 0
            take = min(count, int(ends[k]) - start)
            rows = self._row_order(epoch, rg)[start - begin:start - begin + take]
            out.extend((epoch, rg, int(r)) for r in rows)
            start, count = start + take, count - take
        return out

    # ------------------------------------------------------------------ reading
    def _pf(self) -> pq.ParquetFile:
        if self._file is None:
            fs, file_path = split_path(self.path, self.split)
            self._file = pq.ParquetFile(fs.open_input_file(file_path))
        return self._file

    def _row_group(self, rg: int) -> np.ndarray:
        """Row group ``rg`` as int32 [rows, block_len]; only the last one read is kept."""
        if self._rg_cache is None or self._rg_cache[0] != rg:
            table = self._pf().read_row_group(rg, columns=[TOKENS_COLUMN])
            flat = table.column(0).combine_chunks().flatten().to_numpy()
            self._rg_cache = (rg, flat.reshape(-1, self.block_len))
        return self._rg_cache[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        first = self.position + self.rank * self.local_batch_size
        idx = self.block_indices(self.epoch, first, self.local_batch_size)
        batch = np.stack([self._row_group(rg)[row] for _, rg, row in idx])
        # Advance the shared global state by one whole global batch (same on every rank).
        pos = self.position + self.global_batch_size
        self.epoch, self.position = self.epoch + pos // self.n_blocks, pos % self.n_blocks
        return torch.from_numpy(batch.astype(np.int64))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the next global batch starts: {"epoch", "position"} (rank independent)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_blocks:
            raise ValueError(f"BlockStream state {state} is out of range for {self.n_blocks} "
                             f"blocks (a different pack?)")
        self.epoch, self.position = epoch, position

    def __getstate__(self) -> dict:
        # The open file handle does not pickle (shipping a stream to a Ray actor); reopen there.
        state = dict(self.__dict__)
        state["_file"] = None
        state["_rg_cache"] = None
        return state


def eval_batches(path: str, block_len: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, split: str = "eval") -> Iterator[torch.Tensor]:
    """One ordered pass over a held-out split: global batch b = blocks [b*G, (b+1)*G).

    Rank r takes rows [r*n/N, (r+1)*n/N) of each global batch of n rows; the last global batch
    may be short, so a rank's share may be empty (shape [0, block_len]) -- every rank still
    yields the same number of batches, so collective ops in an eval loop stay in step. Sum
    losses and token counts across ranks to get the exact mean. Use ``split="train"`` on a
    separate eval pack.
    """
    stream = BlockStream(path, block_len, global_batch_size, 0, 1, seed=0, shuffle=False,
                         split=split)
    for start in range(0, stream.n_blocks, global_batch_size):
        n = min(global_batch_size, stream.n_blocks - start)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        idx = stream.block_indices(0, start + lo, hi - lo)
        rows = [stream._row_group(rg)[row] for _, rg, row in idx]
        batch = np.stack(rows) if rows else np.zeros((0, block_len), dtype=np.int32)
        yield torch.from_numpy(batch.astype(np.int64))
