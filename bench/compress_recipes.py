"""The recipe table (BMCook's, on our stack): compression recipes on a real task model, each
row its parameters, bytes, CPU latency and task accuracy against the teacher.

Teacher: the offline all-MiniLM-L6-v2 with LoRA (rank 8 on query and value) and a mean-pooled
linear head, trained by ``run_adapt`` on TREC's 6 coarse question types — all 5,452 training
questions by default (``--k``: few-shot k per class instead), ``--teacher-steps`` steps of 16,
evaluated on the 500 test questions; its LoRA is merged (``plain_task_model``) so the teacher
timed here is a plain 22.7 M-parameter encoder, like the students. Recipes, through the
stages of models/compress/recipe.py with the one Trainer (``make_train_fn``):

* ``distil 6→3``: TinyBERT-style distillation into layers 1, 3, 5 (logits KD + hidden + attention
  MSE + task loss), ``--distill-steps`` steps — the shared first stage of a, b, d;
* (a) ``fast``: distil + W8A8 (int8 weights, per-token int8 activations, int8 GEMM);
* (b) ``small``: distil + int8 weights + int8 embeddings (the 30522 × 384 table is half the
  MiniLM: without it no recipe reaches 4× smaller);
* (c) ``struct+w8a8``: a quarter of the heads and FFN neurons removed per layer (gradient
  importance) with ``--recovery-steps`` of recovery, then W8A8 — 6 layers kept;
* (d) ``fast+small``: distil + W8A8 + int8 embeddings.

The head stays fp32 (``skip: [head]``). Each recipe's artifact is saved, loaded back onto a
freshly rebuilt teacher and must reproduce its logits exactly. Latency: torch on 1 thread, the
task's sequence length (32), batch 1 and 32, models interleaved in rotating rounds
(``bench.common.balanced_order``: one warm-up then ``--repeats`` timed forwards per visit);
"× faster" is the teacher's pooled median over the model's with a 90% bootstrap interval over
rounds. Training runs on ``--train-threads`` threads.

    .venv/bin/python bench/compress_recipes.py            # full: ~20 min on 2 quiet cores
    .venv/bin/python bench/compress_recipes.py --quick    # smoke (< 2 min), numbers meaningless

Step costs measured on the shared 2-core machine (busy): a teacher LoRA step ~1.4 s, a
distillation or recovery step ~3 s (the student trains every weight, the 11.7 M-row
embedding included), so the defaults (400 + 300 + 100 steps) take ~30 min there and about
two thirds of that on a quiet one; scale ``--teacher-steps`` / ``--distill-steps`` to fit.

Goals: a recipe ≥ 2× faster (batch 1 and 32) at ≥ 95% of the teacher's accuracy, and one
≥ 4× smaller (bytes) at ≥ 90%.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (balanced_order, environment, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, result_path, write_json)
from bmray.actors.train.adapt import run_adapt  # noqa: E402
from bmray.actors.train.adapt_config import load_adapt_config  # noqa: E402
from bmray.actors.train.compress import (Teacher, compress_config_from_dict,  # noqa: E402
                                         load_teacher, make_train_fn)
from bmray.models.compress.artifact import (architecture_of, load_compressed,  # noqa: E402
                                            model_sizes, save_compressed)
from bmray.models.compress.recipe import (StageContext, StageRecord, apply_stage,  # noqa: E402
                                          parse_recipe)
from bmray.models.delta.base import base_identity  # noqa: E402

MAX_LENGTH = 32
BATCH_SIZES = (1, 32)
W8A8 = {"kind": "quantize", "scheme": "w8a8", "skip": ["head"]}
INT8 = {"kind": "quantize", "scheme": "int8", "skip": ["head"]}
EMB8 = {"kind": "quantize_embeddings"}


def adapt_mapping(args: Any, out_dir: str) -> dict[str, Any]:
    """The teacher's adapt config (configs/adapt_trec_lora.yaml's LoRA, more data and steps)."""
    return {
        "base": {"kind": "minilm"},
        "delta": {"method": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16},
        "task": {"dataset": "trec", "few_shot_k": args.k or None, "max_length": MAX_LENGTH,
                 "batch_size": 16, "eval_batch_size": 100, "pooling": "mean",
                 "eval_limit": args.eval_limit or None},
        "train": {"max_steps": args.teacher_steps, "lr": 2e-3, "min_lr": 1e-4,
                  "warmup_steps": min(20, args.teacher_steps // 10), "weight_decay": 0.0,
                  "eval_every": 0, "log_every": 50, "grad_clip": 1.0, "echo": False},
        "scaling": {"num_workers": 1},
        "seed": args.seed,
        "out_dir": out_dir,
    }


def recipes(args: Any) -> dict[str, list[dict[str, Any]]]:
    distill = {"kind": "distill", "student_layers": [1, 3, 5], "steps": args.distill_steps,
               "lr": args.distill_lr, "task_weight": 0.2, "kd_weight": 0.8,
               "hidden_weight": 1.0, "attention_weight": 1.0, "temperature": 2.0}
    structured = {"kind": "structured", "heads": 0.25, "neurons": 0.25, "per_layer": True,
                  "recovery_steps": args.recovery_steps, "lr": 5e-5}
    return {"distil 6→3": [distill],
            "a fast": [distill, W8A8],
            "b small": [distill, INT8, EMB8],
            "c struct+w8a8": [structured, W8A8],
            "d fast+small": [distill, W8A8, EMB8]}


def batch_of(teacher: Teacher, blocks: torch.Tensor) -> dict[str, Any]:
    return teacher.objective(blocks, torch.Generator().manual_seed(0))


@torch.no_grad()
def accuracy(model: nn.Module, teacher: Teacher) -> dict[str, Any]:
    model.eval()
    correct = n = 0
    for blocks in teacher.eval_batches():
        batch = batch_of(teacher, blocks)
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        n += batch["labels"].numel()
    return {"accuracy": correct / max(n, 1), "examples": n}


def run_recipes(teacher: Teacher, cfg: Any, args: Any, art_root: Path
                ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Every recipe applied (stages shared by prefix are run once: the distillation), each
    artifact saved and reloaded exactly; returns the models and per-recipe info."""
    blocks = teacher.calibration_rows(args.calibration_batches)
    ctx = StageContext(calibration=lambda: [batch_of(teacher, b) for b in blocks],
                       train=make_train_fn(teacher, cfg))
    arch, ident = architecture_of(teacher.model), base_identity(teacher.model)
    cache: dict[tuple, tuple[nn.Module, list[StageRecord], float]] = {(): (teacher.model, [], 0.0)}
    models, info = {}, {}
    probe = {k: v for k, v in batch_of(teacher, teacher.sample(4)).items() if k != "labels"}
    for name, raw in recipes(args).items():
        stages = parse_recipe(raw)
        key: tuple = ()
        for stage in stages:
            prev = cache[key]
            key = key + (repr(stage.to_dict()),)
            if key in cache:
                continue
            torch.set_num_threads(args.train_threads)
            t0 = time.perf_counter()
            model, rec = apply_stage(copy.deepcopy(prev[0]), stage, ctx)
            took = time.perf_counter() - t0
            cache[key] = (model.eval(), prev[1] + [StageRecord(stage.to_dict(), rec)],
                          prev[2] + took)
            print(f"[bench] {name}: stage {stage.kind} took {took:.1f}s", flush=True)
        model, records, seconds = cache[key]
        directory = save_compressed(model, art_root / name.replace(" ", "_"), records, ident,
                                    {}, architecture=arch)
        loaded = load_compressed(directory, teacher.rebuild)
        with torch.no_grad():
            exact = torch.equal(model(**probe).logits, loaded(**probe).logits)
        if not exact:
            raise RuntimeError(f"{name}: the reloaded artifact differs from the model")
        models[name] = model
        info[name] = {"recipe": raw, "compress_seconds": seconds, "reload_exact": exact,
                      "artifact_bytes": sum(f.stat().st_size for f in directory.iterdir()),
                      "records": [r.record for r in records]}
    return models, info


@torch.no_grad()
def latencies(models: dict[str, nn.Module], teacher: Teacher, args: Any
              ) -> dict[str, dict[str, list[list[float]]]]:
    """Per model and batch size: ``rounds`` lists of ``repeats`` forward times (s), 1 thread,
    models interleaved in rotating order."""
    torch.set_num_threads(1)
    inputs = {b: {k: v for k, v in batch_of(teacher, teacher.sample(b)).items() if k != "labels"}
              for b in BATCH_SIZES}
    times = {n: {str(b): [] for b in BATCH_SIZES} for n in models}
    for name in balanced_order(list(models), args.rounds):
        model = models[name]
        for b in BATCH_SIZES:
            model(**inputs[b])                                          # warm-up
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(**inputs[b])
                samples.append(time.perf_counter() - t0)
            times[name][str(b)].append(samples)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=0, help="few-shot k per class; 0: all TREC train")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--recovery-steps", type=int, default=100)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=0, help="0: all 500 test questions")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=result_path(__file__, "compress_recipes.json"))
    args = parse_args(ap, {"teacher_steps": 4, "distill_steps": 2, "recovery_steps": 1,
                           "calibration_batches": 2, "eval_limit": 64, "rounds": 2,
                           "repeats": 2})
    t_start = time.time()
    torch.set_num_threads(args.train_threads)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench_compress_recipes_") as tmp:
        run(args, Path(tmp), t_start)


def run(args: Any, work: Path, t_start: float) -> None:

    adapt_dir = str(work / "adapt")
    t0 = time.perf_counter()
    adapted = run_adapt(load_adapt_config(adapt_mapping(args, adapt_dir)), out_dir=adapt_dir)
    teacher_seconds = time.perf_counter() - t0
    print(f"[bench] teacher: {args.teacher_steps} LoRA steps in {teacher_seconds:.0f}s, adapt "
          f"accuracy {adapted.metrics.get('accuracy')}", flush=True)

    cfg = compress_config_from_dict({
        "source": adapt_dir, "recipe": recipes(args)["distil 6→3"],
        "calibration": {"batches": args.calibration_batches, "batch_size": 16},
        "train": {"batch_size": 16, "warmup_steps": 10}, "seed": args.seed,
        "out_dir": str(work / "compress")})
    teacher = load_teacher(cfg)
    models, info = run_recipes(teacher, cfg, args, work / "artifacts")
    models = {"teacher": teacher.model, **models}

    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        rows[name] = {**model_sizes(model), **accuracy(model, teacher), **info.get(name, {})}
    times = latencies(models, teacher, args)
    ref = rows["teacher"]
    for name, row in rows.items():
        row["latency_ms"] = {b: 1000 * pooled_median(t) for b, t in times[name].items()}
        row["speedup"] = {b: ratio_with_interval(times["teacher"][b], t)
                          for b, t in times[name].items()}
        row["size_ratio"] = ref["bytes"] / row["bytes"]
        row["retained"] = row["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
        row["goal_fast"] = (all(s["ratio"] >= 2.0 for s in row["speedup"].values())
                            and row["retained"] >= 0.95)
        row["goal_small"] = row["size_ratio"] >= 4.0 and row["retained"] >= 0.90

    print(f"\nTREC teacher: MiniLM + LoRA ({'all train' if not args.k else f'k={args.k}'}, "
          f"{args.teacher_steps} steps), merged; {ref['examples']} test questions; latency "
          f"seq {MAX_LENGTH}, 1 thread, {args.rounds} rounds x {args.repeats}; '×' = teacher "
          f"median / model's [90% interval]")
    head = (f"{'recipe':<16}{'params':>12}{'MB':>8}{'smaller':>9}"
            + "".join(f"{'ms@' + str(b):>9}{'× @' + str(b):>22}" for b in BATCH_SIZES)
            + f"{'accuracy':>10}{'kept':>8}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        cells = "".join(
            f"{r['latency_ms'][str(b)]:>9.2f}{r['speedup'][str(b)]['ratio']:>8.2f}x "
            f"[{r['speedup'][str(b)]['interval'][0]:.2f}-{r['speedup'][str(b)]['interval'][1]:.2f}]"
            for b in BATCH_SIZES)
        print(f"{name:<16}{r['parameters']:>12,}{r['bytes'] / 2**20:>8.2f}"
              f"{r['size_ratio']:>8.2f}x{cells}{r['accuracy']:>10.4f}"
              f"{100 * r['retained']:>7.1f}%")
    fast = [n for n, r in rows.items() if r["goal_fast"]]
    small = [n for n, r in rows.items() if r["goal_small"]]
    print(f"goal: ≥ 2× faster (batch 1 and 32) at ≥ 95% of the teacher → "
          f"{'met by ' + ', '.join(fast) if fast else 'NOT met'}")
    print(f"goal: ≥ 4× smaller at ≥ 90% of the teacher → "
          f"{'met by ' + ', '.join(small) if small else 'NOT met'}")
    write_json(args.out, {
        "bench": "compress_recipes", "args": vars(args),
        "teacher": {"model": "all-MiniLM-L6-v2 + LoRA r8 (query, value) + mean-pool head, "
                             "LoRA merged", "adapt": adapt_mapping(args, "<tmp>"),
                    "adapt_metrics": adapted.metrics, "train_seconds": teacher_seconds},
        "recipes": recipes(args), "batch_sizes": list(BATCH_SIZES), "seq": MAX_LENGTH,
        "latency_threads": 1, "latency_s": times, "rows": rows,
        "goal": {"fast": {"speedup": 2.0, "retained": 0.95, "met_by": fast},
                 "small": {"size_ratio": 4.0, "retained": 0.90, "met_by": small}},
        "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__)}, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
