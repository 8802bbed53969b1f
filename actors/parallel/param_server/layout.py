"""The parameter server's configuration and its shard layout: which shard owns which parameter,
at which offset of which of the shard's two flat buffers (docs/param_server.md).

:func:`partition` packs parameters onto ``K`` shards by Graham's greedy largest-first rule
(LPT): max load − min load ≤ the largest parameter. Within a shard, matrices go to the DECAY
buffer and the rest to NO_DECAY (the two AdamW groups of ``build_adamw``). The layout is
deterministic, so every worker computes the same one from its own copy of the model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bmray.models.typed_config import ConfigError, check_choice, check_positive

__all__ = ["DECAY", "MODES", "NO_DECAY", "ParamServerConfig", "ShardLayout", "Slot", "partition",
           "tensor_view"]

MODES = ("sync", "async")
DECAY, NO_DECAY = 0, 1          # the two AdamW groups of build_adamw: matrices, then the rest


@dataclass
class ParamServerConfig:
    """Knobs of the parameter server (typed, validated with key paths)."""

    num_shards: int = 2             # K shard actors
    mode: str = "sync"              # "sync": BSP, equals single-worker training; "async": SSP
    staleness: int = 2              # async: steps the fastest worker may lead (Ho et al. 2013)
    shard_cpus: float = 0.0         # Ray CPUs reserved per shard actor (torch threads: max(1, int))
    timeout_s: float = 300.0        # a push/pull waiting longer than this fails (a peer is gone)

    def __post_init__(self) -> None:
        check_positive("strategy.num_shards", self.num_shards)
        check_choice("strategy.mode", self.mode, MODES)
        if not isinstance(self.staleness, int) or self.staleness < 0:
            raise ConfigError(f"strategy.staleness: must be an integer >= 0, "
                              f"got {self.staleness!r}")
        check_positive("strategy.shard_cpus", self.shard_cpus, allow_zero=True)
        check_positive("strategy.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives: shard, group (DECAY / NO_DECAY), offset in that flat buffer."""

    index: int                      # position among the model's trainable parameters
    name: str
    shape: tuple[int, ...]
    group: int
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardLayout:
    """One shard's parameters (in model order) and the sizes of its two flat buffers."""

    shard: int
    slots: tuple[Slot, ...]
    sizes: tuple[int, int]          # numel of the DECAY and NO_DECAY buffers

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def partition(params: Sequence[tuple[str, Sequence[int]]], num_shards: int) -> list[ShardLayout]:
    """Greedy largest-first bin packing (LPT) of ``(name, shape)`` pairs onto ``num_shards``.

    Parameters go in decreasing size (ties: model order) to the currently lightest shard
    (ties: lowest index); within a shard they are laid out in model order, matrices in the
    DECAY buffer and the rest in NO_DECAY. Deterministic, so every worker computes the same
    layout from its own copy of the model. Guarantee: max load − min load ≤ largest parameter.
    """
    if num_shards < 1:
        raise ValueError(f"partition: num_shards must be >= 1, got {num_shards}")
    sizes = [math.prod(shape) for _, shape in params]
    load = [0] * num_shards
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-sizes[i], i)):
        k = min(range(num_shards), key=lambda k: (load[k], k))
        owner[i] = k
        load[k] += sizes[i]
    layouts = []
    for k in range(num_shards):
        fill = [0, 0]
        slots = []
        for i, (name, shape) in enumerate(params):
            if owner[i] != k:
                continue
            group = DECAY if len(shape) >= 2 else NO_DECAY
            slots.append(Slot(i, name, tuple(shape), group, fill[group]))
            fill[group] += sizes[i]
        layouts.append(ShardLayout(k, tuple(slots), (fill[0], fill[1])))
    return layouts


def tensor_view(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the warning about read-only (object-store) arrays: we
    only ever read them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)
