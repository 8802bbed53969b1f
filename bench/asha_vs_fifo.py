"""ASHA against FIFO on one search space: the compute (trial-steps) each spends to reach the best
accuracy the other found, and the sweep's wall time.

Both sweeps are ``run_sweep`` (cluster/sweep.py) with the real ``run_adapt`` as the trial body
(the MiniLM + a delta + a head on TREC few-shot), the same space (delta method × LoRA rank /
adapter bottleneck × lr), random search with the same seed and ``num_samples`` — so both draw the
same trials (the JSON checks it) — and differ only in the scheduler; repeated for a few search
seeds. ASHA
(Li et al. 2020) cuts a trial at a rung (after 1, 2, 4 evaluations, reduction factor 2) unless it
is in the top half there; FIFO runs every trial to ``max_t`` evaluations.

Compute is counted in trial-steps: every evaluation a trial reports adds the optimizer steps it
trained since its previous one. Events are ordered by the wall clock at which each evaluation
was reported (the body stamps it), so "the trial-steps spent when accuracy A was first seen"
is the sum of the steps of every evaluation reported up to then, over all trials.

    python bench/asha_vs_fifo.py                # the committed run
    python bench/asha_vs_fifo.py --quick        # smoke
    python bench/asha_vs_fifo.py --num-samples 32 --max-t 8 --eval-every 25 --eval-limit 0

Docs: docs/adaptation.md ("Measured: ASHA against FIFO").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import connect_ray, parse_args, result_path, write_json  # noqa: E402
from bmray.actors.train.adapt import run_adapt  # noqa: E402
from bmray.actors.train.adapt_config import load_adapt_config  # noqa: E402
from bmray.actors.tune.space import SearchSpace  # noqa: E402
from bmray.cluster.sweep import SweepConfig, run_sweep  # noqa: E402

BITFIT_TARGETS = r"re:(embeddings|encoder)\..*(query|key|value|dense|LayerNorm)"
SPACE = {
    "train.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "delta": {"choice": [
        {"method": "lora", "targets": ["query", "value"], "rank": {"choice": [2, 8, 32]}},
        {"method": "adapter", "targets": ["output.dense"], "bottleneck": {"choice": [8, 32]},
         "style": "sequential"},
        {"method": "bitfit", "targets": [BITFIT_TARGETS]},
    ]},
}


def timed_run_adapt(cfg: Any, *, out_dir: str, on_eval: Any = None) -> Any:
    """``run_adapt`` on one thread, each evaluation row stamped with the wall clock."""
    torch.set_num_threads(1)

    def stamped(row: dict[str, Any]) -> None:
        if on_eval is not None:
            on_eval({**row, "wall_time": time.time()})
    return run_adapt(cfg, out_dir=out_dir, on_eval=stamped)


def adapt_mapping(args: Any) -> dict[str, Any]:
    return {
        "base": {"kind": "minilm"},
        "delta": {"method": "lora", "targets": ["query", "value"], "rank": 8},
        "task": {"dataset": "trec", "few_shot_k": args.k, "max_length": 32,
                 "batch_size": args.batch_size, "eval_batch_size": 100,
                 "eval_limit": args.eval_limit or None, "pooling": "mean"},
        "train": {"max_steps": args.max_t * args.eval_every, "lr": 1.0e-3, "min_lr": 0.0,
                  "warmup_steps": 2, "weight_decay": 0.0, "eval_every": args.eval_every,
                  "log_every": args.eval_every, "grad_clip": 1.0, "device": "cpu",
                  "echo": False},
        "scaling": {"num_workers": 1},
        "checkpoint": {"every": 0},
        "seed": 0,
    }


def trial_rows(sweep_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Every trial's reported rows (Tune's result.json), by trial folder."""
    out = {}
    for path in sorted(glob.glob(os.path.join(sweep_dir, "trial_*", "result.json"))):
        with open(path) as fh:
            out[os.path.basename(os.path.dirname(path))] = [json.loads(line) for line in fh
                                                            if line.strip()]
    return out


def events(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The evaluations of every trial in wall-clock order, with the trial-steps each added and
    the sweep's cumulative trial-steps and best accuracy so far."""
    evs = []
    for trial, rs in rows.items():
        prev = 0
        for r in rs:
            if r.get("final") == 1 or "wall_time" not in r:
                continue                      # the final report repeats the last evaluation
            evs.append({"trial": trial, "wall_time": r["wall_time"], "step": r["step"],
                        "accuracy": r["accuracy"], "steps_added": r["step"] - prev})
            prev = r["step"]
    evs.sort(key=lambda e: e["wall_time"])
    total, best = 0, float("-inf")
    for e in evs:
        total += e["steps_added"]
        best = max(best, e["accuracy"])
        e.update(cumulative_trial_steps=total, best_so_far=best)
    return evs


def steps_to_reach(evs: list[dict[str, Any]], target: float) -> int | None:
    """Cumulative trial-steps when an evaluation first reached ``target`` (None: never)."""
    for e in evs:
        if e["accuracy"] >= target - 1e-12:
            return e["cumulative_trial_steps"]
    return None


def summarise(name: str, sweep_dir: str, wall: float, num_samples: int) -> dict[str, Any]:
    rows = trial_rows(sweep_dir)
    evs = events(rows)
    trials = []
    for trial, rs in rows.items():
        cfg = {k: v for k, v in (rs[0].get("config") or {}).items()}
        evals = [r for r in rs if r.get("final") != 1]
        trials.append({"trial": trial, "config": cfg, "steps": max(r["step"] for r in evals),
                       "accuracy_per_eval": [r["accuracy"] for r in evals],
                       "finished": any(r.get("final") == 1 for r in rs),
                       "trainable_pct": next((r["trainable_pct"] for r in rs
                                              if r.get("final") == 1), None)})
    first = {e["trial"]: e["wall_time"] for e in reversed(evs)}
    trials.sort(key=lambda t: first.get(t["trial"], float("inf")))     # in start order
    return {"scheduler": name, "wall_s": wall, "trials": trials,
            "trials_reported": len(rows), "num_samples": num_samples,
            "trials_stopped_early": sum(not t["finished"] for t in trials),
            "total_trial_steps": evs[-1]["cumulative_trial_steps"] if evs else 0,
            "evaluations": len(evs), "best_accuracy": max(e["accuracy"] for e in evs),
            "events": evs}


def drawn(summary: dict[str, Any]) -> list[str]:
    """The trials' sampled parameters, order-free (trial ids are random per sweep)."""
    return sorted(json.dumps(t["config"], sort_keys=True) for t in summary["trials"])


def compare(args: Any, adapt: dict[str, Any], seed: int, order: tuple[str, ...],
            storage: str) -> dict[str, Any]:
    """Both sweeps with the search seeded ``seed``, run in ``order``; their comparison."""
    sweeps: dict[str, Any] = {}
    for scheduler in order:
        sweep = SweepConfig(name=f"{scheduler}-{seed}", storage_path=storage,
                            num_samples=args.num_samples, search="random", seed=seed,
                            scheduler=scheduler, max_t=args.max_t,
                            grace_period=args.grace_period,
                            reduction_factor=args.reduction_factor,
                            max_concurrent_trials=args.concurrent, workers_per_trial=0,
                            trial_cpus=1.0, keep_checkpoints=1)
        t0 = time.perf_counter()
        run_sweep(sweep, adapt, SearchSpace(SPACE), timed_run_adapt, load_adapt_config)
        wall = time.perf_counter() - t0
        sweeps[scheduler] = summarise(scheduler, sweep.sweep_dir, wall, args.num_samples)
        sm = sweeps[scheduler]
        print(f"seed {seed} {scheduler}: best {sm['best_accuracy']:.3f}, "
              f"{sm['total_trial_steps']} trial-steps, {sm['trials_stopped_early']} stopped "
              f"early, {wall:.0f} s", flush=True)
    fifo, asha = sweeps["fifo"], sweeps["asha"]
    common = min(fifo["best_accuracy"], asha["best_accuracy"])
    comparison = {
        "seed": seed, "order": list(order),
        "fifo_best": fifo["best_accuracy"], "asha_best": asha["best_accuracy"],
        "asha_steps_to_reach_fifo_best": steps_to_reach(asha["events"], fifo["best_accuracy"]),
        "fifo_steps_to_reach_asha_best": steps_to_reach(fifo["events"], asha["best_accuracy"]),
        "common_target": common,
        "fifo_steps_to_common_target": steps_to_reach(fifo["events"], common),
        "asha_steps_to_common_target": steps_to_reach(asha["events"], common),
        "total_trial_steps": {"fifo": fifo["total_trial_steps"], "asha": asha["total_trial_steps"]},
        "total_steps_ratio_asha_over_fifo": asha["total_trial_steps"] / fifo["total_trial_steps"],
        "wall_s": {"fifo": fifo["wall_s"], "asha": asha["wall_s"]},
        "wall_ratio_asha_over_fifo": asha["wall_s"] / fifo["wall_s"],
        "trials_stopped_early": {"fifo": fifo["trials_stopped_early"],
                                 "asha": asha["trials_stopped_early"]},
        "same_trials_drawn": drawn(fifo) == drawn(asha),
    }
    return {"comparison": comparison, "sweeps": sweeps}


def summary(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the search seeds: total trial-steps and wall time of each scheduler, and how often
    ASHA found FIFO's best (and at what cost) or stopped the trial that would have."""
    tot = {s: sum(c["total_trial_steps"][s] for c in comparisons) for s in ("fifo", "asha")}
    wall = {s: sum(c["wall_s"][s] for c in comparisons) for s in ("fifo", "asha")}
    return {"seeds": [c["seed"] for c in comparisons], "total_trial_steps": tot,
            "total_steps_ratio_asha_over_fifo": tot["asha"] / tot["fifo"],
            "wall_s": wall, "wall_ratio_asha_over_fifo": wall["asha"] / wall["fifo"],
            "asha_reached_fifo_best": sum(c["asha_steps_to_reach_fifo_best"] is not None
                                          for c in comparisons),
            "best_accuracy": {s: [c[f"{s}_best"] for c in comparisons] for s in ("fifo", "asha")},
            "steps_to_common_target": {s: [c[f"{s}_steps_to_common_target"] for c in comparisons]
                                       for s in ("fifo", "asha")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--max-t", type=int, default=4, help="evaluations of a full trial")
    ap.add_argument("--eval-every", type=int, default=10, help="optimizer steps per evaluation")
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--reduction-factor", type=int, default=2)
    ap.add_argument("--k", type=int, default=16, help="TREC training questions per class")
    ap.add_argument("--eval-limit", type=int, default=100, help="test questions (0: all 500)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once (1 CPU each)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="random-search seeds: one FIFO and one ASHA sweep each")
    ap.add_argument("--out", default=result_path(__file__, "asha_vs_fifo.json"))
    args = parse_args(ap, {"num_samples": 3, "max_t": 2, "eval_every": 2, "eval_limit": 16,
                           "seeds": [0],
                           "out": result_path(__file__, "asha_vs_fifo_quick.json")})
    adapt = adapt_mapping(args)
    connect_ray(num_cpus=args.concurrent)
    runs = []
    record = {"bench": "asha_vs_fifo",
              "config": {**{k: v for k, v in vars(args).items() if k != "out"},
                         "space": SPACE, "adapt": adapt, "search": "random (Optuna's "
                         "RandomSampler through OptunaSearch), the same seed for both sweeps",
                         "order": "FIFO first on even seed positions, ASHA first on odd ones "
                                  "(the machine's load drifts)",
                         "asha_rungs": "after grace_period * reduction_factor^i evaluations",
                         "trial_body": "run_adapt (MiniLM + delta + head, TREC few-shot), "
                                       "in the trial's process, 1 thread",
                         "torch": torch.__version__, "python": platform.python_version(),
                         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared "
                                    "with other jobs"},
              "runs": runs}
    with tempfile.TemporaryDirectory(prefix="asha_vs_fifo_") as storage:
        for i, seed in enumerate(args.seeds):
            order = ("fifo", "asha") if i % 2 == 0 else ("asha", "fifo")
            runs.append(compare(args, adapt, seed, order, storage))
            record["summary"] = summary([r["comparison"] for r in runs])
            write_json(args.out, record)          # partial results survive an interrupt
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
