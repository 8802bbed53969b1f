"""ZeRO stages 0, 1 and 2: data parallelism whose optimizer state (and gradients) are sharded.

Rajbhandari et al. 2020, §5 (P_os, P_os+g); formulas and design in docs/zero.md. Per rank,
with mixed-precision Adam and Ψ trainable parameters over N ranks:

    stage 0   16Ψ          stage 1   4Ψ + 12Ψ/N          stage 2   2Ψ + 14Ψ/N

(fp32 parameters with the optimizer on the device: the fp32 master *is* this rank's slice of
the parameters — "aliased" — so 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N.)

A subclass of :class:`DataParallel` (same buckets, hooks, launch order, transport):

* buckets are zero-padded to a multiple of N and split with ``shard_bounds``: rank r owns
  slice r of every bucket; decay and no-decay parameters never share a bucket;
* stage 0/1: a bucket is all-reduced as in DataParallel and the optimizer reads this rank's
  slice (stage 0 owns every slice); stage 2: a bucket exists only while it is
  reduce-scattered into this rank's gradient shard (every micro-batch);
* step (:func:`step_master_shards`): global norm over the shards, clip, AdamW on the fp32
  slices (:class:`ShardedOptimizer`, with offload), then the slices are all-gathered into the
  ``param_dtype`` parameters asynchronously; the next forward waits for them;
* checkpoints are SingleProcess's format (consolidated_state.py; a collective), or each
  rank's own slices with ``sharded_checkpoint``.

Limitations: unused parameters get a zero gradient (AdamW decays them), not a skipped step.
fp16 needs the DynamicLossScaler (loss_scaler.py).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bmray.models.typed_config import check_choice, check_positive

from bmray.actors.comm import collectives as C
from bmray.actors.parallel.buckets import Bucket, bucket_pieces
from bmray.actors.parallel.data_parallel import DataParallel
from bmray.actors.parallel.strategy import (MicroResult, build_adamw, takes_weight_decay,
                                            weighted_forward_backward)
from bmray.actors.parallel.zero.config import DTYPES, ZeroSharedConfig, check_bool
from bmray.actors.parallel.zero.consolidated_state import (consolidated_optimizer,
                                                           load_lr_and_scaler,
                                                           non_sharded_model,
                                                           optimizer_template, param_states)
from bmray.actors.parallel.zero.loss_scaler import DynamicLossScaler, ScaledWeight
from bmray.actors.parallel.zero.memory import memory_totals
from bmray.actors.parallel.zero.sharded_optimizer import (GradNormStats, ShardedOptimizer,
                                                          step_master_shards)
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.sharded_state import SHARDED_FORMAT, param_layout, unit_entry


@dataclass
class ZeroConfig(ZeroSharedConfig):
    """Knobs of :class:`Zero` (``strategy: {kind: zero, stage: 2, ...}``); param_dtype,
    offload_optimizer, disk_dir, broadcast_init and transport: :class:`ZeroSharedConfig`."""

    stage: int = 1                          # 0: no sharding, 1: optimizer state, 2: + gradients
    bucket_mb: float = 25.0                 # DeepSpeed's reduce_bucket_size / DDP's bucket_cap_mb
    first_bucket_mb: float | None = None    # as in DataParallel; None: same as bucket_mb
    max_inflight_buckets: int = 2           # stage 2: full buckets on the wire at once
    sharded_checkpoint: bool = False        # each rank writes only its shard (sharded_state.py)

    def __post_init__(self) -> None:
        check_choice("strategy.stage", self.stage, [0, 1, 2])
        self.check_shared()
        check_bool("strategy.sharded_checkpoint", self.sharded_checkpoint)
        check_positive("strategy.bucket_mb", self.bucket_mb)
        if self.first_bucket_mb is not None:
            check_positive("strategy.first_bucket_mb", self.first_bucket_mb)
        check_positive("strategy.max_inflight_buckets", self.max_inflight_buckets)


class Zero(GradNormStats, DataParallel):
    """ZeRO stage 0/1/2 over a plain ``nn.Module``; see the module docstring."""

    replicated = True                   # state_dict() consolidates: one file, any world size
    collective_state_dict = True        # ...by all-gathering the shards: every rank takes part

    def __init__(self, config: ZeroConfig | None = None, *, group: Any = None,
                 **overrides: Any) -> None:
        if config is None:
            config = ZeroConfig(**overrides)
        elif overrides:
            raise TypeError("Zero: pass either a ZeroConfig or keyword overrides")
        super().__init__(config, group=group)
        self.stage = config.stage
        self.dtype = DTYPES[config.param_dtype]
        # sharded checkpoints: every rank writes its own file (see actors/train/sharded_state.py)
        self.sharded_checkpoint = config.sharded_checkpoint
        self.replicated = not config.sharded_checkpoint
        # the optimizer's view of the world: stage 0 owns every slice
        self.shards = 1 if self.stage == 0 else self.world_size
        self.shard_rank = 0 if self.stage == 0 else self.rank
        self._gathers: list[tuple[Bucket, Any]] = []
        self._inflight: collections.deque[Bucket] = collections.deque()
        self.scaler = None

    # ------------------------------------------------------------ setup
    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._place(model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        trainable = {id(p) for p in self.params}
        self.frozen = [p for p in self.model.parameters() if id(p) not in trainable]
        self._names = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        # SingleProcess's optimizer, never stepped (no state): the checkpoint layout
        self._template = build_adamw(self.model, cfg, self.params)
        plan = self.bucket_plan(self.params, group_of=takes_weight_decay,
                                itemsize=self.dtype.itemsize)
        on_host = self.config.offload_optimizer != "none"
        # fp32 parameters on the optimizer's device: the master *is* this rank's slice of the
        # parameters (module doc, "Aliased fp32 masters"); otherwise a separate fp32 copy
        self.aliased = self.dtype == torch.float32 and not on_host
        self.flat_params: list[torch.Tensor] = []
        if self.aliased:
            self.model.to(self.dtype)   # in place (a no-op for an fp32 model)
            self.flat_params = [self._flatten_params(ps) for ps in plan]
        else:
            masters = [self._take_slices(ps) for ps in plan]  # fp32, before the cast
            self.model.to(self.dtype)   # in place: Parameter identity (and ties) kept
        self._build_buckets(plan, pad_to=self.shards, allocate=self.stage < 2)
        self._open_transport()          # shared memory for the buckets' collectives, if it can
        self.grad_shards = ([torch.zeros(self._bounds(b).size, dtype=self.dtype,
                                         device=self.device) for b in self.buckets]
                            if self.stage == 2 else [])
        if self.aliased:
            # nn.Parameter(view) aliases the view's storage: no copy
            self.masters = [nn.Parameter(flat[s.start:s.stop])
                            for flat, s in zip(self.flat_params, map(self._bounds, self.buckets))]
        else:
            self.masters = [nn.Parameter(m.to("cpu" if on_host else self.device))
                            for m in masters]
        self.decay = [takes_weight_decay(b.params[0]) for b in self.buckets]
        self.optimizer = self._build_optimizer(cfg)
        if self.dtype == torch.float16:
            self.scaler = DynamicLossScaler(cfg.loss_scale, group=self.group)

    def _bounds(self, bucket: Bucket) -> C.ShardBounds:
        return C.shard_bounds(bucket.numel, self.shard_rank, self.shards)

    def _take_slices(self, params: list[nn.Parameter]) -> torch.Tensor:
        """This rank's slice of the padded flat fp32 copy of ``params`` (a bucket's)."""
        offsets = [0, *itertools.accumulate(p.numel() for p in params)]
        numel = -(-offsets[-1] // self.shards) * self.shards
        b = C.shard_bounds(numel, self.shard_rank, self.shards)
        out = torch.zeros(b.size, dtype=torch.float32, device=self.device)
        for p, off in zip(params, offsets):
            lo, hi = max(b.start, off), min(b.stop, off + p.numel())
            if lo < hi:
                out[lo - b.start:hi - b.start] = p.detach().reshape(-1)[lo - off:hi - off]
        return out

    @torch.no_grad()
    def _flatten_params(self, params: list[nn.Parameter]) -> torch.Tensor:
        """One flat fp32 buffer for a bucket's parameters (its layout: ``Bucket``'s offsets,
        zero-padded to a multiple of the shards); every parameter becomes a view into it
        (``p.data = ...``: the same Parameter object, so ties, hooks and python attributes such
        as ``tp_dim`` are kept)."""
        offsets = [0, *itertools.accumulate(p.numel() for p in params)]
        numel = -(-offsets[-1] // self.shards) * self.shards
        flat = torch.zeros(numel, dtype=torch.float32, device=self.device)
        for p, off in zip(params, offsets):
            flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + p.numel()].view_as(p)
        return flat

    def _build_optimizer(self, cfg: TrainConfig) -> ShardedOptimizer:
        """ShardedAdamW (zero/offload.py) over the fp32 master slices: one flat group per
        bucket, decay or not as build_adamw decides; it allocates its state up front."""
        return ShardedOptimizer(self.masters, self.decay, cfg, self.config, self.rank)

    # ------------------------------------------------------------ backward
    def no_sync(self) -> contextlib.AbstractContextManager:
        """Stage 2 reduces every micro-batch (see module doc); stages 0/1 as DataParallel."""
        return contextlib.nullcontext() if self.stage == 2 else super().no_sync()

    def _launch(self, bucket: Bucket) -> None:
        if self.stage < 2:
            return super()._launch(bucket)          # all-reduce (SUM), as DataParallel
        bucket.allocate()                           # a bucket of unused params: zeros
        if self.world_size > 1:             # summed into this rank's gradient shard
            bucket.work = self._reduce_scatter_into(bucket.buffer,
                                                    self.grad_shards[bucket.index])
        self._launched += 1
        self._inflight.append(bucket)
        while len(self._inflight) > self.config.max_inflight_buckets:
            self._retire(self._inflight.popleft())

    def _retire(self, bucket: Bucket) -> None:
        """Stage 2: add this rank's reduced slice to its shard, free the full bucket."""
        if bucket.work is not None:
            bucket.work.wait()
        else:                                       # one rank: the bucket is the sum
            self.grad_shards[bucket.index].add_(bucket.buffer)
        for p in bucket.params:
            p.grad = None
        bucket.buffer, bucket.work = None, None

    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        self._wait_params()
        if self.scaler is not None:
            weight = ScaledWeight(weight, float(self.scaler.scale(torch.ones(()))))
        if self.stage < 2:
            return super().forward_backward(batch, weight)
        result = weighted_forward_backward(self.model, batch, self.device, weight)
        self._finish_backward()
        while self._inflight:
            self._retire(self._inflight.popleft())
        self._reset()
        return result

    def forward(self, batch: dict[str, Any]) -> Any:
        self._wait_params()
        return super().forward(batch)

    # ------------------------------------------------------------ step
    def _grad_slices(self) -> list[torch.Tensor]:
        """This rank's fp32 gradient slice of every bucket (a view where no cast is needed)."""
        if self.stage == 2:
            return [g.float() for g in self.grad_shards]
        self._wait_all()
        out = []
        for b in self.buckets:
            s = self._bounds(b)
            out.append(b.buffer[s.start:s.stop].float())
        return out

    @torch.no_grad()
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        grads = self._grad_slices()
        norm, skip = step_master_shards(grads, self.masters, self.optimizer, self.scaler,
                                        max_norm, *self._norm_reduction(),
                                        stats=self._take_stats())
        self._stats_reduced()
        for g in self.grad_shards:
            g.zero_()
        self._reset()                   # stage 0/1: zero the buffers, grads stay views
        if not skip:
            self._gather_params()
        return norm

    def _norm_reduction(self) -> tuple[Any, bool, Callable | None]:
        """(group, distributed, local_square) of the global grad norm: the shards of this
        rank's data-parallel group; a composite strategy widens it (parallel/mesh.py)."""
        return self.group, self.shards > 1, None

    def _gather_params(self) -> None:
        """Start the all-gather of every bucket's updated slices (param_dtype), in order.
        Aliased fp32 masters: the step already updated this rank's slice of the parameters;
        with one shard (stage 0) there is nothing to gather, otherwise the other ranks'
        slices arrive in a full temporary buffer copied over the flat parameters."""
        if self.aliased:
            if self.shards > 1:
                for b, m in zip(self.buckets, self.masters):
                    self._gathers.append((b, self._all_gather(m.detach(), b.numel)))
            return
        for b, m in zip(self.buckets, self.masters):
            shard = m.detach().to(self.device, self.dtype)
            work = self._all_gather(shard, b.numel) if self.shards > 1 else None
            self._gathers.append((b, work if work is not None else shard))

    @torch.no_grad()
    def _wait_params(self) -> None:
        for b, pending in self._gathers:
            full = pending if torch.is_tensor(pending) else pending.wait()
            if self.aliased:            # own slice copied onto itself: same values
                self.flat_params[b.index].copy_(full)
                continue
            for p, off in zip(b.params, b.offsets):
                p.copy_(full[off:off + p.numel()].view_as(p))
        self._gathers = []

    def flush(self) -> None:
        self._wait_params()

    # ------------------------------------------------------------ state
    def _gather_full(self, shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every bucket's full flat tensor from this rank's slices (fp32)."""
        out = []
        for b, s in zip(self.buckets, shards):
            s = s.detach().to(self.device, torch.float32)
            out.append(C.all_gather(s, numel=b.numel, group=self.group)
                       if self.shards > 1 else s)
        return [t.cpu() for t in out]

    def _moments(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        inner = self.optimizer.inner
        return inner.exp_avg, inner.exp_avg_sq, torch.tensor(float(inner.step_count))

    def _template_params(self) -> list[nn.Parameter]:
        return [p for g in self._template.param_groups for p in g["params"]]

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's shard only (no collective): see actors/train/sharded_state.py."""
        self._wait_params()
        exp_avg, exp_avg_sq, _ = self._moments()
        opt_index = {id(p): i for i, p in enumerate(self._template_params())}
        units = []
        for b, w, m, v in zip(self.buckets, self.masters, exp_avg, exp_avg_sq):
            s = self._bounds(b)
            units.append(unit_entry(b.numel, s.start, s.stop, w, m, v,
                                    param_layout(b.params, b.offsets, self._names, opt_index)))
        sharded = {"format": SHARDED_FORMAT, "stage": self.stage, "world_size": self.world_size,
                   "shard_rank": self.shard_rank, "shards": self.shards, "units": units,
                   "step": int(self.optimizer.inner.step_count),
                   "optim_template": optimizer_template(self._template, self.optimizer),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        sharded_names = {n for p in self.params for n in self._names[id(p)]}
        return {"model": non_sharded_model(self.module, sharded_names), "sharded": sharded}

    def state_dict(self) -> dict[str, Any]:
        """SingleProcess's format, consolidated from the shards: a collective (all ranks).
        With ``sharded_checkpoint``: this rank's shard only (``sharded_state_dict``)."""
        if self.sharded_checkpoint:
            return self.sharded_state_dict()
        self._wait_params()
        exp_avg, exp_avg_sq, step = self._moments()
        full = {"w": self._gather_full(self.masters), "m": self._gather_full(exp_avg),
                "v": self._gather_full(exp_avg_sq)}
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for i, b in enumerate(self.buckets):
            for p, off in zip(b.params, b.offsets):
                per_param[id(p)] = {k: full[k][i][off:off + p.numel()].view(p.shape).clone()
                                    for k in full}
        model = {}
        for k, v in self.module.state_dict().items():
            model[k] = v.float() if v.is_floating_point() else v
        for p in self.params:
            for name in self._names[id(p)]:
                model[name] = per_param[id(p)]["w"]
        return {"model": model, "optimizer": consolidated_optimizer(
            self._template, self.optimizer, self._template_params(), per_param, step)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a consolidated (SingleProcess-format) state and keep this rank's slices."""
        self._wait_params()
        model = state["model"]
        self.module.load_state_dict(model)          # params (cast to param_dtype), buffers
        pstate = param_states(state.get("optimizer"), self._template_params())
        step = None
        moments: dict[str, list[torch.Tensor]] = {"exp_avg": [], "exp_avg_sq": []}
        for b, master in zip(self.buckets, self.masters):
            s = self._bounds(b)
            m = torch.zeros_like(master)
            v = torch.zeros_like(master)
            for j, a, e, lo, hi in bucket_pieces(b, s.start, s.stop):
                p = b.params[j]
                master[lo:hi] = model[self._names[id(p)][0]].reshape(-1)[a:e].to(master)
                ps = pstate.get(id(p), {})
                if "exp_avg" in ps:
                    m[lo:hi] = ps["exp_avg"].reshape(-1)[a:e].to(m)
                    v[lo:hi] = ps["exp_avg_sq"].reshape(-1)[a:e].to(v)
                    step = ps["step"]
            moments["exp_avg"].append(m)
            moments["exp_avg_sq"].append(v)
        step = torch.as_tensor(step if step is not None else 0.0, dtype=torch.float32)
        inner = self.optimizer.inner
        inner.load_state_dict({"step": int(step), "weight_decay": inner.weight_decays,
                               "numel": [m.numel() for m in self.masters],
                               "master": [m.detach() for m in self.masters], **moments})
        load_lr_and_scaler(self.optimizer, self.scaler, state)

    # ------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        """Model-state bytes this rank holds, by kind and by location (see module doc)."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        # aliased: the flat parameter buffers (padding included) — the masters live in them
        param = nbytes(self.flat_params) if self.aliased else nbytes(self.params)
        grad = (nbytes(self.grad_shards) if self.stage == 2
                else sum(b.numel * self.dtype.itemsize for b in self.buckets))
        inner = self.optimizer.inner.memory_report()      # fp32 masters + moments
        optim = {k: int(inner.get(k, 0)) for k in ("device", "host", "disk")}
        if self.aliased:                # the masters are counted once, as parameters
            optim["device"] -= nbytes(self.masters)
        by_location = {"param": {"device": param, "host": 0, "disk": 0},
                       "grad": {"device": grad, "host": 0, "disk": 0},
                       "optimizer": optim}
        return memory_totals(param, grad, optim, by_location,
                             frozen_param_bytes=nbytes(self.frozen),
                             trainable_params=sum(p.numel() for p in self.params),
                             num_buckets=len(self.buckets), stage=self.stage,
                             shards=self.shards, master_aliased=self.aliased,
                             comm_buffer_bytes=self._comm_buffer_bytes())
