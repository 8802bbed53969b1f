"""The optimizer step of the sharded strategies (ZeRO-1/2, ZeRO-3, the mesh).

* :class:`ShardedOptimizer`: a torch Optimizer face for
  :class:`~bmray.actors.parallel.zero.offload.ShardedAdamW` over this rank's fp32 master
  slices, so the LR scheduler drives it like any optimizer.
* :func:`step_master_shards`: unscale (fp16), global gradient norm over every rank's shards,
  clip, step.
* :class:`GradNormStats`: a strategy mixin whose step statistics ride in that norm's
  all-reduce.

Memory formulas and the design are in docs/zero.md.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.strategy import split_step_stats
from bmray.actors.parallel.zero.config import ZeroSharedConfig
from bmray.actors.parallel.zero.loss_scaler import DynamicLossScaler
from bmray.actors.parallel.zero.offload import OffloadConfig, ShardedAdamW
from bmray.actors.train.config import TrainConfig


class ShardedOptimizer(torch.optim.Optimizer):
    """A torch Optimizer face for :class:`ShardedAdamW` over the fp32 ``masters`` (one flat
    slice each; ``decay[i]``: whether masters[i] takes weight decay), so the trainer's LR
    scheduler (LambdaLR) drives its learning rate like any optimizer's. ``options``: where
    the state lives (``offload_optimizer``, ``disk_dir``); ``rank`` names its files."""

    def __init__(self, masters: list[nn.Parameter], decay: list[bool], cfg: TrainConfig,
                 options: ZeroSharedConfig, rank: int) -> None:
        # build_adamw's two groups (decay, no decay), so the LR scheduler's state is the same
        # as SingleProcess's and checkpoints move between them
        super().__init__([{"params": [m for m, d in zip(masters, decay) if d],
                           "weight_decay": cfg.weight_decay},
                          {"params": [m for m, d in zip(masters, decay) if not d],
                           "weight_decay": 0.0}], dict(lr=cfg.lr))
        self.masters = masters
        offload = OffloadConfig(optimizer=options.offload_optimizer, disk_dir=options.disk_dir)
        self.inner = ShardedAdamW([(m.data, cfg.weight_decay if d else 0.0)
                                   for m, d in zip(masters, decay)], cfg, offload,
                                  name=f"zero_rank{rank}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.inner.step([m.grad for m in self.masters], self.param_groups[0]["lr"])


@torch.no_grad()
def step_master_shards(grads: list[torch.Tensor], masters: list[torch.Tensor],
                       optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler | None,
                       max_norm: float, group: Any, distributed: bool,
                       local_square: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
                       stats: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Unscale and check (fp16), take the global norm over all ranks' shards, clip with
    ``clip_grad_norm_``'s rule and step the fp32 masters; returns (pre-clip norm, skipped).

    ``local_square(grads)`` replaces this rank's squared-norm contribution Σ‖g‖² where some
    elements are held by several ranks of ``group`` (tensor-parallel replicas, a tied weight on
    two pipeline stages: the mesh) and must be counted once. ``stats`` (float64) is summed
    over ``group`` in place, in the same all-reduce as the norm (:class:`GradNormStats`)."""
    skip = False
    if scaler is not None:
        found_inf = scaler.unscale_and_check(grads)
        scaler.update(found_inf)
        skip = bool(found_inf)
    if local_square is not None:
        sq = local_square(grads)
    else:
        sq = (torch.stack([g.pow(2).sum() for g in grads]).sum() if grads
              else torch.zeros((), device=masters[0].device if masters else "cpu"))
    if distributed and stats is not None:
        both = torch.cat([sq.double().reshape(1), stats.to(sq.device)])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        sq = both[0].to(sq.dtype)
        stats.copy_(both[1:])
    elif distributed:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    norm = sq.sqrt()
    if not skip:
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)   # clip_grad_norm_'s rule
            for g in grads:
                g.mul_(coef)
        for m, g in zip(masters, grads):
            m.grad = g.to(m.device)
        optimizer.step()
        for m in masters:
            m.grad = None
    return norm.detach(), skip


class GradNormStats:
    """Mixin for the sharded strategies: the step's statistics (``reduce_step_stats``) ride in
    the all-reduce of the pre-clip global gradient norm that ``clip_and_step`` makes anyway,
    so logging costs no collective of its own (each costs ~1-2 ms of CPU per rank on gloo,
    whatever its size). Applies when the norm is summed over the same group as the
    statistics (not a mesh, whose norm spans tensor and pipeline ranks too)."""

    _stats: tuple[torch.Tensor, list] | None = None

    def _norm_reduction(self) -> tuple[Any, bool, Callable | None]:
        return self.group, self.world_size > 1, None

    def reduce_step_stats(self, values: Sequence[float], counts: Sequence[int] = ()
                          ) -> Callable[[], tuple[list[float], list[int]]]:
        group, distributed, _ = self._norm_reduction()
        if not distributed or group is not self.group:
            return super().reduce_step_stats(values, counts)
        payload = torch.tensor([*map(float, values), *map(float, counts)], dtype=torch.float64)
        box: list[list[float]] = []
        self._stats = (payload, box)

        def wait() -> tuple[list[float], list[int]]:
            if not box:                 # asked before clip_and_step: reduce them alone
                self._stats = None
                dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group)
                box.append(payload.tolist())
            return split_step_stats(box[0], len(values))
        return wait

    def _take_stats(self) -> torch.Tensor | None:
        """The pending statistics for ``step_master_shards(stats=...)``; call
        :meth:`_stats_reduced` after it."""
        return self._stats[0] if self._stats is not None else None

    def _stats_reduced(self) -> None:
        if self._stats is not None:
            payload, box = self._stats
            self._stats = None
            box.append(payload.tolist())
