"""ZeRO stage 3: parameters, gradients and optimizer state all sharded (P_os+g+p).

Rajbhandari et al. 2020, §5.3; units and flat parameters as in PyTorch FSDP (Zhao et al.
2023). Per rank 16Ψ/N of model state plus the transient full parameters of the units gathered
at a time; the design is in docs/zero.md.

* **Units**: every module of the model's ``block_lists`` is one unit; every other
  parameter (and a tied one) belongs to the root unit. A unit's trainable parameters live in
  one flat buffer padded to a multiple of N; rank r keeps slice r (``param_dtype``; on the
  host with ``offload_params``) and its fp32 master. Frozen ones (``shard_frozen``) live in a
  second such buffer with no gradient, master or optimizer state (DeepSpeed partitions every
  parameter). Full buffers exist only while the unit is gathered; parameters view them.
* **Forward**: a pre-hook gathers the unit and prefetches the next; a post-hook frees it
  (level 3) or keeps it until its gradients are reduced (level 2, ``block_levels``).
* **Backward**: the unit is re-gathered (level 3) when the first gradient reaches its outputs;
  once all its gradients exist they are reduce-scattered (SUM, async, ``max_inflight`` at a
  time) into the gradient shard, in a fixed order on every rank (last block first, root last).
  A unit with frozen parameters is freed only once backward has passed its inputs.
* **Step**: as stages 1/2 (sharded_optimizer.py); the ``param_dtype`` slices are refreshed
  from the masters and the next forward gathers them.

Observability: ``memory_report()`` adds ``unit_bytes``, ``unit_levels``,
``peak_gathered_bytes`` and the frozen base's ``frozen_bytes``; ``strategy.trace = []``
records ``(event, unit index)``.
Config: ``strategy: {kind: zero, stage: 3, ...}`` (routed to ``kind: zero3``:
:class:`Zero3Config`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from bmray.models.structure import find_blocks
from bmray.models.typed_config import ConfigError, check_choice, check_positive

from bmray.actors.comm import collectives as C
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
from bmray.actors.train.sharded_state import (SHARDED_FORMAT, frozen_entry, frozen_layout,
                                              param_layout, unit_entry)


@dataclass
class Zero3Config(ZeroSharedConfig):
    """Knobs of :class:`Zero3` (``strategy: {kind: zero, stage: 3, ...}``); param_dtype,
    offload_optimizer, disk_dir, broadcast_init and transport: :class:`ZeroSharedConfig`."""

    stage: int = 3
    offload_params: bool = False           # the rank's param shard lives in host memory
    block_lists: list[str] | None = None   # dotted paths of ModuleLists; None: model.block_lists
    prefetch: bool = True                  # all-gather the next unit while this one computes
    max_inflight: int = 2                  # reduce-scatters on the wire at once
    sharded_checkpoint: bool = False       # each rank writes only its shard (sharded_state.py)
    block_levels: dict[str, int] | None = None   # unit-name glob -> ZeRO level 2 | 3 (else 3)
    shard_frozen: bool = True              # frozen parameters sharded too (False: replicated)

    def __post_init__(self) -> None:
        check_choice("strategy.stage", self.stage, [3])
        self.check_shared()
        if self.block_levels is not None:
            if not isinstance(self.block_levels, dict):
                raise ConfigError(f"strategy.block_levels: expected a mapping of unit-name "
                                  f"patterns to levels 2 or 3, got {self.block_levels!r}")
            for pattern, level in self.block_levels.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ConfigError(f"strategy.block_levels: {pattern!r} is not a unit-name "
                                      f"pattern (e.g. 'blocks.0', 'blocks.*')")
                if isinstance(level, bool) or level not in (2, 3):
                    raise ConfigError(f"strategy.block_levels.{pattern}: {level!r} is not one "
                                      f"of [2, 3] (2: keep gathered until backward, "
                                      f"3: free after forward)")
        check_bool("strategy.sharded_checkpoint", self.sharded_checkpoint)
        check_bool("strategy.shard_frozen", self.shard_frozen)
        check_positive("strategy.max_inflight", self.max_inflight)


class _FrozenFlat:
    """A unit's frozen parameters as one flat ``param_dtype`` buffer padded to a multiple of
    N: this rank's slice persists, the full buffer only while the unit is gathered."""

    def __init__(self, params: list[nn.Parameter], world: int, rank: int) -> None:
        self.params = params
        self.offsets = [0, *itertools.accumulate(p.numel() for p in params)][:-1]
        self.numel = -(-sum(p.numel() for p in params) // world) * world
        self.bounds = C.shard_bounds(self.numel, rank, world)
        self.full: torch.Tensor | None = None
        self.shard: torch.Tensor | None = None

    def pieces(self):
        return zip(self.params, self.offsets)


class _AfterBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once the unit's own backward is done
    (all uses of its parameters computed): then its frozen parameters may be freed. FSDP2's
    ``RegisterPostBackwardFunction`` does the same."""

    @staticmethod
    def forward(ctx: Any, done: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.done = done
        return inputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.done()
        return (None, *grads)


class _Unit:
    """One flat parameter: its module, params (decay first), offsets, shard and full buffer;
    its frozen parameters, if any, in a second flat buffer (``frozen``)."""

    def __init__(self, index: int, name: str, module: nn.Module, params: list[nn.Parameter],
                 world: int, rank: int, frozen: list[nn.Parameter] = ()) -> None:
        self.index, self.name, self.module = index, name, module
        self.frozen = _FrozenFlat(list(frozen), world, rank) if frozen else None
        self.watched = False                       # _AfterBackward on this forward's inputs
        self.backward_done = False                 # ... and its backward has run
        self.level = 3                             # ZeRO level: 3 frees after forward, 2 keeps
        params = [p for p in params if takes_weight_decay(p)] + \
            [p for p in params if not takes_weight_decay(p)]
        self.params = params
        self.offsets = [0, *itertools.accumulate(p.numel() for p in params)][:-1]
        total = sum(p.numel() for p in params)
        self.decay_end = sum(p.numel() for p in params if takes_weight_decay(p))
        self.numel = -(-total // world) * world
        self.bounds = C.shard_bounds(self.numel, rank, world)
        self.full: torch.Tensor | None = None      # flat param_dtype buffer (storage on/off)
        self.shard: torch.Tensor | None = None     # this rank's slice, param_dtype
        self.grad_shard: torch.Tensor | None = None
        self.gathered = False
        self.pending: Any = None                   # in-flight all-gather
        self.backward_gathered = False
        self.missing = len(params)                 # gradients not yet complete this backward
        self.reduced = False
        self.pending_grad: Any = None              # in-flight reduce-scatter (or the flat grad)
        self.segments: list[tuple[int, int, bool]] = []   # (lo, hi) in the shard, decays
        b = self.bounds
        for lo, hi, d in ((0, self.decay_end, True), (self.decay_end, self.numel, False)):
            a, e = max(lo, b.start), min(hi, b.stop)
            if a < e:
                self.segments.append((a - b.start, e - b.start, d))

    @property
    def nbytes(self) -> int:
        return sum(full.numel() * full.element_size() for full, _ in self.flats())

    def flats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(full buffer, this rank's shard) of the trainable and the frozen flat (non-empty)."""
        out = [(self.full, self.shard)] if self.numel else []
        if self.frozen is not None:
            out.append((self.frozen.full, self.frozen.shard))
        return out

    def pieces(self):
        """(param, flat offset) of every parameter."""
        return zip(self.params, self.offsets)


class Zero3(GradNormStats, DataParallel):
    """ZeRO stage 3 over a plain ``nn.Module``; see the module docstring."""

    replicated = True
    collective_state_dict = True
    collective_forward = True           # every unit is all-gathered before it runs
    stage = 3

    def __init__(self, config: Zero3Config | None = None, *, group: Any = None,
                 **overrides: Any) -> None:
        if config is None:
            config = Zero3Config(**overrides)
        elif overrides:
            raise TypeError("Zero3: pass either a Zero3Config or keyword overrides")
        super().__init__(config, group=group)
        self.dtype = DTYPES[config.param_dtype]
        self.sharded_checkpoint = config.sharded_checkpoint
        self.replicated = not config.sharded_checkpoint   # sharded: every rank writes its file
        self.scaler = None
        self.trace: list[tuple[str, int]] | None = None   # set to [] to record events
        self.gathered_bytes = 0
        self.peak_gathered_bytes = 0
        self._inflight: list[_Unit] = []
        self._launched = 0

    # ------------------------------------------------------------ setup
    def _event(self, kind: str, unit: _Unit) -> None:
        if self.trace is not None:
            self.trace.append((kind, unit.index))

    def _block_modules(self) -> list[tuple[str, nn.Module]]:
        paths = self.config.block_lists
        if paths is None:
            paths = list(getattr(self.module, "block_lists", ()) or ())
        if not paths:
            return []
        try:
            return find_blocks(self.module, paths)
        except ValueError as exc:       # "'<path>' is not a submodule of <Model>"
            raise ConfigError(f"strategy.block_lists: {exc}") from exc

    def _assign_levels(self, blocks: list[_Unit]) -> None:
        """``block_levels`` patterns, in order, onto the block units (see module docstring)."""
        for pattern, level in (self.config.block_levels or {}).items():
            hit = [u for u in blocks if fnmatch.fnmatchcase(u.name, pattern)]
            if not hit:
                names = ", ".join(u.name for u in blocks) or "none"
                raise ConfigError(f"strategy.block_levels: {pattern!r} matches no unit; the "
                                  f"units are {names} (blocks without parameters to shard "
                                  f"have none; the root is always held)")
            for u in hit:
                u.level = level

    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._place(model, cfg)
        module = self.module
        self.params = [p for p in module.parameters() if p.requires_grad]
        trainable = {id(p) for p in self.params}
        self.frozen = [p for p in module.parameters() if id(p) not in trainable]
        self._names: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        self._template = build_adamw(module, cfg, self.params)
        # unit of every parameter it shards: the one block whose names hold all its uses
        blocks = self._block_modules()
        shard_frozen = self.config.shard_frozen
        owner: dict[int, int] = {}
        for id_, names in self._names.items():
            if id_ not in trainable and not shard_frozen:
                continue
            homes = {next((b for b, (bn, _) in enumerate(blocks)
                           if n.startswith(bn + ".")), -1) for n in names}
            owner[id_] = homes.pop() if len(homes) == 1 else -1
        masters_full = {id(p): p.detach().float().reshape(-1).clone() for p in self.params}
        module.to(self.dtype)                   # in place: identities and ties kept
        units: list[_Unit] = []
        sharded_frozen = self.frozen if shard_frozen else []
        for b, (bname, bmod) in enumerate(blocks):
            ps = [p for p in self.params if owner[id(p)] == b]
            fs = [p for p in sharded_frozen if owner[id(p)] == b]
            if ps or fs:
                units.append(_Unit(len(units), bname, bmod, ps, self.world_size, self.rank, fs))
        root_ps = [p for p in self.params if owner[id(p)] == -1]
        root_fs = [p for p in sharded_frozen if owner[id(p)] == -1]
        self.blocks = units
        self.root = (_Unit(len(units), "<root>", module, root_ps, self.world_size, self.rank,
                           root_fs) if root_ps or root_fs else None)
        self._assign_levels(units)
        if self.root is not None:
            self.root.level = 2                 # gathered for the whole forward + backward
        self.units = units + ([self.root] if self.root is not None else [])
        shard_device = "cpu" if self.config.offload_params else self.device
        pin = self.config.offload_params and self.device.type == "cuda"
        on_host = self.config.offload_optimizer != "none"
        # fp32 shard and master in the same memory: the master *is* the shard (stage12.py's
        # "aliased fp32 masters"; DeepSpeed 0.19 keeps a second fp32 partition here)
        self.aliased = self.dtype == torch.float32 and not on_host and \
            not self.config.offload_params
        self.masters, self.decay, self._seg = [], [], []
        for u in self.units:
            flat = torch.zeros(u.numel, dtype=torch.float32, device=self.device)
            for p, off in u.pieces():
                flat[off:off + p.numel()] = masters_full[id(p)]
            s = u.bounds
            master = flat[s.start:s.stop]
            u.shard = master.to(shard_device, self.dtype, copy=True)
            if pin:
                u.shard = u.shard.pin_memory()
            u.grad_shard = torch.zeros(s.size, dtype=self.dtype, device=self.device)
            u.full = torch.empty(u.numel, dtype=self.dtype, device=self.device)
            for p, off in u.pieces():
                p.data = u.full[off:off + p.numel()].view_as(p)
            if u.frozen is not None:
                self._shard_frozen(u.frozen, shard_device, pin)
            self._free(u)
            for lo, hi, d in u.segments:
                self.masters.append(nn.Parameter(u.shard[lo:hi]) if self.aliased else
                                    nn.Parameter(master[lo:hi].to(
                                        "cpu" if on_host else self.device, copy=True)))
                self.decay.append(d)
                self._seg.append((u, lo, hi))
        self._unit_of = {id(p): u for u in self.units for p in u.params}
        self.replicated_frozen = [p for p in self.frozen if not shard_frozen]
        self.optimizer = ShardedOptimizer(self.masters, self.decay, self.cfg, self.config,
                                          self.rank)
        if self.dtype == torch.float16:
            self.scaler = DynamicLossScaler(self.cfg.loss_scale, group=self.group)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                       for p in self.params]
        for u in self.blocks:
            u.module.register_forward_pre_hook(self._make_pre_forward(u), with_kwargs=True)
            u.module.register_forward_hook(self._make_post_forward(u))
        module.register_forward_pre_hook(self._root_pre_forward)
        module.register_forward_hook(self._root_post_forward)
        # shared memory for the units' gathers and reduce-scatters, if it can (data_parallel.py)
        self._open_transport(
            capacity_bytes=max((u.nbytes for u in self.units), default=1 << 20))

    def _shard_frozen(self, f: _FrozenFlat, shard_device: Any, pin: bool) -> None:
        """Move ``f``'s parameters into its flat buffer; keep this rank's slice."""
        flat = torch.zeros(f.numel, dtype=self.dtype, device=self.device)
        for p, off in f.pieces():
            flat[off:off + p.numel()] = p.detach().reshape(-1)
        f.shard = flat[f.bounds.start:f.bounds.stop].to(shard_device, copy=True)
        if pin:
            f.shard = f.shard.pin_memory()
        f.full = torch.empty(f.numel, dtype=self.dtype, device=self.device)
        for p, off in f.pieces():
            p.data = f.full[off:off + p.numel()].view_as(p)

    # ------------------------------------------------------------ gather / free
    def _alloc(self, u: _Unit) -> None:
        for full, _ in u.flats():
            storage = full.untyped_storage()
            nbytes = full.numel() * full.element_size()
            if storage.nbytes() == 0 and nbytes:
                storage.resize_(nbytes)
                self.gathered_bytes += nbytes
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)

    def _free(self, u: _Unit) -> None:
        for full, _ in u.flats():
            storage = full.untyped_storage()
            if storage.nbytes():
                if self.gathered_bytes:
                    self.gathered_bytes -= storage.nbytes()
                storage.resize_(0)
        u.gathered = False
        self._event("free", u)

    def _start_gather(self, u: _Unit) -> None:
        """Launch ``u``'s all-gather (no-op if gathered or on its way)."""
        if u.gathered or u.pending is not None:
            return
        self._alloc(u)
        self._event("gather", u)
        u.pending = []
        for full, shard in u.flats():
            shard = shard.to(self.device, non_blocking=True)
            out = full.detach()
            if self.world_size == 1:
                out.copy_(shard)
            else:           # straight into the buffer
                u.pending.append(self._all_gather(shard, out.numel(), out=out))

    def _wait_gather(self, u: _Unit) -> None:
        if u.gathered:
            return
        self._start_gather(u)
        for handle in u.pending:
            handle.wait()
        u.pending = None
        u.gathered = True
        self._event("ready", u)

    def _next(self, u: _Unit, step: int) -> _Unit | None:
        j = u.index + step
        return self.blocks[j] if 0 <= j < len(self.blocks) else None

    # ------------------------------------------------------------ hooks
    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if self.root is not None:
            self._start_gather(self.root)
        if self.config.prefetch and self.blocks:
            self._start_gather(self.blocks[0])
        if self.root is not None:
            self._wait_gather(self.root)

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            self._drain_gathers()
            if self.root is not None:
                self._free(self.root)

    def _make_pre_forward(self, u: _Unit):
        def hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            self._wait_gather(u)
            nxt = self._next(u, 1)
            recompute = torch._C._current_graph_task_id() != -1     # checkpointed block
            if self.config.prefetch and nxt is not None and not recompute:
                self._start_gather(nxt)
            if u.frozen is not None and torch.is_grad_enabled() and not recompute:
                return self._watch_backward(u, args, kwargs)
            return None
        return hook

    def _watch_backward(self, u: _Unit, args: Any, kwargs: Any) -> Any:
        """Route ``u``'s inputs that need a gradient through :class:`_AfterBackward`, so that
        ``u`` (whose frozen parameters backward still needs after its gradients are ready) is
        freed when backward has passed it. Inputs without gradients: freed at the end."""
        flat, spec = tree_flatten((args, kwargs))
        at = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.requires_grad]
        u.watched = bool(at)
        if not at:
            return None
        outs = _AfterBackward.apply(lambda: self._backward_done(u), *(flat[i] for i in at))
        for i, t in zip(at, outs):
            flat[i] = t
        return tree_unflatten(flat, spec)

    def _backward_done(self, u: _Unit) -> None:
        u.backward_done = True
        self._release(u)

    def _release(self, u: _Unit) -> None:
        """Free a block unit in backward once its gradients are reduced and, if it has frozen
        parameters, backward has passed its inputs (the root is freed at the end)."""
        if u is self.root or not u.reduced:
            return
        if u.frozen is not None and not u.backward_done:
            return
        self._free(u)

    def _make_post_forward(self, u: _Unit):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            self._event("forward_end", u)
            if torch._C._current_graph_task_id() != -1:
                return None                 # recomputation inside backward: keep gathered
            if not torch.is_grad_enabled():
                self._free(u)               # no backward follows: both levels free
                return None
            if u.level == 3:
                self._free(u)               # level 2 stays gathered until _reduce frees it
            u.backward_gathered = False
            tensors = [t for t in tree_flatten(output)[0]
                       if torch.is_tensor(t) and t.requires_grad]
            for t in tensors:
                t.register_hook(self._make_pre_backward(u))
            return None
        return hook

    def _make_pre_backward(self, u: _Unit):
        def hook(grad: torch.Tensor) -> None:
            if u.backward_gathered:
                return None
            u.backward_gathered = True
            self._event("backward", u)
            self._wait_gather(u)
            prev = self._next(u, -1)
            if self.config.prefetch and prev is not None and not self._released(prev):
                self._start_gather(prev)
            return None
        return hook

    @staticmethod
    def _released(u: _Unit) -> bool:
        return u.reduced and (u.frozen is None or u.backward_done or not u.watched)

    def _grad_ready(self, p: torch.Tensor) -> None:
        u = self._unit_of[id(p)]
        u.missing -= 1
        if u.missing == 0:
            self._launch_ready()

    def _order(self) -> list[_Unit]:
        """The fixed reduce order on every rank: last block first, root last."""
        return [*reversed(self.blocks), *([self.root] if self.root is not None else [])]

    def _launch_ready(self, force: bool = False) -> None:
        order = self._order()
        while self._launched < len(order) and (force or order[self._launched].missing <= 0):
            self._reduce(order[self._launched])
            self._launched += 1

    @torch.no_grad()
    def _reduce(self, u: _Unit) -> None:
        """Flatten ``u``'s gradients, reduce-scatter them (async), free the unit."""
        if not u.params:                    # frozen only: nothing to reduce
            u.reduced = True
            self._release(u)
            return
        flat = torch.zeros(u.numel, dtype=self.dtype, device=self.device)
        for p, off in u.pieces():
            if p.grad is not None:
                flat[off:off + p.numel()] = p.grad.reshape(-1)
            p.grad = None
        u.reduced = True
        self._event("reduce", u)
        u.pending_grad = (self._reduce_scatter_into(flat, u.grad_shard)
                          if self.world_size > 1 else flat)
        self._release(u)
        self._inflight.append(u)
        while len(self._inflight) > self.config.max_inflight:
            self._retire(self._inflight.pop(0))

    def _retire(self, u: _Unit) -> None:
        pending = u.pending_grad
        if torch.is_tensor(pending):        # one rank: the flat gradient is the sum
            u.grad_shard.add_(pending)
        else:
            pending.wait()                  # added to the shard
        u.pending_grad = None

    def _drain_gathers(self) -> None:
        """Wait for prefetches nobody consumed and free them (collectives stay matched)."""
        for u in self.blocks:
            if u.pending is not None:
                self._wait_gather(u)
            if u.gathered:
                self._free(u)

    def _end_backward(self) -> None:
        self._launch_ready(force=True)      # units without gradients: zeros, in order
        while self._inflight:
            self._retire(self._inflight.pop(0))
        self._drain_gathers()
        if self.root is not None:
            self._free(self.root)
        for u in self.units:
            u.missing, u.reduced, u.backward_gathered = len(u.params), False, False
            u.watched = u.backward_done = False
        self._launched = 0

    # ------------------------------------------------------------ loop API
    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()     # every micro-batch is reduce-scattered (as stage 2)

    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        if self.scaler is not None:
            weight = ScaledWeight(weight, float(self.scaler.scale(torch.ones(()))))
        result = weighted_forward_backward(self.model, batch, self.device, weight)
        self._end_backward()
        return result

    @torch.no_grad()
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        grads = [u.grad_shard[lo:hi].float() for u, lo, hi in self._seg]
        norm, skip = step_master_shards(grads, self.masters, self.optimizer, self.scaler,
                                        max_norm, *self._norm_reduction(),
                                        stats=self._take_stats())
        self._stats_reduced()
        if not skip:
            self._refresh_shards()
        for u in self.units:
            u.grad_shard.zero_()
        return norm

    def _refresh_shards(self) -> None:
        if self.aliased:                # the step updated the shard itself
            return
        for m, (u, lo, hi) in zip(self.masters, self._seg):
            u.shard[lo:hi].copy_(m.detach())

    def flush(self) -> None:
        self._drain_gathers()

    # ------------------------------------------------------------ state
    def _template_params(self) -> list[nn.Parameter]:
        return [p for g in self._template.param_groups for p in g["params"]]

    def _full_fp32(self, u: _Unit, per_segment: list[torch.Tensor]) -> torch.Tensor:
        shard = torch.zeros(u.bounds.size, dtype=torch.float32, device=self.device)
        for t, (v, lo, hi) in zip(per_segment, self._seg):
            if v is u:
                shard[lo:hi] = t.detach().to(self.device, torch.float32)
        full = C.all_gather(shard, numel=u.numel, group=self.group) \
            if self.world_size > 1 else shard
        return full.cpu()

    def _frozen_names(self) -> set[str]:
        """Every name of a sharded frozen parameter."""
        return {n for u in self.units if u.frozen is not None
                for p in u.frozen.params for n in self._names[id(p)]}

    def _frozen_values(self) -> dict[str, torch.Tensor]:
        """The sharded frozen parameters in full, fp32 on the CPU (a collective)."""
        out = {}
        for u in self.units:
            f = u.frozen
            if f is None:
                continue
            shard = f.shard.to(self.device, torch.float32)
            full = C.all_gather(shard, numel=f.numel, group=self.group) \
                if self.world_size > 1 else shard
            full = full.cpu()
            for p, off in f.pieces():
                value = full[off:off + p.numel()].view(p.shape).clone()
                for n in self._names[id(p)]:
                    out[n] = value
        return out

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's shard only (no collective): see actors/train/sharded_state.py."""
        self._drain_gathers()
        inner = self.optimizer.inner
        opt_index = {id(p): i for i, p in enumerate(self._template_params())}
        per_seg = {"w": [m.detach() for m in self.masters], "m": inner.exp_avg,
                   "v": inner.exp_avg_sq}
        units = []
        for u in self.units:
            shard = {}
            for k, ts in per_seg.items():
                t = torch.zeros(u.bounds.size, dtype=torch.float32)
                for x, (v, lo, hi) in zip(ts, self._seg):
                    if v is u:
                        t[lo:hi] = x.detach().to("cpu", torch.float32)
                shard[k] = t
            layout = param_layout(u.params, u.offsets, self._names, opt_index)
            units.append(unit_entry(u.numel, u.bounds.start, u.bounds.stop, shard["w"],
                                    shard["m"], shard["v"], layout))
        frozen = [frozen_entry(f.numel, f.bounds.start, f.bounds.stop, f.shard,
                               frozen_layout(f.params, f.offsets, self._names))
                  for f in (u.frozen for u in self.units) if f is not None]
        sharded_names = {n for p in self.params for n in self._names[id(p)]}
        model = non_sharded_model(self.module, sharded_names | self._frozen_names())
        sharded = {"format": SHARDED_FORMAT, "stage": 3, "world_size": self.world_size,
                   "shard_rank": self.rank, "shards": self.world_size, "units": units,
                   "frozen_units": frozen,
                   "step": int(inner.step_count),
                   "optim_template": optimizer_template(self._template, self.optimizer),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        return {"model": model, "sharded": sharded}

    def state_dict(self) -> dict[str, Any]:
        """SingleProcess's format, consolidated from the shards: a collective (all ranks).
        With ``sharded_checkpoint``: this rank's shard only (``sharded_state_dict``)."""
        if self.sharded_checkpoint:
            return self.sharded_state_dict()
        self._drain_gathers()
        inner = self.optimizer.inner
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for u in self.units:
            full = {"w": self._full_fp32(u, [m.detach() for m in self.masters]),
                    "m": self._full_fp32(u, inner.exp_avg),
                    "v": self._full_fp32(u, inner.exp_avg_sq)}
            for p, off in u.pieces():
                per_param[id(p)] = {k: t[off:off + p.numel()].view(p.shape).clone()
                                    for k, t in full.items()}
        sharded = {n: id(p) for p in self.params for n in self._names[id(p)]}
        frozen = self._frozen_values()
        model = {}
        for k, v in self.module.state_dict(keep_vars=True).items():
            if k in sharded:
                model[k] = per_param[sharded[k]]["w"]
            elif k in frozen:
                model[k] = frozen[k]
            else:
                v = v.detach()
                model[k] = v.float().clone() if v.is_floating_point() else v.clone()
        step = torch.tensor(float(inner.step_count))
        return {"model": model, "optimizer": consolidated_optimizer(
            self._template, self.optimizer, self._template_params(), per_param, step)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a consolidated (SingleProcess-format) state; keep this rank's slices."""
        self._drain_gathers()
        model = state["model"]
        sharded = {n for p in self.params for n in self._names[id(p)]} | self._frozen_names()
        rest = {k: v for k, v in model.items() if k not in sharded}
        missing, unexpected = self.module.load_state_dict(rest, strict=False)
        missing = set(missing) - sharded | {n for n in sharded if n not in model}
        if unexpected or missing:
            raise KeyError(f"Zero3.load_state_dict: unexpected {unexpected}, "
                           f"missing {sorted(missing)}")
        pstate = param_states(state.get("optimizer"), self._template_params())
        step = None
        flats = {}
        for u in self.units:
            w, m, v = (torch.zeros(u.numel) for _ in range(3))
            for p, off in u.pieces():
                n = p.numel()
                w[off:off + n] = model[self._names[id(p)][0]].reshape(-1).float()
                ps = pstate.get(id(p), {})
                if "exp_avg" in ps:
                    m[off:off + n] = ps["exp_avg"].reshape(-1).float()
                    v[off:off + n] = ps["exp_avg_sq"].reshape(-1).float()
                    step = ps["step"]
            s = u.bounds
            flats[u.index] = [t[s.start:s.stop] for t in (w, m, v)]
        seg = lambda k: [flats[u.index][k][lo:hi].clone() for u, lo, hi in self._seg]  # noqa
        inner = self.optimizer.inner
        step = int(torch.as_tensor(step if step is not None else 0.0))
        inner.load_state_dict({"step": step, "weight_decay": inner.weight_decays,
                               "numel": [m.numel() for m in self.masters],
                               "master": seg(0), "exp_avg": seg(1), "exp_avg_sq": seg(2)})
        for m, t in zip(self.masters, seg(0)):
            m.data.copy_(t)
        self._refresh_shards()
        for u in self.units:
            f = u.frozen
            if f is not None:
                full = torch.zeros(f.numel)
                for p, off in f.pieces():
                    full[off:off + p.numel()] = model[self._names[id(p)][0]].reshape(-1).float()
                f.shard.copy_(full[f.bounds.start:f.bounds.stop])
        load_lr_and_scaler(self.optimizer, self.scaler, state)

    # ------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        """Persistent model-state bytes of this rank, by kind and location (stage12.py's keys),
        plus ``peak_gathered_bytes`` (transient full parameters; not in the totals) and the
        frozen base: ``frozen_param_bytes`` (all of it), ``frozen_bytes`` (what this rank
        keeps: its shards, or every frozen parameter without ``shard_frozen``; not in the
        totals, as stages 0-2 count no frozen bytes either), ``frozen_by_location`` and
        ``frozen_saved_bytes`` (the difference)."""
        param = sum(u.shard.numel() * u.shard.element_size() for u in self.units)
        grad = sum(u.grad_shard.numel() * u.grad_shard.element_size() for u in self.units)
        inner = self.optimizer.inner.memory_report()
        optim = {k: int(inner.get(k, 0)) for k in ("device", "host", "disk")}
        if self.aliased:                # the masters are the shards, counted as parameters
            optim["device"] -= sum(m.numel() * m.element_size() for m in self.masters)
        param_at = "host" if self.config.offload_params else "device"
        by_location = {"param": {"device": 0, "host": 0, "disk": 0},
                       "grad": {"device": grad, "host": 0, "disk": 0},
                       "optimizer": optim}
        by_location["param"][param_at] = param
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        frozen_all = sum(nbytes(p) for p in self.frozen)
        frozen_by_location = {"device": sum(nbytes(p) for p in self.replicated_frozen),
                              "host": 0, "disk": 0}
        frozen_by_location[param_at] += sum(nbytes(u.frozen.shard) for u in self.units
                                            if u.frozen is not None)
        frozen = sum(frozen_by_location.values())
        return memory_totals(
            param, grad, optim, by_location,
            frozen_param_bytes=frozen_all, frozen_bytes=frozen,
            frozen_saved_bytes=frozen_all - frozen, frozen_by_location=frozen_by_location,
            trainable_params=sum(p.numel() for p in self.params),
            num_units=len(self.units), stage=3, shards=self.world_size,
            master_aliased=self.aliased,
            unit_bytes=[u.nbytes for u in self.units],
            unit_levels=[u.level for u in self.units],
            peak_gathered_bytes=self.peak_gathered_bytes,
            comm_buffer_bytes=self._comm_buffer_bytes())
