"""Which rank of which gang the current process is (set by gang_worker.GangWorker)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker sits in its gang."""

    rank: int
    world_size: int
    local_rank: int              # index among the gang's workers on the same node
    node_id: str
    device: torch.device
    backend: str


_CONTEXT: WorkerContext | None = None


def worker_context() -> WorkerContext:
    """The calling worker's rank and device; only valid inside a gang worker."""
    if _CONTEXT is None:
        raise RuntimeError("worker_context() called outside a gang worker "
                           "(use cluster.gang.WorkerGroup.execute)")
    return _CONTEXT


def set_context(ctx: WorkerContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx
