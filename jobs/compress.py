"""Compress a trained model with a recipe; measure every stage; write one artifact.

    bmray compress --config configs/compress_tiny.yaml [--set source=runs/x --set out_dir=...]

``source`` is an adaptation run's out_dir (``bmray adapt``) or a pre-training checkpoint (with
``experiment``: the YAML it was trained from). ``recipe`` lists the stages in order (distill,
prune, structured, quantize, moefy, lowrank, share). The driver checks the whole config — every
key, every stage's values, the calibration data the stages need — before building anything,
and the recipe against the loaded model (target names, group sizes) before any stage runs;
each is one ConfigError naming the key (exit 2). The run is in this process (training inside
a stage is the one Trainer's); it prints a BMCook-style table — parameters, bytes, CPU
latency at batch 1 and 32, quality retained vs the teacher — and writes
``out_dir/artifact`` (model.safetensors + manifest.json) and ``out_dir/report.json``.
"""
from __future__ import annotations

import sys
from typing import Any

from bmray.actors.train.compress import (check_against_source, compress_config_from_dict,
                                         run_compress)
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
    """Run the recipe in this process (``address`` is unused: nothing here needs a gang)."""
    return run_compress(compress_config_from_dict(raw))


def print_report(report: dict[str, Any]) -> None:
    print(report["table"], flush=True)
    print(f"[bmray] artifact: {report['artifact']} ({report['artifact_bytes'] / 2**20:.2f} MB "
          f"on disk; reloaded exactly)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray compress"), load_config,
                   run, print_report)


if __name__ == "__main__":
    sys.exit(main())
