"""The pipeline engine: runs one stage's GPipe or 1F1B schedule over ``m`` micro-batches.

:class:`PipelineEngine` executes the action list of
:func:`bmray.actors.parallel.pipeline.schedule.schedule_for` for its stage (a
:class:`~bmray.actors.parallel.pipeline.stage.PipelineStage`). Activations go forward and their
gradients backward by point-to-point messages between neighbours (tag = micro-batch index):
sends are ``isend`` (blocking sends deadlock 1F1B) and receives are posted one micro-batch
ahead. The last stage backpropagates ``float(weight_i) * loss_i``; gradients accumulate in
``.grad``, so after :meth:`PipelineEngine.run` they equal those of ``Σ_i weight_i · loss_i``.
A weight tied between the first and last stage has its two gradients summed after the step by a
p2p exchange.

The last stage returns the real losses and metrics, the others ``MicroResult(loss=nan, ...)``;
:meth:`PipelineEngine.broadcast_losses` gives every stage the last stage's results.

``engine.stats`` (a :class:`StageStats`) after each ``run``: busy / idle / comm seconds over a
step window bounded by barriers, the idle fraction next to the bubble formula
``(p-1)/(m+p-1)``, the peak number of micro-batches in flight and the peak activation bytes the
schedule keeps alive (counted by ``saved_tensors_hooks``). The measurements, the message
protocol and the papers are in docs/pipeline_parallel.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from bmray.models.typed_config import ConfigError, check_choice

from bmray.actors.parallel.pipeline.schedule import SCHEDULES, bubble_fraction, schedule_for
from bmray.actors.parallel.pipeline.stage import PipelineStage, tied_parameters
from bmray.actors.parallel.strategy import MicroResult, move_batch

__all__ = ["PipelineEngine", "StageStats"]


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
        (bmray.actors.parallel.tensor) each TP rank passes on its T / tp shard of the sequence."""
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
