"""All-reduce bandwidth of bmray's collectives API against plain torch.distributed on gloo.

Both run in the same process group of the same gang (cluster.gang.WorkerGroup on an embedded
Ray; torch.multiprocessing if Ray is unavailable), on the same float32 tensors of 1 .. 256 MB
(MB = 2^20 bytes): ``actors.comm.collectives.all_reduce(t, "sum")`` against
``torch.distributed.all_reduce(t)``. So the table measures what the wrapper costs (validation,
op lookup, the Handle), not a different algorithm. A third column, ``shm``, is the
shared-memory transport the data-parallel strategies use between the ranks of one host
(``actors.comm.shm_transport.ShmGroup.all_reduce``, 8 MB slots, larger tensors in pieces): a
different algorithm, measured on the same tensors.

Bandwidths as nccl-tests define them (nccl-tests/doc/PERFORMANCE.md):
    algbw = bytes / time;    busbw = algbw * 2(n-1)/n  (all-reduce moves 2(n-1)/n of the buffer
    per rank in a ring), so busbw is comparable across rank counts.
Time per size = slowest rank's time for ``iters`` back-to-back all-reduces after a barrier,
divided by ``iters``; median over ``--repeats`` interleaved repeats (plain, ours, ours, plain,
...). The ratio column is the median of the per-repeat paired ratios, because the machine is
shared and noisy: quote the ratio, not the absolute numbers.

    python bench/collective_bandwidth.py [--ranks 2 4] [--sizes-mb 1 4 16 64 256] [--repeats 5]

Goal: ours/plain bandwidth ratio ~1.0 (the wrapper adds microseconds to millisecond ops).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402
from bmray.actors.comm import collectives as C  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "collective_bandwidth.json")
MB = 2 ** 20


def iters_for(size_mb: int) -> int:
    """Enough back-to-back calls that one timing spans ~100 ms at ~0.5 GB/s, at least 2."""
    return max(2, 64 // size_mb)


def bench_rank(sizes_mb: list[int], repeats: int) -> dict:
    """Runs on every rank of an initialised gloo group; returns this rank's timings
    {size_mb: {"plain": [s per iter, ...], "ours": [...]}} and a correctness check."""
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Same result as plain torch on a random tensor (the benchmark tensors below are zeros so
    # that repeated summation cannot overflow into inf).
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1000, generator=g)
    same = torch.equal(C.all_reduce(x.clone(), "sum"), _plain(x.clone()))
    impls = {"plain": _plain, "ours": lambda t: C.all_reduce(t, "sum")}
    from bmray.actors.comm import shm_transport
    if shm_transport.available():
        shm = shm_transport.ShmGroup(None, capacity_bytes=8 * MB)
        impls["shm"] = shm.all_reduce
        torch.testing.assert_close(shm.all_reduce(x.clone()), _plain(x.clone()))
    out: dict = {}
    for size in sizes_mb:
        t = torch.zeros(size * MB // 4, dtype=torch.float32)
        k = iters_for(size)
        for fn in impls.values():          # warm-up: gloo buffers, page faults
            fn(t)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(repeats):
            order = list(impls) if r % 2 == 0 else list(reversed(impls))
            for name in order:
                fn = impls[name]
                dist.barrier()
                start = time.perf_counter()
                for _ in range(k):
                    fn(t)
                times[name].append((time.perf_counter() - start) / k)
        out[size] = {"iters": k, **times}
        del t
    return {"rank": rank, "world": world, "same_result": same, "times": out}


def _plain(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def summarize(per_rank: list[dict], sizes_mb: list[int]) -> list[dict]:
    """Slowest rank per repeat, median over repeats, then nccl-tests bandwidths."""
    world = per_rank[0]["world"]
    factor = 2 * (world - 1) / world
    rows = []
    for size in sizes_mb:
        row: dict = {"ranks": world, "size_mb": size, "iters": per_rank[0]["times"][size]["iters"]}
        slowest = {}
        for name in per_rank[0]["times"][size]:
            if name == "iters":
                continue
            slowest[name] = [max(ts) for ts in zip(*(p["times"][size][name] for p in per_rank))]
            sec = statistics.median(slowest[name])
            algbw = size * MB / sec / 1e9
            row[f"{name}_ms"] = round(sec * 1e3, 3)
            row[f"{name}_algbw_GBps"] = round(algbw, 3)
            row[f"{name}_busbw_GBps"] = round(algbw * factor, 3)
        # Paired: each repeat timed plain and ours back to back, so their ratio cancels the
        # machine's slow drifts; the median of the paired ratios is the headline number.
        for name in slowest:
            if name != "plain":
                row[f"ratio_{name}_over_plain"] = round(statistics.median(
                    p / o for p, o in zip(slowest["plain"], slowest[name])), 3)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ launchers
def run_ray(n: int, sizes_mb: list[int], repeats: int) -> list[dict]:
    from bmray.cluster.gang import ScalingConfig, WorkerGroup
    with WorkerGroup(ScalingConfig(num_workers=n, cpus_per_worker=1)) as group:
        return group.execute(bench_rank, sizes_mb, repeats)


def _spawned(rank: int, n: int, store: str, sizes_mb: list[int], repeats: int, q) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
    q.put(bench_rank(sizes_mb, repeats))
    dist.destroy_process_group()


def run_spawn(n: int, sizes_mb: list[int], repeats: int) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = tempfile.mktemp(prefix="bmray_store_")
    procs = [ctx.Process(target=_spawned, args=(r, n, store, sizes_mb, repeats, q))
             for r in range(n)]
    for p in procs:
        p.start()
    outs = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(outs, key=lambda o: o["rank"])


def print_table(rows: list[dict]) -> None:
    names = [n for n in ("plain", "ours", "shm") if f"{n}_ms" in rows[0]]
    ratios = [n for n in names if n != "plain"]
    head = (f"{'ranks':>5} {'size':>7} {'iters':>5} | "
            + " | ".join(f"{n + ' ms':>9} {'algbw':>7} {'busbw':>7}" for n in names) + " | "
            + " ".join(f"{n + '/plain':>10}" for n in ratios))
    print(head)
    print("-" * len(head))
    for r in rows:
        cols = [f"{r[f'{n}_ms']:>9.2f} {r[f'{n}_algbw_GBps']:>7.3f} {r[f'{n}_busbw_GBps']:>7.3f}"
                for n in names]
        print(f"{r['ranks']:>5} {str(r['size_mb']) + ' MB':>7} {r['iters']:>5} | "
              + " | ".join(cols) + " | "
              + " ".join(f"{r[f'ratio_{n}_over_plain']:>10.3f}" for n in ratios))
    print("(bandwidths in GB/s = 1e9 B/s; busbw = algbw * 2(n-1)/n; x/plain = median of "
          "paired per-repeat plain time / x time = x bandwidth / plain bandwidth)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--launcher", choices=["auto", "ray", "spawn"], default="auto")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    launcher = args.launcher
    if launcher in ("auto", "ray"):
        try:
            from bmray.cluster import connect
            connect(num_cpus=max(8, max(args.ranks)), log_to_driver=False)
            launcher = "ray"
        except Exception as exc:  # no Ray here: the same measurement with plain processes
            if args.launcher == "ray":
                raise
            print(f"Ray unavailable ({exc}); using torch.multiprocessing", file=sys.stderr)
            launcher = "spawn"
    run = run_ray if launcher == "ray" else run_spawn

    start = time.perf_counter()
    rows, checks = [], []
    for n in args.ranks:
        per_rank = run(n, args.sizes_mb, args.repeats)
        checks.append(all(p["same_result"] for p in per_rank))
        rows.extend(summarize(per_rank, args.sizes_mb))
    elapsed = time.perf_counter() - start
    print_table(rows)
    print(f"ours == plain on a random tensor at every rank count: {all(checks)}; "
          f"launcher: {launcher}; {elapsed:.0f} s")

    result = {
        "benchmark": "collective_bandwidth", "op": "all_reduce(sum), float32", "backend": "gloo",
        "launcher": "bmray.cluster.gang.WorkerGroup (embedded Ray)" if launcher == "ray"
        else "torch.multiprocessing",
        "peer": "torch.distributed.all_reduce on the same process group",
        "definitions": {"MB": "2^20 bytes", "GBps": "1e9 bytes/s", "algbw": "bytes / time",
                        "busbw": "algbw * 2(n-1)/n (nccl-tests)",
                        "time": "slowest rank, per all-reduce, median of repeats",
                        "ratio_ours_over_plain": "median over repeats of plain time / ours time, "
                                                 "each repeat timing both back to back "
                                                 "(= ours bandwidth / plain bandwidth)",
                        "ratio_shm_over_plain": "the same for the shared-memory transport "
                                                "(actors/comm/shm_transport.py)"},
        "repeats": args.repeats, "same_result": all(checks), "rows": rows,
        "elapsed_s": round(elapsed, 1),
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "threads_per_rank": 1,
                "note": "shared 2-core machine; ranks > cores oversubscribe"},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
