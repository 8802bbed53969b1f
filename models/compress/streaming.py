"""Low-resource inference: run a model whose weights exceed a memory budget (BMInf's idea).

BMInf (Han et al. 2021, "BMInf: An Efficient Toolkit for Big Model Inference and Tuning") keeps
what fits of a big model on the device and streams the rest layer by layer from host memory,
copying the next layer while the current one computes. Here the streamed units are the model's
blocks (``find_blocks``): the always-resident parts (embeddings, final norm, head: whatever is
outside the blocks) stay put; the planner keeps as many blocks resident as ``memory_limit``
allows (per-output-channel symmetric int8 + fp32 scale when ``int8_resident``, dequantised on
the fly); the others live in host memory or on disk (one safetensors file per block) and are
copied into a bounded buffer of one or two block-sized slots right before their block runs.
With ``prefetch`` the next block's copy runs on a background thread (on a GPU: a side CUDA
stream) while the current block computes.

The budget is kept by accounting: always-resident + resident blocks + buffer + the KV cache
alive in a step (the cache is never streamed; ``cache_reserve`` sets room aside for it) must
stay within ``memory_limit``: a plan that cannot hold even one block is a ConfigError naming the
smallest workable ``memory_limit``, a cache outgrowing the room left a MemoryBudgetError.
Activations are not counted. The process's RSS (psutil) is sampled at every block.

``stream_model(model, cfg)`` takes the model over: a streamed block's module keeps its code but
no weights (its tensors are pointed at the buffer's views for the call, and emptied after), and
the ``StreamedModel`` is called like the model (``generate`` works on it). docs/compression.md,
"Low-resource inference".
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import psutil
import safetensors.torch
import torch
from torch import Tensor, nn

from bmray.models.structure import find_blocks
from bmray.models.typed_config import ConfigError, check_choice, check_int

__all__ = ["STORES", "ALIGN", "StreamConfig", "StreamPlan", "StreamedModel", "MemoryBudgetError",
           "stream_model", "plan_for", "plan_stream", "always_resident_bytes", "int8_quantize",
           "int8_dequantize", "tensor_bytes", "kv_cache_reserve", "block_bytes",
           "int8_block_bytes"]

STORES = ("host", "disk")
ALIGN = 64          # every tensor of a packed block starts at a multiple of this (the CPU
                    # allocator's alignment, so kernels see the same alignment as resident weights)
THREAD_PREFIX = "bmray-stream"


class MemoryBudgetError(RuntimeError):
    """The bytes in use (weights + buffer + KV cache) would pass ``memory_limit`` at run time."""


@dataclass(frozen=True)
class StreamConfig:
    """How to run a model under a memory budget (every value checked; ConfigError names the key).

    memory_limit: bytes for weights, the streaming buffer and the KV cache together.
    int8_resident: resident blocks held as int8 + per-channel scale (else as they are).
    prefetch: copy the next block while this one computes (a second buffer slot).
    store: where streamed blocks live, ``host`` memory or ``disk`` (one file per block).
    disk_dir: folder for the disk store (None: a temporary folder, removed on close).
    cache_reserve: bytes of ``memory_limit`` set aside for the KV cache (see kv_cache_reserve).
    device: where blocks run ("cpu", "cuda", "cuda:1").
    """

    memory_limit: int
    int8_resident: bool = True
    prefetch: bool = True
    store: Literal["host", "disk"] = "host"
    disk_dir: str | None = None
    cache_reserve: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        p = "stream"
        check_int(f"{p}.memory_limit", self.memory_limit, minimum=1)
        check_int(f"{p}.cache_reserve", self.cache_reserve, minimum=0)
        for key in ("int8_resident", "prefetch"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{p}.{key}: expected true or false, got {getattr(self, key)!r}")
        check_choice(f"{p}.store", self.store, STORES)
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir):
            raise ConfigError(f"{p}.disk_dir: expected a folder path, got {self.disk_dir!r}")
        if self.disk_dir is not None and self.store != "disk":
            raise ConfigError(f"{p}.disk_dir: given, but store is {self.store!r} (set store: disk)")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"{p}.device: {self.device!r} is not a torch device") from exc
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{p}.device: {self.device!r}: only cpu and cuda are supported")
        if self.cache_reserve >= self.memory_limit:
            raise ConfigError(f"{p}.cache_reserve: {self.cache_reserve} leaves nothing of "
                              f"memory_limit {self.memory_limit} for the weights")


# ----------------------------------------------------------------------------------------------
# Sizes and the int8 weight store
# ----------------------------------------------------------------------------------------------

def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested list / tuple / dict (a KV cache, a block's output)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def kv_cache_reserve(n_layers: int, batch: int, seq_len: int, d_model: int,
                     bytes_per_value: int = 4) -> int:
    """Bytes a decoder's KV cache of ``seq_len`` tokens can take within one generation step:
    keys + values of every layer, twice (the step's new cache is built by concatenation while
    the caller still holds the old one)."""
    return 2 * 2 * n_layers * batch * seq_len * d_model * bytes_per_value


def int8_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 (the linear-scaling / quantize steps of LLM.int8 and
    BMInf): ``s_r = max_j |W_rj| / 127``, ``q_rj = clamp(round(W_rj / s_r), -127, 127)``.
    A row of zeros gets ``s_r = 1``. Returns (q int8 [out, in], s float32 [out])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_dequantize(q: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """``W'_rj = q_rj · s_r`` (the scale-back step), written into ``out`` when given."""
    if out is None:
        return q.float() * scale[:, None]
    return torch.mul(q, scale[:, None], out=out)


def _block_tensors(block: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of a block by name (a streamed block gets them all from
    the buffer)."""
    out = {n: p.detach() for n, p in block.named_parameters(remove_duplicate=False)}
    out.update({n: b for n, b in block.named_buffers(remove_duplicate=False)})
    return out


def _quantized_names(block: nn.Module) -> set[str]:
    """The 2-D weights of the block's nn.Linear modules: what the int8 store quantizes."""
    return {f"{name}.weight" if name else "weight" for name, m in block.named_modules()
            if isinstance(m, nn.Linear)}


def block_bytes(block: nn.Module) -> int:
    """Bytes a block takes in the buffer: its tensors as they are, each start aligned to
    ``ALIGN`` (so also the size of a streamed block in the host or disk store)."""
    return sum(_align(tensor_bytes(t)) for t in _block_tensors(block).values())


def int8_block_bytes(block: nn.Module) -> int:
    """Bytes of a block held by the int8 store: each Linear weight out·in int8 + out fp32
    scales, every other tensor as it is."""
    qnames = _quantized_names(block)
    total = 0
    for name, t in _block_tensors(block).items():
        total += t.size(0) * t.size(1) + 4 * t.size(0) if name in qnames else tensor_bytes(t)
    return total


# ----------------------------------------------------------------------------------------------
# Packed layout: a block's tensors as views into one flat byte buffer
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pack_layout(tensors: dict[str, Tensor]) -> tuple[dict[str, _Entry], int]:
    """Where each tensor lies in the block's flat buffer (each start aligned), and its size."""
    layout, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        layout[name] = _Entry(t.dtype, tuple(t.shape), offset, offset + n)
        offset = _align(offset + n)
    return layout, offset


def _views(raw: Tensor, layout: dict[str, _Entry]) -> dict[str, Tensor]:
    """Typed views of ``raw`` (uint8) as the block's tensors."""
    return {name: raw[e.begin:e.end].view(e.dtype).view(e.shape) for name, e in layout.items()}


def _pack(tensors: dict[str, Tensor], layout: dict[str, _Entry], nbytes: int) -> Tensor:
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    for name, view in _views(flat, layout).items():
        view.copy_(tensors[name])
    return flat


_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def _layout_json(layout: dict[str, _Entry]) -> str:
    return json.dumps({n: [str(e.dtype), list(e.shape), e.begin, e.end] for n, e in layout.items()})


def _layout_from_json(text: str) -> dict[str, _Entry]:
    return {n: _Entry(_DTYPES[d], tuple(s), b, e) for n, (d, s, b, e) in json.loads(text).items()}


# ----------------------------------------------------------------------------------------------
# Where a block's weights come from when it runs
# ----------------------------------------------------------------------------------------------

class _HostSource:
    """A streamed block in host memory (pinned when the blocks run on a GPU): one copy."""

    def __init__(self, tensors: dict[str, Tensor], pin: bool):
        self.layout, self.nbytes = _pack_layout(tensors)
        flat = _pack(tensors, self.layout, self.nbytes)
        self.flat = flat.pin_memory() if pin else flat

    def fill(self, raw: Tensor, views: dict[str, Tensor], staging: Tensor | None) -> None:
        raw[:self.nbytes].copy_(self.flat, non_blocking=raw.is_cuda)

    def close(self) -> None:
        pass


class _DiskSource:
    """A streamed block in a safetensors file (one tensor ``data``: the packed bytes; the
    layout in the file's metadata), read straight into the buffer with ``os.preadv``."""

    def __init__(self, tensors: dict[str, Tensor], path: str):
        self.layout, self.nbytes = _pack_layout(tensors)
        flat = _pack(tensors, self.layout, self.nbytes)
        safetensors.torch.save_file({"data": flat}, path,
                                    metadata={"layout": _layout_json(self.layout)})
        del flat
        self.path = path
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        self.layout = _layout_from_json(header["__metadata__"]["layout"])
        begin, end = header["data"]["data_offsets"]
        if end - begin != self.nbytes:
            raise ValueError(f"{path}: holds {end - begin} bytes, expected {self.nbytes}")
        self.offset = 8 + header_len + begin
        self.fd: int | None = os.open(path, os.O_RDONLY)

    def fill(self, raw: Tensor, views: dict[str, Tensor], staging: Tensor | None) -> None:
        if self.fd is None:
            raise RuntimeError(f"{self.path}: the disk store is closed")
        target = staging if raw.is_cuda else raw
        mv = memoryview(target[:self.nbytes].numpy()).cast("B")
        done = 0
        while done < self.nbytes:
            n = os.preadv(self.fd, [mv[done:]], self.offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {done}")
            done += n
        if raw.is_cuda:
            raw[:self.nbytes].copy_(target[:self.nbytes], non_blocking=True)

    def close(self) -> None:
        """Close the file and remove it (it is this run's copy of the block)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


class _Int8Source:
    """A resident block in the int8 store: Linear weights as (q, scale), the rest as they are;
    filling dequantises into the buffer."""

    def __init__(self, tensors: dict[str, Tensor], qnames: set[str], device: torch.device):
        self.layout, self.nbytes = _pack_layout(tensors)
        self.quantized = {n: tuple(x.to(device) for x in int8_quantize(t))
                          for n, t in tensors.items() if n in qnames}
        self.plain = {n: t.to(device, copy=True) for n, t in tensors.items() if n not in qnames}
        self.resident_bytes = tensor_bytes(self.quantized) + tensor_bytes(self.plain)

    def fill(self, raw: Tensor, views: dict[str, Tensor], staging: Tensor | None) -> None:
        for name, (q, scale) in self.quantized.items():
            int8_dequantize(q, scale, out=views[name])
        for name, t in self.plain.items():
            views[name].copy_(t)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# The plan: what stays resident, how big the buffer is
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamPlan:
    """Which blocks stay resident (``resident``: int8 when ``int8``), which are streamed, and
    the buffer (``slots`` × ``slot_bytes``). ``minimum_limit``: the smallest workable
    ``memory_limit`` for this model and config (every block streamed)."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    int8: bool
    slots: int
    slot_bytes: int
    always_resident_bytes: int
    resident_block_bytes: int
    cache_reserve: int
    memory_limit: int
    minimum_limit: int

    @property
    def buffer_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def resident_bytes(self) -> int:
        return self.always_resident_bytes + self.resident_block_bytes


def plan_stream(full_bytes: Sequence[int], int8_bytes: Sequence[int], always_resident: int,
                cfg: StreamConfig) -> StreamPlan:
    """Fit blocks into ``cfg.memory_limit`` (block i weighs ``full_bytes[i]`` as it is,
    ``block_bytes``; ``int8_bytes[i]`` in the int8 store, ``int8_block_bytes``).

    Without ``int8_resident``, a model that fits whole runs all-resident, with no buffer.
    Otherwise the buffer holds one slot (two with ``prefetch``) of the largest block, and the
    blocks are made resident in order while the room left allows (int8 ones still run through
    a slot: that is where they are dequantised). The rest are streamed.
    """
    n, limit, reserve = len(full_bytes), cfg.memory_limit, cfg.cache_reserve
    if not cfg.int8_resident and always_resident + reserve + sum(full_bytes) <= limit:
        return StreamPlan(tuple(range(n)), (), False, 0, 0, always_resident, sum(full_bytes),
                          reserve, limit, always_resident + reserve + sum(full_bytes))
    slot_bytes = _align(max(full_bytes)) if n else 0
    slots = 2 if cfg.prefetch else 1
    minimum = always_resident + reserve + slots * slot_bytes
    if limit < minimum:
        alt = "" if not cfg.prefetch else (f" (with prefetch=False, one slot: "
                                           f"{minimum - slot_bytes})")
        raise ConfigError(
            f"stream.memory_limit: {limit} bytes cannot run this model: the always-resident "
            f"parts (embeddings, final norm, head) take {always_resident}, cache_reserve "
            f"{reserve}, and the buffer {slots} slot(s) of the largest block, {slot_bytes} "
            f"each; the smallest workable memory_limit is {minimum} bytes{alt}")
    room, resident, cost = limit - minimum, [], 0
    costs = int8_bytes if cfg.int8_resident else full_bytes
    for i in range(n):
        if costs[i] <= room:
            resident.append(i)
            room -= costs[i]
            cost += costs[i]
    streamed = tuple(i for i in range(n) if i not in set(resident))
    return StreamPlan(tuple(resident), streamed, cfg.int8_resident, slots, slot_bytes,
                      always_resident, cost, reserve, limit, minimum)


def always_resident_bytes(model: nn.Module, block_lists: Sequence[str] | None = None) -> int:
    """Bytes of the parameters and buffers outside the blocks (a tied matrix counted once)."""
    in_blocks = {t.untyped_storage().data_ptr() for _, b in find_blocks(model, block_lists)
                 for t in _block_tensors(b).values() if t.numel()}
    seen, total = set(), 0
    for t in [p.detach() for p in model.parameters()] + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if not t.numel() or ptr in in_blocks or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def plan_for(model: nn.Module, cfg: StreamConfig,
             block_lists: Sequence[str] | None = None) -> StreamPlan:
    """The plan ``stream_model(model, cfg)`` would follow, without taking the model over
    (ConfigError when ``cfg.memory_limit`` is too small)."""
    blocks = [b for _, b in find_blocks(model, block_lists)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks to stream")
    return plan_stream([block_bytes(b) for b in blocks], [int8_block_bytes(b) for b in blocks],
                       always_resident_bytes(model, block_lists), cfg)


# ----------------------------------------------------------------------------------------------
# The streamed model
# ----------------------------------------------------------------------------------------------

class _StreamedBlock(nn.Module):
    """Stands in the model's block list for block ``index``; runs it through the engine."""

    def __init__(self, engine: "StreamedModel", index: int, name: str):
        super().__init__()
        self._engine = weakref.ref(engine)      # not a submodule: no cycle, no parameters
        self.index, self.block_name = index, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        engine = self._engine()
        if engine is None:
            raise RuntimeError(f"{self.block_name}: its StreamedModel is gone")
        return engine.run_block(self.index, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.block_name}, streamed"


class StreamedModel(nn.Module):
    """``model`` run under ``cfg.memory_limit``: call it as the model (``generate`` works).

    Accounting (bytes): ``resident_bytes`` (always-resident parts + resident blocks),
    ``buffer_bytes`` (the slots), ``cache_bytes`` (KV cache alive now), ``in_use_bytes`` (their
    sum), ``peak_bytes`` (the largest ``in_use_bytes`` seen; ``reset_peak``), ``peak_rss`` (the
    process's largest sampled RSS). Set ``trace = []`` to record (event, block, time, thread)
    tuples: load_start / load_end / compute_start / compute_end. ``close()`` joins the prefetch
    thread, closes and removes the disk store's files.
    """

    def __init__(self, model: nn.Module, cfg: StreamConfig,
                 block_lists: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(cfg, StreamConfig):
            raise TypeError(f"cfg must be a StreamConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"stream.device: {cfg.device!r} but CUDA is not available")
        blocks = find_blocks(model, block_lists)
        self.block_names = [name for name, _ in blocks]
        self.plan = plan_for(model, cfg, block_lists)
        self.trace: list[tuple[str, int, float, int]] | None = None
        self._closed = False
        self._dir, self._own_dir = None, False
        if cfg.store == "disk" and self.plan.streamed:
            self._own_dir = cfg.disk_dir is None
            self._dir = tempfile.mkdtemp(prefix="bmray-stream-") if self._own_dir else cfg.disk_dir
            os.makedirs(self._dir, exist_ok=True)
        on_gpu = self.device.type == "cuda"
        # per block: ("resident", None) | ("slot", source); a streamed block's module keeps its
        # code, not its weights (released block by block), and the model holds stand-ins
        self._sources: list[Any] = []
        self._block_modules: list[nn.Module] = []
        self._tensor_slots: list[list[tuple[str, nn.Module, str, bool]]] = []
        try:
            for i, (name, block) in enumerate(blocks):
                ts = _block_tensors(block)
                if i in self.plan.resident and not self.plan.int8:
                    self._sources.append(("resident", None))
                elif i in self.plan.resident:
                    self._sources.append(("slot", _Int8Source(ts, _quantized_names(block),
                                                              self.device)))
                elif cfg.store == "host":
                    self._sources.append(("slot", _HostSource(ts, pin=on_gpu)))
                else:
                    path = os.path.join(self._dir, f"block_{i:04d}.safetensors")
                    self._sources.append(("slot", _DiskSource(ts, path)))
                del ts
                if self._sources[i][0] == "resident":
                    block.to(self.device)
                    self._tensor_slots.append([])
                else:
                    self._tensor_slots.append(_tensor_owners(block))
                    _bind(self._tensor_slots[i], None, self.device)
                self._block_modules.append(block)
                parent_name, _, idx = name.rpartition(".")
                model.get_submodule(parent_name)[int(idx)] = _StreamedBlock(self, i, name)
        except BaseException:
            _shutdown(None, [src for kind, src in self._sources if kind == "slot"],
                      self._dir if self._own_dir else None)
            raise
        self.model = model.to(self.device)
        # the bounded buffer
        self._raws = [torch.empty(self.plan.slot_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(self.plan.slots)]
        self._staging = ([torch.empty(self.plan.slot_bytes, dtype=torch.uint8).pin_memory()
                          for _ in range(self.plan.slots)]
                         if on_gpu and cfg.store == "disk" else [None] * self.plan.slots)
        self._holds: list[int | None] = [None] * self.plan.slots
        self._futures: list[Future | None] = [None] * self.plan.slots
        self._in_use = [False] * self.plan.slots
        self._released: list[Any] = [None] * self.plan.slots
        self._side = torch.cuda.Stream(self.device) if on_gpu else None
        self._views: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._next: dict[int, int] = {}
        self._last: int | None = None
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_PREFIX)
                          if cfg.prefetch and self.plan.slots > 1 else None)
        # accounting
        self._process = psutil.Process()
        self._cache_in = self._cache_new = 0
        self.peak_bytes = self.resident_bytes + self.buffer_bytes
        self.peak_rss = self._process.memory_info().rss
        self._finalizer = weakref.finalize(self, _shutdown, self._executor,
                                           [s for k, s in self._sources if k == "slot"],
                                           self._dir if self._own_dir else None)

    @property
    def store_dir(self) -> str | None:
        """The disk store's folder (None: no block on disk)."""
        return self._dir

    # ---------------------------------------------------------------- accounting
    @property
    def resident_bytes(self) -> int:
        """Always-resident parts + resident blocks (int8 or as they are)."""
        return self.plan.resident_bytes

    @property
    def buffer_bytes(self) -> int:
        """The streaming buffer: ``slots`` × the largest block."""
        return self.plan.buffer_bytes

    @property
    def cache_bytes(self) -> int:
        """KV cache alive in the current step: the one passed in + the layers' new ones."""
        return self._cache_in + self._cache_new

    @property
    def in_use_bytes(self) -> int:
        return self.resident_bytes + self.buffer_bytes + self.cache_bytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.in_use_bytes
        self.peak_rss = self._process.memory_info().rss

    def _charge(self, where: str, sample_rss: bool = False) -> None:
        used = self.in_use_bytes
        self.peak_bytes = max(self.peak_bytes, used)
        if sample_rss:
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        if used > self.cfg.memory_limit:
            raise MemoryBudgetError(
                f"{where}: {used} bytes in use would pass memory_limit {self.cfg.memory_limit} "
                f"(weights {self.resident_bytes}, buffer {self.buffer_bytes}, KV cache "
                f"{self.cache_bytes} against cache_reserve {self.cfg.cache_reserve}); raise "
                f"memory_limit or cache_reserve (kv_cache_reserve sizes it)")

    # ---------------------------------------------------------------- calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.model, *args, **kwargs)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RuntimeError("this StreamedModel is closed")
        self._cache_in, self._cache_new = tensor_bytes(kwargs.get("past_key_values")), 0
        try:
            return fn(*args, **kwargs)
        finally:
            self._cache_in = self._cache_new = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
            attr = getattr(model, name)
            if name in ("encode", "decode"):      # encoder-decoder generation calls these
                return lambda *a, **k: self._call(attr, *a, **k)
            return attr

    def train(self, mode: bool = True) -> "StreamedModel":
        """As ``nn.Module.train``, for the block modules too (they are not submodules)."""
        super().train(mode)
        for block in self.__dict__.get("_block_modules", ()):
            block.train(mode)
        return self

    def run_block(self, i: int, args: tuple, kwargs: dict) -> Any:
        """Run block ``i`` on its weights: resident ones directly, the others from a slot."""
        if self._closed:
            raise RuntimeError("this StreamedModel is closed")
        if self._last is not None:
            self._next[self._last] = i
        self._last = i
        slot = None
        try:
            if self._sources[i][0] == "slot":
                slot = self._acquire(i)
                _bind(self._tensor_slots[i], self._slot_views(slot, i), self.device)
                self._prefetch_after(i, slot)
            self._charge(self.block_names[i])
            self._event("compute_start", i)
            out = self._block_modules[i](*args, **kwargs)
            self._event("compute_end", i)
        finally:
            if slot is not None:
                _bind(self._tensor_slots[i], None, self.device)
                self._release(slot)
        if isinstance(out, tuple) and len(out) > 1:
            self._cache_new += tensor_bytes(out[1])     # the block's present (k, v)
        self._charge(self.block_names[i], sample_rss=True)
        return out

    # ---------------------------------------------------------------- the buffer
    def _event(self, what: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((what, i, time.perf_counter(), threading.get_ident()))

    def _slot_views(self, slot: int, i: int) -> dict[str, Tensor]:
        key = (slot, i)
        if key not in self._views:
            self._views[key] = _views(self._raws[slot], self._sources[i][1].layout)
        return self._views[key]

    def _fill(self, slot: int, i: int) -> None:
        """Copy block ``i`` into ``slot`` (on the prefetch thread, or inline)."""
        self._event("load_start", i)
        src = self._sources[i][1]
        if self._side is None:
            src.fill(self._raws[slot], self._slot_views(slot, i), self._staging[slot])
        else:
            with torch.cuda.stream(self._side):
                if self._released[slot] is not None:
                    self._side.wait_event(self._released[slot])
                src.fill(self._raws[slot], self._slot_views(slot, i), self._staging[slot])
            self._side.synchronize()
        self._event("load_end", i)

    def _wait(self, slot: int) -> None:
        fut, self._futures[slot] = self._futures[slot], None
        if fut is not None:
            fut.result()

    def _acquire(self, i: int) -> int:
        for k, held in enumerate(self._holds):
            if held == i:
                try:
                    self._wait(k)
                except BaseException:
                    self._holds[k] = None
                    raise
                self._in_use[k] = True
                return k
        free = [k for k in range(len(self._raws)) if not self._in_use[k]]
        if not free:
            raise RuntimeError(f"{self.block_names[i]}: no free buffer slot (is a block "
                               f"calling another block?)")
        k = free[0]
        self._wait(k)
        self._holds[k] = None
        self._fill(k, i)
        self._holds[k] = i
        self._in_use[k] = True
        return k

    def _predicted_next(self, i: int) -> int | None:
        """The next slot block after ``i``: as seen in the last forward, else in order."""
        n, j = len(self._sources), i
        for _ in range(n):
            j = self._next.get(j, (j + 1) % n)
            if self._sources[j][0] == "slot":
                return j
        return None

    def _prefetch_after(self, i: int, slot: int) -> None:
        if self._executor is None:
            return
        j = self._predicted_next(i)
        if j is None or j == i or j in self._holds:
            return
        free = [k for k in range(len(self._raws)) if not self._in_use[k] and k != slot]
        if not free:
            return
        k = free[0]
        self._wait(k)
        self._holds[k] = j
        self._futures[k] = self._executor.submit(self._fill, k, j)

    def _release(self, slot: int) -> None:
        self._in_use[slot] = False
        if self._side is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._released[slot] = ev

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Join the prefetch thread, close the disk store's files, remove a temporary folder."""
        if self._closed:
            return
        for k in range(len(self._futures)):
            try:
                self._wait(k)
            except Exception:       # noqa: BLE001 - a failed prefetch is no reason to leak
                pass
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tensor_owners(block: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """(name, owning module, attribute, is a parameter) of each of the block's tensors."""
    out = []
    for name in _block_tensors(block):
        path, _, attr = name.rpartition(".")
        owner = block.get_submodule(path)
        out.append((name, owner, attr, attr in owner._parameters))
    return out


def _bind(owners: list[tuple[str, nn.Module, str, bool]], views: dict[str, Tensor] | None,
          device: torch.device) -> None:
    """Point a streamed block's tensors at the buffer's ``views``, or at empty tensors (None):
    a ``.data`` swap, cheaper than ``torch.func.functional_call``'s."""
    for name, owner, attr, is_param in owners:
        old = owner._parameters[attr] if is_param else owner._buffers[attr]
        new = views[name] if views is not None else torch.empty(0, dtype=old.dtype,
                                                                device=device)
        if is_param:
            old.data = new
        else:
            owner._buffers[attr] = new


def _shutdown(executor: ThreadPoolExecutor | None, sources: list[Any], folder: str | None) -> None:
    if executor is not None:
        executor.shutdown(wait=True)
    for src in sources:
        src.close()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def stream_model(model: nn.Module, cfg: StreamConfig,
                 block_lists: Sequence[str] | None = None) -> StreamedModel:
    """``StreamedModel(model, cfg)``: the model is taken over (its block weights move into the
    int8 store, host memory or disk; its block modules keep none)."""
    return StreamedModel(model, cfg, block_lists)
