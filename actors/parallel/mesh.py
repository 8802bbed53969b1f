"""dp × tp × pp on one gang: tensor parallelism inside a node, pipeline stages across nodes,
ZeRO on the data-parallel replicas — composed, not a fourth copy of the training step.

    strategy: {kind: mesh, tp: 2, pp: 2, schedule: 1f1b, zero_stage: 1}   # dp = workers / 4

Ranks are row-major over ``(dp, pp, tp)`` (:class:`~bmray.actors.parallel.dims.ParallelDims`):
TP peers are neighbours, dp replicas outermost. One rank, outermost last:

1. the full model is built and its layout (state-dict keys, ties, AdamW order) remembered;
2. ``tp > 1``: ``make_tensor_parallel`` keeps this rank's slices (a DeltaModel's LoRA follows);
3. ``pp > 1``: ``split_stage`` keeps this rank's layers; a ``PipelineEngine`` runs GPipe/1F1B;
4. what is left is an ordinary module for :class:`Zero` (stage 0, 1, or 2 with pp == 1) on
   the dp group.

The composition: data sliced by the dp coordinate; losses broadcast from the last stage;
the gradient norm counts each element once (weights 1/tp for TP-replicated parameters, 0 for
the last stage's tied copy, 1/dp under ZeRO-0) in one all-reduce over the world; an fp16
overflow anywhere skips the step everywhere; checkpoints are the single-process format, so
they move between meshes. Details: docs/mesh.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.dims import DIMS, ParallelDims
from bmray.models.outputs import ModelOutput
from bmray.models.typed_config import ConfigError, check_choice, check_positive

from bmray.actors.parallel.buckets import bucket_pieces
from bmray.actors.parallel.zero.config import ZeroSharedConfig, check_bool
from bmray.actors.parallel.zero.consolidated_state import with_current_lr
from bmray.actors.parallel.zero.loss_scaler import DynamicLossScaler, ScaledWeight
from bmray.actors.parallel.pipeline.engine import PipelineEngine
from bmray.actors.parallel.pipeline.stage import BALANCE, split_stage, tied_parameters
from bmray.actors.parallel.pipeline.schedule import SCHEDULES
from bmray.actors.parallel.strategy import MicroResult, build_adamw, move_batch
from bmray.actors.parallel.tensor import (TensorParallelLM, gather_tensor_parallel_state,
                                          shard_tensor_parallel_state, tensor_parallel_dims,
                                          tensor_parallel_loss)
from bmray.actors.parallel.tensor.delta import make_tensor_parallel
from bmray.actors.train.config import TrainConfig
from bmray.actors.parallel.zero.stage12 import Zero, ZeroConfig


@dataclass
class MeshParallelConfig(ZeroSharedConfig):
    """Knobs of :class:`MeshParallel` (``strategy: {kind: mesh, ...}``); dp = workers / (tp·pp).
    param_dtype (fp32 master weights either way), offload_optimizer, disk_dir, broadcast_init
    and transport (of the dp buckets): :class:`ZeroSharedConfig`."""

    tp: int = 1                        # tensor-parallel ranks (a node's GPUs)
    pp: int = 1                        # pipeline stages
    schedule: str = "1f1b"             # gpipe | 1f1b
    balance: str = "params"            # how layers are cut into stages: params | time
    sequence_parallel: bool = False    # LayerNorm / dropout on sequence shards (needs tp > 1)
    zero_stage: int = 1                # on the dp replicas: 0 | 1 | 2 (2 only with pp == 1)
    bucket_mb: float = 25.0

    def __post_init__(self) -> None:
        self.check_shared()
        for key in ("tp", "pp"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.{key}: must be an integer >= 1, got {value!r}")
        check_choice("strategy.schedule", self.schedule, list(SCHEDULES))
        check_choice("strategy.balance", self.balance, list(BALANCE))
        check_bool("strategy.sequence_parallel", self.sequence_parallel)
        check_choice("strategy.zero_stage", self.zero_stage, [0, 1, 2])
        check_positive("strategy.bucket_mb", self.bucket_mb)
        if self.zero_stage == 2 and self.pp > 1:
            raise ConfigError("strategy.zero_stage: 2 reduce-scatters every micro-batch's "
                              "gradients as its backward completes; with a pipeline (pp > 1) "
                              "use zero_stage 1 (or 0)")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("strategy.sequence_parallel: needs tp > 1")
        if self.sequence_parallel and self.zero_stage == 2:
            raise ConfigError("strategy.sequence_parallel: composes with zero_stage 0 or 1 "
                              "(its LayerNorm gradients are summed over the TP group after "
                              "the dp reduction, which ZeRO-2 shards)")

    def zero_config(self) -> ZeroConfig:
        return ZeroConfig(stage=self.zero_stage, bucket_mb=self.bucket_mb,
                          param_dtype=self.param_dtype, offload_optimizer=self.offload_optimizer,
                          disk_dir=self.disk_dir, broadcast_init=self.broadcast_init,
                          transport=self.transport)


@dataclass
class _FullLayout:
    """What a checkpoint of the full, plain model looks like: its state-dict keys (tied
    aliases included), the canonical name of every parameter name, and torch AdamW's parameter
    order and groups as ``build_adamw`` makes them — recorded before the model is cut."""

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]   # state-dict key -> full shape
    canonical: dict[str, str]            # any parameter name -> its first (canonical) name
    optim_names: list[str]               # AdamW's index -> canonical name
    optim_template: dict[str, Any]       # AdamW state dict without state

    @classmethod
    def of(cls, model: nn.Module, cfg: TrainConfig) -> "_FullLayout":
        canonical: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canonical[name] = first.setdefault(id(p), name)
        template = build_adamw(model, cfg)
        named = {id(p): n for n, p in model.named_parameters()}
        names = [named[id(p)] for g in template.param_groups for p in g["params"]]
        state = model.state_dict()
        return cls(list(state), {k: tuple(v.shape) for k, v in state.items()}, canonical, names,
                   template.state_dict())


class MeshParallel(Zero):
    """dp × tp × pp over the gang's world; see the module docstring."""

    replicated = True                   # state_dict() is the full single-process state
    collective_state_dict = True        # ...gathered from every rank
    collective_forward = True           # TP all-reduces, pipeline stages hand over activations

    def __init__(self, config: MeshParallelConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = MeshParallelConfig(**overrides)
        elif overrides:
            raise TypeError("MeshParallel: pass either a MeshParallelConfig or keyword overrides")
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        self.dims = ParallelDims.for_world(world, tp=config.tp, pp=config.pp)
        self.global_rank = dist.get_rank() if distributed else 0
        self.coords = self.dims.coords(self.global_rank)
        # every rank creates every group, in the same order (dist.new_group is collective)
        groups: dict[str, Any] = {}
        for dim in DIMS:
            for ranks in self.dims.groups(dim):
                group = dist.new_group(ranks) if distributed else None
                if self.global_rank in ranks:
                    groups[dim] = group
        self.tp_group, self.pp_group = groups.get("tp"), groups.get("pp")
        self.mesh_config = config
        super().__init__(config.zero_config(), group=groups.get("dp"))
        self.engine: PipelineEngine | None = None

    # ------------------------------------------------------------ where this rank sits
    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def data_shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """Ranks of one model replica read the same data: the dp coordinate slices it."""
        return self.coords["dp"], self.dims.dp

    # ------------------------------------------------------------ setup
    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        c = self.mesh_config
        self.cfg = cfg
        self.layout = _FullLayout.of(model, cfg)
        device = self._pick_device(cfg)
        model.to(device)
        if c.tp > 1:                    # the model, or the DeltaModel / encoder inside it
            make_tensor_parallel(model, self.tp_group, c.sequence_parallel)
        inner = model
        if c.pp > 1:
            loss_fn = None
            if c.tp > 1:
                info = model.tensor_parallel
                loss_fn = lambda logits, labels, _cfg: tensor_parallel_loss(  # noqa: E731
                    logits, labels, info)
            inner = split_stage(model, self.coords["pp"], c.pp, balance=c.balance,
                                loss_fn=loss_fn, group=self.pp_group)
            inner.tensor_parallel = getattr(model, "tensor_parallel", None)
        super().setup(inner, cfg)       # ZeRO over the dp group: buckets, masters, optimizer
        if c.pp > 1:
            self.engine = PipelineEngine(self.model, self.pp_group, self.coords["pp"], c.pp,
                                         c.schedule, self.device)
        elif c.tp > 1 and model.tensor_parallel.vocab_parallel:
            self.model = TensorParallelLM(self.model, self.tp_group)
        if self.scaler is not None:     # an overflow on any rank skips the step everywhere
            self.scaler = DynamicLossScaler(cfg.loss_scale, group=None)
        self._sequence_params = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        self._norm_weights = self._weights_for_norm()

    def _weights_for_norm(self) -> dict[int, float]:
        """id(param) -> the weight of its ‖g‖² in the global norm (see module docstring)."""
        tied = {id(p) for p in tied_parameters(self.module)} if self.engine else set()
        split_names = tensor_parallel_dims(self.module)
        split = {id(p) for n, p in self.module.named_parameters(remove_duplicate=False)
                 if n in split_names}
        last = self.coords["pp"] == self.dims.pp - 1
        out = {}
        for p in self.params:
            w = 1.0
            if self.dims.tp > 1 and id(p) not in split:
                w /= self.dims.tp
            if id(p) in tied and last:
                w = 0.0
            if self.stage == 0:
                w /= self.dims.dp
            if w != 1.0:
                out[id(p)] = w
        return out

    # ------------------------------------------------------------ one step
    def run_micro_batches(self, batches: Sequence[dict[str, Any]], weights: Sequence[Any]
                          ) -> list[MicroResult]:
        if self.engine is None:
            return super().run_micro_batches(batches, weights)
        self._wait_params()
        if self.scaler is not None:
            scale = float(self.scaler.scale(torch.ones(())))
            weights = [ScaledWeight(w, scale) for w in weights]
        with self.no_sync():
            results = self.engine.run(batches, weights)
        self._fold_tied_grads()
        self._finish_backward()         # every bucket's dp reduction, in bucket order
        return self.engine.broadcast_losses(results)

    def _fold_tied_grads(self) -> None:
        """The engine's tied-gradient exchange may leave ``.grad`` outside its bucket view."""
        for p in tied_parameters(self.module):
            bucket, j = self._slot[id(p)]
            view = bucket.view(j)
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def _grad_slices(self) -> list[torch.Tensor]:
        if self._sequence_params and self.stage < 2:
            self._wait_all()
            grads = [p.grad for p in self._sequence_params if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=self.tp_group)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        return super()._grad_slices()

    def _norm_reduction(self) -> tuple[Any, bool, Callable | None]:
        return None, self.dims.world_size > 1, self._local_square

    def _local_square(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Σ w_p ‖g_p‖² over this rank's slices (weights: ``_weights_for_norm``)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for bucket, g in zip(self.buckets, grads):
            sq = g.float().pow(2)
            total += sq.sum()
            if not self._norm_weights:
                continue
            s = self._bounds(bucket)
            for j, _, _, lo, hi in bucket_pieces(bucket, s.start, s.stop):
                w = self._norm_weights.get(id(bucket.params[j]))
                if w is not None:
                    total -= (1.0 - w) * sq[lo:hi].sum()
        return total

    def barrier(self) -> None:
        if self.dims.world_size > 1:
            dist.barrier()

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> Any:
        """Eval forward: the loss (logits stay sharded / on the last stage, so none are
        returned and the loop's perplexity uses the loss)."""
        self._wait_params()
        if self.engine is None:
            out = self.model(**move_batch(batch, self.device))
            if self.dims.tp == 1 or not self.module.tensor_parallel.vocab_parallel:
                return out              # logits whole on every rank (BERT, T5: heads replicated)
            return ModelOutput(logits=None, loss=out.loss, aux_loss=out.aux_loss,
                               metrics=out.metrics)
        loss = self.engine.evaluate(batch)
        value = torch.zeros((), dtype=torch.float32, device=self.device) if loss is None \
            else loss.float().reshape(())
        src = dist.get_global_rank(self.pp_group, self.dims.pp - 1)
        dist.broadcast(value, src=src, group=self.pp_group)
        return ModelOutput(logits=None, loss=value)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.layout.shapes)

    def _name(self, p: nn.Parameter) -> str:
        """The full model's canonical name of a parameter this rank holds."""
        return self.layout.canonical.get(self._names[id(p)][0], self._names[id(p)][0])

    def state_dict(self) -> dict[str, Any]:
        """The full single-process state: ZeRO consolidates over dp, then TP slices are
        concatenated and the pipeline stages' parts united. A collective over the world."""
        local = super().state_dict()
        tparams = self._template_params()
        tied_copies = ({id(p) for p in tied_parameters(self.module)}
                       if self.engine is not None and self.coords["pp"] == self.dims.pp - 1
                       else set())
        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        step = None
        for i, p in enumerate(tparams):
            s = local["optimizer"]["state"].get(i)
            if s is None or id(p) in tied_copies:
                continue
            step = s["step"]
            for k in moments:
                moments[k][self._names[id(p)][0]] = s[k]
        module = self.module
        model = gather_tensor_parallel_state(local["model"], module, self.tp_group)
        for k in moments:           # TP-gather under this rank's names, then canonical names
            gathered = gather_tensor_parallel_state(moments[k], module, self.tp_group)
            moments[k] = {self.layout.canonical.get(n, n): t for n, t in gathered.items()}
        if self.dims.pp > 1:
            parts: list[Any] = [None] * self.dims.pp
            dist.all_gather_object(parts, (model, moments, step), group=self.pp_group)
            model, moments = {}, {"exp_avg": {}, "exp_avg_sq": {}}
            for m_part, mom_part, st in parts:
                model.update(m_part)
                for k in moments:
                    moments[k].update(mom_part[k])
                step = st if st is not None else step
        full_model = {}
        for key in self.layout.keys:
            src = key if key in model else self.layout.canonical.get(key, key)
            if src not in model:
                raise RuntimeError(f"mesh state_dict: no rank holds {key!r}")
            full_model[key] = model[src]
        optim = with_current_lr(copy.deepcopy(self.layout.optim_template), self.optimizer)
        step = step if step is not None else torch.zeros(())
        optim["state"] = {i: {"step": step.detach().float().cpu().clone(),
                              "exp_avg": moments["exp_avg"][n],
                              "exp_avg_sq": moments["exp_avg_sq"][n]}
                          for i, n in enumerate(self.layout.optim_names)
                          if n in moments["exp_avg"]}
        return {"model": full_model, "optimizer": optim}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Slice a full single-process state (any mesh's checkpoint) for this rank."""
        full = state["model"]
        module = self.module
        mine = module.state_dict().keys()
        missing = [k for k in mine if k not in full]
        if missing:
            raise ValueError(f"checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}"
                             f": it was written for another model")
        model = shard_tensor_parallel_state({k: full[k] for k in mine}, module, self.tp_group)
        optim = state.get("optimizer")
        local_optim = None
        if optim is not None:
            index = {n: i for i, n in enumerate(self.layout.optim_names)}
            dims = tensor_parallel_dims(module)
            states = {}
            for j, p in enumerate(self._template_params()):
                name = self._names[id(p)][0]
                i = index.get(self._name(p))
                s = None if i is None else optim["state"].get(i, optim["state"].get(str(i)))
                if not s:
                    continue
                entry = {"step": s["step"]}
                for k in ("exp_avg", "exp_avg_sq"):
                    entry[k] = shard_tensor_parallel_state(
                        {name: s[k]}, module, self.tp_group)[name] if name in dims else s[k]
                states[j] = entry
            local_optim = {"state": states, "param_groups": optim["param_groups"]}
        super().load_state_dict({"model": model, "optimizer": local_optim,
                                 **({"scaler": state["scaler"]} if "scaler" in state else {})})

    # ------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        report = super().memory_report()
        report["mesh"] = {"dp": self.dims.dp, "pp": self.dims.pp, "tp": self.dims.tp,
                          **{f"{k}_rank": v for k, v in self.coords.items()}}
        if self.engine is not None and self.engine.stats is not None:
            report["pipeline"] = self.engine.stats.as_dict()
        return report
