"""Memory as the process sees it, not as a strategy declares it.

Why: a strategy's ``memory_report`` sums the tensors it knows about, so a stray copy it does not
know about is invisible to it. These readings come from elsewhere:

* :class:`AllocatorTrace` — the CPU allocator's own allocation / free records, as torch's
  memory profiler collects them (``profile_memory=True``; CPU tensors have no
  ``memory_allocated``). ``mark(name)`` notes a point; afterwards ``live(name)`` is the bytes
  allocated inside the trace and still alive at that point, ``peak(a, b)`` the most alive
  between two marks. Tensors that existed before the trace are not counted (neither their
  allocation nor their free). Memory the allocator does not serve is not seen: shared-memory
  segments (actors/comm/shm_transport.py) and memory-mapped files (``offload_optimizer: disk``).
  The records are per thread: a tensor allocated on this thread and freed on another (a
  shared-memory or gloo work object letting go of an all-gather's input on its own thread)
  looks alive forever. So the trace is exact up to the first collective, and
* :class:`TensorCensus` — the storages of every tensor Python can reach (``gc``), deduplicated,
  less those alive when the census began — counts what is alive whatever thread freed the
  rest. A tensor only C++ holds (autograd's saved tensors, a pending work object) is missed:
  read it when no backward or collective is in flight. Storages in file mappings (mapped
  files, shared memory) are counted apart (``mapped``).
* :func:`mapped_file_bytes` — for those files: their size on disk and the bytes of their
  mappings resident in this process (``/proc/self/smaps``), the only honest figures there.
* :func:`rss_bytes` — the resident set (``/proc/self/statm``).
"""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

_MARK = "live_bytes.mark:"


@dataclass
class AllocatorTrace:
    """``with AllocatorTrace() as t: ...; t.mark("setup"); ...``, then ``t.live("setup")``."""

    device: str = "cpu"
    _events: list[tuple[int, int, int]] = field(default_factory=list)   # (ns, +/-bytes, ptr)
    _marks: dict[str, int] = field(default_factory=dict)                # name -> ns
    _prof: profile | None = None

    def __enter__(self) -> "AllocatorTrace":
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def mark(self, name: str) -> None:
        if name in self._marks or self._prof is None:
            raise ValueError(f"AllocatorTrace.mark: {name!r} marked twice or outside the trace")
        self._marks[name] = -1
        with record_function(_MARK + name):
            pass

    def __exit__(self, *exc: object) -> None:
        assert self._prof is not None
        self._prof.__exit__(*exc)
        tree = self._prof.profiler.kineto_results.experimental_event_tree()
        self._prof = None
        stack = list(tree)
        while stack:
            node = stack.pop()
            kind, fields = node.typed
            if kind == _EventType.Allocation and str(fields.device).startswith(self.device):
                self._events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
            elif kind == _EventType.TorchOp and node.name.startswith(_MARK):
                self._marks[node.name[len(_MARK):]] = node.start_time_ns
            stack.extend(node.children)
        self._events.sort()

    def _curve(self) -> list[tuple[int, int]]:
        """(time, live bytes after the event), counting a free only of a block allocated in
        the trace (a free of an older block has no recorded size: the allocator skips it)."""
        live, sizes, out = 0, {}, []
        for t, size, ptr in self._events:
            if size > 0:
                sizes[ptr] = size
                live += size
            elif ptr in sizes:
                live -= sizes.pop(ptr)
            out.append((t, live))
        return out

    def _at(self, name: str) -> int:
        if self._marks.get(name, -1) < 0:
            raise KeyError(f"AllocatorTrace: no mark {name!r} (marks: {sorted(self._marks)})")
        return self._marks[name]

    def live(self, name: str) -> int:
        """Bytes allocated inside the trace and alive at mark ``name``."""
        t, live = self._at(name), 0
        for when, value in self._curve():
            if when > t:
                break
            live = value
        return live

    def peak(self, start: str, stop: str) -> int:
        """The most bytes alive at once between marks ``start`` and ``stop``."""
        a, b = self._at(start), self._at(stop)
        best = self.live(start)
        for when, value in self._curve():
            if a < when <= b:
                best = max(best, value)
        return best


class TensorCensus:
    """Bytes of the tensor storages reachable from Python now, less those of the storages
    alive at construction (kept alive here, so their addresses cannot be reused)."""

    def __init__(self) -> None:
        self._before = _storages()

    def live(self) -> dict[str, int]:
        """Bytes of the storages new since construction: ``private`` (anonymous memory, what
        the allocator serves) and ``mapped`` (in a file mapping: memory-mapped files, shared
        memory segments)."""
        maps = _file_mappings()
        out = {"private": 0, "mapped": 0}
        for key, t in _storages().items():
            if key not in self._before:
                storage = t.untyped_storage()
                mapped = any(lo <= storage.data_ptr() < hi for lo, hi in maps)
                out["mapped" if mapped else "private"] += storage.nbytes()
        return out


def _storages() -> dict[tuple[int, int], torch.Tensor]:
    """(data pointer, bytes) -> one tensor viewing it, for every CPU storage with data held
    by a tensor that ``gc`` tracks (parameters and plain tensors alike), after a collection
    (a tensor in an unreachable cycle is not alive)."""
    gc.collect()
    out: dict[tuple[int, int], torch.Tensor] = {}
    with warnings.catch_warnings():         # isinstance on deprecated module attributes
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if obj.device.type != "cpu" or obj.layout != torch.strided:
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue                            # a wrapper subclass without storage
        if storage.nbytes():
            out.setdefault((storage.data_ptr(), storage.nbytes()), obj)
    return out


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings backed by a file (a path, not [heap] etc.)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def mapped_file_bytes(paths: list[str]) -> dict[str, int]:
    """``size``: the files' apparent sizes; ``resident``: bytes of this process's mappings of
    them that are in its resident set (smaps ``Rss``), summed over every mapping."""
    wanted = {os.path.realpath(p) for p in paths}
    size = sum(os.path.getsize(p) for p in wanted)
    resident, current = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5:      # a mapping's header line
                current = len(head) == 6 and os.path.realpath(head[5].strip()) in wanted
            elif current and head and head[0] == "Rss:":
                resident += int(head[1]) * 1024
    return {"size": size, "resident": resident}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
