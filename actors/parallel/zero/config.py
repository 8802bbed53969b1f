"""The options every ZeRO-based strategy shares, checked in one place.

:class:`ZeroSharedConfig` holds the compute dtype, where the optimizer state lives, and how the
data-parallel collectives travel; :class:`~bmray.actors.parallel.zero.stage12.ZeroConfig`,
:class:`~bmray.actors.parallel.zero.stage3.Zero3Config` and
:class:`~bmray.actors.parallel.mesh.MeshParallelConfig` extend it with their own options. The
section stays flat in YAML (``strategy: {kind: zero, param_dtype: bf16, ...}``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bmray.actors.comm.transport import TRANSPORTS
from bmray.models.typed_config import ConfigError, check_choice

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFLOAD_OPTIMIZER = ("none", "cpu", "disk")


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")


@dataclass
class ZeroSharedConfig:
    """Options of ZeRO-1/2, ZeRO-3 and the mesh (whose dp replicas run ZeRO)."""

    param_dtype: str = "fp32"               # the compute copy: fp32 | bf16 | fp16
    offload_optimizer: str = "none"         # where master + moments live: none | cpu | disk
    disk_dir: str | None = None             # offload_optimizer: disk — memory-mapped files here
    broadcast_init: bool = True             # copy rank 0's parameters and buffers at setup
    transport: str = "auto"                 # dp collectives via: auto | shm | process_group

    def check_shared(self) -> None:
        """The checks of the shared options (each subclass's ``__post_init__`` calls it)."""
        check_choice("strategy.transport", self.transport, TRANSPORTS)
        check_choice("strategy.param_dtype", self.param_dtype, list(DTYPES))
        check_choice("strategy.offload_optimizer", self.offload_optimizer,
                     list(OFFLOAD_OPTIMIZER))
        if self.offload_optimizer == "disk" and not self.disk_dir:
            raise ConfigError("strategy.disk_dir: required when strategy.offload_optimizer "
                              "is 'disk'")

    def __post_init__(self) -> None:
        self.check_shared()
