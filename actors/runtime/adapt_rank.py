"""What every rank of an adaptation gang runs: ``run_adapt`` on its share, rank 0's report.

``adapt_rank``: executed by cluster/launcher.py (``TrainRun`` with this as its ``rank_fn``),
like train_rank.py for pre-training. ``adapt_rank_relay``: executed by cluster/adapt_gang.py,
which hands rank 0's evaluation rows to its caller while the gang trains (a Tune trial).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from bmray.actors.train.adapt import AdaptResult, run_adapt
from bmray.actors.train.adapt_config import AdaptConfig, adapt_config_from_dict
from bmray.models.typed_config import ConfigError


def adapt_rank(raw: dict[str, Any], shards: list | None = None,
               samples: list[str] | None = None, resume: bool | None = None) -> dict[str, Any]:
    """Adapt on this rank; returns the run's report (``AdaptResult.to_dict()`` + timing)."""
    start = time.perf_counter()
    cfg = adapt_config_from_dict(raw)
    if cfg.out_dir is None:
        raise ConfigError("out_dir: required to run on a gang (the delta and checkpoints go there)")
    if resume is not None:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                      resume=resume))
    report = run_adapt(cfg, out_dir=cfg.out_dir).to_dict()
    report["wall_s"] = time.perf_counter() - start
    return report


def adapt_rank_relay(cfg: AdaptConfig, out_dir: str, queue: Any = None) -> AdaptResult:
    """``run_adapt`` on this rank; rank 0's evaluation rows are put on ``queue`` (a
    ``ray.util.queue.Queue``) so the process that started the gang can hand them on."""
    return run_adapt(cfg, out_dir=out_dir, on_eval=queue.put if queue is not None else None)
