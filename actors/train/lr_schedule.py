"""Learning-rate schedule: linear warmup then cosine decay to a floor.

    lr(s) = lr_max * (s + 1) / W                                   s < W   (Goyal et al. 2017)
    lr(s) = lr_min + ½ (lr_max − lr_min) (1 + cos(π (s − W) / (D − W)))   W ≤ s < D
    lr(s) = lr_min                                                 s ≥ D

(cosine annealing of Loshchilov & Hutter 2017, SGDR, without restarts; the shape nanoGPT uses).
``s`` is the 0-based index of the optimizer step the rate is used for, ``W`` the warmup steps,
``D`` the step at which the decay ends.

Why a ``LambdaLR``: the scheduler then has a ``state_dict`` that checkpoints like any other
torch scheduler, and the formula stays a pure function that tests compare against by hand.
"""
from __future__ import annotations

import math

import torch

from bmray.actors.train.config import TrainConfig


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup_steps: int,
                  decay_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based); see the module docstring."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * ratio))


class WarmupCosine:
    """Picklable multiplier ``lr(s) / lr_max`` for ``LambdaLR`` (a class, not a lambda, so
    the scheduler's state_dict stays plain data)."""

    def __init__(self, cfg: TrainConfig):
        self.kwargs = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                           decay_steps=cfg.total_decay_steps)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, **self.kwargs) / self.kwargs["lr"]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler whose ``step()`` is called once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg))
