"""Train an extractive QA reader, tune its null threshold, measure EM/F1, save the artifact.

    bmray qa --config configs/qa_world_minilm.yaml [--set train.max_steps=50 --set out_dir=...]

The config (base, data, reader, train, seed, out_dir) is checked whole before anything is
built; a bad key or value is one ConfigError naming its path (exit 2). Training is the one
Trainer's, in this process. Writes ``out_dir/reader`` (model.safetensors + manifest.json),
``out_dir/report.json`` and ``out_dir/metrics.jsonl``.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from bmray.actors.train.qa import qa_config_from_dict, run_qa
from bmray.jobs.pretrain import parse_args, run_job
from bmray.models.typed_config import apply_overrides, load_yaml


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    raw = apply_overrides(load_yaml(path), overrides)
    qa_config_from_dict(raw)
    return raw


def run(raw: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    return run_qa(qa_config_from_dict(raw))


def print_report(report: dict[str, Any]) -> None:
    e = report["eval"]
    print(json.dumps(report["data"]), flush=True)
    print(f"[bmray] {report['steps']} steps in {report['train_seconds']} s; threshold "
          f"{report['threshold']:.3f}; eval EM {e['exact']:.1f} F1 {e['f1']:.1f} over "
          f"{int(e['total'])} questions", flush=True)
    print(f"[bmray] artifact: {report['artifact']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray qa"), load_config, run,
                   print_report)


if __name__ == "__main__":
    sys.exit(main())
