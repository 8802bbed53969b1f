"""Adapt a pre-trained model to a task with a delta (or a prompt), on a gang of Ray workers.

    bmray adapt --config configs/adapt_trec_lora.yaml [--set delta.rank=8 ...]
    RAY_ADDRESS=auto bmray adapt --config ...                # a running cluster
    ray job submit --working-dir . -- bmray adapt --config ...

The driver validates the config and builds the task once (an unknown key, a target pattern
that matches nothing, a rank larger than a layer, a delta saved for another base, a template
without a mask, a label word the vocabulary lacks: each fails here, before any worker starts),
then runs ``run_adapt`` on ``scaling.num_workers`` workers (data parallel over the trainable
parameters; ``strategy: {kind: zero, stage: 3}`` shards the frozen base too, ``{kind: mesh,
tp: 2}`` splits it and its LoRA) and prints rank 0's report: accuracy, trainable parameters,
memory per rank (and what sharding the frozen base saves), where the delta is.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from bmray.actors.runtime.adapt_rank import adapt_rank
from bmray.actors.train.adapt import build_task
from bmray.actors.train.adapt_config import adapt_config_from_dict
from bmray.cluster import connect
from bmray.cluster.launcher import TrainRun
from bmray.jobs.pretrain import parse_args, run_job
from bmray.models.typed_config import apply_overrides, load_yaml

DEFAULT_OUT = "runs/adapt"


def load_config(path: str, overrides: list[str], check: bool = True) -> dict[str, Any]:
    """Parse, override and validate; with ``check`` also build the task once on the driver
    (bad input raises ConfigError here). Returns the raw mapping that travels to the workers."""
    raw = apply_overrides(load_yaml(path), overrides)
    raw.setdefault("out_dir", DEFAULT_OUT)
    cfg = adapt_config_from_dict(raw)
    if check:
        build_task(cfg, tokenizer_dir=None)
    return raw


def run(raw: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    """Run the adaptation on a gang; returns rank 0's report."""
    train_run = TrainRun(raw, parse=adapt_config_from_dict, rank_fn=adapt_rank)
    scaling = train_run.scaling
    needed = scaling.num_workers * max(1.0, scaling.cpus_per_worker)
    info = connect(address, num_cpus=max(int(needed), os.cpu_count() or 1))
    print(f"[bmray] running on {info['where']} ({info['cpus']:.0f} CPUs, "
          f"{info['gpus']:.0f} GPUs): {scaling.num_workers} worker(s), strategy "
          f"{train_run.spec.kind}", flush=True)
    return train_run.fit()


def print_report(report: dict[str, Any]) -> None:
    m = report["metrics"]
    share = 100.0 * report["trainable_params"] / max(report["total_params"], 1)
    print(f"[bmray] adapted to step {report['step']}: eval accuracy {m.get('accuracy', 0):.4f} "
          f"on {m.get('examples', 0)} examples (loss {m.get('loss', float('nan')):.4f})",
          flush=True)
    print(f"[bmray] trainable {report['trainable_params']:,} of {report['total_params']:,} "
          f"parameters ({share:.3f}%); latency {report['latency_ms']:.2f} ms/example",
          flush=True)
    mem = report.get("memory") or {}
    mb = 1 / 2**20
    print(f"[bmray] training memory per rank {report['peak_memory_bytes'] * mb:.1f} MB "
          f"(activations {report['activation_bytes'] * mb:.1f} MB)", flush=True)
    if "frozen_param_bytes" in mem:
        print(f"[bmray] frozen base: this rank keeps {mem['frozen_bytes'] * mb:.1f} MB of "
              f"{mem['frozen_param_bytes'] * mb:.1f} MB (sharding saves "
              f"{mem['frozen_saved_bytes'] * mb:.1f} MB)", flush=True)
    if report.get("delta_dir"):
        print(f"[bmray] delta: {report['delta_dir']}", flush=True)
    if report.get("head_dir"):
        print(f"[bmray] head: {report['head_dir']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray adapt"), load_config, run,
                   print_report)

if __name__ == "__main__":
    sys.exit(main())
