"""ZeRO memory: measured model-state bytes per rank against the formulas of Rajbhandari et al.
2020 (§5.1, mixed-precision Adam, K = 12): stage 0 16Ψ, stage 1 4Ψ + 12Ψ/N,
stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N — for N = 1, 2, 4 gloo workers on a Ray gang.

    python -m bench.zero_memory [--d-model 128 --layers 2]

Prints a table (stage, dtype, N, measured, predicted, ratio, the report) and writes
bench/results/zero_memory.json. "Measured" is not the strategy's own sum: it is every tensor
storage alive in the rank after setup and two training steps, new since before the model was
built (bench/live_bytes.TensorCensus: what Python can reach, deduplicated), less the frozen
parameters; with one rank the CPU allocator's own records (torch's memory profiler) give the
same figure to the byte and are recorded beside it. ``report`` is ``memory_report()``'s
``model_state_bytes`` (it must equal the measurement). Padding of the shards is included;
stage 2/3's transient reduce buffers and gathered units are freed by then. fp32 rows: the
masters alias the parameters (16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N).
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.distributed as dist

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import seed_everything
from bmray.actors.parallel.zero.stage12 import Zero
from bmray.actors.parallel.zero.stage3 import Zero3
from bench.common import add_model_args, gpt_config, result_path, world_pack, write_json
from bench.live_bytes import AllocatorTrace, TensorCensus
from bmray.models.data import BlockStream
from bmray.models.families.registry import build_model

BLOCK, VOCAB = 65, 512


FORMULAS = {"bf16": lambda s, psi, n: {0: 16 * psi, 1: 4 * psi + 12 * psi / n,
                                       2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[s],
            "fp32": lambda s, psi, n: {0: 16 * psi, 1: 8 * psi + 8 * psi / n,
                                       2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[s]}


def _measure(pack: str, vocab: int, d_model: int, layers: int) -> dict:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    out = {}
    for dtype in ("bf16", "fp32"):
        for stage in (0, 1, 2, 3):
            seed_everything(0)
            ids = next(BlockStream(pack, BLOCK, 4 * world, rank, world, seed=0))
            batch = {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone()}
            census = TensorCensus()
            with AllocatorTrace() if world == 1 else contextlib.nullcontext() as trace:
                model = build_model(gpt_config(vocab, d_model, layers, BLOCK, heads=4))
                z = Zero3(param_dtype=dtype) if stage == 3 else Zero(stage=stage,
                                                                     param_dtype=dtype)
                z.setup(model, cfg)
                for _ in range(2):                  # the loop's calls, without the Trainer
                    z.forward_backward(batch, 1.0)  # (whose read-ahead batch is not state)
                    z.clip_and_step(cfg.grad_clip)
                z.flush()
                live = census.live()["private"]
                if trace is not None:
                    trace.mark("end")
            frozen = sum(p.numel() * p.element_size() for p in model.parameters()
                         if not p.requires_grad)
            out[(dtype, stage)] = {
                "measured": live - frozen,
                "allocator": trace.live("end") - frozen if trace is not None else None,
                "report": z.memory_report()}
            del z, model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, d_model=128, layers=2)
    ap.add_argument("--out", default=result_path(__file__, "zero_memory.json"))
    args = ap.parse_args()

    from bmray.cluster import connect, shutdown
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    root = tempfile.mkdtemp(prefix="zero_memory_")
    pack = world_pack(root, BLOCK, VOCAB, n_entities=60)   # token ids < VOCAB
    connect(num_cpus=8, log_to_driver=False)
    rows = []
    try:
        for n in (1, 2, 4):
            with WorkerGroup(ScalingConfig(num_workers=n)) as group:
                reports = group.execute(_measure, pack, VOCAB, args.d_model, args.layers)
            for dtype in ("bf16", "fp32"):
                for stage in (0, 1, 2, 3):
                    per_rank = [r[(dtype, stage)] for r in reports]
                    r = per_rank[0]["report"]
                    psi = r["trainable_params"]
                    predicted = FORMULAS[dtype](stage, psi, n)
                    measured = max(x["measured"] for x in per_rank)
                    rows.append({"stage": stage, "param_dtype": dtype, "workers": n,
                                 "psi": psi, "measured_bytes": measured,
                                 "allocator_bytes": per_rank[0]["allocator"],
                                 "predicted_bytes": predicted,
                                 "ratio": measured / predicted,
                                 "report_bytes": max(x["report"]["model_state_bytes"]
                                                     for x in per_rank),
                                 "report_equals_measured": all(
                                     x["report"]["model_state_bytes"] == x["measured"]
                                     for x in per_rank),
                                 "param_bytes": r["param_bytes"], "grad_bytes": r["grad_bytes"],
                                 "optimizer_bytes": r["optimizer_bytes"]})
    finally:
        shutdown()
    print(f"{'stage':>5} {'dtype':>5} {'N':>2} {'measured':>11} {'predicted':>11} "
          f"{'ratio':>6} {'report':>11} {'report=measured':>15}")
    for r in rows:
        print(f"{r['stage']:>5} {r['param_dtype']:>5} {r['workers']:>2} "
              f"{r['measured_bytes']:>11,} {r['predicted_bytes']:>11,.0f} {r['ratio']:>6.3f} "
              f"{r['report_bytes']:>11,} {str(r['report_equals_measured']):>15}")
    write_json(args.out, {"model": {"d_model": args.d_model, "layers": args.layers,
                                    "vocab": VOCAB},
                          "measured": "tensor storages alive after setup + 2 steps, new since "
                                      "before the model was built, less frozen parameters "
                                      "(bench/live_bytes.TensorCensus); allocator_bytes: the "
                                      "CPU allocator's records (N = 1)",
                          "rows": rows}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
