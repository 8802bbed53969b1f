"""The worker gang: placement, rendezvous, rank contexts, and a clear report of a dead worker."""
from __future__ import annotations

import os

import pytest
import ray
import torch
import torch.distributed as dist

from bmray.cluster.gang import ScalingConfig, WorkerFailure, WorkerGroup, worker_context
from bmray.models.typed_config import ConfigError


def _whoami():
    ctx = worker_context()
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    return ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, float(t), os.getpid(), \
        torch.get_num_threads()


@pytest.mark.parametrize("n", [1, 3])
def test_gang_ranks_rendezvous_and_all_reduce(ray_session, n):
    with WorkerGroup(ScalingConfig(num_workers=n)) as group:
        out = group.execute(_whoami)
    assert [o[0] for o in out] == list(range(n))
    assert all(o[1] == n and o[3] == "gloo" and o[6] == 1 for o in out)
    assert sorted(o[2] for o in out) == list(range(n))          # one node: local = global
    assert {o[4] for o in out} == {n * (n + 1) / 2}             # sum of 1..n on every rank
    assert len({o[5] for o in out}) == n                         # n separate processes


def _boom(rank_to_fail):
    if worker_context().rank == rank_to_fail:
        raise ValueError("bad shape on purpose")
    return "ok"


def _suicide():
    if worker_context().rank == 1:
        os._exit(1)
    return "ok"


def test_worker_errors_and_deaths_name_the_rank(ray_session):
    with WorkerGroup(ScalingConfig(num_workers=2)) as group:
        with pytest.raises(WorkerFailure, match="rank 1 failed: .*bad shape on purpose"):
            group.execute(_boom, 1)
        with pytest.raises(WorkerFailure, match="rank 1 died"):
            group.execute(_suicide)


def test_scaling_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        ScalingConfig(placement_strategy="RANDOM")
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        ScalingConfig(num_workers=0)
    with pytest.raises(ConfigError, match="nccl needs"):
        ScalingConfig(backend="nccl")


def test_unplaceable_gang_fails_clearly(ray_session):
    with pytest.raises(RuntimeError, match="could not place 2 workers"):
        WorkerGroup(ScalingConfig(num_workers=2, cpus_per_worker=100,
                                  start_timeout_s=2)).start()
    assert ray.available_resources().get("CPU", 0) > 0
