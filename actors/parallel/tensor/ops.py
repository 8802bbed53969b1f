"""The communication operators of tensor (and sequence) parallelism, as autograd Functions.

Each is the adjoint of its partner (Shoeybi et al. 2019, fig. 3; Korthikanti et al. 2022,
fig. 5 and sec. 4.2.2; docs/tensor_parallel.md)::

    CopyToTensorParallel            "f"       forward identity          backward all-reduce
    ReduceFromTensorParallel        "g"       forward all-reduce        backward identity
    GatherFromSequenceParallel      "g-bar"   forward all-gather (seq)  backward reduce-scatter
    ReduceScatterToSequenceParallel "g-bar*"  forward reduce-scatter    backward all-gather (seq)
    ScatterToSequenceParallel                 forward split (seq)       backward all-gather (seq)
    GatherFromTensorParallel                  forward all-gather (last) backward split (last)

Plus the group helpers the layers, the loss and the state resharding share. Activations are
[B, T, D] (sequence dim ``SEQ_DIM`` = 1). Uneven splits follow ``torch.tensor_split`` (the
first ``n % tp`` ranks get one more). A group of one rank (or ``group=None`` without an
initialised torch.distributed) skips every collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bmray.actors.comm import collectives as C

__all__ = ["CopyToTensorParallel", "GatherFromSequenceParallel", "GatherFromTensorParallel",
           "GroupRef", "ReduceFromTensorParallel", "ReduceScatterToSequenceParallel",
           "SEQ_DIM", "ScatterToSequenceParallel", "all_gather_along", "group_rank",
           "group_size", "rank_chunk", "split_sizes"]

SEQ_DIM = 1      # our activations are [B, T, D] (Megatron's are [T, B, D], sequence dim 0)


# ------------------------------------------------------------------------------- groups
def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (1 without an initialised torch.distributed and ``group=None``)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 without an initialised torch.distributed)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class GroupRef:
    """Holds a ProcessGroup on a module. A ProcessGroup cannot be pickled or deep-copied; a
    deep copy of a TP model (same process) shares the group, which is what it means."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __deepcopy__(self, memo: dict) -> "GroupRef":
        return self

    def __reduce__(self):
        raise TypeError("a tensor-parallel module holds a torch.distributed process group and "
                        "cannot be pickled; save its state_dict instead")


def split_sizes(n: int, parts: int) -> list[int]:
    """Chunk sizes of ``torch.tensor_split(range(n), parts)``: the first ``n % parts`` get one more."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def rank_chunk(t: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's ``tensor_split`` chunk of ``t`` along ``dim`` (a view)."""
    return torch.tensor_split(t, group_size(group), dim=dim)[group_rank(group)]


def all_gather_along(x: Tensor, dim: int, sizes: list[int],
                      group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; rank r's chunk has ``sizes[r]`` there
    (uneven allowed: chunks are zero-padded to the largest on the wire, then trimmed)."""
    world = len(sizes)
    if world == 1:
        return x
    width = max(sizes)
    x = x.contiguous()
    if x.size(dim) != width:
        pad = list(x.shape)
        pad[dim] = width - x.size(dim)
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def _check_seq(x: Tensor, world: int, what: str) -> None:
    if x.size(SEQ_DIM) % world:
        raise ValueError(f"{what}: sequence parallelism splits the sequence (dim {SEQ_DIM}) "
                         f"evenly over {world} ranks, but its length {x.size(SEQ_DIM)} is not "
                         f"divisible by {world}")


def _seq_all_gather(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Equal sequence chunks of all ranks, concatenated along SEQ_DIM."""
    world = group_size(group)
    if world == 1:
        return x
    full = C.all_gather(x.movedim(SEQ_DIM, 0).contiguous(), numel=x.size(SEQ_DIM) * world,
                        group=group)
    return full.movedim(0, SEQ_DIM)


def _seq_reduce_scatter(x: Tensor, group: dist.ProcessGroup | None, what: str) -> Tensor:
    """Sum over ranks, keep this rank's equal chunk along SEQ_DIM."""
    world = group_size(group)
    if world == 1:
        return x
    _check_seq(x, world, what)
    return C.reduce_scatter(x.movedim(SEQ_DIM, 0).contiguous(), group=group).movedim(0, SEQ_DIM)


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum over ranks into a new tensor (the input may be saved for someone's backward)."""
    if group_size(group) == 1:
        return x
    return C.all_reduce(x.clone(memory_format=torch.contiguous_format), group=group)


# ---------------------------------------------------------------------------- operators
class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce backward. Put before a column-parallel layer:
    each rank's partial input gradient (from its columns) is summed into the full one."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward. After a row-parallel layer (sums
    the partial products) and the vocab-parallel embedding; f's conjugate."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class GatherFromSequenceParallel(torch.autograd.Function):
    """Korthikanti et al.'s g-bar: all-gather the sequence shards forward (the input a column
    layer needs whole), reduce-scatter backward (sum the ranks' partial input gradients and keep
    this rank's tokens). Replaces f under sequence parallelism."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return _seq_all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_reduce_scatter(grad, ctx.group, "GatherFromSequenceParallel backward"), None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """The conjugate of the above: reduce-scatter along the sequence forward (sum a row layer's
    partial outputs, keep this rank's tokens), all-gather backward. Replaces g under SP."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return _seq_reduce_scatter(x, group, "ReduceScatterToSequenceParallel")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_all_gather(grad, ctx.group), None


class ScatterToSequenceParallel(torch.autograd.Function):
    """Enter the sequence-parallel region from a replicated activation: keep this rank's
    sequence chunk forward, all-gather the chunks' gradients backward (each rank's gradient is
    whole for its own tokens only, so concatenation — not a sum — restores the full one)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        world = group_size(group)
        if world == 1:
            return x
        _check_seq(x, world, "ScatterToSequenceParallel")
        return rank_chunk(x, SEQ_DIM, group).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_all_gather(grad, ctx.group), None


class GatherFromTensorParallel(torch.autograd.Function):
    """All-gather a column layer's split output along the last dim forward (chunks of
    ``sizes``, uneven allowed), keep this rank's chunk of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, sizes: list[int]) -> Tensor:
        ctx.group = group
        return all_gather_along(x, x.dim() - 1, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return rank_chunk(grad, grad.dim() - 1, ctx.group).contiguous(), None, None
