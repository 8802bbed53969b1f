"""Loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2).

fp16 gradients below ~6e-8 flush to zero: the loss is multiplied by a scale S before
backward and the gradients divided by S (in fp32, on the master) before the step; too large an
S overflows (docs/zero.md, "Loss scaling").

*Dynamic* scaling finds the largest S that does not overflow, step by step — the state
machine of ``torch.amp.GradScaler`` (and of Megatron / DeepSpeed / BMTrain):

* overflow (any non-finite gradient on **any** rank): skip the optimizer step, multiply S by
  ``backoff_factor`` (0.5: halve; never below ``min_scale``), restart the clean-step count;
* clean step: count it; after ``growth_interval`` consecutive clean steps multiply S by
  ``growth_factor`` (2.0) and restart the count (a scale that would overflow fp32 is kept).

Every rank must skip the same steps, or the replicas (or the ZeRO shards) diverge: with
sharded gradients each rank only sees its shard, so ``unscale_and_check`` all-reduces the
found-inf flag with MAX over the process group (one 1-element collective per step). The
scale then evolves identically on every rank.

bf16 has fp32's exponent range and needs no scaling: ``LossScalerConfig(enabled=False)``
makes :class:`DynamicLossScaler` the identity (no multiply, no checks, no collective), and
:class:`StaticLossScaler` is a fixed scale without checks.

Use, in a strategy's backward / ``clip_and_step`` (grads unscaled before clipping, so the
clip threshold and the reported norm are in true units)::

    scaler.scale(loss).backward()
    found_inf = scaler.unscale_and_check(p.grad for p in master_params)
    scaler.update(found_inf)
    if not found_inf:
        clip; optimizer.step()
    zero_grad()
"""
from __future__ import annotations

import math
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from bmray.models.typed_config import ConfigError, check_positive

__all__ = ["DynamicLossScaler", "LossScalerConfig", "ScaledWeight", "StaticLossScaler"]

CONFIG_KEY = "train.loss_scale"


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (inf if out of range): the scale lives in fp32, as GradScaler's
    tensor does, so non-power-of-two factors round exactly as they do there."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.inf


class ScaledWeight:
    """A (lazy) micro-batch weight times the loss scale, converted when backward asks: what
    the sharded strategies pass as the weight of an fp16 micro-batch."""

    def __init__(self, weight: Any, scale: float) -> None:
        self.weight, self.scale = weight, scale

    def __float__(self) -> float:
        return float(self.weight) * self.scale


@dataclass
class LossScalerConfig:
    """``train.loss_scale``: dynamic loss scaling (defaults are torch.amp.GradScaler's)."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0       # scale *= growth_factor after growth_interval clean steps
    backoff_factor: float = 0.5      # scale *= backoff_factor on an overflow
    growth_interval: int = 2000      # consecutive clean steps before the scale grows
    min_scale: float = 1.0           # the scale never backs off below this
    enabled: bool = True             # False: no scaling, no checks (bf16 / fp32)

    def __post_init__(self) -> None:
        p = CONFIG_KEY
        for key in ("init_scale", "growth_factor", "backoff_factor", "min_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"{p}.{key}: expected a finite number, got {value!r}")
        check_positive(f"{p}.init_scale", self.init_scale)
        check_positive(f"{p}.min_scale", self.min_scale)
        if self.growth_factor <= 1.0:
            raise ConfigError(f"{p}.growth_factor: must be > 1, got {self.growth_factor!r}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ConfigError(f"{p}.backoff_factor: must be in (0, 1), got {self.backoff_factor!r}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ConfigError(f"{p}.growth_interval: expected an integer >= 1, "
                              f"got {self.growth_interval!r}")
        if self.min_scale > self.init_scale:
            raise ConfigError(f"{p}.min_scale: {self.min_scale} is larger than "
                              f"{p}.init_scale {self.init_scale}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{p}.enabled: expected true or false, got {self.enabled!r}")


def _grads_by_device_and_dtype(grads: Iterable[Tensor | None]) -> dict[tuple, list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()._values() if not g.is_coalesced() else g._values()
        groups[(g.device, g.dtype)].append(g)
    return groups


def unscale_(grads: Iterable[Tensor | None], inv_scale: float) -> Tensor | None:
    """Multiply ``grads`` in place by ``inv_scale``; return a 0/1 float flag "some gradient is
    inf or NaN" on the first gradient's device (None when there are no gradients).

    Uses torch's fused ``_amp_foreach_non_finite_check_and_unscale_`` (the GradScaler kernel:
    one pass that checks and multiplies) where it exists, else foreach ops.
    """
    flags = []
    for (device, _), group in _grads_by_device_and_dtype(grads).items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        if hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"):
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        else:
            finite = torch.stack([torch.isfinite(g).all() for g in group]).all()
            found.copy_((~finite).float().reshape(1))
            torch._foreach_mul_(group, inv_scale)
        flags.append(found)
    if not flags:
        return None
    first = flags[0]
    for f in flags[1:]:
        first = torch.maximum(first, f.to(first.device))
    return first


def _comm_device(group: Any) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and others) CPU ones."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DynamicLossScaler:
    """Dynamic loss scaling with a rank-consistent skip decision (see the module docstring).

    ``group``: the process group whose ranks must agree on skipping (None: the default group
    when torch.distributed is initialised; in one process no collective is issued).
    ``unscale_and_check`` is a collective then: every rank of ``group`` must call it every
    step, with or without gradients of its own.
    """

    def __init__(self, config: LossScalerConfig | None = None, group: Any = None):
        self.config = config or LossScalerConfig()
        self.group = group
        self.scale_value: float = _f32(self.config.init_scale) if self.config.enabled else 1.0
        self.growth_tracker: int = 0          # consecutive clean steps since the last change
        self.skipped_steps: int = 0           # overflow steps so far (for logs)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def scale(self, loss: Tensor) -> Tensor:
        """``loss * scale`` (the loss itself when disabled)."""
        return loss * self.scale_value if self.enabled else loss

    def unscale_and_check(self, grads: Iterable[Tensor | None]) -> bool:
        """Divide ``grads`` in place by the scale; True when any gradient on any rank of the
        group is inf or NaN (the caller then skips the optimizer step). Disabled: False."""
        if not self.enabled:
            return False
        found = unscale_(grads, 1.0 / self.scale_value)
        if dist.is_available() and dist.is_initialized():
            device = _comm_device(self.group)
            flag = (found.to(device) if found is not None
                    else torch.zeros(1, dtype=torch.float32, device=device))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            found = flag
        return bool(found is not None and found.item() > 0)

    def update(self, found_inf: bool) -> None:
        """Advance the state machine after a step (GradScaler's ``_amp_update_scale_``)."""
        if not self.enabled:
            return
        cfg = self.config
        if found_inf:
            self.scale_value = max(_f32(self.scale_value * cfg.backoff_factor), cfg.min_scale)
            self.growth_tracker = 0
            self.skipped_steps += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == cfg.growth_interval:
            grown = _f32(self.scale_value * cfg.growth_factor)
            if math.isfinite(grown):          # GradScaler keeps a scale that would be inf in fp32
                self.scale_value = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


class StaticLossScaler:
    """A fixed scale (default 1: bf16 / fp32) with no overflow checks and no collective.

    Same interface as :class:`DynamicLossScaler`; ``unscale_and_check`` only divides (when the
    scale is not 1) and always returns False — a static scale never skips a step.
    """

    enabled = False

    def __init__(self, scale: float = 1.0):
        check_positive(f"{CONFIG_KEY}.init_scale", scale)
        self.scale_value = float(scale)

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self.scale_value == 1.0 else loss * self.scale_value

    def unscale_and_check(self, grads: Iterable[Tensor | None]) -> bool:
        if self.scale_value != 1.0:
            for group in _grads_by_device_and_dtype(grads).values():
                torch._foreach_mul_(group, 1.0 / self.scale_value)
        return False

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value = float(state["scale"])
