"""What runs inside Ray actors: communication (comm/), parallel strategies (parallel/), the
training loop (train/) and the gang worker (runtime/).

    from bmray.actors import Trainer, train, TrainConfig, CheckpointConfig, SingleProcess

The public names are resolved lazily (PEP 562): importing one sub-package does not import the
whole training stack.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "bmray.actors.train.checkpoints",
    "average_checkpoints": "bmray.actors.train.checkpoints",
    "latest_checkpoint": "bmray.actors.train.checkpoints",
    "list_checkpoints": "bmray.actors.train.checkpoints",
    "load_checkpoint": "bmray.actors.train.checkpoints",
    "save_checkpoint": "bmray.actors.train.checkpoints",
    "MetricsLogger": "bmray.actors.train.metrics",
    "read_metrics": "bmray.actors.train.metrics",
    "build_scheduler": "bmray.actors.train.lr_schedule",
    "warmup_cosine": "bmray.actors.train.lr_schedule",
    "SingleProcess": "bmray.actors.parallel.strategy",
    "Strategy": "bmray.actors.parallel.strategy",
    "CheckpointConfig": "bmray.actors.train.config",
    "TrainConfig": "bmray.actors.train.config",
    "Trainer": "bmray.actors.train.loop",
    "TrainResult": "bmray.actors.train.loop",
    "seed_everything": "bmray.actors.train.loop",
    "train": "bmray.actors.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bmray.actors' has no attribute {name!r}")
