"""CPU AdamW step time: torch.optim.AdamW (for-loop, foreach, fused) against DeepSpeed's
DeepSpeedCPUAdam (ZeRO-Offload's AVX optimizer, deepspeed.ops.adam), and bmray's ShardedAdamW
("cpu": torch's fused kernel over flat tensors; "disk": the same over memory-mapped moments).

Same fp32 parameters for every optimizer: ``--params`` (30M) elements split into tensors of
``--tensor-numel`` (0.5M, roughly the matrices of a small transformer), fixed random gradients,
AdamW with weight decay 0.1 on all of them. Per thread count (``--threads 1 2``) a fresh
subprocess (torch.set_num_threads and OMP_NUM_THREADS both set, since DeepSpeed's kernel uses
OpenMP) times ``--steps`` steps after ``--warmup`` steps, interleaving the optimizers for
``--repeats`` rounds; the table shows the median ms per step. The machine is shared and
noisy: compare rows of the same thread count. DeepSpeedCPUAdam JIT-builds its C++ extension
the first time (ninja + a compiler; cached under ~/.cache/torch_extensions); the time to build
or load it is recorded, and a failed build is recorded instead of a time. Each optimizer's
parameters after warmup are compared with torch's fused AdamW's (max |difference|), so a
faster row is known to compute the same update.

    python bench/cpu_adam.py [--params 30000000] [--threads 1 2] [--steps 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_adam.json")
NAMES = ["torch AdamW (for-loop)", "torch AdamW (foreach)", "torch AdamW (fused)",
         "DeepSpeedCPUAdam", "ShardedAdamW cpu (fused, flat)", "ShardedAdamW disk (mmap)"]


def run_threads(args: argparse.Namespace, threads: int) -> dict:
    """Everything for one thread count, inside this (fresh) process."""
    import torch

    from bmray.actors.parallel.zero.offload import OffloadConfig, ShardedAdamW
    from bmray.actors.train.config import TrainConfig

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    sizes = [args.tensor_numel] * (args.params // args.tensor_numel)
    if args.params % args.tensor_numel:
        sizes.append(args.params % args.tensor_numel)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.1)
    info: dict = {"threads": threads}

    def torch_opt(**extra):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.AdamW(ps, **kw, **extra)
        return opt.step, lambda: torch.cat([p.detach() for p in ps])

    def deepspeed_opt():
        t0 = time.perf_counter()
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = DeepSpeedCPUAdam(ps, adamw_mode=True, **kw)
        info.setdefault("deepspeed_build_or_load_s", time.perf_counter() - t0)
        return opt.step, lambda: torch.cat([p.detach() for p in ps])

    def sharded(placement):
        master = torch.cat(init)
        grad = torch.cat(grads)
        opt = ShardedAdamW([(master, 0.1)], cfg, OffloadConfig(placement),
                           name=f"bench-{placement}")
        info.setdefault("closers", []).append(opt.close)
        return (lambda: opt.step([grad], cfg.lr)), (lambda: master.clone())

    makers = {NAMES[0]: lambda: torch_opt(foreach=False),
              NAMES[1]: lambda: torch_opt(foreach=True),
              NAMES[2]: lambda: torch_opt(fused=True),
              NAMES[3]: deepspeed_opt,
              NAMES[4]: lambda: sharded("cpu"),
              NAMES[5]: lambda: sharded("disk")}
    steps, errors, reference = {}, {}, None
    for name, make in makers.items():
        try:
            step, params = make()
            for _ in range(args.warmup):
                step()
        except Exception as exc:           # e.g. DeepSpeed's JIT build failing: record it
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        got = params()
        if reference is None and name == NAMES[2]:
            reference = got
        steps[name] = (step, got)
    diffs = {name: float((got - reference).abs().max()) if reference is not None else None
             for name, (_, got) in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    for close in info.pop("closers", []):
        close()
    rows = []
    fused = statistics.median(times[NAMES[2]]) if NAMES[2] in times else None
    for name in NAMES:
        row = {"threads": threads, "optimizer": name}
        if name in times:
            ms = statistics.median(times[name]) * 1e3
            row.update(median_ms=ms, runs_ms=[t * 1e3 for t in times[name]],
                       ratio_vs_fused=ms / (fused * 1e3) if fused else None,
                       max_abs_diff_vs_fused=diffs[name])
        else:
            row["error"] = errors.get(name, "not run")
        rows.append(row)
    return {"rows": rows, **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=30_000_000)
    ap.add_argument("--tensor-numel", type=int, default=500_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_threads(args, args.child)))
        return

    import glob
    cached = bool(glob.glob(os.path.expanduser("~/.cache/torch_extensions/*/cpu_adam/*.so")))
    results = []
    for threads in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(threads)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("threads", "child", "out")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            results.append({"threads": threads, "error": proc.stderr[-2000:]})
            continue
        results.append(json.loads(line[-1][len("RESULT "):]))

    print(f"\nAdamW step, {args.params / 1e6:.0f}M fp32 parameters "
          f"({args.params // args.tensor_numel} tensors), median of {args.repeats} x "
          f"{args.steps} steps")
    print(f"{'threads':>7}  {'optimizer':<32}{'ms/step':>9}{'vs fused':>9}{'max|Δ|':>10}")
    for res in results:
        for row in res.get("rows", []):
            if "median_ms" in row:
                diff = row["max_abs_diff_vs_fused"]
                print(f"{row['threads']:>7}  {row['optimizer']:<32}{row['median_ms']:>9.1f}"
                      f"{row['ratio_vs_fused']:>9.2f}{diff if diff is None else f'{diff:.1e}':>10}")
            else:
                print(f"{row['threads']:>7}  {row['optimizer']:<32}  failed: {row['error'][:80]}")
        if "deepspeed_build_or_load_s" in res:
            print(f"{res['threads']:>7}  (DeepSpeedCPUAdam build/load: "
                  f"{res['deepspeed_build_or_load_s']:.1f} s)")
        if "error" in res:
            print(f"{res['threads']:>7}  child failed: {res['error'][-300:]}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"bench": "cpu_adam", "args": {k: v for k, v in vars(args).items()
                                                  if k != "child"},
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": platform.python_version()},
                   "deepspeed_extension_cached_before_run": cached,
                   "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
