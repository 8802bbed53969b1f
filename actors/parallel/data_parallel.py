"""All-reduce data parallelism: every rank holds the whole model, gradients are summed.

torch DDP's Reducer (Li et al. 2020), written out; the design is in docs/data_parallel.md.

* ``setup`` broadcasts rank 0's parameters and buffers (one flat tensor per dtype).
* Parameters, in reverse order, are packed into buckets of ``bucket_mb`` (the first
  ``first_bucket_mb``; buckets.py); every ``param.grad`` is a view into its bucket's flat
  buffer.
* A post-accumulate-grad hook counts each bucket's missing gradients; a complete bucket is
  all-reduced (SUM) asynchronously, strictly in bucket order (the same order on every rank).
  ``clip_and_step`` is the only place that waits.
* ``no_sync()``: the hooks do nothing and gradients accumulate in the buffers.
* SUM, not mean: the loop weights micro-batches by their share of the global target count.
* The last bucket carries the step's statistics (``STATS_SLOTS`` extra elements, counts as
  base-2048 digits) and is held until ``reduce_step_stats`` hands them over.
* ``transport``: the buckets' collectives (actors/comm/transport.py): shared memory between
  the CPU workers of one host (``auto``, ``shm``) or the process group.

ZeRO-1/2/3 (zero/) and the mesh subclass :class:`DataParallel` for its buckets, hooks, launch
order and transport. Without an initialised process group it runs as one rank and never
communicates.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bmray.models.typed_config import check_choice, check_positive

from bmray.actors.comm.transport import (TRANSPORTS, ProcessGroupTransport, Transport,
                                         make_transport)
from bmray.actors.parallel.buckets import Bucket, bucket_assignment
from bmray.actors.parallel.strategy import (MicroResult, Strategy, build_adamw, resolve_device,
                                            weighted_forward_backward)
from bmray.actors.train.config import TrainConfig

MB = 1024 * 1024
STATS_SLOTS = 64                # values + 4 digits per count carried in the last bucket
_DIGIT_BITS, _DIGITS = 11, 4    # counts < 2**44, digit sums exact in fp32 below 8192 ranks


def count_digits(count: int) -> list[float]:
    """``count`` as ``_DIGITS`` base-2**11 digits, least significant first (their sums over
    fewer than 8192 ranks are exact in fp32, where the count's own sum might not be)."""
    if not 0 <= count < 1 << (_DIGIT_BITS * _DIGITS):
        raise ValueError(f"a step count of {count} cannot be carried (0 <= count < 2**44)")
    mask = (1 << _DIGIT_BITS) - 1
    return [float((count >> (_DIGIT_BITS * i)) & mask) for i in range(_DIGITS)]


def digits_count(digits: Sequence[float]) -> int:
    return sum(int(round(d)) << (_DIGIT_BITS * i) for i, d in enumerate(digits))


@dataclass
class DataParallelConfig:
    """Knobs of :class:`DataParallel` (names and defaults follow torch DDP)."""

    bucket_mb: float = 25.0                 # DDP's bucket_cap_mb
    first_bucket_mb: float | None = 1.0     # DDP's first bucket; None: same as bucket_mb
    find_unused_parameters: bool = False    # sum a used-bitmap so globally unused params skip the step
    broadcast_init: bool = True             # copy rank 0's parameters and buffers at setup
    transport: str = "auto"                 # buckets via: auto | shm | process_group

    def __post_init__(self) -> None:
        check_positive("strategy.bucket_mb", self.bucket_mb)
        if self.first_bucket_mb is not None:
            check_positive("strategy.first_bucket_mb", self.first_bucket_mb)
        check_choice("strategy.transport", self.transport, TRANSPORTS)


class DataParallel(Strategy):
    """Replicated model, bucketed asynchronous all-reduce (SUM) of gradients; see module doc."""

    def __init__(self, config: DataParallelConfig | None = None, *, group: Any = None,
                 **overrides: Any) -> None:
        if config is None:
            config = DataParallelConfig(**overrides)
        elif overrides:
            raise TypeError("DataParallel: pass either a DataParallelConfig or keyword overrides")
        self.config = config
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self._sync = True
        self._launched = 0              # buckets launched in the current synced backward
        self._used: list[int] = []
        self._carrier: Bucket | None = None    # the last bucket, when it carries statistics
        self._held = False              # the carrier waits for the step's statistics
        self._on_reduced: Callable[[], None] | None = None
        # the collectives of buckets / shards (comm/transport.py); the process group until
        # setup opens the configured one
        self.transport: Transport | None = ProcessGroupTransport(group) if self.distributed \
            else None

    # ------------------------------------------------------------ setup
    def _pick_device(self, cfg: TrainConfig) -> torch.device:
        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _place(self, model: nn.Module, cfg: TrainConfig) -> None:
        """Move ``model`` to this rank's device and, unless told not to, give every rank rank
        0's parameters and buffers (shared by the ZeRO strategies' setups)."""
        self.device = self._pick_device(cfg)
        self.model = model.to(self.device)
        if self.distributed and self.world_size > 1 and self.config.broadcast_init:
            self._broadcast_state()

    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        self._place(model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._build_buckets(self.bucket_plan(self.params), stats_slots=STATS_SLOTS)
        self._open_transport()
        self.optimizer = build_adamw(self.model, cfg, self.params)

    def _open_transport(self, capacity_bytes: int | None = None) -> None:
        """The configured transport for the buckets (shared memory where ``transport`` allows
        and the ranks can use it: CPU, Linux x86-64, one host); every rank of the group
        decides alike. ``capacity_bytes``: each rank's shared-memory slot (default: the bucket
        size, 1-4 MB; larger tensors go in pieces)."""
        if not self.distributed or self.world_size == 1:
            return
        if capacity_bytes is None:
            capacity_bytes = int(self.config.bucket_mb * MB)
        capacity = int(min(max(capacity_bytes, MB), 4 * MB))   # pieces beyond
        self.transport = make_transport(self.config.transport, self.group, self.device,
                                        capacity_bytes=capacity)

    @property
    def uses_shared_memory(self) -> bool:
        """The buckets' collectives go through shared memory (``transport: auto | shm``)."""
        return self.transport is not None and self.transport.name == "shm"

    def bucket_plan(self, params: Sequence[nn.Parameter], group_of: Callable | None = None,
                    itemsize: int | None = None) -> list[list[nn.Parameter]]:
        """``params`` in reverse order (backward's), grouped into buckets by the size caps."""
        order = list(reversed(params))
        c = self.config
        first = int(c.first_bucket_mb * MB) if c.first_bucket_mb is not None else None
        return [[order[i] for i in idx] for idx in
                bucket_assignment(order, int(c.bucket_mb * MB), first, group_of, itemsize)]

    def _build_buckets(self, plan: list[list[nn.Parameter]], pad_to: int = 1,
                       allocate: bool = True, stats_slots: int = 0) -> None:
        """Buckets from a plan, the gradient-ready hooks, and ``param.grad`` as views into the
        (allocated) buffers. ``stats_slots``: the last bucket carries the step's statistics
        when there is someone to send them to and its dtype keeps them (fp32 / fp64)."""
        self.buckets: list[Bucket] = []
        self._slot: dict[int, tuple[Bucket, int]] = {}
        carries = stats_slots and self.world_size > 1 and plan and \
            plan[-1][0].dtype in (torch.float32, torch.float64) and \
            self.world_size < 1 << (24 - _DIGIT_BITS)
        for b, params in enumerate(plan):
            extra = stats_slots if carries and b == len(plan) - 1 else 0
            bucket = Bucket(b, params, self.device, pad_to, allocate, extra)
            for j, p in enumerate(bucket.params):
                if allocate:
                    p.grad = bucket.view(j)         # gradient_as_bucket_view
                self._slot[id(p)] = (bucket, j)
            self.buckets.append(bucket)
        self._carrier = self.buckets[-1] if carries else None
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._used = [0] * len(self.params)
        self._ready = [False] * len(self.params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Rank 0's parameters and buffers to every rank, one flat tensor per dtype."""
        tensors = [t for t in [*self.model.parameters(), *self.model.buffers()]]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in group])
            self.transport.broadcast(flat, src=0)
            for t, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                t.copy_(synced)

    # ------------------------------------------------------------ backward
    def _grad_ready(self, p: torch.Tensor) -> None:
        """post-accumulate-grad hook: the gradient of ``p`` for this backward is complete."""
        bucket, j = self._slot[id(p)]
        if bucket.buffer is None:
            bucket.allocate()           # a transient buffer (ZeRO-2)
        grad = p.grad
        if grad is None or grad.data_ptr() != bucket.buffer.data_ptr() + \
                bucket.offsets[j] * bucket.buffer.element_size():
            # someone replaced .grad (e.g. zero_grad(set_to_none)): fold it back into the bucket
            view = bucket.view(j)
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view
        i = self._index[id(p)]
        self._used[i] = 1
        if not self._sync or self._ready[i]:
            return
        self._ready[i] = True
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch(self, bucket: Bucket) -> None:
        if self.world_size > 1:
            bucket.work = self.transport.all_reduce(bucket.buffer, async_op=True)
        self._launched += 1

    def _launchable(self) -> int:
        """How many buckets backward may launch: all but a statistics carrier."""
        return len(self.buckets) - (self._carrier is not None)

    def _launch_ready(self) -> None:
        """Launch complete buckets in bucket order (the same order on every rank)."""
        while self._launched < self._launchable() and self.buckets[self._launched].pending == 0:
            self._launch(self.buckets[self._launched])

    def _finish_backward(self) -> None:
        """After a synced backward: buckets with gradients that never arrived (unused
        parameters: zeros in their slots) are launched now, in order; the statistics
        carrier is held for ``reduce_step_stats``."""
        while self._launched < self._launchable():
            self.buckets[self._launched].pending = 0
            self._launch(self.buckets[self._launched])
        if self._carrier is not None and self._launched < len(self.buckets):
            self._held = True

    def _launch_held(self) -> None:
        if self._held:
            self._held = False
            self._carrier.pending = 0
            self._launch(self._carrier)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward inside accumulates into the buckets without communicating."""
        return _NoSync(self)

    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        if self._sync and (self._launched or self._held):
            # the buckets are already on the wire: a second synced backward would race them
            raise RuntimeError("DataParallel: a second synchronised backward before "
                               "clip_and_step; run earlier micro-batches under no_sync()")
        result = weighted_forward_backward(self.model, batch, self.device, weight)
        if self._sync:
            self._finish_backward()
        return result

    # ------------------------------------------------------------ step
    def _wait_all(self) -> None:
        self._finish_backward()         # no-op after a synced backward
        self._launch_held()             # nobody handed statistics over: reduce it alone
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        if self._on_reduced is not None:    # read the statistics before the buffers are zeroed
            self._on_reduced()

    def _reset(self) -> None:
        for bucket in self.buckets:
            if bucket.buffer is not None:
                bucket.buffer.zero_()
            bucket.pending = len(bucket.params)
        self._launched = 0
        self._ready = [False] * len(self.params)
        self._used = [0] * len(self.params)

    @torch.no_grad()
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        self._wait_all()
        skipped: list[nn.Parameter] = []
        if self.config.find_unused_parameters:
            used = torch.tensor(self._used, dtype=torch.int32, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(used, group=self.group)     # gloo: CPU int tensor is fine
            skipped = [p for p, u in zip(self.params, used.tolist()) if u == 0]
        # Global L2 norm from the flat buffers (one norm per bucket, not one per tensor).
        norms = [torch.linalg.vector_norm(b.grads.float()) for b in self.buckets]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)   # clip_grad_norm_'s rule
            for b in self.buckets:
                b.grads.mul_(coef.to(b.buffer.dtype))
        for p in skipped:
            p.grad = None
        self.optimizer.step()
        for p in skipped:
            bucket, j = self._slot[id(p)]
            p.grad = bucket.view(j)
        self._reset()                   # zero the buffers in place: the grads stay views
        return norm.detach()

    # ------------------------------------------------------------ sharded collectives (ZeRO)
    def _reduce_scatter_into(self, t: torch.Tensor, shard: torch.Tensor) -> Any:
        """Start summing flat ``t`` over the group and adding this rank's slice of the sum
        (``shard_bounds``) to ``shard``; the handle's ``wait()`` returns ``shard`` with it
        added (the transport's ``reduce_scatter``)."""
        return self.transport.reduce_scatter(t, into=shard, async_op=True)

    def _all_gather(self, shard: torch.Tensor, numel: int, out: torch.Tensor | None = None
                    ) -> Any:
        """Start gathering every rank's ``shard`` of a flat tensor of ``numel`` elements; with
        ``out`` (``numel`` elements, a multiple of the world size) straight into it, else into
        a new tensor that ``wait()`` returns."""
        return self.transport.all_gather(shard, numel, out=out, async_op=True)

    # ------------------------------------------------------------ collectives for the loop
    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def reduce_step_stats(self, values: Sequence[float], counts: Sequence[int] = ()
                          ) -> Callable[[], tuple[list[float], list[int]]]:
        """The statistics in the held last bucket's spare slots, launched with it now (module
        doc); the plain collective when no bucket is held or they do not fit."""
        bucket, n = self._carrier, len(values) + _DIGITS * len(counts)
        if not self._held or bucket is None or n > bucket.extra:
            return super().reduce_step_stats(values, counts)
        payload = [float(v) for v in values] + [d for c in counts for d in count_digits(int(c))]
        tail = bucket.buffer[bucket.numel:bucket.numel + n]
        tail.copy_(torch.tensor(payload, dtype=tail.dtype))
        self._launch_held()
        reduced: list[list[float]] = []

        def collect() -> None:
            self._on_reduced = None
            reduced.append(tail.tolist())

        self._on_reduced = collect

        def wait() -> tuple[list[float], list[int]]:
            if not reduced:             # asked before clip_and_step: wait for the bucket now
                if bucket.work is not None:
                    bucket.work.wait()
                    bucket.work = None
                collect()
            out = reduced[0]
            k = len(values)
            return out[:k], [digits_count(out[i:i + _DIGITS]) for i in range(k, n, _DIGITS)]
        return wait

    def all_reduce_sum_async(self, values: Sequence[float]) -> Callable[[], list[float]]:
        if self.world_size == 1:
            out = [float(v) for v in values]
            return lambda: out
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

        def wait() -> list[float]:
            work.wait()
            return t.tolist()
        return wait

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])     # copies in place: grads stay views
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def memory_report(self) -> dict[str, int]:
        report = super().memory_report()
        report["grad_bytes"] = sum(b.grads.numel() * b.buffer.element_size()
                                   for b in self.buckets)
        report["num_buckets"] = len(self.buckets)
        # where it lives (same keys as ZeRO's report): everything on this rank's device
        total = report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]
        report.update(model_state_bytes=total, device=total, host=0, disk=0,
                      comm_buffer_bytes=self._comm_buffer_bytes())
        return report

    def _comm_buffer_bytes(self) -> int:
        """The shared-memory slots this rank maps (not model state: reported beside it)."""
        return self.transport.comm_buffer_bytes if self.transport is not None else 0


class _NoSync(contextlib.AbstractContextManager):
    def __init__(self, strategy: DataParallel) -> None:
        self.strategy = strategy

    def __enter__(self) -> DataParallel:
        self.prev, self.strategy._sync = self.strategy._sync, False
        return self.strategy

    def __exit__(self, *exc: Any) -> None:
        self.strategy._sync = self.prev
