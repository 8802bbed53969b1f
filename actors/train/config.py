"""Typed configs of the training loop and of checkpointing.

Why two dataclasses: what the optimizer does (TrainConfig) and where state goes
(CheckpointConfig) change independently — a sweep varies the first, a cluster move the second.
Both validate in ``__post_init__`` and raise :class:`models.typed_config.ConfigError` naming the
key path (``train.lr``), so a bad YAML value fails before any compute is spent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bmray.actors.parallel.activation_checkpointing import ActivationCheckpointConfig
from bmray.actors.parallel.zero.loss_scaler import LossScalerConfig
from bmray.models.typed_config import ConfigError, check_choice, check_positive


@dataclass
class TrainConfig:
    """Optimisation of one run (AdamW, Loshchilov & Hutter 2019, with warmup + cosine decay).

    One optimizer step consumes one global batch of blocks from the data stream; the batch
    is split into ``micro_batches`` pieces whose gradients are accumulated, so changing
    ``micro_batches`` changes memory, not the maths (the loss is weighted by token count).
    """

    max_steps: int = 100            # optimizer steps of the whole run (a resumed run stops here too)
    micro_batches: int = 1          # gradient accumulation: micro-batches per optimizer step
    lr: float = 3e-4                # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5            # floor of the cosine decay
    warmup_steps: int = 10          # linear warmup (Goyal et al. 2017)
    decay_steps: int | None = None  # end of the cosine decay; default max_steps
    weight_decay: float = 0.1       # decoupled; applied to matrices only (nanoGPT convention)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global L2 norm (Pascanu et al. 2013); 0 disables
    eval_every: int = 0             # evaluate every N steps (0: only at the end if eval data)
    eval_batches: int = 8           # batches per evaluation (fewer if the eval set is shorter)
    log_every: int = 1              # one JSON line of train metrics every N steps
    metrics_path: str | None = None  # JSON-lines file; None: keep rows in memory only
    echo: bool = True               # also print each metrics row as one short console line
    # recompute chosen blocks' activations in backward instead of storing them (Chen et al.
    # 2016): {enabled: true, blocks: [0, 2]} or all blocks when blocks is omitted
    activation_checkpointing: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig)
    # dynamic loss scaling of fp16 parameters (ZeRO's param_dtype: fp16): initial scale, the
    # growth window and factors, {init_scale: 65536, growth_interval: 2000, ...}
    loss_scale: LossScalerConfig = field(default_factory=LossScalerConfig)
    device: str = "auto"            # "auto" (cuda if visible) | "cpu" | "cuda" | "cuda:N"

    def __post_init__(self) -> None:
        check_positive("train.max_steps", self.max_steps)
        check_positive("train.micro_batches", self.micro_batches)
        check_positive("train.lr", self.lr)
        check_positive("train.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr: {self.min_lr} is larger than train.lr {self.lr}")
        check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.decay_steps is not None:
            check_positive("train.decay_steps", self.decay_steps)
            if self.decay_steps < self.warmup_steps:
                raise ConfigError(f"train.decay_steps: {self.decay_steps} is shorter than "
                                  f"train.warmup_steps {self.warmup_steps}")
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {value!r}")
        check_positive("train.eps", self.eps)
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("train.eval_every", self.eval_every, allow_zero=True)
        check_positive("train.eval_batches", self.eval_batches)
        check_positive("train.log_every", self.log_every)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            check_choice("train.device", self.device, ["auto", "cpu", "cuda", "cuda:N"])

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.max_steps


@dataclass
class CheckpointConfig:
    """Where and how often the run's full state is saved (see checkpoints.py)."""

    dir: str | None = None       # local path or pyarrow URI (s3://, gs://); None: no checkpoints
    every: int = 0               # save every N steps; 0: only at the end of the run
    keep_last: int = 3           # retention: keep the newest N step checkpoints; 0 keeps all
    average_last: int = 0        # at the end, average the last k checkpoints into <dir>/averaged
    resume: bool = True          # continue from <dir>/latest when it exists
    # only the trainable tensors (and their optimizer state): an adaptation run's checkpoint
    # is its delta's size, not the frozen base's, which the run rebuilds from its source
    trainable_only: bool = False

    def __post_init__(self) -> None:
        check_positive("checkpoint.every", self.every, allow_zero=True)
        check_positive("checkpoint.keep_last", self.keep_last, allow_zero=True)
        check_positive("checkpoint.average_last", self.average_last, allow_zero=True)
        if self.average_last and self.keep_last and self.average_last > self.keep_last:
            raise ConfigError(f"checkpoint.average_last: {self.average_last} checkpoints to "
                              f"average but checkpoint.keep_last keeps only {self.keep_last}")
        if (self.every or self.average_last) and not self.dir:
            raise ConfigError("checkpoint.dir: required when checkpoint.every or "
                              "checkpoint.average_last is set")
