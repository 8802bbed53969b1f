"""A compression run whose training stages run on a gang: ``run_compress_gang``.

    report = run_compress_gang(cfg)        # cfg.scaling.num_workers > 1, cfg.strategy

The driver runs the recipe (loading, measuring, the data-free stages, the artifact) as
``run_compress`` does; a stage that trains — distillation, recovery fine-tuning, QAT — calls
``train(module, steps, lr)``, which here ships the module to the gang's workers
(actors/runtime/compress_rank.py: a pickle, pruning's parametrizations carried beside it),
trains each rank's copy under ``cfg.strategy`` on its shard of the task rows from the
driver's stream position, and loads rank 0's consolidated trained tensors back into the
driver's module (strict on the trainable names; the frozen teacher is never written). The
gang starts on the first training stage and stays up for the next ones.
"""
from __future__ import annotations

from typing import Any, Callable

import ray
from torch import nn

from bmray.actors.runtime.compress_rank import (RowSlice, load_trained, pack_module,
                                                train_stage_rank)
from bmray.actors.train.compress import (CompressConfig, Teacher, TrainFn, run_compress,
                                         stage_train_config, train_summary)
from bmray.cluster.gang import WorkerGroup

__all__ = ["CompressGang", "run_compress_gang", "needs_gang"]


def needs_gang(cfg: CompressConfig) -> bool:
    """More than one worker, or a strategy other than one process."""
    return cfg.scaling.num_workers > 1 or cfg.strategy.kind not in ("auto", "single")


class CompressGang:
    """The gang of ``cfg.scaling`` (started on first use; ``group``: one already started,
    e.g. a test's, which is then not shut down here) and the train-function factory that
    ``run_compress`` takes."""

    def __init__(self, cfg: CompressConfig, group: WorkerGroup | None = None):
        self.cfg = cfg
        self.group = group
        self._own = group is None

    def _started(self) -> WorkerGroup:
        if self.group is None:
            self.group = WorkerGroup(self.cfg.scaling).start()
        return self.group

    def make_train_fn(self, teacher: Teacher, cfg: CompressConfig) -> TrainFn:
        """``train(module, steps, lr)`` on the gang (see the module docstring)."""
        stream = teacher.train_data
        if not all(hasattr(stream, k) for k in ("rows", "batch", "seed", "pos")):
            raise TypeError(f"a gang trains on task rows (a RowStream), not "
                            f"{type(stream).__name__}")

        def train(module: nn.Module, steps: int, lr: float) -> dict[str, Any]:
            group = self._started()
            data = RowSlice(stream.rows, stream.batch, stream.seed, stream.pos)
            shipped = ray.put(pack_module(module))
            outs = group.execute(train_stage_rank, shipped, teacher.objective, data,
                                 stage_train_config(cfg.train, steps, lr), cfg.strategy,
                                 cfg.seed)
            # the next stage reads on from here, as one process would
            stream.load_state_dict({"pos": stream.pos + steps * stream.batch})
            head = outs[0]
            if head["frozen_changed"]:
                raise RuntimeError(f"the gang changed frozen tensors: "
                                   f"{head['frozen_changed'][:5]}")
            load_trained(module, head["state"])
            module.to("cpu").eval()
            return {**train_summary(steps, lr, head["losses"], head["grad_norms"]),
                    "workers": len(outs), "strategy": cfg.strategy.resolved(len(outs)).kind}
        return train

    def close(self) -> None:
        if self._own and self.group is not None:
            self.group.shutdown()
        self.group = None

    def __enter__(self) -> "CompressGang":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_compress_gang(cfg: CompressConfig, echo: Callable[[str], None] = print,
                      group: WorkerGroup | None = None) -> dict[str, Any]:
    """``run_compress`` with its training stages on a gang of ``cfg.scaling.num_workers``
    under ``cfg.strategy`` (Ray must be connected)."""
    with CompressGang(cfg, group) as gang:
        return run_compress(cfg, echo, make_train=gang.make_train_fn)
