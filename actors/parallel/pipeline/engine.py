"""Pipeline parallelism: a GPT cut layer by layer into stages, one stage per rank, run with the
GPipe or 1F1B schedule over ``m`` micro-batches.

Huang et al. 2019 ("GPipe", sec. 2.2) for the cut and the all-forward-all-backward schedule;
Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", sec. 2.2.1) for 1F1B (PipeDream-Flush). The schedules themselves, the bubble
formula ``(p-1)/(m+p-1)`` and the balancing are pure functions in ``actors/pipeline_schedule.py``
(re-exported here); this file is what runs them.

**Cutting** (:func:`split_stage`). The pipeline layers are the model's ``blocks``. The first
stage also holds ``embed``, the last ``ln_f``, ``lm_head`` and the loss; with one stage it
holds everything. Balancing (``balance="params"`` or ``"time"``, :func:`layer_costs`) counts the
embedding as an extra cost on layer 0 and ``ln_f`` + ``lm_head`` (+ the loss, when timed) as an
extra cost on the last layer, since that is the stage they land on; then
:func:`partition_balanced` picks the contiguous ranges that minimise the costliest stage.
Submodules keep their canonical names (blocks live in an ``nn.ModuleDict`` keyed by the original
index), so a stage's state dict is the plain model's keys for its subset, and the union over
stages is the plain state dict. Submodules are taken **by reference** (each rank builds the
model and keeps its stage; nothing is copied), except the tied output matrix below.

**Tied embeddings** (Press & Wolf 2017). When ``lm_head.weight is embed.tok.weight`` and there
is more than one stage, the first stage keeps ``embed.tok.weight`` and the last stage gets its own
copy as ``lm_head.weight`` (the given model stays tied). After the backward passes the engine sums
the two gradients (Megatron's "embedding group" all-reduce), so both copies receive the full
gradient and, stepped by the same optimizer, stay equal. The sum is a p2p exchange between the
two ranks (each sends its gradient, receives the other's and adds) rather than an all-reduce on
a new 2-rank group: ``dist.new_group`` is collective over *all* ranks, which an engine built by
one pipeline cannot demand; the result is the same (``a + b == b + a`` in IEEE arithmetic, so the
copies stay bit-identical). :func:`tied_parameters` names the parameters concerned.

**Engine** (:class:`PipelineEngine`). Every stage receives all micro-batch dicts (the first
stage reads ``input_ids``, the last ``labels``; every stage reads the activation shape
``[b, T, d_model]`` from ``input_ids``, so no shape header travels). Activations go forward and
their gradients backward by point-to-point messages between neighbours (tag = micro-batch
index). Sends are ``isend``: with blocking sends 1F1B deadlocks when a stage sends an
activation forward while its neighbour sends a gradient back, each waiting for the other to
receive (Megatron batches send+recv pairs for the same reason). Receives are posted one
micro-batch ahead (``irecv`` of ``i + 1`` as soon as ``i`` arrived; one spare buffer per
direction) and waited on when the schedule needs them: a send that finds its receive already
posted goes out at once, where otherwise the sender's communication thread must wake up, in
the middle of its next computation, to answer the receiver (measured: 2-5 ms per message on
two busy cores, against ~0.3 ms pre-posted). The last stage
backpropagates ``float(weight_i) * loss_i`` (the weight is converted only there, and only then:
the trainer's lazy weights wait for an all-reduce); gradients accumulate across micro-batches in
``.grad``, so after :meth:`PipelineEngine.run` they equal those of ``Σ_i weight_i · loss_i`` on
the full batch.

**What each stage returns**: the last stage returns the real detached losses and the model's
metrics; the other stages return ``MicroResult(loss=nan, aux_loss=None, metrics={})`` — a value
that cannot be mistaken for a loss if it leaks into a sum. :meth:`PipelineEngine.broadcast_losses`
gives every stage the last stage's results (one broadcast of the ``m`` losses, one of the
metrics).

**Measurements** (``engine.stats``, a :class:`StageStats`, after each ``run``):

* ``busy_s``: compute time (the stage's forwards and backwards, the loss included).
  ``busy_cpu_s`` is the CPU time of the same (``time.thread_time``; with one torch thread the
  CPU kernels run on the calling thread): on a CPU run ``busy_cpu_s / busy_s`` well below 1
  means the stage shared its core with other processes, and its timings are not the
  pipeline's own.
* ``idle_s = wall_s - busy_s``: the rest of the step window — blocked in ``recv``/``isend``, and
  waiting at the end of the schedule for the slowest stage. ``comm_s`` is the part spent inside
  the p2p calls. The step window (``wall_s``) starts after a barrier over the pipeline group and
  ends after another, so every stage measures over the same window, which is what the bubble
  formula is about (the trailing idle of the last stage in GPipe is idle too). The barriers cost
  one tiny collective each; ``measure=False`` drops them (and the CUDA syncs that make busy time
  honest on a GPU), and then ``wall_s`` is this stage's own time from first to last action.
  The tied-gradient exchange runs after the window (``tied_sync_s``).
* ``peak_inflight``: most micro-batches whose activations the stage holds (forwarded, not yet
  backwarded): ``m`` for GPipe, ``min(p - stage, m)`` for 1F1B.
* ``peak_activation_bytes``: most bytes of activations held at once, counted as the tensors
  autograd saves for backward during the stage's forward (``torch.autograd.graph.
  saved_tensors_hooks``; each storage counted once per micro-batch; parameters excluded), plus
  the received input; released at the micro-batch's backward. This is bookkeeping of what the
  schedule keeps alive, not an allocator reading (which on CPU would not be available).

Not supported: MoE blocks (their load-balancing loss would have to be carried from every
stage), KV caches, families other than GPT (ConfigError names what is supported).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bmray.models.layers.blocks import positions_for
from bmray.models.config import ModelConfig
from bmray.models.layers.losses import lm_loss_and_metrics
from bmray.models.typed_config import ConfigError, check_choice

from bmray.actors.parallel.pipeline.schedule import (SCHEDULES, bubble_fraction, gpipe_schedule,
                                one_f_one_b_schedule, partition_balanced, schedule_for)
from bmray.actors.parallel.strategy import MicroResult, move_batch

__all__ = ["bubble_fraction", "partition_balanced", "layer_costs", "gpipe_schedule",
           "one_f_one_b_schedule", "split_stage", "tied_parameters", "PipelineStage",
           "PipelineEngine", "StageStats", "default_loss", "BALANCE"]

BALANCE = ("params", "time")
SUPPORTED_FAMILIES = ("gpt",)
LossFn = Callable[[Tensor, Tensor, ModelConfig], Any]


def default_loss(logits: Tensor, labels: Tensor, config: ModelConfig) -> tuple[Tensor, dict]:
    """GPT's own loss: token cross-entropy with the config's label smoothing, and its metrics."""
    return lm_loss_and_metrics(logits, labels, None, config.label_smoothing)


def _gpt_config(model: nn.Module) -> ModelConfig:
    """The model's config if it is a family the pipeline can cut; else a ConfigError."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "family", None) if isinstance(cfg, ModelConfig) else type(model).__name__
    if family not in SUPPORTED_FAMILIES or not all(hasattr(model, a) for a in
                                                   ("embed", "blocks", "ln_f", "lm_head")):
        raise ConfigError(f"pipeline: cannot cut a {family!r} model into stages; supported "
                          f"families: {list(SUPPORTED_FAMILIES)} (models/gpt.py)")
    if cfg.moe is not None:
        raise ConfigError("pipeline: model.moe is not supported (the MoE load-balancing loss "
                          "of every stage would have to reach the last stage)")
    return cfg


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_costs(model: nn.Module, by: str = "params", sample: dict[str, Tensor] | None = None,
                loss_fn: LossFn | None = None, repeats: int = 3) -> list[float]:
    """Cost of each pipeline layer (``model.blocks[i]``) for balancing.

    ``by="params"``: parameter count. ``by="time"``: measured forward + backward seconds on
    ``sample`` (a micro-batch dict with ``input_ids`` and ``labels``), the median of ``repeats``
    after one warm-up. Either way the embedding's cost is added to layer 0 and the head's
    (``ln_f`` + ``lm_head``, + the loss when timed) to the last layer: they run on those layers'
    stages. (A tied output matrix counts on both ends: each end stage holds a copy.)
    Timing leaves the parameters' ``.grad`` as it found them.
    """
    cfg = _gpt_config(model)
    check_choice("pipeline.balance", by, BALANCE)
    blocks = list(model.blocks)
    if by == "params":
        costs = [float(_numel(b)) for b in blocks]
        costs[0] += _numel(model.embed)
        costs[-1] += _numel(model.ln_f) + _numel(model.lm_head)
        return costs
    if sample is None or "input_ids" not in sample or "labels" not in sample:
        raise ConfigError("pipeline.balance: 'time' needs a sample micro-batch with input_ids "
                          "and labels")
    loss_fn = loss_fn or default_loss
    ids, labels, mask = sample["input_ids"], sample["labels"], sample.get("attention_mask")
    pieces: list[Callable[[Tensor | None], Tensor]] = [
        lambda _: model.embed(ids, positions_for(ids, 0, mask))]
    pieces += [lambda x, b=b: b(x, key_padding_mask=mask)[0] for b in blocks]
    pieces.append(lambda x: _as_loss(loss_fn(model.lm_head(model.ln_f(x)), labels, cfg))[0])
    saved = {p: p.grad for p in model.parameters()}
    samples: list[list[float]] = [[] for _ in pieces]
    for r in range(repeats + 1):
        inputs, outputs, seconds = [], [], []
        for k, fn in enumerate(pieces):
            x = None if k == 0 else outputs[-1].detach().requires_grad_()
            t0 = time.perf_counter()
            outputs.append(fn(x))
            seconds.append(time.perf_counter() - t0)
            inputs.append(x)
        for k in range(len(pieces) - 1, -1, -1):
            grad = None if k == len(pieces) - 1 else inputs[k + 1].grad
            t0 = time.perf_counter()
            torch.autograd.backward(outputs[k], grad)
            seconds[k] += time.perf_counter() - t0
        if r:                                   # the first pass is a warm-up
            for k, s in enumerate(seconds):
                samples[k].append(s)
    for p, g in saved.items():
        p.grad = g
    t = [statistics.median(s) for s in samples]
    costs = t[1:-1]
    costs[0] += t[0]
    costs[-1] += t[-1]
    return costs


def _as_loss(out: Any) -> tuple[Tensor, dict]:
    """A loss function may return ``loss`` or ``(loss, metrics)``."""
    if isinstance(out, tuple):
        return out[0], dict(out[1] or {})
    return out, {}


class PipelineStage(nn.Module):
    """The layers ``[lo, hi)`` of a GPT, plus the embedding on the first stage and the head and
    loss on the last. ``forward(hidden, batch)``: the first stage ignores ``hidden`` and embeds
    ``batch["input_ids"]``; a non-last stage returns the hidden states ``[b, T, d_model]``; the
    last returns ``(loss, metrics)``."""

    def __init__(self, config: ModelConfig, stage: int, n_stages: int, layer_range: tuple[int, int],
                 blocks: dict[str, nn.Module], embed: nn.Module | None = None,
                 ln_f: nn.Module | None = None, lm_head: nn.Module | None = None,
                 loss_fn: LossFn | None = None, tied: bool = False):
        super().__init__()
        self.config = config
        self.stage, self.n_stages, self.layer_range = stage, n_stages, layer_range
        self.tied = tied                        # embed.tok.weight and lm_head.weight are one
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict(blocks)
        if ln_f is not None:
            self.ln_f = ln_f
            self.lm_head = lm_head
        # a plain attribute, not a submodule: a loss module must not add state-dict keys
        object.__setattr__(self, "loss_fn", loss_fn or default_loss)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def forward(self, hidden: Tensor | None, batch: dict[str, Any]) -> Any:
        mask = batch.get("attention_mask")
        if self.is_first:
            ids = batch["input_ids"]
            hidden = self.embed(ids, positions_for(ids, 0, mask))
        for block in self.blocks.values():
            hidden, _, _ = block(hidden, key_padding_mask=mask)
        if not self.is_last:
            return hidden
        logits = self.lm_head(self.ln_f(hidden))
        return _as_loss(self.loss_fn(logits, batch["labels"], self.config))


def _check_ranges(ranges: Sequence[tuple[int, int]], n_layers: int, n_stages: int) -> None:
    ranges = [tuple(r) for r in ranges]
    ok = len(ranges) == n_stages and ranges[0][0] == 0 and ranges[-1][1] == n_layers and all(
        lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not ok:
        raise ConfigError(f"pipeline.ranges: {ranges} must be {n_stages} non-empty contiguous "
                          f"[lo, hi) ranges covering layers 0..{n_layers}")


def split_stage(model: nn.Module, stage: int, n_stages: int,
                ranges: Sequence[tuple[int, int]] | None = None, balance: str = "params",
                loss_fn: LossFn | None = None, sample: dict[str, Tensor] | None = None,
                group: Any = None) -> PipelineStage:
    """Stage ``stage`` of ``n_stages`` of a GPT (see the module docstring).

    ``ranges`` fixes the layer ranges; else they are balanced by ``balance`` ("params" or
    "time"). Timed costs differ between ranks, and every rank must cut the same ranges: when
    torch.distributed is initialised, the costs measured on rank 0 of ``group`` (None: WORLD)
    are broadcast over it, so every rank of ``group`` must call this.
    """
    cfg = _gpt_config(model)
    n_layers = len(model.blocks)
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ConfigError(f"pipeline.stages: must be an integer >= 1, got {n_stages!r}")
    if not isinstance(stage, int) or not 0 <= stage < n_stages:
        raise ConfigError(f"pipeline: stage {stage!r} is outside 0..{n_stages - 1}")
    if n_layers < n_stages:
        raise ConfigError(f"pipeline: {n_layers} layer(s) cannot fill {n_stages} stages "
                          f"(each stage needs at least one layer)")
    if ranges is None:
        check_choice("pipeline.balance", balance, BALANCE)
        costs = layer_costs(model, balance, sample, loss_fn)
        if balance == "time" and dist.is_available() and dist.is_initialized():
            shared = torch.tensor(costs, dtype=torch.float64)
            dist.broadcast(shared, src=dist.get_global_rank(group, 0) if group else 0,
                           group=group)
            costs = shared.tolist()
        ranges = partition_balanced(costs, n_stages)
    _check_ranges(ranges, n_layers, n_stages)
    lo, hi = ranges[stage]
    first, last = stage == 0, stage == n_stages - 1
    tied = model.lm_head.weight is model.embed.tok.weight
    lm_head = model.lm_head
    if last and tied and n_stages > 1:
        lm_head = _untied(model.lm_head, "weight")
    return PipelineStage(cfg, stage, n_stages, (lo, hi),
                         {str(i): model.blocks[i] for i in range(lo, hi)},
                         embed=model.embed if first else None,
                         ln_f=model.ln_f if last else None, lm_head=lm_head if last else None,
                         loss_fn=loss_fn, tied=tied)


def _untied(module: nn.Module, name: str) -> nn.Module:
    """A shallow copy of ``module`` whose parameter ``name`` is a copy (python attributes such
    as ``tp_dim`` kept); the original module and its parameter are untouched. Shallow, not
    ``deepcopy``: a tensor-parallel layer may hold a process group, which cannot be copied."""
    clone = nn.Module.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._parameters = dict(module._parameters)
    old = module._parameters[name]
    new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    clone._parameters[name] = new
    return clone


def tied_parameters(stage_module: PipelineStage) -> list[nn.Parameter]:
    """The parameters of this stage that are copies of one tied weight on another stage (the
    first stage's ``embed.tok.weight``, the last's ``lm_head.weight``); [] where nothing is
    tied across stages (one stage keeps the tie itself)."""
    if not stage_module.tied or stage_module.n_stages == 1:
        return []
    if stage_module.is_first:
        return [stage_module.embed.tok.weight]
    if stage_module.is_last:
        return [stage_module.lm_head.weight]
    return []


@dataclass
class StageStats:
    """One stage's measurements over one ``run`` (see the module docstring)."""

    stage: int
    n_stages: int
    schedule: str
    micro_batches: int
    busy_s: float
    busy_cpu_s: float
    idle_s: float
    comm_s: float
    wall_s: float
    idle_fraction: float
    bubble_formula: float
    peak_inflight: int
    peak_activation_bytes: int
    tied_sync_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TIED_TAG = 1 << 20      # above any micro-batch index


class PipelineEngine:
    """Runs one stage of a pipeline: ``run(micro_batches, weights)`` executes this stage's
    schedule with p2p to its neighbours in ``group`` (None: WORLD; ``stage`` is this rank's rank
    in it). ``act_dtype``: dtype of the activations on the wire (default: the stage's parameter
    dtype)."""

    def __init__(self, stage_module: PipelineStage, group: Any, stage: int, n_stages: int,
                 schedule: str = "1f1b", device: torch.device | str = "cpu",
                 act_dtype: torch.dtype | None = None, measure: bool = True):
        check_choice("pipeline.schedule", schedule, SCHEDULES)
        if not 0 <= stage < n_stages or stage_module.stage != stage or \
                stage_module.n_stages != n_stages:
            raise ConfigError(f"pipeline: engine stage {stage}/{n_stages} does not match the "
                              f"module's {stage_module.stage}/{stage_module.n_stages}")
        if n_stages > 1:
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if size != n_stages or rank != stage:
                raise ConfigError(f"pipeline: the group has {size} ranks and this is rank "
                                  f"{rank}; expected {n_stages} stages and stage {stage}")
        self.device = torch.device(device)
        self.module = stage_module.to(self.device)
        self.group, self.stage, self.n_stages = group, stage, n_stages
        self.schedule, self.measure = schedule, measure
        floats = [p.dtype for p in stage_module.parameters() if p.is_floating_point()]
        self.act_dtype = act_dtype or (floats[0] if floats else torch.get_default_dtype())
        self.prev = self._global(stage - 1) if stage > 0 else None
        self.next = self._global(stage + 1) if stage < n_stages - 1 else None
        self.stats: StageStats | None = None

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # ------------------------------------------------------------------ the step

    def run(self, micro_batches: Sequence[dict[str, Any]], weights: Sequence[Any]
            ) -> list[MicroResult]:
        """One step's forwards and backwards; gradients accumulate in the stage's ``.grad``."""
        m = len(micro_batches)
        if m == 0 or len(weights) != m:
            raise ValueError(f"pipeline.run: {m} micro-batches and {len(weights)} weights "
                             f"(need the same number, at least one)")
        actions = schedule_for(self.schedule, m, self.n_stages, self.stage)
        self._batches = [move_batch(b, self.device) for b in micro_batches]
        self._weights = weights
        self._held: dict[int, tuple] = {}
        self._results: dict[int, MicroResult] = {}
        self._sends: list[tuple[Any, Tensor]] = []
        self._posted: dict[tuple[str, int], tuple[Any, Tensor]] = {}     # pre-posted irecvs
        self._act_bytes: dict[int, int] = {}
        self._busy = self._busy_cpu = self._comm = 0.0
        self._live_bytes = self._peak_bytes = self._inflight = self._peak_inflight = 0
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        if self.measure and self.n_stages > 1:
            dist.barrier(group=self.group)
        start = time.perf_counter()
        for kind, i in actions:
            (self._forward if kind == "F" else self._backward)(i)
        self._wait_sends(all_=True)
        if self.measure and self.n_stages > 1:
            dist.barrier(group=self.group)
        wall = time.perf_counter() - start
        t0 = time.perf_counter()
        self._sync_tied()
        tied_s = time.perf_counter() - t0
        idle = max(wall - self._busy, 0.0)
        self.stats = StageStats(
            stage=self.stage, n_stages=self.n_stages, schedule=self.schedule, micro_batches=m,
            busy_s=self._busy, busy_cpu_s=self._busy_cpu, idle_s=idle, comm_s=self._comm,
            wall_s=wall,
            idle_fraction=idle / (idle + self._busy) if idle + self._busy > 0 else 0.0,
            bubble_formula=bubble_fraction(self.n_stages, m), peak_inflight=self._peak_inflight,
            peak_activation_bytes=self._peak_bytes, tied_sync_s=tied_s)
        results = [self._results[i] for i in range(m)]
        self._batches = self._weights = self._held = self._results = None
        return results

    def _shape(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        """[b, T, d_model] of the activations between stages; with sequence parallelism
        (actors/tensor_parallel.py) each TP rank passes on its T / tp shard of the sequence."""
        ids = batch["input_ids"]
        t = ids.size(1)
        info = getattr(self.module, "tensor_parallel", None)
        if info is not None and info.sequence_parallel:
            t //= info.tp_size
        return ids.size(0), t, self.module.config.d_model

    def _compute(self, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        if self.measure and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._busy += time.perf_counter() - t0
        self._busy_cpu += time.thread_time() - c0
        return out

    def _recv(self, kind: str, i: int) -> Tensor:
        """The activation (``kind="F"``, from the previous stage) or the gradient (``"B"``,
        from the next) of micro-batch ``i``; then posts the receive of micro-batch ``i + 1`` of
        the same kind (every stage runs each kind in increasing order), so the peer's send
        finds it waiting: a send whose receive is not yet posted waits for the receiver's
        notice, which costs a wake-up of the sender's communication thread while it computes."""
        work, buf = self._posted.pop((kind, i), None) or self._irecv(kind, i)
        t0 = time.perf_counter()
        work.wait()
        self._comm += time.perf_counter() - t0
        if i + 1 < len(self._batches):
            self._posted[(kind, i + 1)] = self._irecv(kind, i + 1)
        return buf

    def _irecv(self, kind: str, i: int) -> tuple[Any, Tensor]:
        buf = torch.empty(self._shape(self._batches[i]), dtype=self.act_dtype,
                          device=self.device)
        src = self.prev if kind == "F" else self.next
        return dist.irecv(buf, src=src, group=self.group, tag=i), buf

    def _isend(self, tensor: Tensor, dst: int, tag: int) -> None:
        self._wait_sends(all_=False)
        tensor = tensor.detach().to(self.act_dtype).contiguous()
        t0 = time.perf_counter()
        self._sends.append((dist.isend(tensor, dst=dst, group=self.group, tag=tag), tensor))
        self._comm += time.perf_counter() - t0

    def _wait_sends(self, all_: bool) -> None:
        """Drop the sends that completed (all of them, waiting, with ``all_``): a sent tensor
        stays referenced until then, so a finished one must not linger and hold memory."""
        t0 = time.perf_counter()
        if all_:
            for work, _ in self._sends:
                work.wait()
            self._sends = []
        else:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._comm += time.perf_counter() - t0

    def _forward(self, i: int) -> None:
        batch = self._batches[i]
        x = None
        if self.prev is not None:
            x = self._recv("F", i).requires_grad_()
        seen: set[int] = set()
        count = [x.numel() * x.element_size() if x is not None else 0]

        def pack(t: Tensor) -> Tensor:
            try:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
            except (RuntimeError, NotImplementedError):
                return t
            if ptr not in self._param_ptrs and ptr not in seen and (
                    x is None or ptr != x.untyped_storage().data_ptr()):
                seen.add(ptr)
                count[0] += storage.nbytes()
            return t

        def step() -> Any:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return self.module(x, batch)

        out = self._compute(step)
        if self.next is None:
            loss, metrics = out
            self._held[i] = (x, loss)
            self._results[i] = MicroResult(loss.detach(), None, metrics)
        else:
            self._held[i] = (x, out)
            self._results[i] = MicroResult(torch.tensor(math.nan), None, {})
            self._isend(out, self.next, tag=i)
        self._act_bytes[i] = count[0]
        self._live_bytes += count[0]
        self._peak_bytes = max(self._peak_bytes, self._live_bytes)
        self._inflight += 1
        self._peak_inflight = max(self._peak_inflight, self._inflight)

    def _backward(self, i: int) -> None:
        x, out = self._held.pop(i)
        if self.next is None:
            weight = self._weights[i]
            self._compute(lambda: (out * float(weight)).backward())
        else:
            grad = self._recv("B", i)
            self._compute(lambda: torch.autograd.backward(out, grad.to(out.dtype)))
        if self.prev is not None:
            g = x.grad if x.grad is not None else torch.zeros_like(x)
            self._isend(g, self.prev, tag=i)
        self._live_bytes -= self._act_bytes.pop(i)
        self._inflight -= 1

    def _sync_tied(self) -> None:
        """Sum the tied weight's gradient between the first and last stage (p2p exchange)."""
        params = tied_parameters(self.module)
        if not params:
            return
        peer = self._global(self.n_stages - 1 if self.stage == 0 else 0)
        for k, p in enumerate(params):
            mine = p.grad if p.grad is not None else torch.zeros_like(p)
            mine = mine.contiguous()
            other = torch.empty_like(mine)
            work = dist.isend(mine, dst=peer, group=self.group, tag=_TIED_TAG + k)
            dist.recv(other, src=peer, group=self.group, tag=_TIED_TAG + k)
            work.wait()
            p.grad = mine + other

    # ------------------------------------------------------------------ helpers

    def broadcast_losses(self, results: Sequence[MicroResult]) -> list[MicroResult]:
        """Every stage gets the last stage's results (losses and metrics). A collective over the
        pipeline group: every stage calls it with its own ``run`` results."""
        if self.n_stages == 1:
            return list(results)
        src = self._global(self.n_stages - 1)
        losses = torch.stack([r.loss.float().reshape(()) for r in results]).to(self.device)
        dist.broadcast(losses, src=src, group=self.group)
        # read on the host here (the broadcast pickles them): this is the pipeline's step sync
        metrics = [[{k: float(v) for k, v in r.metrics.items()} for r in results]]
        dist.broadcast_object_list(metrics, src=src, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        return [MicroResult(losses[i].clone(), None, dict(metrics[0][i]))
                for i in range(len(results))]

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> Tensor | None:
        """Forward only, one batch through the pipeline: the loss on the last stage, None on
        the others (they pass the activations on)."""
        batch = move_batch(batch, self.device)
        x = None
        if self.prev is not None:
            x = torch.empty(self._shape(batch), dtype=self.act_dtype, device=self.device)
            dist.recv(x, src=self.prev, group=self.group, tag=0)
        out = self.module(x, batch)
        if self.next is None:
            return out[0].detach()
        dist.send(out.to(self.act_dtype).contiguous(), dst=self.next, group=self.group, tag=0)
        return None
