"""The parameter-server shard: a Ray actor owning one partition of the parameters (two flat fp32
buffers, DECAY and NO_DECAY) and the AdamW state of exactly those elements.

An asyncio actor, so pushes and pulls wait on each other without blocking it. Sync mode
(``push`` then ``apply``): it sums the N pushes of a step in rank order, returns its squared
norm for the global clip, and applies one ``torch.optim.AdamW`` step. Async mode
(``push_async``): each push is one AdamW step on arrival, and ``pull`` enforces the SSP bound
(a worker at clock c waits until every worker pushed c − staleness steps). Each version's
buffers are ``ray.put`` once and read zero-copy by the workers. The driver creates, resets
and stops shards with :mod:`bmray.cluster.param_server`; the protocol is in
docs/param_server.md.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np
import ray
import torch

from bmray.actors.parallel.param_server.layout import (DECAY, NO_DECAY, ParamServerConfig,
                                                       ShardLayout, tensor_view)
from bmray.actors.train.config import TrainConfig

__all__ = ["ParameterServerShard"]


@ray.remote
class ParameterServerShard:
    """One partition of the parameters and its AdamW state (an asyncio Ray actor: pushes and
    pulls wait on each other without blocking the actor)."""

    def __init__(self, index: int, world_size: int, train: TrainConfig,
                 config: ParamServerConfig) -> None:
        torch.set_num_threads(max(1, int(config.shard_cpus)))
        self.index = index
        self._changed = asyncio.Condition()
        self.reset(world_size, train, config)

    def reset(self, world_size: int, train: TrainConfig, config: ParamServerConfig) -> None:
        """Forget everything and serve a new run (reuses the actor process: no start-up)."""
        self.world_size, self.train, self.config = world_size, train, config
        self.generation = 0                 # bumped by every load (setup / checkpoint restore)
        self.version = 0                    # optimizer steps applied
        self.layout: ShardLayout | None = None
        self.flat: list[torch.Tensor] = []
        self.optimizer: torch.optim.AdamW | None = None
        self._snapshot = None               # ObjectRef of the current version's buffers
        self._slots: dict[int, dict] = {}   # sync: step -> {"grads", "lr", "sum", "sq"}
        self._reset_clocks()

    def _reset_clocks(self) -> None:
        n = self.world_size
        self.clock = [0] * n                # async: pushes per worker since the last load
        self._base = [self.version] * n     # version each worker last pulled
        self.stats_ = {"max_gap": 0, "gaps": [], "waits": [0] * n, "wait_s": [0.0] * n,
                       "max_version_lag": 0, "pushes": [0] * n, "zero_copy_grads": True}

    # -------------------------------------------------------------- state
    async def load(self, generation: int, layout: ShardLayout, params: Sequence[np.ndarray],
                   exp_avg: Sequence[np.ndarray] | None = None,
                   exp_avg_sq: Sequence[np.ndarray] | None = None, step: int = 0) -> int:
        """Install parameters (and optionally AdamW moments at ``step``): setup and restore."""
        self.layout = layout
        self.flat = [torch.tensor(np.asarray(a, dtype=np.float32)) for a in params]  # owned copy
        t = self.train
        groups = [{"params": [self.flat[DECAY]], "weight_decay": t.weight_decay},
                  {"params": [self.flat[NO_DECAY]], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"][0].numel() > 0]
        kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        if not groups:                      # more shards than parameters: an empty shard
            self.optimizer = None
        else:
            try:
                self.optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, ValueError):
                self.optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
        if self.optimizer is not None and exp_avg is not None and step > 0:
            for g, p in enumerate(self.flat):
                if p.numel():
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step), dtype=torch.float32),
                        "exp_avg": torch.tensor(np.asarray(exp_avg[g], dtype=np.float32)),
                        "exp_avg_sq": torch.tensor(np.asarray(exp_avg_sq[g], dtype=np.float32))}
        self.version = int(step)
        self.generation = generation
        self._snapshot = None
        self._slots.clear()
        self._reset_clocks()
        async with self._changed:
            self._changed.notify_all()
        return self.world_size

    def state(self) -> dict[str, Any]:
        """Version and AdamW moments of this partition (None before the first step)."""
        st = [self.optimizer.state.get(p) if self.optimizer else None for p in self.flat]
        if not any(st):
            return {"step": self.version, "exp_avg": None, "exp_avg_sq": None}
        zeros = [np.zeros(p.numel(), np.float32) for p in self.flat]
        return {"step": self.version,
                "exp_avg": [s["exp_avg"].numpy() if s else z for s, z in zip(st, zeros)],
                "exp_avg_sq": [s["exp_avg_sq"].numpy() if s else z for s, z in zip(st, zeros)]}

    def stats(self) -> dict[str, Any]:
        return {"shard": self.index, "version": self.version,
                "numel": self.layout.numel if self.layout else 0,
                "clock": list(self.clock), **self.stats_}

    # -------------------------------------------------------------- helpers
    async def _wait(self, predicate, what: str) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), self.config.timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"parameter-server shard {self.index}: waited "
                                   f"{self.config.timeout_s:.0f} s for {what} (a worker is "
                                   f"gone or slower than strategy.timeout_s)") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _snapshot_ref(self) -> Any:
        """This version's buffers in the object store: one ``ray.put`` per version."""
        if self._snapshot is None:
            self._snapshot = ray.put(tuple(p.numpy() for p in self.flat))
        return self._snapshot

    def _apply(self, grads: Sequence[torch.Tensor], lr: float) -> None:
        """One AdamW step of the partition with the given gradients (torch's own update)."""
        for p, g in zip(self.flat, grads):
            p.grad = g
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        for p in self.flat:
            p.grad = None
        self.version += 1
        self._snapshot = None

    def _mine(self, grads: Sequence[Sequence[np.ndarray]], rank: int) -> list[torch.Tensor]:
        mine = grads[self.index]
        if any(a.flags.writeable for a in mine):
            self.stats_["zero_copy_grads"] = False
        self.stats_["pushes"][rank] += 1
        return [tensor_view(a) for a in mine]

    # -------------------------------------------------------------- pull
    async def pull(self, rank: int, generation: int, clock: int | None = None) -> list:
        """[ObjectRef of the current buffers, version]. Waits for ``generation`` (a load); in
        async mode with ``clock``, also for the SSP condition min clock ≥ clock − staleness."""
        await self._wait(lambda: self.generation >= generation, f"load generation {generation}")
        if self.config.mode == "async" and clock is not None:
            s = self.config.staleness
            # read-my-writes first (not counted as a wait: no other worker is involved)
            await self._wait(lambda: self.clock[rank] >= clock, f"rank {rank}'s push {clock}")
            ready = lambda: min(self.clock) >= clock - s   # noqa: E731
            if not ready():
                t0 = time.perf_counter()
                self.stats_["waits"][rank] += 1
                await self._wait(ready, f"the slowest worker to reach step {clock - s} "
                                        f"(rank {rank} is at {clock}, staleness {s})")
                self.stats_["wait_s"][rank] += time.perf_counter() - t0
            gap = clock - min(self.clock)
            self.stats_["gaps"].append(gap)
            self.stats_["max_gap"] = max(self.stats_["max_gap"], gap)
            self._base[rank] = self.version
        return [self._snapshot_ref(), self.version]

    # -------------------------------------------------------------- sync mode
    async def push(self, step: int, rank: int, grads: Sequence[Sequence[np.ndarray]],
                   lr: float) -> float:
        """Rank ``rank``'s gradient of step ``step``; returns ‖Σ_ranks g‖² of this partition
        once all N ranks pushed (a barrier)."""
        if step != self.version:
            raise RuntimeError(f"parameter-server shard {self.index}: rank {rank} pushed a "
                               f"gradient of step {step}, the shard is at step {self.version}")
        slot = self._slots.setdefault(step, {"grads": {}, "lr": lr, "sum": None, "sq": None})
        slot["grads"][rank] = self._mine(grads, rank)
        if rank == 0:
            slot["lr"] = lr
        if len(slot["grads"]) == self.world_size:
            parts = [slot["grads"][r] for r in range(self.world_size)]
            total = [t.clone() for t in parts[0]]          # summed in rank order: deterministic
            for other in parts[1:]:
                for acc, g in zip(total, other):
                    acc.add_(g)
            slot["grads"] = {}
            slot["sq"] = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
                             for t in total)
            slot["sum"] = total
            await self._notify()
        await self._wait(lambda: slot["sum"] is not None, f"the pushes of step {step}")
        return slot["sq"]

    async def apply(self, step: int, norm: float, max_norm: float) -> list:
        """Apply step ``step`` (the first call does; later ones find it done) with the global
        norm ``norm`` of all shards; returns [ObjectRef of the new buffers, version]."""
        if self.version == step:
            slot = self._slots.pop(step)
            grads = slot["sum"]
            if max_norm > 0:
                coef = min(1.0, max_norm / (norm + 1e-6))   # torch.nn.utils.clip_grad_norm_
                for g in grads:
                    g.mul_(coef)
            self._apply(grads, slot["lr"])
        elif self.version != step + 1:
            raise RuntimeError(f"parameter-server shard {self.index}: apply of step {step} "
                               f"but the shard is at step {self.version}")
        return [self._snapshot_ref(), self.version]

    # -------------------------------------------------------------- async mode
    async def push_async(self, rank: int, grads: Sequence[Sequence[np.ndarray]], lr: float,
                         coef: float) -> int:
        """Apply rank ``rank``'s gradient (scaled by its clip ``coef``) now; returns the version."""
        g = self._mine(grads, rank)
        if coef != 1.0:
            g = [t * coef for t in g]
        lag = self.version - self._base[rank]
        self.stats_["max_version_lag"] = max(self.stats_["max_version_lag"], lag)
        self._apply(g, lr)
        self.clock[rank] += 1
        await self._notify()
        return self.version
