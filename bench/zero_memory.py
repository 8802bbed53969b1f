"""ZeRO memory: measured model-state bytes per rank against the formulas of Rajbhandari et al.
2020 (§5.1, mixed-precision Adam, K = 12): stage 0 16Ψ, stage 1 4Ψ + 12Ψ/N,
stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N — for N = 1, 2, 4 gloo workers on a Ray gang.

    python -m bench.zero_memory [--d-model 128 --layers 2]

Prints a table (stage, N, measured, predicted, ratio, params / grads / optimizer bytes) and
writes bench/results/zero_memory.json. "Measured" counts the tensors each rank holds after one
bf16 training step (actors/zero.py ``memory_report``; padding of the shards included;
stage 2's transient reduce buckets are not model state and are not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist

from actors.train_config import TrainConfig
from actors.trainer import Trainer, seed_everything
from actors.zero import Zero
from actors.zero3 import Zero3
from models.config import ModelConfig
from models.data import BlockStream
from models.objectives import CausalLM
from models.registry import build_model

BLOCK, VOCAB = 65, 512


def _measure(pack: str, vocab: int, d_model: int, layers: int) -> dict:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    out = {}
    for stage in (0, 1, 2, 3):
        seed_everything(0)
        model = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=d_model,
                                        n_heads=4, n_layers=layers, d_ff=4 * d_model,
                                        max_seq_len=BLOCK, dropout=0.0))
        stream = BlockStream(pack, BLOCK, 4 * world, rank, world, seed=0)
        trainer = Trainer(model, CausalLM(), stream, cfg, seed=0,
                          strategy=(Zero3(param_dtype="bf16") if stage == 3
                                    else Zero(stage=stage, param_dtype="bf16")))
        trainer.fit()
        out[stage] = trainer.strategy.memory_report()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "zero_memory.json"))
    args = ap.parse_args()

    from bench.common import world_pack
    from cluster import connect, shutdown
    from cluster.gang import ScalingConfig, WorkerGroup

    root = tempfile.mkdtemp(prefix="zero_memory_")
    pack = world_pack(root, BLOCK, VOCAB, n_entities=60)   # token ids < VOCAB
    connect(num_cpus=8, log_to_driver=False)
    rows = []
    try:
        for n in (1, 2, 4):
            with WorkerGroup(ScalingConfig(num_workers=n)) as group:
                reports = group.execute(_measure, pack, VOCAB, args.d_model, args.layers)
            rep = reports[0]
            psi = rep[0]["trainable_params"]
            formula = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n,
                       3: 16 * psi / n}
            for stage in (0, 1, 2, 3):
                r = rep[stage]
                rows.append({"stage": stage, "workers": n, "psi": psi,
                             "measured_bytes": r["model_state_bytes"],
                             "predicted_bytes": formula[stage],
                             "ratio": r["model_state_bytes"] / formula[stage],
                             "param_bytes": r["param_bytes"], "grad_bytes": r["grad_bytes"],
                             "optimizer_bytes": r["optimizer_bytes"],
                             "device": r["device"], "host": r["host"], "disk": r["disk"],
                             "max_rank_bytes": max(x[stage]["model_state_bytes"]
                                                   for x in reports)})
    finally:
        shutdown()
    print(f"{'stage':>5} {'N':>2} {'measured':>11} {'predicted':>11} {'ratio':>6} "
          f"{'params':>10} {'grads':>10} {'optim':>10}")
    for r in rows:
        print(f"{r['stage']:>5} {r['workers']:>2} {r['measured_bytes']:>11,} "
              f"{r['predicted_bytes']:>11,.0f} {r['ratio']:>6.3f} {r['param_bytes']:>10,} "
              f"{r['grad_bytes']:>10,} {r['optimizer_bytes']:>10,}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"model": {"d_model": args.d_model, "layers": args.layers, "vocab": VOCAB},
                   "param_dtype": "bf16", "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
