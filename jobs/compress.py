"""Compress a trained model with a recipe; measure every stage; write one artifact.

    bmray compress --config configs/compress_tiny.yaml [--set source=runs/x --set out_dir=...]

``source`` is an adaptation run's out_dir (``bmray adapt``) or a pre-training checkpoint (with
``experiment``: the YAML it was trained from). ``recipe`` lists the stages in order (distill,
prune, structured, quantize, moefy, lowrank, share). The driver checks the whole config — every
key, every stage's values, the calibration data the stages need — before building anything,
and the recipe against the loaded model (target names, group sizes) before any stage runs;
each is one ConfigError naming the key (exit 2). The run is in this process; a stage's
training is the one Trainer's, here too, or — with ``scaling.num_workers`` > 1 or a
``strategy`` (ddp, zero stage 1-3) — on a gang (cluster/compress_gang.py). It prints a
BMCook-style table — parameters, bytes, CPU latency at batch 1 and 32, quality retained vs
the teacher — and writes
``out_dir/artifact`` (model.safetensors + manifest.json) and ``out_dir/report.json``.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from bmray.actors.train.compress import (check_against_source, compress_config_from_dict,
                                         run_compress)
from bmray.cluster import connect
from bmray.cluster.compress_gang import needs_gang, run_compress_gang
from bmray.jobs.pretrain import parse_args, run_job
from bmray.models.typed_config import apply_overrides, load_yaml

DEFAULT_OUT = "runs/compress"


def load_config(path: str, overrides: list[str], check: bool = True) -> dict[str, Any]:
    """Parse, override and validate (ConfigError naming the key); with ``check`` also load
    the source once and check the recipe against it (names, shapes). Returns the raw
    mapping."""
    raw = apply_overrides(load_yaml(path), overrides)
    raw.setdefault("out_dir", DEFAULT_OUT)
    cfg = compress_config_from_dict(raw)
    if check:
        check_against_source(cfg)
    return raw


def run(raw: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    """Run the recipe in this process; its training stages too, or on a gang (Ray at
    ``address``, else an embedded local Ray) when the config asks for one."""
    cfg = compress_config_from_dict(raw)
    if not needs_gang(cfg):
        return run_compress(cfg)
    s = cfg.scaling
    info = connect(address, num_cpus=max(int(s.num_workers * max(1.0, s.cpus_per_worker)),
                                         os.cpu_count() or 1))
    print(f"[bmray] training stages on {info['where']}: {s.num_workers} worker(s), strategy "
          f"{cfg.strategy.resolved(s.num_workers).kind}", flush=True)
    return run_compress_gang(cfg)


def print_report(report: dict[str, Any]) -> None:
    print(report["table"], flush=True)
    print(f"[bmray] artifact: {report['artifact']} ({report['artifact_bytes'] / 2**20:.2f} MB "
          f"on disk; reloaded exactly)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray compress"), load_config,
                   run, print_report)


if __name__ == "__main__":
    sys.exit(main())
