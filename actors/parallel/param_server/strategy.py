"""The parameter server's worker side: :class:`ParameterServer`, the Strategy the training loop
runs with on each worker.

Each step the worker pulls the parameters from the K shards (the model's parameters become
read-only views of the object-store buffers), runs forward/backward on its slice of the global
batch and pushes its gradients (every ``param.grad`` is a view into one flat buffer per
(shard, group); one ``ray.put`` per step). It keeps no optimizer state: its ``optimizer`` is an
AdamW that is never stepped, carrying the loop's learning rate (sent with every push) and the
checkpoint format of the other strategies. Sync mode equals single-worker training; async mode
is SSP with bounded staleness, where cross-rank sums are this worker's own values. The shard
actors are started by the driver (:mod:`bmray.cluster.param_server`) and passed in. Design,
formulas and papers: docs/param_server.md.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from bmray.models.typed_config import ConfigError

from bmray.actors.parallel.param_server.layout import ParamServerConfig, partition, tensor_view
from bmray.actors.parallel.strategy import (MicroResult, Strategy, build_adamw, resolve_device,
                                            weighted_forward_backward)
from bmray.actors.runtime.worker_context import worker_context
from bmray.actors.train.config import TrainConfig

__all__ = ["ParameterServer"]


def _default_rank_world() -> tuple[int, int]:
    try:
        ctx = worker_context()
        return ctx.rank, ctx.world_size
    except RuntimeError:
        pass
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ParameterServer(Strategy):
    """The worker side: pull, forward/backward on this rank's slice, push (docs/param_server.md)."""

    replicated = True       # rank 0 gathers the full state from the shards into one file

    def __init__(self, shards: Sequence[Any], config: ParamServerConfig | None = None, *,
                 rank: int | None = None, world_size: int | None = None, **overrides: Any):
        if config is None:
            config = ParamServerConfig(**{"num_shards": len(shards), **overrides})
        elif overrides:
            raise TypeError("ParameterServer: pass either a ParamServerConfig or keyword overrides")
        if len(shards) != config.num_shards:
            raise ConfigError(f"strategy.num_shards: {config.num_shards} but {len(shards)} "
                              f"shard actors were given")
        self.shards = list(shards)
        self.config = config
        r, w = _default_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self._generation = 0
        self._pending: list | None = None   # in-flight pull / apply refs
        self._pushes: list = []             # async: in-flight push refs (errors surface later)
        self._version = 0
        self._clock = 0
        self._snapshots: list = []          # the pulled buffers the parameters view
        # async: what this worker saw, per step — its clock c (pushes so far), the version each
        # shard reported after applying its c-th push, and the version it then pulled to
        # compute step c + 1 on — so the SSP bound can be checked from the worker's side
        self.staleness_log: list[dict[str, Any]] = []

    @property
    def asynchronous(self) -> bool:
        return self.config.mode == "async"

    # ------------------------------------------------------------ setup
    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # Never stepped: carries the scheduler's lr, and the checkpoint format of build_adamw.
        self.optimizer = build_adamw(self.model, cfg, self.params)
        # Never stepped here (the shards step); tell the LR scheduler so it does not warn that
        # scheduler.step() ran before optimizer.step().
        self.optimizer._opt_called = True
        self.layouts = partition([(n, tuple(p.shape)) for n, p in named], self.config.num_shards)
        self.grads = [[torch.zeros(n, dtype=torch.float32, device=self.device) for n in lay.sizes]
                      for lay in self.layouts]
        for lay, bufs in zip(self.layouts, self.grads):
            for s in lay.slots:
                self.params[s.index].grad = bufs[s.group][s.offset:s.offset + s.numel].view(s.shape)
        params = None
        if self.is_main:                # rank 0's initial weights (every rank seeds alike)
            params = [[np.empty(n, np.float32) for n in lay.sizes] for lay in self.layouts]
            with torch.no_grad():
                for lay, arrs in zip(self.layouts, params):
                    for s in lay.slots:
                        arrs[s.group][s.offset:s.offset + s.numel] = \
                            self.params[s.index].detach().cpu().reshape(-1).numpy()
        self._load_shards(params)

    def _load_shards(self, params, exp_avg=None, exp_avg_sq=None, step: int = 0) -> None:
        """Rank 0 installs a state on the shards; every rank then pulls it."""
        self._generation += 1
        if self.is_main:
            worlds = ray.get([s.load.remote(self._generation, lay, params[k],
                                            None if exp_avg is None else exp_avg[k],
                                            None if exp_avg_sq is None else exp_avg_sq[k], step)
                              for k, (s, lay) in enumerate(zip(self.shards, self.layouts))])
            if any(w != self.world_size for w in worlds):
                raise ConfigError(f"parameter server: the shards expect {worlds[0]} workers but "
                                  f"this gang has {self.world_size} (start_shards(world_size=...))")
        self._clock = 0
        self._pending = [s.pull.remote(self.rank, self._generation) for s in self.shards]
        self._materialize()

    def flush(self) -> None:
        """The last step's pushes applied and its parameters pulled (async mode leaves them in
        flight until the next forward)."""
        self._materialize()

    # ------------------------------------------------------------ pull
    def _materialize(self) -> None:
        """Wait for the requested parameters and make the model's parameters views of them."""
        if self._pending is None:
            return
        answers = ray.get(self._pending)
        self._pending = None
        applied = ray.get(self._pushes) if self._pushes else []   # raises a shard's error
        self._pushes = []
        snapshots = ray.get([a[0] for a in answers])      # read-only, shared memory
        self._version = int(answers[0][1])
        if self.asynchronous:
            self.staleness_log.append({"clock": self._clock, "applied": [int(v) for v in applied],
                                       "pulled": [int(a[1]) for a in answers]})
        self._snapshots = snapshots
        with torch.no_grad():
            for lay, bufs in zip(self.layouts, snapshots):
                flats = [tensor_view(b) for b in bufs]
                for s in lay.slots:
                    view = flats[s.group][s.offset:s.offset + s.numel].view(s.shape)
                    self.params[s.index].data = view if self.device.type == "cpu" else \
                        view.to(self.device, non_blocking=True)

    # ------------------------------------------------------------ compute
    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        self._materialize()
        return weighted_forward_backward(self.model, batch, self.device, weight)

    def forward(self, batch: dict[str, Any]) -> Any:
        self._materialize()
        return super().forward(batch)

    def _fold_grads(self) -> None:
        """Make sure every gradient is (still) its view into the flat buffers."""
        for lay, bufs in zip(self.layouts, self.grads):
            for s in lay.slots:
                p = self.params[s.index]
                view = bufs[s.group][s.offset:s.offset + s.numel].view(s.shape)
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad)
                    p.grad = view

    def _put_grads(self) -> Any:
        """One ``ray.put`` of every (shard, group) gradient buffer; then zero them in place."""
        host = [[b if b.device.type == "cpu" else b.cpu() for b in bufs] for bufs in self.grads]
        ref = ray.put(tuple(tuple(b.numpy() for b in bufs) for bufs in host))
        for bufs in self.grads:
            for b in bufs:
                b.zero_()
        return ref

    @torch.no_grad()
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        self._fold_grads()
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.asynchronous:
            norms = [torch.linalg.vector_norm(b) for bufs in self.grads for b in bufs]
            norm = torch.linalg.vector_norm(torch.stack(norms)).cpu()
            coef = min(1.0, max_norm / (float(norm) + 1e-6)) if max_norm > 0 else 1.0
            ref = self._put_grads()
            self._pushes = [s.push_async.remote(self.rank, ref, lr, coef) for s in self.shards]
            self._clock += 1
            self._pending = [s.pull.remote(self.rank, self._generation, self._clock)
                             for s in self.shards]
            return norm
        ref = self._put_grads()
        squares = ray.get([s.push.remote(self._version, self.rank, ref, lr) for s in self.shards])
        norm = math.sqrt(sum(squares))
        self._pending = [s.apply.remote(self._version, norm, max_norm) for s in self.shards]
        return torch.tensor(norm, dtype=torch.float32)

    # ------------------------------------------------------------ scalars across ranks
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        if self.asynchronous or self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------ state
    def _param_index(self) -> dict[int, int]:
        """id(param) -> its index in a torch optimizer state_dict (build_adamw's order)."""
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(order)}

    def state_dict(self) -> dict[str, Any]:
        """Model + AdamW state gathered from the shards, in torch's AdamW state_dict format."""
        self._materialize()
        model = {k: v.clone() for k, v in self.module.state_dict().items()}
        shards = ray.get([s.state.remote() for s in self.shards])
        optim = self.optimizer.state_dict()
        index = self._param_index()
        for lay, st in zip(self.layouts, shards):
            if st["exp_avg"] is None:
                continue
            m = [torch.from_numpy(np.array(a)) for a in st["exp_avg"]]      # owned copies
            v = [torch.from_numpy(np.array(a)) for a in st["exp_avg_sq"]]
            for s in lay.slots:
                sl = slice(s.offset, s.offset + s.numel)
                optim["state"][index[id(self.params[s.index])]] = {
                    "step": torch.tensor(float(st["step"]), dtype=torch.float32),
                    "exp_avg": m[s.group][sl].view(s.shape),
                    "exp_avg_sq": v[s.group][sl].view(s.shape)}
        return {"model": model, "optimizer": optim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rank 0 scatters the parameters and AdamW moments to the shards; all ranks pull."""
        self._materialize()
        model = state["model"]
        optim = state.get("optimizer") or {"state": {}, "param_groups": []}
        for group, saved in zip(self.optimizer.param_groups, optim["param_groups"]):
            group["lr"] = saved["lr"]                   # the loop's schedule continues from here
        if not self.is_main:                            # rank 0 scatters; the others pull
            self._load_shards(None)
            return
        index = self._param_index()
        params, exp_avg, exp_avg_sq, steps = [], [], [], []
        for lay in self.layouts:
            p_k = [np.empty(n, np.float32) for n in lay.sizes]
            m_k = [np.zeros(n, np.float32) for n in lay.sizes]
            v_k = [np.zeros(n, np.float32) for n in lay.sizes]
            for s in lay.slots:
                sl = slice(s.offset, s.offset + s.numel)
                p_k[s.group][sl] = model[s.name].detach().float().cpu().reshape(-1).numpy()
                st = optim["state"].get(index[id(self.params[s.index])])
                if st:
                    m_k[s.group][sl] = st["exp_avg"].float().cpu().reshape(-1).numpy()
                    v_k[s.group][sl] = st["exp_avg_sq"].float().cpu().reshape(-1).numpy()
                    steps.append(int(float(st["step"])))
            params.append(p_k)
            exp_avg.append(m_k)
            exp_avg_sq.append(v_k)
        step = max(steps, default=0)
        self._load_shards(params, exp_avg, exp_avg_sq, step)

    def shard_stats(self) -> list[dict[str, Any]]:
        """Each shard's counters: version, SSP clock gaps and waits, pushes."""
        return ray.get([s.stats.remote() for s in self.shards])

    def memory_report(self) -> dict[str, int]:
        return {"param_bytes": sum(p.numel() * p.element_size() for p in self.params),
                "grad_bytes": sum(b.numel() * b.element_size()
                                  for bufs in self.grads for b in bufs),
                "optimizer_bytes": 0}       # AdamW state lives on the shards
