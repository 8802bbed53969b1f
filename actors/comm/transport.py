"""How a data-parallel group moves its flat tensors: one interface, two implementations.

    transport = make_transport("auto", group, device, capacity_bytes=4 << 20)
    h = transport.all_reduce(bucket, async_op=True); ...; h.wait()     # SUM, in place
    transport.reduce_scatter(flat_grad, into=grad_shard)                # adds this rank's slice
    full = transport.all_gather(shard, numel)                          # every rank's slice

* :class:`ProcessGroupTransport`: torch.distributed (gloo, NCCL) through
  :mod:`bmray.actors.comm.collectives`.
* :class:`ShmTransport`: the ranks of one host sum in shared memory
  (:mod:`bmray.actors.comm.shm_transport`); CPU tensors on Linux x86-64 only. It has no
  broadcast of its own: the one broadcast a run makes (setup) goes through the process group.

``transport`` is ``auto`` (shared memory where every rank can use it, else the process group),
``shm`` (shared memory or a ConfigError) or ``process_group``. Slices follow
:func:`bmray.actors.comm.collectives.shard_bounds` in both, so they are interchangeable. The
cost model and measurements are in docs/communication.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from bmray.actors.comm import collectives as C
from bmray.actors.comm import shm_transport
from bmray.models.typed_config import ConfigError, check_choice

TRANSPORTS = ("auto", "shm", "process_group")


class Transport(ABC):
    """Collectives of flat tensors over one group; ``async_op=True`` returns a handle whose
    ``wait()`` gives the result."""

    name: str = ""
    comm_buffer_bytes: int = 0          # memory this rank maps for communication

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    @abstractmethod
    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        """Sum contiguous ``t`` over the group, in place."""

    @abstractmethod
    def reduce_scatter(self, t: torch.Tensor, into: torch.Tensor, async_op: bool = False) -> Any:
        """Sum flat ``t`` over the group and add this rank's slice of the sum
        (``shard_bounds``) to ``into``; returns ``into``."""

    @abstractmethod
    def all_gather(self, shard: torch.Tensor, numel: int, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Any:
        """Every rank's ``shard`` of a flat tensor of ``numel`` elements, concatenated; with
        ``out`` (``numel`` elements, a multiple of the world size) straight into it."""

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """``t`` of group rank ``src`` into ``t`` of every rank (in place)."""
        return C.broadcast(t, src, group=self.group, async_op=async_op)


class ProcessGroupTransport(Transport):
    """torch.distributed's collectives (gloo, NCCL)."""

    name = "process_group"

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def reduce_scatter(self, t: torch.Tensor, into: torch.Tensor, async_op: bool = False) -> Any:
        handle = _AddOnWait(C.reduce_scatter(t, op="sum", group=self.group, async_op=True), into)
        return handle if async_op else handle.wait()

    def all_gather(self, shard: torch.Tensor, numel: int, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Any:
        if out is None:
            return C.all_gather(shard, numel=numel, group=self.group, async_op=async_op)
        return C.all_gather_into(out, shard, group=self.group, async_op=async_op)


class ShmTransport(Transport):
    """Shared memory among the ranks of one host (:class:`shm_transport.ShmGroup`)."""

    name = "shm"

    def __init__(self, group: Any = None, capacity_bytes: int = 8 << 20) -> None:
        super().__init__(group)
        self.shm = shm_transport.ShmGroup(group, capacity_bytes=capacity_bytes)
        self.comm_buffer_bytes = self.shm.mapped_bytes

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        return self.shm.all_reduce(t, async_op=async_op)

    def reduce_scatter(self, t: torch.Tensor, into: torch.Tensor, async_op: bool = False) -> Any:
        return self.shm.reduce_scatter(t, async_op=async_op, into=into)

    def all_gather(self, shard: torch.Tensor, numel: int, out: torch.Tensor | None = None,
                   async_op: bool = False) -> Any:
        return self.shm.all_gather(shard, numel, async_op=async_op, out=out)


def make_transport(name: str, group: Any, device: torch.device,
                   capacity_bytes: int = 8 << 20) -> Transport:
    """The transport ``name`` (one of ``TRANSPORTS``) for ``group``; every rank of the group
    calls it and decides alike. ``auto`` falls back to the process group where shared memory
    is not possible; ``shm`` raises a ConfigError there. ``capacity_bytes``: each rank's
    shared-memory slot (larger tensors go in pieces)."""
    check_choice("strategy.transport", name, TRANSPORTS)
    if name == "process_group":
        return ProcessGroupTransport(group)
    if not (device.type == "cpu" and shm_transport.available()):
        if name == "shm":
            raise ConfigError("strategy.transport: shm needs CPU workers on Linux x86-64 "
                              f"(this rank trains on {device.type})")
        return ProcessGroupTransport(group)
    try:
        return ShmTransport(group, capacity_bytes=capacity_bytes)
    except shm_transport.Unavailable as exc:
        if name == "shm":
            raise ConfigError(f"strategy.transport: shm is not possible here: {exc}") from exc
        return ProcessGroupTransport(group)


class _AddOnWait:
    """A process-group reduce-scatter whose slice is added to ``shard`` when waited for."""

    def __init__(self, work: Any, shard: torch.Tensor) -> None:
        self.work, self.shard = work, shard

    def wait(self) -> torch.Tensor:
        self.shard.add_(self.work.wait())
        return self.shard
