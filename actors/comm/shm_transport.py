"""Collectives among the ranks of one host through shared memory.

On gloo every collective crosses TCP loopback and costs ~1.5-2.5 ms of CPU per rank whatever
its size; when all the ranks of a data-parallel group share a host they can instead sum in
memory all of them map (as NCCL's SHM transport and DeepSpeed's CPU ``shm`` all-reduce do).
Only the data moves; synchronisation is one 32-bit counter per rank and Linux futexes.

Mapping: a file under /dev/shm, unlinked once every rank has mapped it; one cache line of
counters per rank, then one slot of ``capacity`` bytes per rank. All-reduce, op s (counters
3s → 3s+1 → 3s+2 → 3s+3): copy into my slot; sum my chunk (``shard_bounds``) of every slot
in rank order and write it back into my slot; read every other rank's chunk. Each chunk is
summed once in a fixed order: bit-identical on every rank. Reduce-scatter stops after the
sum; all-gather copies and reads. Tensors larger than ``capacity`` go in pieces.

Ops run in order on one background thread per group (they overlap the caller's compute); a
dead peer is noticed within a second. Requirements (``available()``): Linux on x86-64 and
CPU tensors. The protocol step by step and measurements: docs/communication.md.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import mmap
import os
import platform
import queue
import threading
import time
import uuid
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from bmray.actors.comm.collectives import shard_bounds

_LINE = 64                      # one cache line of counter per rank
_SYS_FUTEX = 202                # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = None


class Unavailable(RuntimeError):
    """The group cannot use shared memory (ranks on several hosts, /dev/shm refused); raised
    on every rank alike, so all of them fall back together."""


def available() -> bool:
    """Shared-memory collectives work on this platform."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") \
        and os.path.isdir("/dev/shm")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex(addr: int, op: int, val: int, timeout_s: float | None = None) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ts = None
    if timeout_s is not None:
        ts = ctypes.byref(_Timespec(int(timeout_s), int((timeout_s % 1) * 1e9)))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), op, val, ts, None, 0)


class _Handle:
    """What ``async_op=True`` returns: ``wait()`` gives the op's result (torch's Work)."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def wait(self) -> Any:
        return self._future.result()

    def is_completed(self) -> bool:
        return self._future.done()


class ShmGroup:
    """The ranks of ``group`` (all on this host) and their shared mapping; see module doc.

    Collective construction: every rank of ``group`` calls it (it uses the group once to
    agree on the file name and to check that every rank is on this host)."""

    def __init__(self, group: Any = None, capacity_bytes: int = 8 << 20,
                 peer_check_s: float = 1.0) -> None:
        if not available():
            raise Unavailable("shared-memory collectives need Linux on x86-64")
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        capacity_bytes = max(capacity_bytes, _LINE * self.world)   # >= 8 elements per rank
        self.capacity = (capacity_bytes + _LINE - 1) // _LINE * _LINE
        self.peer_check_s = peer_check_s
        me = {"host": os.uname().nodename, "boot": _boot_id(), "pid": os.getpid(),
              "name": f"/dev/shm/bmray-{uuid.uuid4().hex}"}
        peers: list[Any] = [None] * self.world
        dist.all_gather_object(peers, me, group=group)
        if len({(p["host"], p["boot"]) for p in peers}) != 1:
            raise Unavailable("the ranks are on different hosts")
        self.pids = [p["pid"] for p in peers]
        path = peers[0]["name"]
        size = self.world * (_LINE + self.capacity)
        created = [None]
        if self.rank == 0:
            created[0] = _attempt(lambda: _create(path, size))
        dist.broadcast_object_list(created, src=dist.get_global_rank(group, 0)
                                   if group is not None else 0, group=group)
        if created[0] is not None:
            raise Unavailable(f"cannot create {path}: {created[0]}")
        mapped: list[Any] = [None]
        error = _attempt(lambda: mapped.__setitem__(0, _map(path, size)))
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error, group=group)
        if self.rank == 0:
            os.unlink(path)             # mapped everywhere: nothing to clean up later
        if any(errors):
            raise Unavailable(f"cannot map {path}: {[e for e in errors if e][0]}")
        self._map = mapped[0]
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self._counters = torch.frombuffer(self._map, dtype=torch.int32,
                                          count=self.world * _LINE // 4)
        data = raw[self.world * _LINE:]
        self._slots = [data[i * self.capacity:(i + 1) * self.capacity]
                       for i in range(self.world)]
        self._seq = 0
        self.mapped_bytes = size
        # One daemon thread runs the ops in order. It holds only the queue, so the group can
        # be collected (which stops the thread); a daemon never holds up interpreter exit.
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(self._ops,), name="bmray-shm", daemon=True).start()
        self._closed = weakref.finalize(self, self._ops.put, None)

    # ------------------------------------------------------------ synchronisation
    def _counter(self, rank: int) -> int:
        return int(self._counters[rank * _LINE // 4])

    def _post(self, value: int) -> None:
        self._counters[self.rank * _LINE // 4] = _int32(value)
        _futex(self._base + self.rank * _LINE, _FUTEX_WAKE, 2 ** 31 - 1)

    def _wait_all(self, value: int) -> None:
        """Until every rank's counter has reached ``value``. Counters are 32-bit and wrap
        (every 2**32 / 3 ops); ranks are never more than one op apart, so "reached" is
        decided on the wrapped difference, as TCP compares sequence numbers."""
        target = _int32(value)
        for j in range(self.world):
            last_check = time.monotonic()
            while True:
                seen = self._counter(j)
                if (seen - target) & 0xFFFFFFFF < 0x80000000:
                    break
                _futex(self._base + j * _LINE, _FUTEX_WAIT, seen, self.peer_check_s)
                if time.monotonic() - last_check >= self.peer_check_s:
                    last_check = time.monotonic()
                    if not _alive(self.pids[j]):
                        raise RuntimeError(f"shared-memory collective: rank {j} "
                                           f"(pid {self.pids[j]}) died")

    def _begin(self) -> int:
        """Start op s: wait until every rank has finished reading op s-1's slots (usually
        long true), then return the op's base counter 3s."""
        base = 3 * self._seq
        self._wait_all(base)
        self._seq += 1
        return base

    # ------------------------------------------------------------ the ops (background thread)
    def _slot(self, i: int, like: torch.Tensor, n: int) -> torch.Tensor:
        return self._slots[i][:n * like.element_size()].view(like.dtype)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = t.view(-1)
            for lo, hi in _pieces(flat, self.capacity // t.element_size()):
                x = flat[lo:hi]
                n = x.numel()
                base = self._begin()
                mine = self._slot(self.rank, x, n)
                mine.copy_(x)
                self._post(base + 1)
                self._wait_all(base + 1)
                # my chunk of the sum, in rank order, into my own tensor and then into my slot
                # where the others read it (they read only other chunks of my slot meanwhile)
                b = shard_bounds(n, self.rank, self.world)
                if b.stop > b.start:
                    acc = x[b.start:b.stop]
                    acc.copy_(self._slot(0, x, n)[b.start:b.stop])
                    for j in range(1, self.world):
                        acc.add_(self._slot(j, x, n)[b.start:b.stop])
                    mine[b.start:b.stop].copy_(acc)
                self._post(base + 2)
                self._wait_all(base + 2)
                for j in range(self.world):
                    if j != self.rank:
                        c = shard_bounds(n, j, self.world)
                        x[c.start:c.stop].copy_(self._slot(j, x, n)[c.start:c.stop])
                self._post(base + 3)
        return t

    def _reduce_scatter(self, t: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        """This rank's elements ``shard_bounds(numel)`` of the sum of flat ``t``; with
        ``into`` (that many elements) added to it in place instead of a new tensor."""
        with torch.no_grad():
            b = shard_bounds(t.numel(), self.rank, self.world)
            per = b.padded
            flat = t.reshape(-1)
            if per * self.world != flat.numel():
                flat = torch.cat([flat, flat.new_zeros(per * self.world - flat.numel())])
            grid = flat.view(self.world, per)
            if into is not None and (into.numel() != b.size or not into.is_contiguous()):
                raise ValueError(f"shared-memory reduce_scatter: into= needs {b.size} "
                                 f"contiguous elements, got {tuple(into.shape)}")
            in_place = into is not None and b.size == per    # else via a padded temporary
            out = into.view(-1) if in_place else t.new_empty(per)
            # pieces of ``cols`` columns of the [world, per] layout: a piece's row r is a slice
            # of rank r's share, copied into each slot without a temporary
            cols = max(1, self.capacity // t.element_size() // self.world)
            for lo, hi in _pieces(out, cols):
                k = hi - lo
                base = self._begin()
                self._slot(self.rank, t, self.world * k).view(self.world, k).copy_(
                    grid[:, lo:hi])
                self._post(base + 1)
                self._wait_all(base + 1)
                acc = out[lo:hi]
                first = self._slot(0, t, self.world * k).view(self.world, k)[self.rank]
                if in_place:
                    acc.add_(first)
                else:
                    acc.copy_(first)
                for j in range(1, self.world):
                    acc.add_(self._slot(j, t, self.world * k).view(self.world, k)[self.rank])
                self._post(base + 3)
            if into is not None:
                if not in_place:
                    into.add_(out[:b.size].view_as(into))
                return into
            return out[:b.size]

    def _all_gather(self, shard: torch.Tensor, numel: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Every rank's ``shard`` (its ``shard_bounds(numel)`` elements) concatenated; into
        ``out`` (``numel`` contiguous elements) when given."""
        with torch.no_grad():
            b = shard_bounds(numel, self.rank, self.world)
            if shard.numel() != b.size:
                raise ValueError(f"shared-memory all_gather: rank {self.rank} has "
                                 f"{shard.numel()} elements but owns {b.size} of {numel}")
            per = b.padded
            if out is not None and (out.numel() != numel or not out.is_contiguous()
                                    or out.dtype != shard.dtype):
                raise ValueError(f"shared-memory all_gather: out= needs {numel} contiguous "
                                 f"{shard.dtype} elements, got {tuple(out.shape)} {out.dtype}")
            direct = out is not None and per * self.world == numel   # no padding: gather in place
            full = out.view(-1) if direct else shard.new_empty(per * self.world)
            grid = full.view(self.world, per)
            flat = shard.reshape(-1)
            for lo, hi in _pieces(grid[0], self.capacity // shard.element_size()):
                base = self._begin()
                mine = flat[lo:min(hi, b.size)]
                self._slot(self.rank, shard, hi - lo)[:mine.numel()].copy_(mine)
                self._post(base + 1)
                self._wait_all(base + 1)
                for j in range(self.world):
                    grid[j, lo:hi].copy_(self._slot(j, shard, hi - lo))
                self._post(base + 3)
            if out is None:
                return full[:numel]
            if not direct:
                out.view(-1).copy_(full[:numel])
            return out

    # ------------------------------------------------------------ public API
    def _submit(self, fn: Callable, arg: torch.Tensor, async_op: bool, *args: Any) -> Any:
        if arg.device.type != "cpu":
            raise ValueError("shared-memory collectives take CPU tensors")
        if not self._closed.alive:
            raise RuntimeError("shared-memory group is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.put((future, fn, (arg, *args)))
        return _Handle(future) if async_op else future.result()

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        """Sum ``t`` (contiguous, CPU) over the group in place; with ``async_op`` a handle
        whose ``wait()`` returns ``t``."""
        if not t.is_contiguous():
            raise ValueError("shared-memory all_reduce needs a contiguous tensor")
        return self._submit(self._all_reduce, t, async_op)

    def reduce_scatter(self, t: torch.Tensor, async_op: bool = False,
                       into: torch.Tensor | None = None) -> Any:
        """This rank's elements (``shard_bounds``) of the sum of ``t``, flattened — what
        ``collectives.reduce_scatter`` returns for a 1-d tensor. ``into``: add them to
        this tensor in place and return it (ZeRO-2 accumulates its gradient shard so,
        without a temporary the size of the shard)."""
        return self._submit(self._reduce_scatter, t, async_op, into)

    def all_gather(self, shard: torch.Tensor, numel: int, async_op: bool = False,
                   out: torch.Tensor | None = None) -> Any:
        """The inverse of ``reduce_scatter``'s split: every rank's shard of a flat tensor of
        ``numel`` elements, concatenated (``collectives.all_gather`` for 1-d). ``out``:
        write them there (ZeRO-3 gathers straight into a unit's flat parameter buffer)."""
        return self._submit(self._all_gather, shard, async_op, numel, out)

    def close(self) -> None:
        """Stop the op thread once the queued ops are done (they still complete)."""
        self._closed()


def _pieces(flat: torch.Tensor, per: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``per`` elements covering ``flat``."""
    return [(lo, min(lo + per, flat.numel())) for lo in range(0, flat.numel(), per)]


def _serve(ops: queue.SimpleQueue) -> None:
    """The op thread: run (future, fn, args) items in order until a None arrives."""
    while True:
        item = ops.get()
        if item is None:
            return
        future, fn, args = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:    # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)
        del item, future, fn, args          # no reference to the group between ops


def _int32(value: int) -> int:
    """``value`` modulo 2**32 as a signed 32-bit int (what the counter words hold)."""
    return (value + 2 ** 31) % 2 ** 32 - 2 ** 31


def _attempt(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _create(path: str, size: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""
