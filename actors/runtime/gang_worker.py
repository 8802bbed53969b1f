"""The actor side of a worker gang: one Ray actor per rank, holding a torch.distributed group.

Why our own actor rather than Ray Train's TorchTrainer (see cluster/gang.py for the driver
side): the parameter server needs worker actors that talk to separate shard actors, fault
tolerance must restart the gang from *our* sharded checkpoints, and tests and benchmarks run
arbitrary functions on every rank (collectives against numpy, DDP against single-process
training) without the ~10 s TorchTrainer start-up per run.

``GangWorker.execute(fn, ...)`` runs a cloudpickled function inside the actor, where
``worker_context()`` says which rank it is; torch.distributed's default group is the gang.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable

import ray
import torch
import torch.distributed as dist

# A module reference (not a copy): Ray ships this actor class by value, and the context must
# live in the real module that `worker_context()` reads.
from bmray.actors.runtime import worker_context as _ctx
from bmray.actors.runtime.worker_context import WorkerContext


@ray.remote
class GangWorker:
    """One rank of a gang. Created by cluster.gang.WorkerGroup; not used directly."""

    def __init__(self, threads: int = 1, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        torch.set_num_threads(max(1, int(threads)))

    def address(self) -> tuple[str, int, str]:
        """(node IP, a free TCP port on it, node id): rank 0's becomes the rendezvous point."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port, ray.get_runtime_context().get_node_id()

    def setup(self, rank: int, world_size: int, local_rank: int, master: str, port: int,
              backend: str, timeout_s: float) -> None:
        """Join the gang's process group (TCP rendezvous at rank 0)."""
        if backend == "nccl":
            device = torch.device("cuda", 0)      # Ray exposes this actor's GPU as device 0
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://{master}:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _ctx.set_context(WorkerContext(rank, world_size, local_rank,
                                       ray.get_runtime_context().get_node_id(), device, backend))

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        _ctx.set_context(None)
