"""Training throughput of bmray's single-worker loop against a plain PyTorch loop.

Same GPT, same initial weights, same batches, same optimizer (AdamW), schedule and clipping;
the plain loop is what a user would write by hand (nanoGPT-style). Ours runs through
`actors.train.loop.Trainer` (token-weighted accumulation, metrics, schedule, strategy object),
once on the same in-memory batches and once streaming the same blocks from Parquet through
`models.data.BlockStream`, so the table shows what the loop costs and what the data path costs.

Runs are interleaved (plain, ours, plain, ours, ...) and the median of the repeats is reported,
because the machine is shared and noisy: quote the ratio, not the absolute numbers.

    python bench/train_throughput.py [--steps 30 --repeats 3 --threads 2]

Goal: ours ≥ 0.95 × plain.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (add_model_args, add_timing_args, cpu_train_config,  # noqa: E402
                          fused_adamw, gpt_config, result_path, warmup_cosine_lr,
                          with_steps, world_pack, write_json)
from bmray.actors.train.config import TrainConfig  # noqa: E402
from bmray.actors.train.loop import Trainer  # noqa: E402
from bmray.models import ModelConfig, build_model, objective_for  # noqa: E402
from bmray.models.data import BlockStream  # noqa: E402


def plain_loop(model: torch.nn.Module, batches: list[torch.Tensor], cfg: TrainConfig) -> float:
    """The hand-written reference: returns seconds for len(batches) steps."""
    opt = fused_adamw(model.parameters(), cfg)
    sched = warmup_cosine_lr(opt, cfg)
    model.train()
    start = time.perf_counter()
    for blocks in batches:
        out = model(input_ids=blocks[:, :-1], labels=blocks[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    float(out.loss.detach())  # one sync at the end
    return time.perf_counter() - start


def ours_loop(model: torch.nn.Module, data, cfg: TrainConfig, model_cfg: ModelConfig) -> float:
    trainer = Trainer(model, objective_for(model_cfg), data, cfg, model_config=model_cfg)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(ap, steps=30, warmup_steps=3, repeats=3, steps_help=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-len", type=int, default=129)
    add_model_args(ap, d_model=256, layers=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=result_path(__file__, "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vocab = 4096
    model_cfg = gpt_config(vocab, args.d_model, args.layers, args.block_len,
                           heads=args.d_model // 64)
    n = args.steps + args.warmup_steps
    cfg = cpu_train_config(n, log_every=10)
    pack = world_pack(tempfile.mkdtemp(prefix="bmray_bench_"), args.block_len, vocab)
    stream = BlockStream(pack, args.block_len, args.batch, shuffle=False)
    batches = [next(stream) for _ in range(n)]   # the same blocks, held in memory
    init = build_model(model_cfg)
    tokens = args.steps * args.batch * (args.block_len - 1)

    def timed(fn) -> float:
        # Time all n steps and subtract a separately measured warm-up of the same kind, so
        # one-off costs (first-touch allocation, optimizer state) do not count.
        return fn(n) - fn(args.warmup_steps)

    runs = {
        "plain PyTorch loop": lambda k: plain_loop(copy.deepcopy(init), batches[:k], cfg),
        "bmray Trainer (in-memory batches)": lambda k: ours_loop(
            copy.deepcopy(init), iter(batches[:k]), with_steps(cfg, k), model_cfg),
        "bmray Trainer + BlockStream (Parquet)": lambda k: ours_loop(
            copy.deepcopy(init), BlockStream(pack, args.block_len, args.batch, shuffle=False),
            with_steps(cfg, k), model_cfg),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    base = statistics.median(times["plain PyTorch loop"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"loop": name, "median_s": med, "tokens_per_s": tokens / med,
                     "ratio_vs_plain": base / med, "runs_s": ts})
    print(f"\nGPT d_model={args.d_model} layers={args.layers} batch={args.batch}x"
          f"{args.block_len - 1} tokens, {args.steps} timed steps, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'loop':40s} {'tokens/s':>10s} {'× plain':>8s}")
    for r in rows:
        print(f"{r['loop']:40s} {r['tokens_per_s']:10.0f} {r['ratio_vs_plain']:8.3f}")
    goal = 0.95
    ours = rows[1]["ratio_vs_plain"]
    print(f"goal: ours ≥ {goal} × plain → {'met' if ours >= goal else 'NOT met'} ({ours:.3f})")
    write_json(args.out, {"bench": "train_throughput", "args": vars(args), "rows": rows,
                          "goal_ratio": goal, "goal_met": ours >= goal,
                          "torch": torch.__version__})
    print(f"wrote {args.out}")
    assert all(math.isfinite(r["median_s"]) for r in rows)


if __name__ == "__main__":
    main()
