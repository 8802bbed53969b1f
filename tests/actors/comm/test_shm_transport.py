"""actors/shm_transport.py on 1, 2, 3 and 4 ranks of one gang, against numpy.

Each rank builds its inputs from (size, dtype, rank) with numpy's seeded generator; the driver
rebuilds every rank's inputs and computes the sums with numpy. A slot capacity of 256 bytes
makes every size above 64 float32 elements go in several pieces. Tolerances: int64 exact,
float32 rtol 1e-5 (summed in rank order), float64 rtol 1e-12. The shared-memory result must
also be identical on every rank (one rank sums each chunk, all read it).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
import torch.distributed as dist

from bmray.actors.comm.collectives import shard_bounds

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GROUP_RANKS = {1: [2], 2: [1, 3], 3: [0, 2, 3], 4: None}
SIZES = [0, 1, 7, 13, 64, 1001]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12),
       "int64": dict(rtol=0, atol=0)}


def _input(n: int, dtype: str, rank: int) -> np.ndarray:
    rng = np.random.default_rng([n, list(DTYPES).index(dtype), rank])
    if dtype == "int64":
        return rng.integers(-1000, 1000, size=n).astype(np.int64)
    return rng.standard_normal(n).astype(dtype)


def _all_ops():
    """Every world size's group (all 4 ranks create every group, in the same order)."""
    from bmray.actors.comm.shm_transport import ShmGroup

    rank = dist.get_rank()
    groups = {w: (dist.new_group(r) if r is not None else None, r)
              for w, r in GROUP_RANKS.items()}
    out = {}
    for world, (group, ranks) in groups.items():
        if ranks is not None and rank not in ranks:
            continue
        shm = ShmGroup(group, capacity_bytes=256)
        me = dist.get_rank(group)
        for n in SIZES:
            for name, dtype in DTYPES.items():
                x = torch.from_numpy(_input(n, name, me))
                reduced = x.clone()
                shm.all_reduce(reduced)
                b = shard_bounds(n, me, world)
                scattered = shm.reduce_scatter(x.clone())
                into = torch.ones(b.size, dtype=dtype)
                added = shm.reduce_scatter(x.clone(), into=into)
                gathered = shm.all_gather(x[b.start:b.stop].clone(), n)
                buf = torch.empty(n, dtype=dtype)       # out=: ZeRO-3's flat parameter buffer
                gathered_out = shm.all_gather(x[b.start:b.stop].clone(), n, out=buf)
                assert gathered_out is buf
                out[(world, n, name)] = (reduced, scattered, gathered, x.dtype == dtype,
                                         added is into and added, gathered_out)
        # async handles complete in launch order whatever order they are waited in
        ts = [torch.full((300,), float(me + 10 * i)) for i in range(3)]
        handles = [shm.all_reduce(t, async_op=True) for t in ts]
        out[(world, "async")] = [h.wait() for h in reversed(handles)][::-1]
        shm.close()
    return out


def test_all_reduce_reduce_scatter_all_gather_match_numpy(gangs):
    outs = gangs(4).execute(_all_ops)
    for world, ranks in GROUP_RANKS.items():
        members = ranks if ranks is not None else list(range(4))
        for n in SIZES:
            for name in DTYPES:
                inputs = [_input(n, name, r) for r in range(world)]
                total = torch.from_numpy(np.sum(inputs, axis=0) if n else inputs[0])
                first = None
                for me, global_rank in enumerate(members):
                    reduced, scattered, gathered, dtype_kept, added, gathered_out = \
                        outs[global_rank][(world, n, name)]
                    assert torch.equal(gathered_out, gathered)
                    assert dtype_kept
                    torch.testing.assert_close(reduced, total, **TOL[name])
                    if first is None:
                        first = reduced
                    assert torch.equal(reduced, first)      # bit-identical on every rank
                    b = shard_bounds(n, me, world)
                    torch.testing.assert_close(scattered, total[b.start:b.stop], **TOL[name])
                    # into=: accumulated in place (ZeRO-2's gradient shard)
                    torch.testing.assert_close(added, total[b.start:b.stop] + 1, **TOL[name])
                    torch.testing.assert_close(gathered, torch.from_numpy(inputs[me]).new_tensor(
                        np.concatenate([x[shard_bounds(n, r, world).start:
                                          shard_bounds(n, r, world).stop]
                                        for r, x in enumerate(inputs)]) if n else inputs[0]),
                        rtol=0, atol=0)
        for global_rank in members:
            got = outs[global_rank][(world, "async")]
            for i, t in enumerate(got):
                expected = sum(float(r + 10 * i) for r in range(world))
                assert torch.all(t == expected)


def _across_the_counter_wrap():
    """Ops whose 32-bit counters wrap past 2**31 and 2**32 mid-sequence still agree."""
    from bmray.actors.comm.shm_transport import ShmGroup, _int32

    shm = ShmGroup(None, capacity_bytes=256)
    results = []
    for seq in (2 ** 31 // 3 - 2, 2 ** 32 // 3 - 2):
        dist.barrier()
        shm._seq = seq                                  # as if seq ops had run already
        shm._post(3 * seq)
        dist.barrier()
        for i in range(5):
            x = torch.full((100,), float(dist.get_rank() + i))
            shm.all_reduce(x)
            results.append(float(x[0]))
        results.append(_int32(3 * shm._seq) == shm._counter(dist.get_rank()))
    return results


def test_counters_wrap_around(gangs):
    outs = gangs(2).execute(_across_the_counter_wrap)
    expected = [float(1 + 2 * i) for i in range(5)] + [True]
    assert outs[0] == outs[1] == expected * 2


def _dropped_group_stops_its_thread():
    import gc
    import threading
    import time

    from bmray.actors.comm.shm_transport import ShmGroup

    def threads():
        return sum(t.name == "bmray-shm" for t in threading.enumerate())

    before = threads()
    shm = ShmGroup(None, capacity_bytes=256)
    shm.all_reduce(torch.ones(3))
    during = threads()
    del shm
    gc.collect()
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    return before, during, threads()


def test_a_dropped_group_stops_its_thread(gangs):
    for before, during, after in gangs(2).execute(_dropped_group_stops_its_thread):
        assert during == before + 1 and after == before


def _dead_peer():
    """Rank 0 waits for a 'rank 1' whose pid is a finished process: a clear error, soon."""
    import time

    from bmray.actors.comm.shm_transport import ShmGroup

    shm = ShmGroup(None, capacity_bytes=256, peer_check_s=0.2)
    if dist.get_rank() != 0:
        return None
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    shm.pids[1] = done.pid
    t0 = time.monotonic()
    try:
        shm.all_reduce(torch.ones(4))
    except RuntimeError as exc:
        return str(exc), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_a_dead_peer_raises_instead_of_hanging(gangs):
    message, seconds = gangs(2).execute(_dead_peer)[0]
    assert "rank 1" in message and "died" in message
    assert seconds < 5


def _refuse_cuda_and_strided():
    from bmray.actors.comm.shm_transport import ShmGroup

    shm = ShmGroup(None, capacity_bytes=256)
    errors = []
    with pytest.raises(ValueError, match="contiguous"):
        shm.all_reduce(torch.ones(4, 4).t())
    with pytest.raises(ValueError, match="out= needs 4 contiguous"):   # the wrong size
        shm.all_gather(torch.ones(2), 4, out=torch.empty(3))
    with pytest.raises(ValueError, match="out= needs 4 contiguous"):   # the wrong dtype
        shm.all_gather(torch.ones(2), 4, out=torch.empty(4, dtype=torch.float64))
    gathered = shm.all_gather(torch.ones(2), 4, out=torch.empty(4))   # the group still works
    errors.append("ok" if gathered.tolist() == [1.0] * 4 else gathered.tolist())
    return errors


def test_non_contiguous_input_is_refused(gangs):
    assert gangs(2).execute(_refuse_cuda_and_strided) == [["ok"], ["ok"]]
