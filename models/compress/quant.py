"""Post-training quantization of nn.Linear layers, applied by module name from outside.

Every scheme follows the three steps of linear quantization (Jacob et al. 2018, "Quantization
and training of neural networks for efficient integer-arithmetic-only inference"): scale by
``s = max|w| / qmax`` (symmetric, zero point 0), round to integers in [-qmax, qmax], and scale
back (``w ≈ q·s``), so the per-element error is at most ``s/2``. Codes are computed as
``round(v · (1/s))`` everywhere (a multiply runs ~2× faster than a divide on CPU; QAT uses
the same expression, so its fake codes and the converted layer's codes agree).

- ``int8``: weight-only, one scale per output channel; fp32 activations
  (the weight is dequantized per call: the saving is memory; on CPU torch's
  ``_weight_int8pack_mm`` for fp32 inputs is ~40× slower than fp32 ``F.linear``).
- ``w8a8``: int8 weights per output channel and int8 activations with one dynamic scale per
  token (LLM.int8() / SmoothQuant's "per-token" granularity); the product is a real
  int8 × int8 → int32 matrix multiplication, rescaled by ``s_x ⊗ s_w``: oneDNN's int8 GEMM
  on CPU (``s_w`` fused in), ``torch._int_mm`` elsewhere.
- ``int4``: weight-only, one scale per group of ``group_size`` input features (GPTQ / AWQ's
  group-wise layout), two 4-bit values packed per uint8 byte.

:func:`quantize_model` swaps the targeted ``nn.Linear`` modules for :class:`QuantLinear` in
place; the quantized model's ``state_dict`` (plain int8/uint8/fp32 tensors) loads into any
model quantized with the same config. docs/compression.md has the formulas and error bounds.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.delta.base import match_modules
from bmray.models.typed_config import ConfigError, check_choice, check_int

__all__ = ["SCHEMES", "SUPPORTED_BITS", "CHUNK_BYTES", "ONEDNN_INT8", "QuantConfig", "QuantReport",
           "QuantLinear", "W8A8StraightThrough", "qmax", "quantize_per_channel",
           "quantize_groupwise", "quantize_per_token", "token_chunk", "dequantize", "pack_int4",
           "unpack_int4", "w8a8_matmul", "w8a8_matmul_onednn", "onednn_pack", "plan_targets",
           "replace_module", "quantize_model"]

SCHEMES = ("int8", "w8a8", "int4")
SUPPORTED_BITS = (4, 8)
_BITS = {"int8": 8, "w8a8": 8, "int4": 4}
_EPS = 1e-12        # floor of max|x|: an all-zero row gets a tiny scale and quantizes to 0
ONEDNN_INT8 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn,
                                                               "qlinear_pointwise")
CHUNK_BYTES = 768 * 1024   # fp32 rows per thread per step of per-token quantization: in L2


@dataclass(frozen=True)
class QuantConfig:
    """``scheme`` (one of SCHEMES); ``group_size`` (int4's input features per scale);
    ``targets`` (module-name patterns, as models/delta; empty = every nn.Linear) and ``skip``
    (patterns excluded from the targets, e.g. a classifier head)."""

    scheme: Literal["int8", "w8a8", "int4"] = "int8"
    group_size: int = 128
    targets: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, SCHEMES)
        check_int("group_size", self.group_size, minimum=2)
        if self.group_size % 2:
            raise ConfigError(f"group_size: must be even (two 4-bit values per byte), "
                              f"got {self.group_size}")
        for key in ("targets", "skip"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{key}: expected a list of module-name patterns, got {value!r}")
            object.__setattr__(self, key, tuple(value))

    @property
    def bits(self) -> int:
        return _BITS[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def qmax(bits: int) -> int:
    """Largest integer of a symmetric ``bits``-bit code: 127 for 8, 7 for 4 (the code -2^(b-1)
    is left unused so that the range is symmetric and zero is exact)."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits: {bits!r} is not one of {list(SUPPORTED_BITS)}")
    return 2 ** (bits - 1) - 1


def _absmax_scale(x: Tensor, dim: int, bits: int) -> Tensor:
    return x.detach().abs().amax(dim, keepdim=True).float().clamp_min(_EPS) / qmax(bits)


def quantize_per_channel(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """(q int8 of ``w``'s shape, scale fp32 of shape (out_features,)): one symmetric scale per
    row ``s_i = max_j |w_ij| / qmax``, ``q = round(w·(1/s))``; ``|w - q·s| ≤ s/2``."""
    scale = _absmax_scale(w, -1, bits)
    q = torch.round(w.float() * scale.reciprocal()).clamp_(-qmax(bits), qmax(bits))
    q = q.to(torch.int8)
    return q, scale.squeeze(-1)


def quantize_groupwise(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(q int8 of ``w``'s shape, scale (out_features, in_features // group_size)): one
    symmetric scale per row and per run of ``group_size`` input features."""
    rows, cols = w.shape
    if group_size < 1 or cols % group_size:
        raise ConfigError(f"group_size: {group_size} does not divide in_features {cols}")
    g = w.float().reshape(rows, cols // group_size, group_size)
    scale = _absmax_scale(g, -1, bits)
    q = torch.round(g * scale.reciprocal()).clamp_(-qmax(bits), qmax(bits)).to(torch.int8)
    return q.reshape(rows, cols), scale.squeeze(-1)


class _Workspace(threading.local):
    """One fp32 scratch buffer per thread, reused across calls: a fresh multi-hundred-KiB
    tensor per call costs page faults that, on CPU, take longer than the arithmetic."""

    buf: Tensor | None = None
    view: Tensor | None = None                  # the last (rows, cols) view handed out

    def get(self, rows: int, cols: int, device: torch.device) -> Tensor:
        view = self.view
        if view is not None and view.shape == (rows, cols) and view.device == device:
            return view
        buf = self.buf
        if buf is None or buf.numel() < rows * cols or buf.device != device:
            buf = self.buf = torch.empty(rows * cols, device=device)
        view = self.view = buf[:rows * cols].view(rows, cols)
        return view


_SCRATCH = _Workspace()


def token_chunk(k: int) -> int:
    """Rows of ``k`` features quantized per step: ``CHUNK_BYTES`` of fp32 per intra-op thread
    (each thread's share of every elementwise pass stays in its L2; larger steps also keep
    the per-op thread start-up small next to the work)."""
    return max(8, CHUNK_BYTES // (4 * k)) * torch.get_num_threads()


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 of ``x``'s shape, scale fp32 of shape ``x.shape[:-1] + (1,)``): one dynamic
    scale per token (row of the last dimension), ``s = max|x| / 127``. No clamp is needed:
    ``|x / s| ≤ 127`` by construction. Rows go :func:`token_chunk` at a time through one reused
    fp32 buffer, so the passes (|x|, max, x/s, round, → int8) run in cache."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.requires_grad:                       # codes: no gradient
        rows = rows.detach()
    if rows.dtype != torch.float32:
        rows = rows.float()
    n, k = rows.shape
    chunk = token_chunk(k)
    buf = _SCRATCH.get(min(n, chunk), k, rows.device)
    if n <= chunk:                               # one chunk: no slicing, no copies
        scale = torch.abs(rows, out=buf).amax(-1, keepdim=True).clamp_min_(_EPS).div_(127.0)
        q = torch.mul(rows, scale.reciprocal(), out=buf).round_().to(torch.int8)
    else:
        q = torch.empty((n, k), dtype=torch.int8, device=rows.device)
        scale = torch.empty(n, 1, device=rows.device)
        for i in range(0, n, chunk):
            part = rows[i:i + chunk]
            tmp = buf[:part.shape[0]]
            s = torch.abs(part, out=tmp).amax(-1, keepdim=True).clamp_min_(_EPS).div_(127.0)
            scale[i:i + chunk] = s
            q[i:i + chunk] = torch.mul(part, s.reciprocal(), out=tmp).round_()
    if x.dim() == 2:
        return q, scale
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def dequantize(q: Tensor, scale: Tensor, group_size: int | None = None) -> Tensor:
    """``q · s`` in fp32: ``scale`` per row (shape (rows,) or (rows, 1)) or, with
    ``group_size``, per row and group (shape (rows, cols // group_size))."""
    if group_size is None:
        return q.float() * (scale.unsqueeze(-1) if scale.dim() == q.dim() - 1 else scale)
    rows, cols = q.shape
    return (q.float().reshape(rows, cols // group_size, group_size)
            * scale.unsqueeze(-1)).reshape(rows, cols)


def pack_int4(q: Tensor) -> Tensor:
    """Two signed 4-bit values per uint8 byte along the last dimension (even length): element
    2j in the low nibble, 2j+1 in the high one, each as its two's complement nibble."""
    if q.shape[-1] % 2:
        raise ConfigError(f"in_features: int4 packing needs an even length, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7], last dimension doubled."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)
    return both - ((both & 0x8) << 1)          # sign-extend the nibble: 8..15 → -8..-1


def w8a8_matmul(x: Tensor, weight_q: Tensor, weight_scale: Tensor,
                bias: Tensor | None = None) -> Tensor:
    """``x @ (q_w·s_w)ᵀ + b`` with ``x`` quantized per token: ``(q_x @ q_wᵀ) ⊙ (s_x ⊗ s_w)``.
    The int8 product runs in ``torch._int_mm`` (int32 accumulation, exact); ``q_wᵀ`` is a
    column-major view of the row-major (out, in) weight. ``int32 · fp32`` promotes to fp32 in
    one pass; the bias is added in the same ``addcmul`` pass that applies ``s_w``. The
    device-generic path (CUDA, or a CPU build without oneDNN)."""
    shape = x.shape
    xq, sx = quantize_per_token(x.reshape(-1, shape[-1]))
    out = torch.mul(torch._int_mm(xq, weight_q.t()), sx)
    out = torch.addcmul(bias, out, weight_scale, out=out) if bias is not None \
        else out.mul_(weight_scale)
    return out.reshape(*shape[:-1], weight_q.shape[0]).to(x.dtype)


def onednn_pack(weight_q: Tensor) -> Tensor:
    """The int8 (out, in) weight in oneDNN's blocked layout (an opaque tensor: not saved)."""
    return torch.ops.onednn.qlinear_prepack(weight_q, None)


def w8a8_matmul_onednn(x: Tensor, packed: Tensor, weight_scale: Tensor, zero_points: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """:func:`w8a8_matmul` on oneDNN's int8 GEMM (AMX / VNNI): ``s_w`` is applied inside the
    GEMM, which writes fp32 directly (no int32 tensor, no conversion pass); ``s_x`` (per
    token: oneDNN takes one activation scale) and the bias follow in one ``addcmul`` pass."""
    shape = x.shape
    xq, sx = quantize_per_token(x if x.dim() == 2 else x.reshape(-1, shape[-1]))
    out = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, weight_scale, zero_points, None,
                                             1.0, 0, torch.float32, "none", [], "")
    out = torch.addcmul(bias, out, sx, out=out) if bias is not None else out.mul_(sx)
    if x.dim() != 2:
        out = out.reshape(*shape[:-1], weight_scale.shape[0])
    return out if x.dtype == torch.float32 else out.to(x.dtype)


class W8A8StraightThrough(torch.autograd.Function):
    """A w8a8 layer inside a graph that needs ``∂/∂x`` (a frozen quantized base under trained
    deltas): the forward is the int8 product, the backward treats the activations'
    quantization as the identity (straight-through, as in QAT) and multiplies by the
    dequantized weight: ``∂L/∂x = ∂L/∂y · Ŵ``. The quantized weight gets no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:
        ctx.layer = layer
        return layer.int8_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear``. Buffers: ``weight_q`` (int8 (out, in); int4: uint8
    (out, in/2), two values a byte), ``weight_scale`` (fp32 (out,); int4: (out, in/group)) and
    ``bias`` (fp32 or None). Build one with :meth:`from_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str,
                 group_size: int = 128):
        super().__init__()
        check_choice("scheme", scheme, SCHEMES)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        if scheme == "int4":
            if in_features % group_size:
                raise ConfigError(f"group_size: {group_size} does not divide in_features "
                                  f"{in_features}")
            wq = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            ws = torch.ones(out_features, in_features // group_size)
        else:
            wq = torch.zeros(out_features, in_features, dtype=torch.int8)
            ws = torch.ones(out_features)
        self.register_buffer("weight_q", wq)
        self.register_buffer("weight_scale", ws)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[Any, Tensor, Tensor] | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "QuantLinear":
        """Quantize ``linear``'s weight with ``cfg.scheme`` (bias kept in fp32)."""
        return cls.from_weight(linear.weight, linear.bias, cfg)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: Tensor, bias: Tensor | None, cfg: QuantConfig) -> "QuantLinear":
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bias is not None, cfg.scheme, cfg.group_size)
        if cfg.scheme == "int4":
            q, scale = quantize_groupwise(weight, 4, cfg.group_size)
            q = pack_int4(q)
        else:
            q, scale = quantize_per_channel(weight, 8)
        mod.weight_q.copy_(q)
        mod.weight_scale.copy_(scale)
        if bias is not None:
            mod.bias.copy_(bias.float())
        return mod.to(weight.device)

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight ``q·s`` this layer multiplies by."""
        if self.scheme == "int4":
            return dequantize(unpack_int4(self.weight_q), self.weight_scale, self.group_size)
        return dequantize(self.weight_q, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme == "w8a8":
            if x.requires_grad and torch.is_grad_enabled():
                return W8A8StraightThrough.apply(x, self)
            return self.int8_forward(x)
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def int8_forward(self, x: Tensor) -> Tensor:
        """The w8a8 product (no autograd graph): oneDNN on CPU, ``torch._int_mm`` elsewhere."""
        if ONEDNN_INT8 and x.is_cpu:
            packed, zeros = self.onednn_weight()
            return w8a8_matmul_onednn(x, packed, self.weight_scale, zeros, self.bias)
        return w8a8_matmul(x, self.weight_q, self.weight_scale, self.bias)

    def onednn_weight(self) -> tuple[Tensor, Tensor]:
        """The packed weight, rebuilt when ``weight_q`` changed (load_state_dict, .to, an
        in-place edit of a tensor that tracks versions: inference-mode tensors do not)."""
        w = self.weight_q
        key = (w.data_ptr(), None if w.is_inference() else w._version)
        if self._packed is None or self._packed[0] != key:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            self._packed = (key, onednn_pack(self.weight_q), zeros)
        return self._packed[1], self._packed[2]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}      # the opaque packed tensor is not copied

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{group}")


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_model` changed: the layers and their weight bytes before (fp32
    weight) and after (codes + scales); biases are fp32 on both sides and not counted."""

    scheme: str
    layers: tuple[str, ...]
    weight_bytes_before: int
    weight_bytes_after: int

    @property
    def ratio(self) -> float:
        return self.weight_bytes_before / max(1, self.weight_bytes_after)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def plan_targets(model: nn.Module, cfg: QuantConfig,
                 site_types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[str]:
    """Names of the ``site_types`` modules ``cfg`` selects (every one when ``targets`` is
    empty), minus ``skip``; a pattern that matches nothing, or a layer the scheme cannot take
    (int4: ``group_size`` must divide in_features), is a ConfigError naming the key."""
    if cfg.targets:
        names = match_modules(model, cfg.targets, site_types)
    else:
        names = [n for n, m in model.named_modules() if n and isinstance(m, site_types)]
        if not names:
            raise ConfigError(f"targets: {type(model).__name__} has no "
                              f"{'/'.join(t.__name__ for t in site_types)} to quantize")
    if cfg.skip:
        try:
            skipped = set(match_modules(model, cfg.skip, site_types))
        except ConfigError as exc:
            raise ConfigError("skip" + str(exc)[len("targets"):]) from None
        names = [n for n in names if n not in skipped]
    modules = dict(model.named_modules())
    for name in names:
        in_f = modules[name].weight.shape[1]
        if cfg.scheme == "int4" and in_f % cfg.group_size:
            raise ConfigError(f"group_size: {cfg.group_size} does not divide in_features "
                              f"{in_f} of layer {name!r}")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``name`` of ``model`` to ``new``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _weight_bytes(m: nn.Module) -> int:
    if isinstance(m, QuantLinear):
        return sum(t.numel() * t.element_size() for t in (m.weight_q, m.weight_scale))
    return m.weight.numel() * m.weight.element_size()


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig) -> QuantReport:
    """Replace every targeted ``nn.Linear`` of ``model`` by a :class:`QuantLinear` in place.
    Every target is checked before the first one changes; a module reached under two names
    (tied) becomes one shared QuantLinear."""
    names = plan_targets(model, cfg)
    modules = dict(model.named_modules(remove_duplicate=False))
    done: dict[int, QuantLinear] = {}
    before = after = 0
    for name in names:
        linear = modules[name]
        if id(linear) not in done:
            done[id(linear)] = QuantLinear.from_linear(linear, cfg)
            before += _weight_bytes(linear)
            after += _weight_bytes(done[id(linear)])
    for name, m in modules.items():          # every alias of a replaced module
        if name and id(m) in done:
            replace_module(model, name, done[id(m)])
    return QuantReport(cfg.scheme, tuple(names), before, after)
