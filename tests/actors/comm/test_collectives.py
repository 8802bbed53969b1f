"""actors/collectives.py on gangs of 1, 2, 3 and 4 workers, against results computed with numpy.

Every rank builds its input from (case, rank) with numpy's seeded generator; the driver rebuilds
all ranks' inputs the same way and computes the expected result with numpy. Tolerances: integer
sums/products, max, min, broadcast and gathers are exact; float32 reductions are compared with
rtol=1e-5 (4 summands, backend-chosen order), float64 with rtol=1e-12. Sizes include 0, 1 and
primes (7, 13) that no world size > 1 divides. One 4-worker gang per module, subgroups of it for
world sizes 1-3 (see GROUP_RANKS).
"""
from __future__ import annotations

import sys
import zlib

import numpy as np
import pytest
import ray.cloudpickle
import torch
import torch.distributed as dist

from bmray.actors.comm import collectives as C
from bmray.cluster.gang import ScalingConfig, WorkerGroup

# The worker functions below are shipped to the gang by value (this module is not importable
# by its pytest name inside the workers).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORLDS = [1, 2, 3, 4]
SHAPES = [(0,), (1,), (7,), (13,), (12,), (5, 3)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-12),
       "int64": dict(rtol=0, atol=0)}


# One gang of 4 for the module; world sizes 1-3 run on subgroups of it. A gang start costs
# 2-4 s on a quiet machine but 15-30 s on the loaded shared one, and subgroups also exercise the
# group-rank -> global-rank mapping of src/dst (the 2-rank group is ranks {1, 3}, not {0, 1}).
GROUP_RANKS = {1: [2], 2: [1, 3], 3: [0, 2, 3], 4: None}   # None: the default (world) group
NOT_IN_GROUP = "not-in-group"


@pytest.fixture(scope="module")
def gang4(ray_session):
    with WorkerGroup(ScalingConfig(num_workers=4)) as group:
        yield group


@pytest.fixture(params=WORLDS, ids=lambda n: f"world{n}")
def world(request):
    return request.param


def run(gang4, world: int, fn, *args) -> list:
    """Run fn(group, *args) on the ranks of the world-sized group; results in group-rank order."""
    outs = gang4.execute(_in_group, GROUP_RANKS[world], fn, *args)
    outs = [o for o in outs if not (isinstance(o, str) and o == NOT_IN_GROUP)]
    assert len(outs) == world
    return outs


def _in_group(ranks, fn, *args):
    if ranks is None:
        return fn(None, *args)
    group = dist.new_group(ranks)          # collective over the whole gang
    if dist.get_rank() not in ranks:
        return NOT_IN_GROUP
    try:
        return fn(group, *args)
    finally:
        dist.destroy_process_group(group)


def make(case: tuple, rank: int) -> np.ndarray:
    """The deterministic input of one rank for one case: (name, shape, dtype, op, ...)."""
    _, shape, dtype, op = case[:4]
    rng = np.random.default_rng([zlib.crc32(repr(case).encode()), rank])
    if dtype == "int64":
        lo, hi = (1, 4) if op == "prod" else (-50, 50)
        return rng.integers(lo, hi, size=shape, dtype=np.int64)
    if op == "prod":                         # keep products of 4 ranks well inside range
        return rng.uniform(0.5, 1.5, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def expected_reduce(case: tuple, world: int) -> np.ndarray:
    op = case[3]
    xs = np.stack([make(case, r) for r in range(world)]).astype(
        np.int64 if case[2] == "int64" else np.float64)
    out = {"sum": xs.sum(0), "avg": xs.mean(0) if xs.size else xs.sum(0), "max": xs.max(0)
           if xs.size else xs.sum(0), "min": xs.min(0) if xs.size else xs.sum(0),
           "prod": xs.prod(0)}[op]
    return out


def assert_close(got: np.ndarray, want: np.ndarray, case: tuple) -> None:
    assert got.shape == want.shape, (case, got.shape, want.shape)
    np.testing.assert_allclose(got, want.astype(got.dtype), err_msg=str(case), **TOL[case[2]])


def reduce_cases(ops=tuple(C.OPS), shapes=SHAPES) -> list[tuple]:
    return [("r", s, d, op) for d in DTYPES for op in ops for s in shapes
            if not (op == "avg" and d == "int64")]


def _tensor(case, rank):
    return torch.from_numpy(make(case, rank))


# ------------------------------------------------------------------ worker fns: fn(group, ...)
def _run_all_reduce(group, cases):
    rank = C.rank(group)
    return [C.all_reduce(_tensor(c, rank), op=c[3], group=group).numpy() for c in cases]


def _run_reduce(group, cases):
    rank, world = C.rank(group), C.world_size(group)
    out = []
    for c in cases:
        for dst in range(world):
            res = C.reduce(_tensor(c, rank), dst=dst, op=c[3], group=group)
            out.append(res.numpy() if rank == dst else None)
    return out


def _run_broadcast(group, cases):
    rank, world = C.rank(group), C.world_size(group)
    return [[C.broadcast(_tensor(c, rank), src=src, group=group).numpy() for src in range(world)]
            for c in cases]


def _forcing_fallback(name: str, group, fn):
    """Run fn() as on a backend without the flat-tensor primitive (the fallback path)."""
    key = (name, str(dist.get_backend(group)))
    saved = C._NATIVE.get(key)
    C._NATIVE[key] = False
    try:
        return fn()
    finally:
        C._NATIVE.pop(key) if saved is None else C._NATIVE.__setitem__(key, saved)


def _run_reduce_scatter(group, cases):
    rank = C.rank(group)
    out = []
    for c in cases:
        t = _tensor(c, rank)
        before = t.clone()
        shard = C.reduce_scatter(t, op=c[3], group=group)
        assert torch.equal(t, before), "reduce_scatter must not modify its input"
        fallback = _forcing_fallback("reduce_scatter", group,
                                     lambda: C.reduce_scatter(t, op=c[3], group=group))
        assert torch.equal(t, before), "reduce_scatter must not modify its input"
        out.append((shard.numpy(), fallback.numpy()))
    return out


def _run_all_gather(group, cases):
    rank, world = C.rank(group), C.world_size(group)
    out = []
    for c in cases:
        full = _tensor(c, 0)                   # every rank knows the same full tensor
        b = C.shard_bounds(full.shape[0], rank, world)
        shard = full[b.start:b.stop].clone()
        out.append((C.all_gather(shard, numel=full.shape[0], group=group).numpy(),
                    C.all_gather(shard, group=group).numpy(),    # sizes exchanged and checked
                    _forcing_fallback("all_gather", group, lambda: C.all_gather(
                        shard, numel=full.shape[0], group=group)).numpy()))
    return out


def _run_async(group, case_sum, case_avg, case_max, case_rs, case_ag):
    r, w = C.rank(group), C.world_size(group)
    full = _tensor(case_ag, 0)
    b = C.shard_bounds(full.shape[0], r, w)
    handles = [C.all_reduce(_tensor(case_sum, r), "sum", group=group, async_op=True),
               C.all_reduce(_tensor(case_avg, r), "avg", group=group, async_op=True),
               C.all_reduce(_tensor(case_max, r), "max", group=group, async_op=True),
               C.reduce_scatter(_tensor(case_rs, r), "avg", group=group, async_op=True),
               C.all_gather(full[b.start:b.stop].clone(), numel=full.shape[0], group=group,
                            async_op=True),
               C.broadcast(_tensor(case_sum, r), src=w - 1, group=group, async_op=True)]
    assert all(isinstance(h, C.Handle) for h in handles)
    results = [h.wait().numpy().copy() for h in reversed(handles)][::-1]
    assert all(h.is_completed() for h in handles)
    again = handles[1].wait().numpy()          # wait() twice: post-processing applied once
    np.testing.assert_array_equal(again, results[1])
    C.barrier(group)
    return results


def _run_ring(group):
    r, w = C.rank(group), C.world_size(group)
    nxt, prv = (r + 1) % w, (r - 1) % w
    mine = torch.arange(5, dtype=torch.float64) + 100 * r
    got_blocking = torch.empty(5, dtype=torch.float64)
    # Blocking ring: even ranks send first, odd ranks receive first (no deadlock for any w >= 2).
    if r % 2 == 0:
        C.send(mine, nxt, group=group)
        C.recv(got_blocking, prv, group=group)
    else:
        C.recv(got_blocking, prv, group=group)
        C.send(mine, nxt, group=group)
    got_async = torch.empty(5, dtype=torch.float64)
    hr = C.irecv(got_async, prv, group=group)
    hs = C.isend(mine * -1, nxt, group=group)
    got = hr.wait()
    hs.wait()
    return got_blocking.numpy(), got.numpy()


def _run_errors(group):
    r, w = C.rank(group), C.world_size(group)
    msgs = {}

    def catch(key, fn):
        try:
            fn()
            msgs[key] = None
        except (ValueError, TypeError) as exc:
            msgs[key] = f"{type(exc).__name__}: {exc}"

    x = torch.ones(7)
    catch("op", lambda: C.all_reduce(x, op="mean", group=group))
    catch("avg_int", lambda: C.all_reduce(torch.ones(3, dtype=torch.int64), op="avg", group=group))
    catch("src", lambda: C.broadcast(x, src=w, group=group))
    catch("dst", lambda: C.reduce(x, dst=-1, group=group))
    catch("not_tensor", lambda: C.all_reduce([1.0, 2.0], group=group))
    catch("non_contig", lambda: C.all_reduce(torch.ones(4, 3).t(), group=group))
    catch("self_send", lambda: C.send(x, r, group=group))
    catch("shard_size", lambda: C.all_gather(torch.ones(5), numel=7, group=group))
    if w > 1:   # mismatches across ranks: detected on every rank, so nobody hangs
        catch("mismatch_shape", lambda: C.all_reduce(torch.ones(8 if r == w - 1 else 7),
                                                      group=group, check=True))
        catch("mismatch_dtype", lambda: C.broadcast(
            torch.ones(3, dtype=torch.float64 if r == 0 else torch.float32), 0, group=group,
            check=True))
        catch("bad_layout", lambda: C.all_gather(torch.ones(2 if r == 0 else 3), group=group))
        catch("matching_check", lambda: C.reduce_scatter(torch.ones(7), group=group, check=True))
    ok = C.all_reduce(torch.ones(3), "sum", group=group).tolist()   # the group still works
    return msgs, ok


# ----------------------------------------------------------------------------------- tests
def test_all_reduce_every_op_dtype_and_size(gang4, world):
    cases = reduce_cases()
    for rank_out in run(gang4, world, _run_all_reduce, cases):
        for case, got in zip(cases, rank_out):
            assert_close(got, expected_reduce(case, world), case)


def test_reduce_to_every_destination(gang4, world):
    cases = reduce_cases(ops=("sum", "avg", "max", "prod"), shapes=[(0,), (1,), (7,), (2, 3)])
    outs = run(gang4, world, _run_reduce, cases)
    for i, case in enumerate(cases):
        want = expected_reduce(case, world)
        for dst in range(world):
            assert_close(outs[dst][i * world + dst], want, case)


def test_broadcast_from_every_source(gang4, world):
    cases = [("b", s, d, "none") for d in DTYPES for s in [(0,), (1,), (7,), (3, 4)]]
    for rank_out in run(gang4, world, _run_broadcast, cases):
        for case, per_src in zip(cases, rank_out):
            for src in range(world):
                np.testing.assert_array_equal(per_src[src], make(case, src))


def test_reduce_scatter_uneven_sizes(gang4, world):
    cases = reduce_cases(ops=("sum", "avg", "max", "min"), shapes=SHAPES)
    outs = run(gang4, world, _run_reduce_scatter, cases)
    for rank, rank_out in enumerate(outs):
        for case, (native, fallback) in zip(cases, rank_out):
            b = C.shard_bounds(case[1][0], rank, world)
            assert_close(native, expected_reduce(case, world)[b.start:b.stop], case)
            assert_close(fallback, expected_reduce(case, world)[b.start:b.stop], case)


def test_all_gather_uneven_shards(gang4, world):
    cases = [("g", s, d, "none") for d in DTYPES for s in SHAPES]
    for rank_out in run(gang4, world, _run_all_gather, cases):
        for case, gathered in zip(cases, rank_out):   # with numel, without, fallback path
            for got in gathered:
                np.testing.assert_array_equal(got, make(case, 0))


def test_async_handles_waited_in_reverse_order(gang4, world):
    cs, ca, cm = ("a", (13,), "float32", "sum"), ("a", (7,), "float64", "avg"), \
        ("a", (1000,), "int64", "max")
    crs, cag = ("a", (11, 2), "float32", "avg"), ("a", (9,), "int64", "none")
    outs = run(gang4, world, _run_async, cs, ca, cm, crs, cag)
    for rank, res in enumerate(outs):
        assert_close(res[0], expected_reduce(cs, world), cs)
        assert_close(res[1], expected_reduce(ca, world), ca)
        assert_close(res[2], expected_reduce(cm, world), cm)
        b = C.shard_bounds(11, rank, world)
        assert_close(res[3], expected_reduce(crs, world)[b.start:b.stop], crs)
        np.testing.assert_array_equal(res[4], make(cag, 0))
        np.testing.assert_array_equal(res[5], make(cs, world - 1))


@pytest.mark.parametrize("world", [2, 3, 4], ids=lambda n: f"world{n}")
def test_send_recv_ring(gang4, world):
    """A ring needs two ranks (a self-send is rejected: see the error tests)."""
    outs = run(gang4, world, _run_ring)
    for rank, (blocking, nonblocking) in enumerate(outs):
        prv = (rank - 1) % world
        np.testing.assert_array_equal(blocking, np.arange(5) + 100 * prv)
        np.testing.assert_array_equal(nonblocking, -(np.arange(5) + 100 * prv))


def test_errors_are_clear_and_symmetric(gang4, world):
    for rank, (msgs, ok) in enumerate(run(gang4, world, _run_errors)):
        assert ok == [float(world)] * 3
        assert "op 'mean' is not one of ['sum', 'avg', 'max', 'min', 'prod']" in msgs["op"]
        assert "'avg' needs a floating dtype" in msgs["avg_int"]
        assert f"src={world} is not a rank of the group (0..{world - 1})" in msgs["src"]
        assert "dst=-1" in msgs["dst"]
        assert msgs["not_tensor"].startswith("TypeError: all_reduce: expected a torch.Tensor")
        assert "contiguous" in msgs["non_contig"]
        assert "is this rank itself" in msgs["self_send"]
        b = C.shard_bounds(7, rank, world)
        assert f"has a shard of 5 rows but owns rows [{b.start}, {b.stop}) of 7" \
            in msgs["shard_size"]
        if world > 1:
            assert f"rank {world - 1} passed float32[8] but rank 0 passed float32[7]" \
                in msgs["mismatch_shape"]
            assert "passed float32[3] but rank 0 passed float64[3]" in msgs["mismatch_dtype"]
            assert "do not follow the shard layout" in msgs["bad_layout"]
            assert msgs["matching_check"] is None


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 5])
def test_shard_bounds_partition_brute_force(n_ranks):
    for n in range(0, 23):
        owned = []
        for r in range(n_ranks):
            b = C.shard_bounds(n, r, n_ranks)
            assert b.padded == -(-n // n_ranks) and 0 <= b.size <= b.padded
            assert b.start == min(r * b.padded, n)
            owned.extend(range(b.start, b.stop))
        assert owned == list(range(n))       # contiguous, in rank order, no gaps or overlaps
    with pytest.raises(ValueError, match="0 <= rank < world"):
        C.shard_bounds(5, n_ranks, n_ranks)
