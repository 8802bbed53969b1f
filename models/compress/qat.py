"""Quantization-aware training: fake quantization with a straight-through estimator.

The forward pass sees the quantized values ``clamp(round(x·(1/s)), -qmax, qmax)·s`` (fp32 in, fp32
out); the backward pass treats rounding as the identity (the straight-through estimator of
Bengio, Léonard & Courville 2013) and, as in Jacob et al. 2018 §3, zeroes the gradient where
the input was clipped: ``∂y/∂x = 1 if |round(x/s)| ≤ qmax else 0`` — decided on the rounded
code, not on ``|x| ≤ qmax·s``: in fp32 ``qmax·(amax/qmax)`` can fall one ulp short of ``amax``,
and the element that sets an absmax scale must keep its gradient whatever the rounding. The scale is a constant of the step
(recomputed from the current weight each forward, not trained).

:func:`prepare_qat` swaps the targeted ``nn.Linear`` layers for :class:`FakeQuantLinear` (the
fp32 weight is what trains); :func:`convert_qat` turns them into the
:class:`~bmray.models.compress.quant.QuantLinear` of the same scheme, whose codes are exactly
the ones the last forward pass used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.compress.quant import (QuantConfig, QuantLinear, plan_targets, qmax,
                                         replace_module)

__all__ = ["FakeQuantize", "fake_quantize", "FakeQuantLinear", "prepare_qat", "convert_qat"]


class FakeQuantize(torch.autograd.Function):
    """Symmetric fake quantization; backward is the clipped straight-through estimator."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, bits: int) -> Tensor:
        limit = qmax(bits)
        codes = torch.round(x * scale.reciprocal())
        ctx.save_for_backward(codes.abs() <= limit)      # not clipped: the gradient passes
        return codes.clamp_(-limit, limit) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """``clamp(round(x/s), -qmax, qmax)·s`` with the straight-through gradient; ``scale``
    broadcasts against ``x`` (per channel: shape (out, 1)) and gets no gradient."""
    qmax(bits)                                  # ConfigError for an unsupported width
    return FakeQuantize.apply(x, scale.detach(), bits)


class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` whose forward uses its fake-quantized weight (per output channel, or per
    group for int4) and, for w8a8, fake-quantized per-token activations."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.cfg = cfg
        self.weight = linear.weight
        self.bias = linear.bias

    def weight_scale(self) -> Tensor:
        """The current weight's absmax scale, shaped to broadcast over the weight (per group
        for int4: over the weight viewed as (out, in/group, group))."""
        w = self.weight.detach()
        if self.cfg.scheme == "int4":
            w = w.reshape(self.out_features, -1, self.cfg.group_size)
        return w.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / qmax(self.cfg.bits)

    def quantized_weight(self) -> Tensor:
        scale = self.weight_scale()
        if self.cfg.scheme == "int4":
            w = self.weight.reshape(self.out_features, -1, self.cfg.group_size)
            return fake_quantize(w, scale, 4).reshape(self.out_features, self.in_features)
        return fake_quantize(self.weight, scale, 8)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.scheme == "w8a8":
            sx = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
            x = fake_quantize(x, sx, 8)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.cfg.scheme}")


def prepare_qat(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Swap the targeted ``nn.Linear`` layers of ``model`` for :class:`FakeQuantLinear` in
    place (they share the original weight and bias Parameters, so an optimizer built before
    or after sees the same tensors); returns the layer names. Checked before any change."""
    names = plan_targets(model, cfg)
    modules = dict(model.named_modules())
    for name in names:
        replace_module(model, name, FakeQuantLinear(modules[name], cfg))
    return names


@torch.no_grad()
def convert_qat(model: nn.Module) -> list[str]:
    """Replace every :class:`FakeQuantLinear` of ``model`` by the QuantLinear of its scheme
    (quantized from the trained weight with the same scale); returns the layer names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    modules = dict(model.named_modules())
    for name in names:
        fq = modules[name]
        replace_module(model, name, QuantLinear.from_weight(fq.weight, fq.bias, fq.cfg))
    return names
