"""Parameter server (sync, async) against all-reduce data parallelism at the same worker count.

Same GPT, same initial weights, same data path (synthetic world -> BPE -> packed Parquet ->
BlockStream sliced by rank), same loop (actors.train.loop.Trainer), N gang workers
(cluster.gang.WorkerGroup, one CPU thread each); only the strategy differs:

* ``all-reduce DP``       actors.parallel.data_parallel.DataParallel (bucketed all-reduce,
                          SUM; shared memory between the workers of this host,
                          ``transport: auto``)
* ``all-reduce DP, gloo`` the same over the gloo process group (``transport: process_group``)
* ``PS sync``             actors.parallel.param_server.ParameterServer, K shards, BSP (equals
                          DP's maths)
* ``PS async (s=2)``      the same, SSP with staleness 2: each push is applied on arrival

The parameter server moves its gradients and parameters through Ray's object store, so no
row shares its transport; both all-reduce baselines are reported ("× DP" against our
default, "× DP gloo" against the process group).

Reported per strategy: optimizer updates per second (sync: steps/s; async: shard versions/s,
N per worker step), and tokens/s through the whole gang (every worker's tokens over the
slowest worker's time). Train-step time only: ``fit`` after ``warmup`` untimed steps (no eval,
no checkpoints, no start-up). ``--repeats`` rounds run every strategy once, in an order that
rotates from round to round (``bench.common.balanced_order``: every strategy takes every
position; a multiple of 4 balances them); a row's figure is the median over rounds, and its
ratio's 90% interval a bootstrap over rounds (``bench.common.bootstrap_ratio``). The machine
is shared: quote ratios.

    python bench/param_server_throughput.py                               # full: 20 steps x 8 rounds
    python bench/param_server_throughput.py --quick --out /tmp/ps.json    # smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import ray
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (BOOTSTRAP_RESAMPLES, INTERVAL, add_model_args,  # noqa: E402
                          add_timing_args, balanced_order, cpu_train_config,
                          fresh_model, gpt_config, parse_args,
                          ratio_with_interval, result_path, world_pack,
                          write_json)
from bmray.actors.parallel.param_server import ParameterServer, ParamServerConfig  # noqa: E402
from bmray.actors.train.config import TrainConfig  # noqa: E402
from bmray.cluster import connect, shutdown  # noqa: E402
from bmray.cluster.gang import ScalingConfig, WorkerGroup  # noqa: E402
from bmray.cluster.param_server import reset_shards, start_shards, stop_shards  # noqa: E402
from bmray.models import ModelConfig, build_model, objective_for  # noqa: E402
from bmray.models.data import BlockStream  # noqa: E402


def worker_run(kind: str, pack: str, model_cfg: ModelConfig, cfg: TrainConfig, batch: int,
               warmup: int, shards=None, ps: ParamServerConfig | None = None,
               transport: str = "auto") -> dict:
    """Inside each gang worker: train ``cfg.max_steps`` steps, time those after ``warmup``."""
    from bmray.actors.parallel.data_parallel import DataParallel
    from bmray.actors.train.loop import Trainer
    from bmray.cluster.gang import worker_context

    ctx = worker_context()
    model = fresh_model(model_cfg)
    data = BlockStream(pack, model_cfg.max_seq_len, batch, rank=ctx.rank,
                       world_size=ctx.world_size, shuffle=False)
    strategy = (ParameterServer(shards, ps) if kind == "ps"
                else DataParallel(transport=transport))
    trainer = Trainer(model, objective_for(model_cfg), data, cfg, strategy=strategy,
                      model_config=model_cfg)
    trainer.fit(until=warmup)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    steps = cfg.max_steps - warmup
    out = {"rank": ctx.rank, "seconds": seconds, "steps": steps,
           "tokens": steps * (batch // ctx.world_size) * (model_cfg.max_seq_len - 1),
           "loss": result.losses[cfg.max_steps]}
    if kind == "ps" and ctx.rank == 0:
        st = strategy.shard_stats()
        out["max_gap"] = max(s["max_gap"] for s in st)
        out["waits"] = [sum(s["waits"][r] for s in st) for r in range(ctx.world_size)]
    return out


QUICK = {"steps": 3, "warmup_steps": 1, "repeats": 4, "d_model": 128, "layers": 2,
         "block_len": 65}
BASE, BASE_GLOO = "all-reduce DP", "all-reduce DP, gloo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--staleness", type=int, default=2)
    add_timing_args(ap, steps=20, warmup_steps=3, repeats=8, repeats_help="rounds, every "
                    "strategy once per round in rotating order (a multiple of 4 balances the "
                    "positions)", steps_help="timed steps", warmup_help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16, help="global batch (blocks)")
    ap.add_argument("--block-len", type=int, default=129)
    add_model_args(ap, d_model=256, layers=4)
    ap.add_argument("--out", default=result_path(__file__, "param_server_throughput.json"))
    args = parse_args(ap, QUICK)
    vocab = 4096
    model_cfg = gpt_config(vocab, args.d_model, args.layers, args.block_len)
    cfg = cpu_train_config(args.steps + args.warmup_steps)
    pack = world_pack(tempfile.mkdtemp(prefix="bmray_ps_bench_"), args.block_len, vocab)

    connect(num_cpus=max(8, args.workers + 2), log_to_driver=False)
    N = args.workers
    runs = {BASE: ("dp", None), BASE_GLOO: ("dp", None),
            "PS sync": ("ps", ParamServerConfig(num_shards=args.shards, mode="sync")),
            f"PS async (s={args.staleness})": ("ps", ParamServerConfig(
                num_shards=args.shards, mode="async", staleness=args.staleness))}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    shards = start_shards(ParamServerConfig(num_shards=args.shards), cfg, world_size=N)
    t0 = time.perf_counter()
    try:
        with WorkerGroup(ScalingConfig(num_workers=N)) as group:
            for name in balanced_order(list(runs), args.repeats):
                kind, ps = runs[name]
                if ps is not None:
                    reset_shards(shards, ps, cfg, world_size=N)
                transport = "process_group" if name == BASE_GLOO else "auto"
                outs = group.execute(worker_run, kind, pack, model_cfg, cfg, args.batch,
                                     args.warmup_steps, shards, ps, transport)
                wall = max(o["seconds"] for o in outs)
                updates = sum(o["steps"] for o in outs) if kind == "ps" and \
                    ps.mode == "async" else outs[0]["steps"]
                results[name].append({
                    "updates_per_s": updates / wall,
                    "tokens_per_s": sum(o["tokens"] for o in outs) / wall,
                    "worker_steps_per_s": [o["steps"] / o["seconds"] for o in outs],
                    "final_loss": outs[0]["loss"],
                    **{k: outs[0][k] for k in ("max_gap", "waits") if k in outs[0]}})
    finally:
        stop_shards(shards)
        shutdown()
    def per_round(name: str) -> list[list[float]]:
        return [[r["tokens_per_s"]] for r in results[name]]

    rows = []
    for name, rs in results.items():
        vs = ratio_with_interval(per_round(name), per_round(BASE))
        vs_gloo = ratio_with_interval(per_round(name), per_round(BASE_GLOO))
        rows.append({"strategy": name,
                     "transport": ("object store (shards)" if runs[name][0] == "ps" else
                                   "gloo (process group)" if name == BASE_GLOO else
                                   "auto (shared memory)"),
                     "updates_per_s": statistics.median(r["updates_per_s"] for r in rs),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                     "ratio_vs_dp": vs["ratio"], "ratio_vs_dp_interval": vs["interval"],
                     "ratio_vs_dp_gloo": vs_gloo["ratio"],
                     "ratio_vs_dp_gloo_interval": vs_gloo["interval"], "runs": rs})
    params = sum(p.numel() for p in build_model(model_cfg).parameters())
    print(f"\nGPT {params / 1e6:.2f}M params (d_model={args.d_model}, layers={args.layers}), "
          f"global batch {args.batch}x{args.block_len - 1} tokens, {N} workers x 1 thread, "
          f"{args.shards} shards, {args.steps} timed steps, median of {args.repeats} rotating "
          f"rounds; {INTERVAL:.0%} intervals: bootstrap over rounds")
    print(f"{'strategy':22s} {'updates/s':>10s} {'tokens/s':>10s} {'x DP':>6s} "
          f"{'interval':>11s} {'x DP gloo':>9s} {'interval':>11s}  notes")
    for r in rows:
        last = r["runs"][-1]
        note = f"max gap {last['max_gap']}, waits/rank {last['waits']}" if "max_gap" in last \
            and "async" in r["strategy"] else ""
        print(f"{r['strategy']:22s} {r['updates_per_s']:10.2f} {r['tokens_per_s']:10.0f} "
              f"{r['ratio_vs_dp']:6.2f} {'{:5.3f}–{:5.3f}'.format(*r['ratio_vs_dp_interval'])} "
              f"{r['ratio_vs_dp_gloo']:9.2f} "
              f"{'{:5.3f}–{:5.3f}'.format(*r['ratio_vs_dp_gloo_interval'])}  {note}")
    write_json(args.out, {"bench": "param_server_throughput", "args": vars(args),
                          "params": params, "rows": rows,
                          "order": "bench.common.balanced_order (rotating rounds)",
                          "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "interval": INTERVAL},
                          "torch": torch.__version__, "ray": ray.__version__,
                          "wall_s": time.perf_counter() - t0})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
