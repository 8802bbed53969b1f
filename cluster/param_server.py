"""Driver-side lifecycle of the parameter-server shards: start the K shard actors of a run,
reset them for the next run, stop them (docs/param_server.md)::

    shards = start_shards(ParamServerConfig(num_shards=2, mode="sync"), train_cfg, world_size=N)
    with WorkerGroup(ScalingConfig(num_workers=N)) as group:
        group.execute(fn, shards)   # fn: Trainer(..., strategy=ParameterServer(shards)).fit()
    stop_shards(shards)
"""
from __future__ import annotations

from typing import Any, Sequence

import ray

from bmray.models.typed_config import ConfigError

from bmray.actors.parallel.param_server.layout import ParamServerConfig
from bmray.actors.runtime.param_server_shard import ParameterServerShard
from bmray.actors.train.config import TrainConfig

__all__ = ["reset_shards", "start_shards", "stop_shards"]


def start_shards(config: ParamServerConfig, train: TrainConfig, world_size: int) -> list:
    """Create the K shard actors of one run (the driver does this and hands the handles to the
    workers, e.g. as an argument of ``WorkerGroup.execute``)."""
    return [ParameterServerShard.options(num_cpus=config.shard_cpus,
                                         max_concurrency=max(64, 4 * world_size))
            .remote(k, world_size, train, config) for k in range(config.num_shards)]


def reset_shards(shards: Sequence[Any], config: ParamServerConfig, train: TrainConfig,
                 world_size: int) -> list:
    """Make running shards serve a new run (same K; mode, staleness and optimizer may
    change) without starting new actor processes; returns the handles."""
    if len(shards) != config.num_shards:
        raise ConfigError(f"strategy.num_shards: {config.num_shards} but {len(shards)} shards")
    ray.get([s.reset.remote(world_size, train, config) for s in shards])
    return list(shards)


def stop_shards(shards: Sequence[Any]) -> None:
    for s in shards:
        try:
            ray.kill(s, no_restart=True)
        except Exception:       # already gone
            pass
