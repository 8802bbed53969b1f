"""The Ray actor that runs a training loop: one worker, one device.

Why an actor and not a task: the worker holds state that outlives one call (the model, the data
position, later its torch.distributed group), and the driver must be able to watch it and kill
it. The loop runs *inside* the actor (jobs/ only start, watch and collect), so nothing is
round-tripped through the driver per step. Issue 3 turns this into a gang of N such workers.
"""
from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch


@ray.remote
class TrainWorker:
    """Runs ``jobs.experiment.build_trainer(...).fit()`` on this actor's device."""

    def __init__(self, threads: int = 1) -> None:
        # Ray sets OMP_NUM_THREADS=1 inside actors with num_cpus <= 1; pin torch to exactly
        # the CPUs this actor was given so that co-located workers do not oversubscribe cores.
        torch.set_num_threads(max(1, threads))
        self.trainer = None
        self.tokenizer = None

    def node(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(),
                "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}

    def run(self, raw_experiment: dict, samples: list[str] | None = None,
            max_new_tokens: int = 40) -> dict[str, Any]:
        """Train the experiment (resuming from its checkpoint dir when one exists) and return a
        JSON-able report; with ``samples``, also the model's greedy continuation of each."""
        from jobs.experiment import build_trainer, experiment_from_dict, prepare_data

        start = time.perf_counter()
        exp = experiment_from_dict(raw_experiment)
        self.tokenizer, _ = prepare_data(exp)
        self.trainer = build_trainer(exp)
        result = self.trainer.fit()
        report = {
            "step": result.step,
            "losses": {int(k): float(v) for k, v in result.losses.items()},
            "eval": result.eval,
            "checkpoint": result.checkpoint,
            "averaged_checkpoint": result.averaged_checkpoint,
            "resumed_from": result.resumed_from,
            "parameters": sum(p.numel() for p in self.trainer.strategy.module.parameters()),
            "wall_s": time.perf_counter() - start,
        }
        if samples:
            report["samples"] = {p: self.sample(p, max_new_tokens) for p in samples}
        return report

    def sample(self, prompt: str, max_new_tokens: int = 40) -> str:
        """Greedy continuation of ``prompt`` by the trained model (decoder families)."""
        from models.generation import GenerationConfig, generate

        model = self.trainer.strategy.module
        model.eval()
        ids = torch.tensor([self.tokenizer.encode(prompt)])
        cfg = GenerationConfig(max_new_tokens=max_new_tokens,
                               eos_id=self.tokenizer.special_ids()["eos_id"])
        with torch.no_grad():
            out = generate(model, ids, cfg)
        return prompt + self.tokenizer.decode(out[0, ids.size(1):].tolist(),
                                              skip_special_tokens=True)
