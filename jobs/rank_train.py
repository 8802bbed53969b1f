"""Train a ranker — a cross-encoder, a dual encoder or a span pre-training — and save it.

    bmray rank-train --config configs/rank_cross_encoder.yaml [--set train.max_steps=50 ...]

``kind`` (cross_encoder | dual_encoder | span_pretrain) says what is trained; the whole config
is checked before anything is built (a ConfigError naming the key: exit 2). The run is in this
process on the one Trainer (actors/train/rank_run.py). It prints each evaluation collection's
metrics before and after training and writes ``out_dir/artifact`` (model.safetensors +
manifest.json with the base's identity; models/retrieval/rank_artifact.py) and
``out_dir/report.json``. Docs: docs/retrieval.md, "Re-ranking, fusion and training".
"""
from __future__ import annotations

import sys
from typing import Any

from bmray.actors.train.rank_run import rank_config_from_dict, run_rank
from bmray.jobs.pretrain import parse_args, run_job
from bmray.models.retrieval.metrics import format_table
from bmray.models.typed_config import apply_overrides, load_yaml


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """Parse, override and validate (ConfigError naming the key); returns the raw mapping."""
    raw = apply_overrides(load_yaml(path), overrides)
    rank_config_from_dict(raw)
    return raw


def run(raw: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    return run_rank(rank_config_from_dict(raw))


def print_report(report: dict[str, Any]) -> None:
    rows = {}
    for name in report["before"]:
        if name in report.get("first_stage", {}):
            rows[f"{name} first stage"] = report["first_stage"][name]
        rows[f"{name} before"] = report["before"][name]
        rows[f"{name} after"] = report["after"][name]
    print(format_table(rows), flush=True)
    print(f"[bmray] {report['kind']}: {report['steps']} steps in {report['train_seconds']:.1f} s, "
          f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}; artifact: "
          f"{report['artifact']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_job(parse_args(argv, description=__doc__, prog="bmray rank-train"), load_config,
                   run, print_report)


if __name__ == "__main__":
    sys.exit(main())
