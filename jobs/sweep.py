"""Sweep an adaptation over a search space with Ray Tune, then write the Pareto report.

    bmray sweep --config configs/sweep.yaml [--set sweep.num_samples=32 ...]
    bmray sweep --config configs/sweep.yaml --resume      # after the driver died mid-sweep
    RAY_ADDRESS=auto bmray sweep --config ...              # a running cluster

The YAML has three sections: ``adapt:`` (the adapt config, inline or a path relative to the
YAML), ``space:`` (dotted keys into it, each a distribution) and ``sweep:`` (trials, scheduler,
search, resources per trial, keep-N). The space is checked against the adapt config before any
trial starts. The trial body and the config loader are ``module:function`` strings
(``sweep.trial_body``, ``sweep.config_loader``; by default the adapt job's own), imported here.
At the end: the Pareto table and plot, the best delta in ``<storage>/<name>/best_delta``, and the
``tensorboard --logdir`` command that shows every trial.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable

from bmray.actors.tune.space import SearchSpace
from bmray.cluster import connect
from bmray.cluster.sweep import (SweepConfig, SweepResult, run_sweep, tensorboard_command,
                                  trial_spec)
from bmray.models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml

SECTIONS = ("adapt", "space", "sweep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmray sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="sweep YAML (adapt:, space:, sweep:)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a value, e.g. sweep.num_samples=4")
    ap.add_argument("--resume", action="store_true",
                    help="finish the sweep saved in <storage>/<name> (finished trials are kept)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    ap.add_argument("--report", default=None, help="also write the trials' results as JSON here")
    return ap.parse_args(argv)


def resolve(path: str, key: str) -> Callable[..., Any]:
    """``module:function`` -> the function; a clear ConfigError when it is not importable."""
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"sweep.{key}: cannot import {path!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"sweep.{key}: {path!r} is not callable")
    return fn


def load_sweep(path: str, overrides: list[str]) -> tuple[SweepConfig, dict, SearchSpace]:
    """Parse the YAML (inlining an adapt path), apply overrides, type the sweep, parse the space."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; valid are {list(SECTIONS)}")
    for section in SECTIONS[:2]:
        if section not in raw:
            raise ConfigError(f"{path}: missing section {section!r}")
    if isinstance(raw["adapt"], str):
        adapt_path = os.path.join(os.path.dirname(os.path.abspath(path)), raw["adapt"])
        raw["adapt"] = load_yaml(adapt_path)
    if not isinstance(raw["adapt"], dict):
        raise ConfigError(f"adapt: expected a mapping or a YAML path, got {raw['adapt']!r}")
    raw = apply_overrides(raw, overrides)
    sweep = from_dict(SweepConfig, raw.get("sweep") or {}, "sweep")
    return sweep, raw["adapt"], SearchSpace(raw["space"])


def run(sweep: SweepConfig, adapt: dict, space: SearchSpace, address: str | None = None,
        resume: bool = False) -> SweepResult:
    body = resolve(sweep.trial_body, "trial_body")
    load_config = resolve(sweep.config_loader, "config_loader")
    check = resolve(sweep.config_check, "config_check") if sweep.config_check else None
    trial_spec(sweep, adapt, space, body, load_config, check)  # bad space: fails before Ray
    per_trial = sweep.trial_cpus + sweep.workers_per_trial * sweep.cpus_per_worker
    info = connect(address, num_cpus=max(int(per_trial + 0.999), os.cpu_count() or 1))
    print(f"[bmray] sweep {sweep.name!r} on {info['where']} ({info['cpus']:.0f} CPUs): "
          f"{sweep.num_samples} trial(s), {sweep.search} search, {sweep.scheduler} scheduler, "
          f"{sweep.workers_per_trial} worker(s) per trial"
          f"{', resuming' if resume else ''}", flush=True)
    return run_sweep(sweep, adapt, space, body, load_config, resume=resume)


def print_report(sweep: SweepConfig, result: SweepResult) -> None:
    rep = result.report
    print(rep["table"], flush=True)
    print(f"[bmray] Pareto report: {rep['markdown']}" +
          (f", plot {rep['png']}" if rep["png"] else ""), flush=True)
    if rep["best_delta"]:
        print(f"[bmray] best trial {rep['best'].trial} (accuracy {rep['best'].accuracy:.4f}); "
              f"its delta: {rep['best_delta']}", flush=True)
    print(f"[bmray] curves: {tensorboard_command(sweep)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep, adapt, space = load_sweep(args.config, args.overrides)
        result = run(sweep, adapt, space, args.address, resume=args.resume)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    print_report(sweep, result)
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(result.trials, fh, indent=2, default=str)
    return 0 if result.report["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
