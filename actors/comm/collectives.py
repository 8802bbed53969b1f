"""Collectives: one small typed API over torch.distributed, with async handles.

    from bmray.actors.comm import collectives as C
    C.all_reduce(grad, op="sum")                      # in place, returns grad
    shard = C.reduce_scatter(flat_grad, op="avg")     # this rank's piece of the reduced tensor
    full = C.all_gather(shard, numel=flat.numel())    # the pieces of all ranks, concatenated
    h = C.all_reduce(bucket, async_op=True); ...; h.wait()

What it adds to torch.distributed (docs/communication.md):

* **Uneven shards**: a tensor of n rows is split with :func:`shard_bounds` (c = ceil(n/world)
  rows per rank, the last ranks fewer or none); padding and trimming happen inside. ZeRO's
  flat shards and the shared-memory transport use the same layout.
* **Post-processing after async ops**: a :class:`Handle`'s ``wait()`` divides for ``avg`` and
  trims the padding, so async and sync calls return the same tensor.
* **Readable errors** raised on every rank alike before any communication; ``check=True``
  also compares dtype and shape across ranks (one small extra all-gather).
* ``avg`` is sum / world (integer dtypes refused); ``reduce_scatter`` and the all-gathers fall
  back to all-reduce + slice / the list form where the backend lacks the flat primitive.

``src`` / ``dst`` are ranks within ``group``. Float sums agree with numpy up to rounding
(~1e-6 relative in float32); integer sums, max and min are exact.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["OPS", "Handle", "ShardBounds", "all_gather", "all_gather_into", "all_reduce",
           "barrier", "broadcast",
           "irecv", "isend", "rank", "recv", "reduce", "reduce_scatter", "send", "shard_bounds",
           "world_size"]

OPS: dict[str, dist.ReduceOp] = {
    "sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM,   # avg = sum, then / world in wait()
    "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "prod": dist.ReduceOp.PRODUCT,
}

# New names in torch 2.13 (the *_tensor ones warn as deprecated); older torch has only the latter.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------- handles
class Handle:
    """An in-flight collective. ``wait()`` blocks, applies the post-processing (divide for avg,
    trim padding) once, and returns the result tensor; ``is_completed()`` does not block."""

    def __init__(self, work: dist.Work | None, result: Tensor,
                 post: Callable[[Tensor], Tensor] | None = None):
        self._work, self._result, self._post = work, result, post
        self._done = False

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()

    def wait(self) -> Tensor:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            if self._post is not None:
                self._result = self._post(self._result)
            self._work, self._post, self._done = None, None, True
        return self._result


def _finish(work: dist.Work | None, result: Tensor, post: Callable[[Tensor], Tensor] | None,
            async_op: bool) -> Tensor | Handle:
    handle = Handle(work, result, post)
    return handle if async_op else handle.wait()


# ----------------------------------------------------------------------------- shard layout
@dataclass(frozen=True)
class ShardBounds:
    """Rows ``[start, stop)`` of an ``n``-row tensor owned by one rank; ``padded`` = ceil(n/world),
    the size every rank's shard has on the wire."""

    start: int
    stop: int
    padded: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_bounds(numel: int, rank: int, world: int) -> ShardBounds:
    """The shard layout used by reduce_scatter / all_gather (and ZeRO's flat shards):
    with ``c = ceil(numel / world)`` rank ``r`` owns ``[r*c, min((r+1)*c, numel))`` (possibly
    empty). Contiguous shards in rank order, so concatenating them gives the tensor back."""
    if numel < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_bounds: need numel >= 0 and 0 <= rank < world, got "
                         f"numel={numel}, rank={rank}, world={world}")
    c = math.ceil(numel / world)
    start = min(rank * c, numel)
    return ShardBounds(start, min(start + c, numel), c)


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group)


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group)


# ------------------------------------------------------------------------------ validation
def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _inplace(name: str, t: object) -> Tensor:
    t = _tensor(name, t)
    if not t.is_contiguous():
        raise ValueError(f"{name}: works in place and needs a contiguous tensor "
                         f"(got shape {tuple(t.shape)}, stride {t.stride()}); call .contiguous()")
    return t


def _op(name: str, op: str, t: Tensor) -> dist.ReduceOp:
    if op not in OPS:
        raise ValueError(f"{name}: op {op!r} is not one of {list(OPS)}")
    if op == "avg" and not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name}: op 'avg' needs a floating dtype, got {t.dtype} "
                         f"(use 'sum' and divide yourself)")
    return OPS[op]


def _peer(name: str, what: str, r: int, group: dist.ProcessGroup | None,
          allow_self: bool = True) -> int:
    """Validate a group rank and return the global rank torch wants."""
    world = dist.get_world_size(group)
    if not isinstance(r, int) or not 0 <= r < world:
        raise ValueError(f"{name}: {what}={r!r} is not a rank of the group (0..{world - 1})")
    if not allow_self and r == dist.get_rank(group):
        raise ValueError(f"{name}: {what}={r} is this rank itself; point-to-point needs a peer")
    return r if group is None else dist.get_global_rank(group, r)


def _divide(world: int) -> Callable[[Tensor], Tensor]:
    def post(t: Tensor) -> Tensor:
        return t.div_(world)
    return post


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_MAX_DIMS = 8


def _describe(row: list[int]) -> str:
    code, ndim, *dims = row
    dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else f"dtype#{code}"
    return f"{str(dtype).replace('torch.', '')}{list(dims[:ndim])}"


def _exchange_meta(t: Tensor, group: dist.ProcessGroup | None) -> list[list[int]]:
    """All ranks' (dtype, ndim, shape) as rows of python ints, in group-rank order."""
    shape = list(t.shape)
    if len(shape) > _MAX_DIMS:       # fold the trailing dims: still catches any size mismatch
        shape = shape[:_MAX_DIMS - 1] + [math.prod(shape[_MAX_DIMS - 1:])]
    code = (_DTYPES.index(t.dtype) if t.dtype in _DTYPES
            else 100 + zlib.crc32(str(t.dtype).encode()) % 1000)   # stable across processes
    row = torch.tensor([code, t.dim()] + shape + [-1] * (_MAX_DIMS - len(shape)),
                       dtype=torch.int64, device=t.device)
    world = dist.get_world_size(group)
    out = torch.empty(world * row.numel(), dtype=torch.int64, device=t.device)
    _all_gather_flat(out, row, group=group)
    return out.view(world, -1).tolist()


def _check_same(name: str, t: Tensor, group: dist.ProcessGroup | None) -> None:
    rows = _exchange_meta(t, group)
    for r, row in enumerate(rows):
        if row != rows[0]:
            raise ValueError(f"{name}: rank {r} passed {_describe(row)} but rank 0 passed "
                             f"{_describe(rows[0])}; every rank must pass the same dtype and shape")


# ---------------------------------------------------------------------- the collectives
def broadcast(t: Tensor, src: int, group: dist.ProcessGroup | None = None,
              async_op: bool = False, check: bool = False) -> Tensor | Handle:
    """Copy ``t`` of rank ``src`` into ``t`` of every rank (in place)."""
    t = _inplace("broadcast", t)
    g_src = _peer("broadcast", "src", src, group)
    if check:
        _check_same("broadcast", t, group)
    work = dist.broadcast(t, g_src, group=group, async_op=async_op)
    return _finish(work, t, None, async_op)


def reduce(t: Tensor, dst: int, op: str = "sum", group: dist.ProcessGroup | None = None,
           async_op: bool = False, check: bool = False) -> Tensor | Handle:
    """Reduce ``t`` of all ranks into ``t`` of rank ``dst`` (in place). On the other ranks the
    contents of ``t`` afterwards are unspecified (the backend may use it as scratch)."""
    t = _inplace("reduce", t)
    red = _op("reduce", op, t)
    g_dst = _peer("reduce", "dst", dst, group)
    if check:
        _check_same("reduce", t, group)
    work = dist.reduce(t, g_dst, op=red, group=group, async_op=async_op)
    is_dst = dist.get_rank(group) == dst
    post = _divide(dist.get_world_size(group)) if op == "avg" and is_dst else None
    return _finish(work, t, post, async_op)


def all_reduce(t: Tensor, op: str = "sum", group: dist.ProcessGroup | None = None,
               async_op: bool = False, check: bool = False) -> Tensor | Handle:
    """Reduce ``t`` over all ranks; every rank gets the result in ``t`` (in place)."""
    t = _inplace("all_reduce", t)
    red = _op("all_reduce", op, t)
    if check:
        _check_same("all_reduce", t, group)
    work = dist.all_reduce(t, op=red, group=group, async_op=async_op)
    post = _divide(dist.get_world_size(group)) if op == "avg" else None
    return _finish(work, t, post, async_op)


# (collective, backend) -> does the backend's flat-tensor primitive work? Learned on first use
# (every rank runs the same torch, so every rank falls back together).
_NATIVE: dict[tuple[str, str], bool] = {}


def _unsupported(exc: BaseException) -> bool:
    return "support" in str(exc).lower()


def reduce_scatter(t: Tensor, op: str = "sum", group: dist.ProcessGroup | None = None,
                   async_op: bool = False, check: bool = False) -> Tensor | Handle:
    """Reduce ``t`` (same shape on every rank) over all ranks and return this rank's rows
    ``shard_bounds(t.shape[0], rank, world)`` of the result, as a new tensor (``t`` is not
    modified). Dim 0 need not be divisible by the world size; a 0-dim tensor is treated as
    one row."""
    t = _tensor("reduce_scatter", t)
    red = _op("reduce_scatter", op, t)
    if check:
        _check_same("reduce_scatter", t, group)
    x = t.reshape(1) if t.dim() == 0 else t.contiguous()
    me, world = dist.get_rank(group), dist.get_world_size(group)
    b = shard_bounds(x.shape[0], me, world)
    rest = x.shape[1:]
    if b.padded * world != x.shape[0]:
        padded = x.new_zeros((b.padded * world, *rest))
        padded[: x.shape[0]] = x
        x = padded
    out = x.new_empty((b.padded, *rest))

    def post(shard: Tensor) -> Tensor:
        shard = shard[: b.size]
        return shard.div_(world) if op == "avg" else shard

    key = ("reduce_scatter", str(dist.get_backend(group)))
    if _NATIVE.get(key, True):
        try:
            work = _reduce_scatter_flat(out, x, op=red, group=group, async_op=async_op)
            _NATIVE[key] = True
            return _finish(work, out, post, async_op)
        except (RuntimeError, NotImplementedError) as exc:   # backend without reduce_scatter
            if not _unsupported(exc):
                raise
            _NATIVE[key] = False
    # Fallback: every rank reduces everything, then keeps its rows.
    x = x.clone() if x is t else x
    work = dist.all_reduce(x, op=red, group=group, async_op=async_op)
    lo = me * b.padded
    return _finish(work, x, lambda full: post(full[lo: lo + b.padded].clone()), async_op)


def all_gather(shard: Tensor, numel: int | None = None, group: dist.ProcessGroup | None = None,
               async_op: bool = False) -> Tensor | Handle:
    """Concatenate every rank's ``shard`` along dim 0 (the inverse of :func:`reduce_scatter`'s
    split). The shards must follow :func:`shard_bounds` for a total of ``numel`` rows. Pass
    ``numel`` when you know it (ZeRO does): the local shard is checked against the layout and no
    extra communication happens. Without it, the shard sizes, dtypes and trailing shapes are
    exchanged first (one small all-gather) and checked across ranks."""
    shard = _tensor("all_gather", shard)
    x = shard.reshape(1) if shard.dim() == 0 else shard.contiguous()
    me, world = dist.get_rank(group), dist.get_world_size(group)
    if numel is None:
        rows = _exchange_meta(x, group)
        for r, row in enumerate(rows):
            if row[0] != rows[0][0] or row[1] != rows[0][1] or row[3:] != rows[0][3:]:
                raise ValueError(f"all_gather: rank {r} passed {_describe(row)} but rank 0 passed "
                                 f"{_describe(rows[0])}; shards must agree in dtype and in all "
                                 f"but the first dim")
        numel = sum(row[2] for row in rows)
        sizes = [row[2] for row in rows]
        expected = [shard_bounds(numel, r, world).size for r in range(world)]
        if sizes != expected:
            raise ValueError(f"all_gather: shard sizes {sizes} do not follow the shard layout "
                             f"for {numel} rows over {world} ranks ({expected}); see shard_bounds")
    b = shard_bounds(numel, me, world)
    if x.shape[0] != b.size:
        raise ValueError(f"all_gather: rank {me} has a shard of {x.shape[0]} rows but owns "
                         f"rows [{b.start}, {b.stop}) of {numel} (ceil({numel}/{world}) = "
                         f"{b.padded} per rank, see shard_bounds)")
    rest = x.shape[1:]
    if b.size != b.padded:
        padded = x.new_zeros((b.padded, *rest))
        padded[: b.size] = x
        x = padded
    out = x.new_empty((b.padded * world, *rest))

    def trim(full: Tensor) -> Tensor:
        return full[:numel]

    key = ("all_gather", str(dist.get_backend(group)))
    if _NATIVE.get(key, True):
        try:
            work = _all_gather_flat(out, x, group=group, async_op=async_op)
            _NATIVE[key] = True
            return _finish(work, out, trim, async_op)
        except (RuntimeError, NotImplementedError) as exc:
            if not _unsupported(exc):
                raise
            _NATIVE[key] = False
    # Fallback: the list form, writing straight into views of `out`.
    views = [out[r * b.padded:(r + 1) * b.padded] for r in range(world)]
    work = dist.all_gather(views, x, group=group, async_op=async_op)
    return _finish(work, out, trim, async_op)


def all_gather_into(out: Tensor, shard: Tensor, group: dist.ProcessGroup | None = None,
                    async_op: bool = False) -> Tensor | Handle:
    """Every rank's equal-sized flat ``shard`` straight into ``out`` (``world`` times its
    elements, contiguous; no padding, no trim): ZeRO-3 gathers a unit's flat parameter
    buffer so. Returns ``out`` (or a handle whose ``wait()`` does)."""
    out, shard = _inplace("all_gather_into", out), _tensor("all_gather_into", shard)
    world = dist.get_world_size(group)
    if out.numel() != world * shard.numel():
        raise ValueError(f"all_gather_into: out has {out.numel()} elements, not "
                         f"{world} x {shard.numel()} (the world times the shard)")
    try:
        work = _all_gather_flat(out, shard, group=group, async_op=async_op)
    except (RuntimeError, NotImplementedError) as exc:     # backend without the flat form
        if not _unsupported(exc):
            raise
        work = dist.all_gather(list(out.chunk(world)), shard, group=group, async_op=async_op)
    return _finish(work, out, None, async_op)


def send(t: Tensor, dst: int, group: dist.ProcessGroup | None = None) -> None:
    """Blocking send of ``t`` to rank ``dst``; the receiver must post a buffer of the same
    dtype and shape (not checked: a size mismatch is reported by the backend)."""
    dist.send(_inplace("send", t), _peer("send", "dst", dst, group, allow_self=False),
              group=group)


def recv(t: Tensor, src: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Blocking receive into ``t`` from rank ``src``; returns ``t``."""
    dist.recv(_inplace("recv", t), _peer("recv", "src", src, group, allow_self=False),
              group=group)
    return t


def isend(t: Tensor, dst: int, group: dist.ProcessGroup | None = None) -> Handle:
    """Non-blocking send; ``t`` must not be modified until ``wait()``."""
    work = dist.isend(_inplace("isend", t), _peer("isend", "dst", dst, group, allow_self=False),
                      group=group)
    return Handle(work, t)


def irecv(t: Tensor, src: int, group: dist.ProcessGroup | None = None) -> Handle:
    """Non-blocking receive into ``t``; ``wait()`` returns ``t`` once it has arrived."""
    work = dist.irecv(_inplace("irecv", t), _peer("irecv", "src", src, group, allow_self=False),
                      group=group)
    return Handle(work, t)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait until every rank of the group has reached this call."""
    dist.barrier(group=group)
