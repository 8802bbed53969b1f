"""The delta-tuning table (Ding et al. 2023, Nature Machine Intelligence, Table 2) on our
adapt path: TREC (6 coarse classes) and AG News (4 topics), the offline all-MiniLM-L6-v2 with a
classification head, each method — full fine-tuning, LoRA, sequential adapters, BitFit,
prefix-tuning, a soft prompt, ladder side-tuning — trained by ``run_adapt`` in this process.

Per run: % trainable parameters, test accuracy, training memory (``peak_memory_bytes``: on CPU
parameters + gradients + AdamW state + the activations autograd keeps for one micro-batch,
``activation_bytes``; on a GPU the CUDA peak), the median step time. The table: means over
seeds, accuracy relative to full fine-tuning, and each method's memory saving against full
fine-tuning (Sung et al. 2022 report 69% for ladder side-tuning, 26% for LoRA/adapters).

    python bench/delta_table.py                     # the committed run (few-shot, capped test)
    python bench/delta_table.py --quick             # smoke
    python bench/delta_table.py --k 0 --eval-limit 0 --steps 1000 --seeds 0 1 2   # full data

Docs: docs/adaptation.md ("Measured: the delta-tuning table").
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import parse_args, result_path, trim, write_json  # noqa: E402
from bmray.actors.train.adapt import run_adapt  # noqa: E402
from bmray.actors.train.adapt_config import load_adapt_config  # noqa: E402

# method -> (delta mapping for the registry, or None: full fine-tuning; learning rate).
# The learning rates are the usual ones of each method's paper family, not tuned here.
BITFIT_TARGETS = r"re:(embeddings|encoder)\..*(query|key|value|dense|LayerNorm)"
METHODS: dict[str, tuple[dict[str, Any] | None, float]] = {
    "full": (None, 1e-4),
    "lora": ({"method": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16.0}, 2e-3),
    "adapter": ({"method": "adapter", "targets": ["output.dense"], "bottleneck": 32,
                 "style": "sequential"}, 1e-3),
    "bitfit": ({"method": "bitfit", "targets": [BITFIT_TARGETS]}, 5e-3),
    "prefix": ({"method": "prefix", "length": 10, "reparam_hidden": 64}, 5e-3),
    "soft_prompt": ({"method": "soft_prompt", "length": 20, "init": "vocab"}, 3e-2),
    "ladder": ({"method": "ladder", "reduction_factor": 8, "side_heads": 4}, 3e-3),
}
MAX_LENGTH = {"trec": 32, "agnews": 64}
N_LABELS = {"trec": 6, "agnews": 4}


def adapt_mapping(dataset: str, method: str, seed: int, args: Any) -> dict[str, Any]:
    """The adapt config of one run (the same for every method but ``delta`` and ``lr``)."""
    delta, lr = METHODS[method]
    return {
        "base": {"kind": "minilm"},
        "delta": copy.deepcopy(delta),
        "task": {"dataset": dataset, "few_shot_k": args.k or None,
                 "max_length": MAX_LENGTH[dataset], "batch_size": args.batch_size,
                 "eval_batch_size": 100, "eval_limit": args.eval_limit or None,
                 "pooling": "mean"},
        "train": {"max_steps": args.steps, "lr": lr * args.lr_scale, "min_lr": 0.0,
                  "warmup_steps": max(1, args.steps // 10), "weight_decay": 0.0,
                  "eval_every": 0, "log_every": 1, "grad_clip": 1.0, "device": args.device,
                  "echo": False},
        "scaling": {"num_workers": 1},
        "checkpoint": {"every": 0},
        "seed": seed,
    }


def step_times(metrics_path: str) -> list[float]:
    """Seconds of each training step, from the cumulative ``elapsed_s`` of the train rows."""
    rows = [json.loads(line) for line in open(metrics_path)]
    elapsed = [r["elapsed_s"] for r in rows if r.get("split") == "train" and "elapsed_s" in r]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def one_run(dataset: str, method: str, seed: int, args: Any, scratch: str) -> dict[str, Any]:
    mapping = adapt_mapping(dataset, method, seed, args)
    out = os.path.join(scratch, f"{dataset}-{method}-{seed}")
    mapping["out_dir"] = out
    cfg = load_adapt_config(mapping)
    t0 = time.perf_counter()
    result = run_adapt(cfg, out_dir=out)
    wall = time.perf_counter() - t0
    steps = step_times(os.path.join(out, "metrics.jsonl"))
    timed = steps[1:] or steps              # step 1 pays one-off allocations
    m = result.memory
    head = (result.trainable_params if method == "full" else
            N_LABELS[dataset] * (384 + 1))   # the head: Linear(384 -> labels)
    return {
        "dataset": dataset, "method": method, "seed": seed, "lr": cfg.train.lr,
        "delta": mapping["delta"],
        "accuracy": result.metrics["accuracy"], "eval_examples": result.metrics["examples"],
        "eval_loss": result.metrics["loss"], "final_train_loss": result.losses[max(result.losses)],
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_pct": 100.0 * result.trainable_params / result.total_params,
        "delta_params": result.trainable_params - head if method != "full" else None,
        "peak_memory_bytes": result.peak_memory_bytes,
        "activation_bytes": result.activation_bytes,
        # a step holds a float32 gradient for every trainable tensor (the strategy's report,
        # read after the step, sees none); on CPU peak = model state + activations
        "model_state_bytes": result.peak_memory_bytes - result.activation_bytes,
        "param_bytes": m["param_bytes"], "grad_bytes": 4 * result.trainable_params,
        "optimizer_bytes": m["optimizer_bytes"],
        "median_step_s": statistics.median(timed), "step_s": steps,
        "latency_ms": result.latency_ms, "delta_bytes": result.delta_bytes,
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (dataset, method); ratios against full fine-tuning's means."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = {m: [r for r in rows if r["dataset"] == dataset and r["method"] == m]
                 for m in dict.fromkeys(r["method"] for r in rows if r["dataset"] == dataset)}
        mean = {m: {k: statistics.mean(r[k] for r in rs) for k in
                    ("accuracy", "peak_memory_bytes", "activation_bytes", "median_step_s")}
                for m, rs in group.items() if rs}
        full = mean.get("full")
        for m, rs in group.items():
            mm = mean[m]
            accs = [r["accuracy"] for r in rs]
            row = {"dataset": dataset, "method": m, "seeds": [r["seed"] for r in rs],
                   "trainable_pct": rs[0]["trainable_pct"],
                   "trainable_params": rs[0]["trainable_params"],
                   "accuracy_mean": mm["accuracy"], "accuracy_per_seed": accs,
                   "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                   "peak_memory_mb": mm["peak_memory_bytes"] / 2 ** 20,
                   "activation_mb": mm["activation_bytes"] / 2 ** 20,
                   "median_step_ms": 1e3 * mm["median_step_s"]}
            if full:
                row.update(
                    accuracy_vs_full=mm["accuracy"] / full["accuracy"],
                    memory_saving_vs_full=1 - mm["peak_memory_bytes"] / full["peak_memory_bytes"],
                    activation_saving_vs_full=1 - mm["activation_bytes"]
                    / full["activation_bytes"],
                    step_time_vs_full=mm["median_step_s"] / full["median_step_s"])
            out.append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | method | % trainable | accuracy (mean) | vs full | memory MB | "
             "saving vs full | activations MB | act. saving | step ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['trainable_pct']:.3f} | "
            f"{r['accuracy_mean']:.3f} | {r.get('accuracy_vs_full', float('nan')):.2f} | "
            f"{r['peak_memory_mb']:.1f} | {r.get('memory_saving_vs_full', float('nan')):.0%} | "
            f"{r['activation_mb']:.2f} | {r.get('activation_saving_vs_full', float('nan')):.0%} | "
            f"{r['median_step_ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["trec", "agnews"],
                    choices=sorted(MAX_LENGTH))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--k", type=int, default=16, help="training examples per class (0: all)")
    ap.add_argument("--eval-limit", type=int, default=200,
                    help="test examples, a seeded sample (0: the whole test set)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's lr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=result_path(__file__, "delta_table.json"))
    args = parse_args(ap, {"datasets": ["trec"], "methods": ["full", "lora", "ladder"],
                           "seeds": [0], "steps": 4, "eval_limit": 32,
                           "out": result_path(__file__, "delta_table_quick.json")})
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(base="all-MiniLM-L6-v2 (BertModel, 22.7M parameters, frozen but for full "
                       "fine-tuning)", head="mean pooling -> Linear(384 -> classes)",
                  max_length=MAX_LENGTH, optimizer="AdamW, warmup 10% then cosine to 0, "
                  "clip 1.0, no weight decay",
                  methods={m: {"delta": d, "lr": lr} for m, (d, lr) in METHODS.items()},
                  memory=("peak_memory_bytes: on CPU parameters + gradients + AdamW state + "
                          "activation_bytes (bytes autograd keeps for backward in one training "
                          "micro-batch of batch_size rows, parameters excluded); on a GPU the "
                          "CUDA peak allocated"),
                  step_time="median of each run's optimizer steps after the first "
                            "(Trainer elapsed_s; forward, backward, clip, AdamW)",
                  torch=torch.__version__, python=platform.python_version(),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs")
    record: dict[str, Any] = {"bench": "delta_table", "config": config, "runs": rows}
    with tempfile.TemporaryDirectory(prefix="delta_table_") as scratch:
        for seed in args.seeds:
            for dataset in args.datasets:
                for method in args.methods:
                    row = one_run(dataset, method, seed, args, scratch)
                    rows.append(row)
                    print(f"{dataset:7s} {method:12s} seed {seed}: acc {row['accuracy']:.3f} "
                          f"trainable {row['trainable_pct']:.3f}% mem "
                          f"{row['peak_memory_bytes'] / 2**20:.1f} MB act "
                          f"{row['activation_bytes'] / 2**20:.2f} MB step "
                          f"{1e3 * row['median_step_s']:.0f} ms wall {row['wall_s']:.0f}s",
                          flush=True)
                    record["table"] = table(rows)
                    write_json(args.out, record)     # partial results survive an interrupt
                    trim()
    record["table"] = table(rows)
    record["markdown"] = markdown(record["table"])
    write_json(args.out, record)
    print(record["markdown"])


if __name__ == "__main__":
    main()
