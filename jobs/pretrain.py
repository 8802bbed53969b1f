"""Pre-train a model from a YAML experiment, on an embedded local Ray or a Ray cluster.

    python -m jobs.pretrain --config configs/gpt-tiny.yaml [--set train.max_steps=50 ...]
    RAY_ADDRESS=auto python -m jobs.pretrain --config ...            # a running cluster
    ray job submit --working-dir . -- python -m jobs.pretrain --config ...

The driver validates the config (a bad key fails here, before any worker starts), starts the
train worker as a Ray actor, and waits for its report; the loop runs inside the worker. The
family (gpt, bert, electra, t5) comes from ``model.family`` in the config.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ray

from cluster import connect
from models.typed_config import ConfigError, apply_overrides, load_yaml


def parse_args(argv: list[str] | None = None, description: str = __doc__) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-3")
    ap.add_argument("--address", default=None,
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    ap.add_argument("--num-cpus", type=int, default=2,
                    help="CPUs (torch threads) for the train worker")
    ap.add_argument("--report", default=None, help="also write the final report as JSON here")
    return ap.parse_args(argv)


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """Parse, override and validate; returns the raw mapping that travels to the worker."""
    from jobs.experiment import experiment_from_dict

    raw = apply_overrides(load_yaml(path), overrides)
    experiment_from_dict(raw)            # validate now: errors name the key, nothing has started
    return raw


def run(raw: dict[str, Any], address: str | None, num_cpus: int,
        samples: list[str] | None = None) -> dict[str, Any]:
    """Start one train worker on the cluster, run the experiment there, return its report."""
    from actors.train_worker import TrainWorker

    info = connect(address, num_cpus=max(num_cpus, 2))
    print(f"[bmray] running on {info['where']} ({info['cpus']:.0f} CPUs, "
          f"{info['gpus']:.0f} GPUs)", flush=True)
    num_gpus = 1 if info["gpus"] >= 1 else 0
    worker = TrainWorker.options(num_cpus=num_cpus, num_gpus=num_gpus,
                                 name=None, max_restarts=0).remote(threads=num_cpus)
    try:
        return ray.get(worker.run.remote(raw, samples=samples))
    finally:
        ray.kill(worker)


def print_report(report: dict[str, Any]) -> None:
    losses = report["losses"]
    if losses:
        steps = sorted(losses)
        print(f"[bmray] trained to step {report['step']}: loss {losses[steps[0]]:.3f} (step "
              f"{steps[0]}) -> {losses[steps[-1]]:.3f} (step {steps[-1]})", flush=True)
    if report.get("eval"):
        ev = report["eval"]
        print(f"[bmray] eval loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.2f}", flush=True)
    if report.get("checkpoint"):
        print(f"[bmray] checkpoint: {report['checkpoint']}", flush=True)
    if report.get("averaged_checkpoint"):
        print(f"[bmray] averaged checkpoint: {report['averaged_checkpoint']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        raw = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    report = run(raw, args.address, args.num_cpus)
    print_report(report)
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
