"""The sweep's Pareto report: accuracy against % trainable parameters, training memory and
inference latency, as a markdown table and a PNG plot, and the best trial's delta for serving.

A trial is on the Pareto front when no other trial is at least as good on every axis and strictly
better on one (accuracy up, each cost down): the textbook non-dominated set, computed exactly over
all pairs (sweeps hold tens to hundreds of trials).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COSTS = ("trainable_pct", "peak_memory_bytes", "latency_ms")
COST_TITLES = {"trainable_pct": "% trainable parameters", "peak_memory_bytes":
               "training memory (MiB)", "latency_ms": "inference latency (ms/example)"}


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial: its name, accuracy, costs and parameters."""

    trial: str
    accuracy: float
    trainable_pct: float
    peak_memory_bytes: float
    latency_ms: float
    params: tuple = ()        # ((name, value), ...) as sampled
    checkpoint: str | None = None


def dominates(a: TrialPoint, b: TrialPoint) -> bool:
    """a is at least as good as b on every axis and strictly better on one."""
    ge = a.accuracy >= b.accuracy and all(getattr(a, c) <= getattr(b, c) for c in COSTS)
    gt = a.accuracy > b.accuracy or any(getattr(a, c) < getattr(b, c) for c in COSTS)
    return ge and gt


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """The non-dominated points, by accuracy (best first)."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (-p.accuracy, p.trial))


def markdown_table(points: Sequence[TrialPoint], front: Sequence[TrialPoint]) -> str:
    on_front = {p.trial for p in front}
    rows = ["| trial | accuracy | % trainable | train memory (MiB) | latency (ms) | Pareto | "
            "parameters |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (-p.accuracy, p.trial)):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in p.params)
        rows.append(f"| {p.trial} | {p.accuracy:.4f} | {p.trainable_pct:.3f} | "
                    f"{p.peak_memory_bytes / 2**20:.1f} | {p.latency_ms:.3f} | "
                    f"{'*' if p.trial in on_front else ''} | {params} |")
    return "\n".join(rows) + "\n"


def plot(points: Sequence[TrialPoint], front: Sequence[TrialPoint], path: str) -> str:
    """Accuracy against each cost, the front highlighted; written as PNG to ``path``."""
    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4), squeeze=False)
    on_front = {p.trial for p in front}
    for ax, cost in zip(axes[0], COSTS):
        scale = 1 / 2**20 if cost == "peak_memory_bytes" else 1.0
        rest = [p for p in points if p.trial not in on_front]
        ax.scatter([getattr(p, cost) * scale for p in rest], [p.accuracy for p in rest],
                   c="tab:gray", label="trial")
        ax.scatter([getattr(p, cost) * scale for p in front], [p.accuracy for p in front],
                   c="tab:red", label="Pareto front")
        ax.set_xlabel(COST_TITLES[cost])
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(points: Sequence[TrialPoint], sweep_dir: str, metric: str = "accuracy",
                 skipped: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``pareto.md``, ``pareto.png`` and ``best_delta/`` into ``sweep_dir``; returns their
    paths, the front and the best trial (highest accuracy with a surviving checkpoint)."""
    front = pareto_front(points)
    table = markdown_table(points, front)
    md = os.path.join(sweep_dir, "pareto.md")
    with open(md, "w") as fh:
        fh.write(f"# Sweep report: {len(points)} finished trial(s), {len(front)} on the Pareto "
                 f"front ({metric} up; % trainable, memory, latency down)\n\n{table}")
        if skipped:
            fh.write(f"\nNot in the table (stopped before their final report): "
                     f"{', '.join(skipped)}\n")
    png = plot(points, front, os.path.join(sweep_dir, "pareto.png")) if points else None
    best = next((p for p in sorted(points, key=lambda p: (-p.accuracy, p.trial))
                 if p.checkpoint and os.path.isdir(p.checkpoint)), None)
    best_dir = None
    if best is not None:
        best_dir = os.path.join(sweep_dir, "best_delta")
        shutil.rmtree(best_dir, ignore_errors=True)
        shutil.copytree(best.checkpoint, best_dir)
    return {"table": table, "markdown": md, "png": png, "front": front, "best": best,
            "best_delta": best_dir}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
