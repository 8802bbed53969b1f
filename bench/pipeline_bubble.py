"""Pipeline bubble: measured idle fraction of each stage against (p-1)/(m+p-1), GPipe and 1F1B.

A GPT of ``--layers`` equal blocks is cut into p stages (balanced by parameter count; the
vocabulary is small so the embedding and head add little to the end stages: the formula assumes
equal stages), one stage per Ray worker (`cluster.gang.WorkerGroup`, one torch thread each, gloo
p2p), and `actors.parallel.pipeline.engine.PipelineEngine` runs m micro-batches per step. Per
stage the engine measures busy (compute) and idle (the rest of the step window between two
barriers: blocked in recv/send, or done and waiting for the others). The table gives, for the
fastest of ``--repeats`` steps (after one warm-up step; see ``best_step``), the idle fraction
averaged over the stages with its spread, next to the formula, and the median over all steps;
and the activations held: peak micro-batches in flight per stage and peak saved-activation bytes
of stage 0 (where 1F1B and GPipe differ most). ``cpu/wall`` is the CPU time of the stages'
compute over its wall time in the reported step: near 1 the stages had their cores to
themselves; well below 1 other processes took them and the row measures the contention too.

    python bench/pipeline_bubble.py [--stages 2 4 --micro 1 2 4 8 --repeats 5] [--spawn]

``--spawn`` starts the stages with ``torch.multiprocessing`` instead of a Ray gang (the same
worker function and gloo groups), for a machine without Ray — e.g. a 16-core GPU host, where
p = 4 gets a core per stage.

Honesty: every stage must have a core of its own, or stages that the schedule runs in parallel
are time-sliced and their compute stretches into what should be idle time. With p stages on
fewer than p cores the rows are marked "oversubscribed" and their measurement is not the
pipeline's bubble (on this 2-core machine: p = 4).

Goal: |measured - formula| < 5 points for both schedules.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (add_model_args, connect_ray, gpt_config, result_path,  # noqa: E402
                          write_json)
from bmray.models import ModelConfig  # noqa: E402

GOAL_POINTS = 5.0


def worker_bench(model_cfg: ModelConfig, p: int, micro: list[int], schedules: list[str],
                 rows_per_micro: int, seq: int, repeats: int):
    """Runs on every rank of the gang; the first ``p`` ranks form the pipeline. Returns this
    stage's measurements per (schedule, m), or None on a rank outside the pipeline."""
    import torch.distributed as dist

    from bmray.actors.parallel.pipeline.engine import PipelineEngine
    from bmray.actors.parallel.pipeline.stage import split_stage
    from bmray.models import build_model

    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(p))) if p < world else None     # every rank calls it
    if rank >= p:
        return None
    torch.manual_seed(0)
    module = split_stage(build_model(model_cfg), rank, p)
    g = torch.Generator().manual_seed(0)
    out = []
    for schedule in schedules:
        engine = PipelineEngine(module, group, rank, p, schedule=schedule)
        for m in micro:
            batches = [{"input_ids": torch.randint(0, model_cfg.vocab_size, (rows_per_micro, seq),
                                                   generator=g),
                        "labels": torch.randint(0, model_cfg.vocab_size, (rows_per_micro, seq),
                                                generator=g)} for _ in range(m)]
            steps = []
            for r in range(repeats + 1):
                engine.run(batches, [1.0 / m] * m)
                module.zero_grad(set_to_none=True)
                if r:                                  # the first step is a warm-up
                    steps.append(engine.stats.as_dict())
            out.append({"schedule": schedule, "m": m, "stage": rank,
                        "layers": list(module.layer_range), "steps": steps})
    return out


def best_step(stage_steps: list[list[dict]]) -> tuple[int, float]:
    """The fastest step (shortest wall time; every stage's window ends at the same barrier)
    and the median over all steps of the stage-mean idle fraction. On a shared machine other
    processes, and the jitter of each action's time, only ever add time — to a stage's compute
    and so to its peer's waiting — so the fastest step is the closest reading of the pipeline
    itself (timeit's reasoning for taking the minimum)."""
    n = len(stage_steps[0])
    walls = [max(steps[k]["wall_s"] for steps in stage_steps) for k in range(n)]
    means = [statistics.mean(steps[k]["idle_fraction"] for steps in stage_steps)
             for k in range(n)]
    return min(range(n), key=walls.__getitem__), statistics.median(means)


def _spawned(rank: int, world: int, port: int, queue, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(*args)))
    finally:
        dist.destroy_process_group()


def spawn_execute(world: int, fn, *args) -> list:
    """``fn(*args)`` on ``world`` fresh processes with a gloo group: results by rank (what
    ``WorkerGroup.execute`` does, without Ray)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, queue, fn, args))
             for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    return [results[r] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    ap.add_argument("--repeats", type=int, default=8, help="timed steps per (p, m, schedule)")
    ap.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    add_model_args(ap, d_model=256, layers=8, vocab=128)
    ap.add_argument("--spawn", action="store_true",
                    help="torch.multiprocessing instead of a Ray gang (no Ray needed)")
    ap.add_argument("--out", default=result_path(__file__, "pipeline_bubble.json"))
    args = ap.parse_args()

    from bmray.actors.parallel.pipeline.schedule import bubble_fraction

    model_cfg = gpt_config(args.vocab, args.d_model, args.layers, args.seq)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gang = contextlib.nullcontext()
    if not args.spawn:
        from bmray.cluster.gang import ScalingConfig, WorkerGroup

        connect_ray(num_cpus=max(8, max(args.stages)))
        gang = WorkerGroup(ScalingConfig(num_workers=max(args.stages), cpus_per_worker=1))
    rows = []
    with gang as group:
        execute = group.execute if group else functools.partial(spawn_execute, max(args.stages))
        for p in args.stages:
            per_rank = execute(worker_bench, model_cfg, p, args.micro, args.schedules,
                               args.rows, args.seq, args.repeats)
            stage_rows = [r for out in per_rank if out for r in out]
            for schedule in args.schedules:
                for m in args.micro:
                    st = sorted((r for r in stage_rows if r["schedule"] == schedule
                                 and r["m"] == m), key=lambda r: r["stage"])
                    best, med = best_step([r["steps"] for r in st])
                    idle = [r["steps"][best]["idle_fraction"] for r in st]
                    cpu = sum(r["steps"][best]["busy_cpu_s"] for r in st) / \
                        sum(r["steps"][best]["busy_s"] for r in st)
                    formula = bubble_fraction(p, m)
                    measured = statistics.mean(idle)
                    rows.append({"p": p, "m": m, "schedule": schedule, "formula": formula,
                                 "measured": measured, "stage_min": min(idle),
                                 "stage_max": max(idle), "median_step_measured": med,
                                 "busy_cpu_over_wall": cpu,
                                 "diff_points": 100 * (measured - formula),
                                 "within_goal": abs(100 * (measured - formula)) < GOAL_POINTS,
                                 "oversubscribed": p > cores,
                                 "peak_inflight": [r["steps"][best]["peak_inflight"] for r in st],
                                 "stage0_activation_mb":
                                     st[0]["steps"][best]["peak_activation_bytes"] / 2**20,
                                 "stages": st})
    print(f"\nGPT d_model={args.d_model} layers={args.layers} vocab={args.vocab}, micro-batch "
          f"{args.rows}x{args.seq} tokens, 1 thread per stage, gloo p2p, {cores} cores; "
          f"idle fraction of the fastest of {args.repeats} steps, mean over stages "
          f"[min..max]; "
          f"'median' = median over the steps")
    print(f"{'p':>2s} {'m':>2s} {'schedule':8s} {'formula':>7s} {'measured':>8s} "
          f"{'stages':>13s} {'median':>6s} {'diff pts':>8s} {'in flight':>11s} {'act MB s0':>9s}  "
          f"note")
    for r in rows:
        note = "oversubscribed" if r["oversubscribed"] else ("ok" if r["within_goal"] else
                                                             "OFF")
        flight = ",".join(str(x) for x in r["peak_inflight"])
        print(f"{r['p']:2d} {r['m']:2d} {r['schedule']:8s} {r['formula']:7.3f} "
              f"{r['measured']:8.3f} [{r['stage_min']:.3f}..{r['stage_max']:.3f}] "
              f"{r['median_step_measured']:6.3f} "
              f"{r['diff_points']:+8.1f} {flight:>11s} {r['stage0_activation_mb']:9.2f} "
              f"{r['busy_cpu_over_wall']:8.2f}  {note}")
    honest = [r for r in rows if not r["oversubscribed"]]
    met = all(r["within_goal"] for r in honest)
    print(f"goal: |measured - formula| < {GOAL_POINTS:g} points → "
          f"{'met' if met else 'NOT met'} on the {len(honest)} rows with a core per stage"
          + (f"; {len(rows) - len(honest)} oversubscribed rows (p > {cores} cores) are not a "
             f"measurement of the bubble" if len(honest) < len(rows) else ""))
    write_json(args.out, {"bench": "pipeline_bubble", "args": vars(args), "rows": rows,
                          "launcher": "torch.multiprocessing" if args.spawn else "ray gang",
                          "goal_points": GOAL_POINTS, "goal_met": met, "cores": cores,
                          "torch": torch.__version__, "cpus": os.cpu_count()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
