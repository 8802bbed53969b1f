"""Parameter-server data parallelism: parameters and AdamW state live on K shard actors.

The scheme of Li et al. 2014 ("Scaling Distributed Machine Learning with the Parameter
Server", OSDI) and of DistBelief's Downpour SGD (Dean et al. 2012), on Ray actors::

    shards = start_shards(ParamServerConfig(num_shards=2, mode="sync"), train_cfg, world_size=N)
    with WorkerGroup(ScalingConfig(num_workers=N)) as group:       # cluster/gang.py
        group.execute(fn, shards)   # fn: Trainer(..., strategy=ParameterServer(shards)).fit()
    stop_shards(shards)

* **Shards** (:class:`ParameterServerShard`, separate Ray actors created by the driver with
  :func:`start_shards`) each own a partition of the parameters as two flat fp32 buffers — the
  weight-decay group (matrices) and the no-decay group (biases, norms), the grouping of
  ``actors.strategy.build_adamw`` — and the AdamW state of exactly those elements. The update
  is ``torch.optim.AdamW`` itself (fused where torch has it, like the single-process
  strategy), stepped over the two flat buffers: AdamW is elementwise, so one step over a
  flat buffer equals one step over the tensors it holds.
* **Workers** (:class:`ParameterServer`, the Strategy the training loop runs with) *pull*
  the parameters, run forward/backward on their slice of the global batch and *push* the
  gradients. The worker keeps no optimizer state; its ``optimizer`` is an AdamW that is
  never stepped: it carries the learning rate the loop's warmup-cosine scheduler
  (actors/schedule.py) sets each step — sent along with every push, so the shards apply
  exactly the loop's schedule — and gives checkpoints the same optimizer format as the
  single-process and data-parallel strategies (a checkpoint of one loads into another).

Partition by size (:func:`partition`): greedy largest-first bin packing (Graham's LPT rule,
1969) — parameters sorted by size, each placed on the currently lightest shard. The heaviest
shard then exceeds the lightest by at most the largest parameter (the last parameter placed
on the heaviest shard went to the lightest one at that time), so shards do equal work.

No needless copies through Ray's object store:

* pull: a shard ``ray.put``s its two flat buffers once per version (lazily, on the first pull
  of that version); every worker ``ray.get``s the same object, which numpy maps read-only
  from shared memory, and ``torch.from_numpy`` views it — the model's parameters *are*
  slices of the object-store buffer (forward only reads them; the worker never writes them).
* push: every ``param.grad`` is a view into one flat buffer per (shard, group), so autograd
  accumulates straight into it (as DDP's ``gradient_as_bucket_view``); one ``ray.put`` per
  step of the nested tuple of those buffers (as numpy views) is the only copy, and the
  same single ObjectRef goes to all K shards, which read their part zero-copy.

Synchronous mode (``mode="sync"``, BSP): a shard waits for the N pushes of step s, sums
them in rank order (the trainer contract: the strategy's gradient is the SUM over ranks of
the token-weighted gradients), and applies one AdamW step — so the run equals single-worker
training and all-reduce DP. Global grad-norm clipping (Pascanu et al. 2013) needs the norm of
the *summed* gradient over all shards, which no single process holds: each push returns the
shard's squared norm ‖g_k‖² of its summed partition once all N pushes arrived; every worker
adds the K values in shard order (the same float on every worker), takes the square root
and sends it back with ``apply``; the first ``apply`` of a step updates the shard with
torch's rule ``coef = min(1, max_norm / (norm + 1e-6))``, later ones only return the new
version. Three round trips per step: push (a barrier), apply, get of the new parameters.

Asynchronous mode (``mode="async"``) with bounded staleness, the Stale Synchronous Parallel
model of Ho et al. 2013 (NIPS, "More Effective Distributed ML via a Stale Synchronous
Parallel Parameter Server"): each push is one AdamW step applied on arrival. Each worker
has a clock c (its pushes so far); its pull for step c is granted only when every worker
has pushed at least c − s steps (min clock ≥ c − s, ``staleness = s``) and its own c pushes
are applied (read-my-writes: a push carries an object reference and may start after the pull
that follows it). So the fastest
worker is never more than s steps ahead of the slowest, and the parameters it reads hold
every worker's updates of all steps before c − s; a fast worker *blocks* in pull until the
slow one catches up. The slowest worker is never blocked, so no deadlock. The shard records
the largest clock gap it granted (≤ s by construction, checked by the tests), how often and
how long workers waited, and the largest version lag (shard updates between a worker's pull
and the application of its gradient: at most (N − 1)(2s + 1), since while a worker at clock c
computes, each other worker may push its steps from c − s up to c + s). With no step barrier
the loop's cross-rank sums would re-synchronise the workers, so in async mode
``all_reduce_sum`` is this worker's own value: each worker's gradient is then the mean-loss
gradient of its own slice (the full-batch gradient's unbiased estimate), clipped by its own
norm (the worker holds all of it), and each push is a full AdamW step at the lr of the
pushing worker's step. Checkpoints in async mode are a snapshot of the shards when rank 0
saves, which includes other workers' pushes of nearby steps.

Cross-rank scalars (token counts, losses) in sync mode go through the gang's gloo group
(``torch.distributed``, initialised by cluster.gang.WorkerGroup): a handful of float64 per
step, cheaper than another actor round trip; the tensors never touch it. ``barrier()`` (for
checkpoint commits) uses it too.

A set of shards serves one run (one ``setup``); ``reset_shards`` readies them for the next.

Limits: fp32 parameters on CPU shards (a CUDA worker copies them to its device on each pull
and its gradients to the host on each push); a parameter that gets no gradient in a step
is pushed as zeros, so AdamW still moves it by its momentum and weight decay, where a single
process would skip it (DataParallel's ``find_unused_parameters`` handles that case; here
it is not implemented).
"""
from __future__ import annotations

import asyncio
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from bmray.models.typed_config import ConfigError, check_choice, check_positive

from bmray.actors.parallel.strategy import (MicroResult, Strategy, build_adamw, resolve_device,
                       weighted_forward_backward)
from bmray.actors.train.config import TrainConfig

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


# ------------------------------------------------------------------------------ partition
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


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the warning about read-only (object-store) arrays: we
    only ever read them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


# ------------------------------------------------------------------------------ the shard
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
        return [_tensor(a) for a in mine]

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


def start_shards(config: ParamServerConfig, train: TrainConfig, world_size: int) -> list:
    """Create the K shard actors of one run (the driver does this and hands the handles to the
    workers, e.g. as an argument of ``WorkerGroup.execute``)."""
    return [ParameterServerShard.options(num_cpus=config.shard_cpus,
                                         max_concurrency=max(64, 4 * world_size))
            .remote(k, world_size, train, config) for k in range(config.num_shards)]


def reset_shards(shards: Sequence[Any], config: ParamServerConfig, train: TrainConfig,
                 world_size: int) -> list:
    """Make running shards serve a new run (same K; mode, staleness and optimizer may
    change) without starting new actor processes; returns the handles."""
    if len(shards) != config.num_shards:
        raise ConfigError(f"strategy.num_shards: {config.num_shards} but {len(shards)} shards")
    ray.get([s.reset.remote(world_size, train, config) for s in shards])
    return list(shards)


def stop_shards(shards: Sequence[Any]) -> None:
    for s in shards:
        try:
            ray.kill(s, no_restart=True)
        except Exception:       # already gone
            pass


# ------------------------------------------------------------------------------ the worker
def _default_rank_world() -> tuple[int, int]:
    try:
        from bmray.actors.runtime.worker_context import worker_context
        ctx = worker_context()
        return ctx.rank, ctx.world_size
    except RuntimeError:
        pass
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ParameterServer(Strategy):
    """The worker side: pull, forward/backward on this rank's slice, push; see module doc."""

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
                flats = [_tensor(b) for b in bufs]
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
        """Each shard's counters: version, SSP clock gaps and waits, pushes (see the module doc)."""
        return ray.get([s.stats.remote() for s in self.shards])

    def memory_report(self) -> dict[str, int]:
        return {"param_bytes": sum(p.numel() * p.element_size() for p in self.params),
                "grad_bytes": sum(b.numel() * b.element_size()
                                  for bufs in self.grads for b in bufs),
                "optimizer_bytes": 0}       # AdamW state lives on the shards
