"""Pre-train a model from a YAML experiment, on an embedded local Ray or a Ray cluster.

    bmray pretrain --config configs/gpt-tiny.yaml [--set train.max_steps=50 ...]
    RAY_ADDRESS=auto bmray pretrain --config ...            # a running cluster
    ray job submit --working-dir . -- bmray pretrain --config ...

The driver validates the config (a bad key fails here, before any worker starts), starts the
gang of ``scaling.num_workers`` train workers (Ray actors) with the ``strategy`` of the config
(single, ddp, param_server), and waits for rank 0's report; the loop runs inside the workers.
With ``run.max_failures > 0`` a dead worker restarts the gang from the latest checkpoint. The
family (gpt, bert, electra, t5) comes from ``model.family``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from bmray.actors.train.experiment import experiment_from_dict
from bmray.cluster import connect
from bmray.cluster.launcher import RunFailed, TrainRun
from bmray.models.typed_config import ConfigError, apply_overrides, load_yaml


def parse_args(argv: list[str] | None = None, description: str = __doc__,
               prog: str = "bmray pretrain") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog,
                                 description=description.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-3")
    ap.add_argument("--address", default=None,
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    ap.add_argument("--report", default=None, help="also write the final report as JSON here")
    return ap.parse_args(argv)


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """Parse, override and validate; returns the raw mapping that travels to the worker."""
    raw = apply_overrides(load_yaml(path), overrides)
    experiment_from_dict(raw)            # validate now: errors name the key, nothing has started
    return raw


def run(raw: dict[str, Any], address: str | None = None,
        samples: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment on a gang of workers; returns rank 0's report."""
    train_run = TrainRun(raw, samples=samples)
    scaling = train_run.scaling
    needed = scaling.num_workers * max(1.0, scaling.cpus_per_worker)
    info = connect(address, num_cpus=max(int(needed), os.cpu_count() or 1))
    print(f"[bmray] running on {info['where']} ({info['cpus']:.0f} CPUs, "
          f"{info['gpus']:.0f} GPUs): {scaling.num_workers} worker(s), strategy "
          f"{train_run.spec.kind}", flush=True)
    return train_run.fit()


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


def run_job(args: argparse.Namespace, load: Callable[[str, list[str]], dict[str, Any]],
            execute: Callable[[dict[str, Any], str | None], dict[str, Any]],
            report_fn: Callable[[dict[str, Any]], None]) -> int:
    """A gang job's driver: load and check the config (exit 2 on a ConfigError), run it (exit
    1 when the run fails), print the report and write it to ``--report``."""
    try:
        raw = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    try:
        report = execute(raw, args.address)
    except RunFailed as exc:
        print(f"[bmray] run failed: {exc}", file=sys.stderr)
        return 1
    report_fn(report)
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv), load_config, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
