"""Gradual pruning: the cubic sparsity schedule and the prune / recover loop around a trainer.

Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1): sparsity rises from ``s_i`` to ``s_f``
over ``n`` pruning steps every ``Δt`` optimizer steps from ``t0``,

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n Δt))³,   t ∈ {t0, t0 + Δt, ..., t0 + n Δt},

pruning fast while the network has many redundant weights and slowly near the target. Between
pruning steps the model trains on (recovery fine-tuning) with the masks held (prune.py).

``prune_iteratively`` drives any trainer through ``fit(until)`` (``Trainer.fit(until=...)``):
train to a pruning step, re-compute the masks at that step's sparsity, apply them in place,
repeat, then train to ``until``. The trainer never learns about pruning; the masks are applied
before its first step (at sparsity ``s_t0``) so its optimizer and checkpoints see the masked
parameters from the start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bmray.models.compress.prune import (PruneConfig, apply_masks, compute_masks, is_masked,
                                         prune_targets, sparsity_report)
from bmray.models.typed_config import ConfigError

__all__ = ["SparsitySchedule", "prune_iteratively"]


@dataclass(frozen=True)
class SparsitySchedule:
    """Zhu & Gupta's cubic schedule: ``initial`` s_i, ``final`` s_f, ``start`` t0, ``steps``
    n pruning steps, ``every`` Δt optimizer steps apart."""

    initial: float = 0.0
    final: float = 0.5
    start: int = 0
    steps: int = 10
    every: int = 1

    def __post_init__(self) -> None:
        for key in ("initial", "final"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"schedule.{key}: must be a number in [0, 1), got {v!r}")
        if self.final < self.initial:
            raise ConfigError(f"schedule.final: must be >= schedule.initial ({self.initial}), "
                              f"got {self.final}")
        for key, low in (("start", 0), ("steps", 1), ("every", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"schedule.{key}: must be an integer >= {low}, got {v!r}")

    @property
    def end(self) -> int:
        """The last pruning step, t0 + n Δt."""
        return self.start + self.steps * self.every

    def pruning_steps(self) -> list[int]:
        """t0, t0 + Δt, ..., t0 + n Δt."""
        return [self.start + i * self.every for i in range(self.steps + 1)]

    def sparsity_at(self, step: int) -> float:
        """s_t (eq. 1); s_i before t0 and s_f after the end."""
        frac = min(max((step - self.start) / (self.steps * self.every), 0.0), 1.0)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3


def prune_iteratively(model: nn.Module, cfg: PruneConfig, schedule: SparsitySchedule,
                      fit: Callable[[int], Any], until: int,
                      calibration: Callable[[], Iterable[Any]] | None = None
                      ) -> list[dict[str, Any]]:
    """Prune ``model`` (the module the trainer trains) along ``schedule``, training with
    ``fit(step)`` (train up to optimizer step ``step``) in between, and finally to ``until``.

    ``calibration`` (Wanda) is a zero-argument callable giving fresh batches: the activations
    are re-measured at every pruning step, on the model as pruned so far. Resuming a run
    half-way is not handled here (re-run from the start). Returns one row per
    pruning step: ``{"step", "sparsity", "measured"}`` (measured over the targets)."""
    if until < schedule.end:
        raise ConfigError(f"until: {until} ends before the schedule's last pruning step "
                          f"{schedule.end}")
    if cfg.is_nm:
        raise ConfigError(f"prune.method: {cfg.method!r} has a fixed pattern; a sparsity "
                          f"schedule applies to magnitude and wanda")
    modules = dict(model.named_modules())
    # all-ones masks first: the parameter names the trainer checkpoints are fixed from step 0
    apply_masks(model, {n: torch.ones_like(modules[n].weight, dtype=torch.bool)
                        for n in prune_targets(model, cfg) if not is_masked(modules[n])})
    rows = []
    for t in schedule.pruning_steps():
        if t > 0:
            fit(t)
        s = schedule.sparsity_at(t)
        masks = compute_masks(model, dataclasses.replace(cfg, sparsity=s),
                              calibration() if calibration is not None else None)
        apply_masks(model, masks)
        measured = sparsity_report(model, masks)["total"]["sparsity"]
        rows.append({"step": t, "sparsity": s, "measured": measured})
    fit(until)
    return rows
