"""Gradient buckets: flat buffers that the parameters' gradients view into.

:class:`Bucket` is one flat buffer (DataParallel all-reduces it; ZeRO-1/2 and the mesh split
it into per-rank slices), :func:`bucket_assignment` groups parameters into buckets by DDP's
size rule, :func:`bucket_pieces` maps a slice of a bucket back to its parameters. See
docs/data_parallel.md.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


class Bucket:
    """One flat gradient buffer, the parameters viewing into it, and its in-flight work.

    ``pad_to``: the buffer is zero-padded to a multiple of it, so ZeRO can split every bucket
    into equal per-rank slices (``shard_bounds`` layout, no copy at reduce-scatter time).
    ``allocate=False`` leaves ``buffer`` None until :meth:`allocate` (ZeRO-2: the full bucket
    only exists while its gradients are being reduced). ``extra`` elements after the
    gradients (``numel``) carry the step's statistics (DataParallel's module doc)."""

    __slots__ = ("index", "params", "offsets", "numel", "extra", "dtype", "device", "buffer",
                 "pending", "work")

    def __init__(self, index: int, params: list[nn.Parameter], device: torch.device,
                 pad_to: int = 1, allocate: bool = True, extra: int = 0) -> None:
        self.index = index
        self.params = params
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = -(-total // pad_to) * pad_to
        self.extra = extra
        self.dtype, self.device = params[0].dtype, device
        self.buffer: torch.Tensor | None = None
        if allocate:
            self.allocate()
        self.pending = len(params)
        self.work: Any = None

    def allocate(self) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros(self.numel + self.extra, dtype=self.dtype,
                                      device=self.device)
        return self.buffer

    @property
    def grads(self) -> torch.Tensor:
        """The gradient part of the buffer (without the statistics slots)."""
        return self.buffer[:self.numel] if self.extra else self.buffer

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)


def bucket_assignment(params: Sequence[nn.Parameter], bucket_bytes: int,
                      first_bucket_bytes: int | None = None,
                      group_of: Callable[[nn.Parameter], Any] | None = None,
                      itemsize: int | None = None) -> list[list[int]]:
    """Indices of ``params`` grouped into buckets in the given order: a bucket closes once it
    holds at least its cap in bytes (DDP's rule; a larger parameter gets a bucket of its own)
    and never mixes dtypes or devices — nor values of ``group_of(p)`` (ZeRO keeps AdamW's
    decay / no-decay groups in separate buckets). ``itemsize``: count bytes as if every
    element had this size (the dtype the buckets will hold, when the model is cast later)."""
    buckets: list[list[int]] = []
    open_: dict[tuple, tuple[list[int], int]] = {}
    for i, p in enumerate(params):
        key = (p.dtype, p.device, group_of(p) if group_of is not None else None)
        idx, size = open_.get(key, ([], 0))
        idx.append(i)
        size += p.numel() * (itemsize or p.element_size())
        cap = first_bucket_bytes if (not buckets and first_bucket_bytes) else bucket_bytes
        if size >= cap:
            buckets.append(idx)
            open_.pop(key, None)
        else:
            open_[key] = (idx, size)
    buckets.extend(idx for idx, _ in open_.values() if idx)
    return buckets


def bucket_pieces(bucket: Bucket, lo: int, hi: int
                  ) -> Iterator[tuple[int, int, int, int, int]]:
    """(param index j, [a, b) in the param's flat, [a', b') in the slice) for every parameter
    overlapping elements [lo, hi) of the bucket's flat layout."""
    for j, (p, off) in enumerate(zip(bucket.params, bucket.offsets)):
        a, b = max(lo, off), min(hi, off + p.numel())
        if a < b:
            yield j, a - off, b - off, a - lo, b - lo
