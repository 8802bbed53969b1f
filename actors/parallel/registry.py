"""Strategy registry: the ``strategy:`` section of an experiment → a Strategy object.

    strategy: {kind: ddp, bucket_mb: 25}                  # all-reduce data parallelism
    strategy: {kind: param_server, num_shards: 2, mode: async, staleness: 2}
    strategy: {kind: zero, stage: 2, param_dtype: bf16}   # ZeRO-1/2 (zero/stage12.py)
    strategy: {kind: zero, stage: 3, offload_params: true} # ZeRO-3 (zero/stage3.py; kind zero3)
    strategy: {kind: mesh, tp: 2, pp: 2, zero_stage: 1}   # dp x tp x pp (mesh.py)
    strategy: {kind: single}                              # one worker, no communication

The section is flat: ``kind`` picks the strategy and every other key belongs to that kind's
typed config (an unknown key names the kind's valid keys). ``auto`` (the default) is ``single``
on one worker and ``ddp`` on more. Adding a strategy is one entry in ``KINDS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bmray.actors.parallel.data_parallel import DataParallel, DataParallelConfig
from bmray.actors.parallel.mesh import MeshParallel, MeshParallelConfig
from bmray.actors.parallel.param_server import ParameterServer, ParamServerConfig
from bmray.actors.parallel.strategy import SingleProcess, Strategy
from bmray.actors.parallel.zero.stage12 import Zero, ZeroConfig
from bmray.actors.parallel.zero.stage3 import Zero3, Zero3Config
from bmray.models.typed_config import ConfigError, check_choice, from_dict


@dataclass
class _NoOptions:
    """``single`` takes no options."""


KINDS: dict[str, type] = {"single": _NoOptions, "ddp": DataParallelConfig,
                          "param_server": ParamServerConfig, "zero": ZeroConfig,
                          "zero3": Zero3Config, "mesh": MeshParallelConfig}


@dataclass
class StrategySpec:
    kind: str = "auto"
    options: Any = field(default_factory=_NoOptions)

    def resolved(self, num_workers: int) -> "StrategySpec":
        """``auto`` → single (1 worker) or ddp (more), with that kind's default options."""
        if self.kind != "auto":
            return self
        kind = "single" if num_workers == 1 else "ddp"
        return StrategySpec(kind, KINDS[kind]())

    def model_parallel_size(self) -> int:
        """Workers per model replica (tp x pp for ``mesh``, else 1): the data is split over
        ``num_workers / model_parallel_size`` replicas."""
        opts = self.options
        return getattr(opts, "tp", 1) * getattr(opts, "pp", 1) if self.kind == "mesh" else 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **vars(self.options)}


def strategy_from_dict(raw: dict[str, Any] | None) -> StrategySpec:
    raw = dict(raw or {})
    kind = raw.pop("kind", "auto")
    if kind == "zero" and raw.get("stage") == 3:
        kind = "zero3"                  # stage 3 has its own class and options (zero/stage3.py)
    check_choice("strategy.kind", kind, ["auto", *KINDS])
    if kind == "auto":
        if raw:
            raise ConfigError(f"strategy: options {sorted(raw)} need an explicit strategy.kind "
                              f"(one of {list(KINDS)})")
        return StrategySpec()
    return StrategySpec(kind, from_dict(KINDS[kind], raw, "strategy"))


def build_strategy(spec: StrategySpec, device: str, shards: list | None = None) -> Strategy:
    """The Strategy for this rank (inside a gang worker: torch.distributed is initialised)."""
    if spec.kind == "single":
        return SingleProcess(device)
    if spec.kind == "ddp":
        return DataParallel(spec.options)
    if spec.kind == "zero":
        return Zero(spec.options)
    if spec.kind == "zero3":
        return Zero3(spec.options)
    if spec.kind == "mesh":
        return MeshParallel(spec.options)
    if spec.kind == "param_server":
        if not shards:
            raise ValueError("the param_server strategy needs the shard actors "
                             "(cluster.launcher.TrainRun starts them)")
        return ParameterServer(shards, spec.options)
    raise ConfigError(f"strategy.kind: {spec.kind!r} is not resolved (call .resolved())")
