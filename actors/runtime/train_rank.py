"""What every rank of a training gang runs: build its strategy and trainer, fit, report.

Executed through ``WorkerGroup.execute(train_rank, ...)`` by cluster/launcher.py. Rank 0
prepares the data first (trains/loads the tokenizer, packs the corpus) while the others wait
at a barrier, then every rank builds the same model and streams its own slice of the data.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from bmray.actors.parallel.registry import build_strategy, strategy_from_dict
from bmray.actors.runtime.worker_context import worker_context
from bmray.actors.train.builders import build_trainer, prepare_data
from bmray.actors.train.experiment import experiment_from_dict
from bmray.models.generation import GenerationConfig, generate
from bmray.models.tokenizer import Tokenizer


def train_rank(raw_experiment: dict[str, Any], shards: list | None = None,
               samples: list[str] | None = None, max_new_tokens: int = 40,
               resume: bool | None = None) -> dict[str, Any]:
    """Train the experiment on this rank; returns the report (full on rank 0)."""
    start = time.perf_counter()
    ctx = worker_context()
    exp = experiment_from_dict(raw_experiment)
    if resume is not None:
        exp.checkpoint.resume = resume
    if ctx.rank == 0:
        prepare_data(exp)
    if ctx.world_size > 1:
        dist.barrier()
    spec = strategy_from_dict(raw_experiment.get("strategy")).resolved(ctx.world_size)
    strategy = build_strategy(spec, exp.train.device, shards)
    data_rank, data_world = strategy.data_shard(ctx.rank, ctx.world_size)
    trainer = build_trainer(exp, strategy, rank=data_rank, world_size=data_world)
    result = trainer.fit()
    report: dict[str, Any] = {
        "rank": ctx.rank, "world_size": ctx.world_size, "strategy": spec.kind,
        "step": result.step,
        "losses": {int(k): float(v) for k, v in result.losses.items()},
        "eval": result.eval, "checkpoint": result.checkpoint,
        "averaged_checkpoint": result.averaged_checkpoint, "resumed_from": result.resumed_from,
        "parameters": sum(p.numel() for p in trainer.strategy.module.parameters()),
        "memory": trainer.strategy.memory_report(),
        "wall_s": time.perf_counter() - start,
    }
    if samples and ctx.rank == 0 and strategy.replicated and spec.kind != "mesh":
        report["samples"] = {p: _complete(trainer, exp, p, max_new_tokens) for p in samples}
    return report


def _complete(trainer: Any, exp: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by the trained model (decoder families)."""
    tok = Tokenizer.load(exp.data.tokenizer_path)
    model = trainer.strategy.module
    device = next(model.parameters()).device
    ids = torch.tensor([tok.encode(prompt)], device=device)
    out = generate(model, ids, GenerationConfig(max_new_tokens=max_new_tokens,
                                                eos_id=tok.special_ids()["eos_id"]))
    return prompt + tok.decode(out[0, ids.size(1):].tolist(), skip_special_tokens=True)
