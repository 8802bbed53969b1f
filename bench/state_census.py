"""Model state of our ZeRO and DeepSpeed's, counted the same way on both sides.

Why: bench/deepspeed_zero.py used to read each side's own tensors *after* ``step()``. At that
moment DeepSpeed has already freed its gradients (stage 1/2 ``param.grad`` and averaged
gradients, stage 3's gradient partitions) while ours keeps its gradient buffers from step to
step (as torch DDP does), so the rows compared 16-byte-per-parameter states with 12-byte ones.
Here both sides are counted by :class:`bench.live_bytes.TensorCensus` — every tensor storage
Python can reach, new since before the model was built — at three points of the same loop:

* ``setup``: after ``Zero.setup`` / ``deepspeed.initialize`` (before any step);
* ``at_step``: after backward, before the optimizer step — activations are gone, every
  gradient the step needs is alive: the model state the step works on;
* ``after_step``: after the step (what the old count read).

    python -m bench.state_census [--stages 1 2 3 --offload none cpu --ds-config overlap]

Writes bench/results/state_census.json. Same GPT, dtype (fp32), micro-batch and bucket sizes
as bench/deepspeed_zero.py; DeepSpeed configured as there ("overlap": ``overlap_comm``,
``contiguous_gradients``, ``reduce_scatter``, stage 3's buckets one block) or without the
overlap switches ("plain"; the same figures on CPU). ``private`` is anonymous memory;
``mapped`` our shared-memory transport's slots (``comm_buffer_bytes``), which gloo's own
buffers — outside any tensor — have no counterpart of here.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from bench.common import (MB, add_model_args, decay_groups, deepspeed_gang_env, destroy_engine,
                          fresh_model, gpt_config, result_path, write_json)
from bench.live_bytes import TensorCensus


def _batch(vocab: int, seq: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (micro, seq + 1), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone()}


def ds_conf(stage: int, offload: str, style: str, bucket_elems: int, unit_elems: int,
            micro: int, world: int) -> dict[str, Any]:
    """As bench/deepspeed_zero.py: buckets equal to ours (stage 3: one block, our unit)."""
    zero: dict[str, Any] = {"stage": stage}
    if stage < 3:
        zero.update(reduce_bucket_size=bucket_elems, allgather_bucket_size=bucket_elems)
    else:
        zero.update(reduce_bucket_size=unit_elems, stage3_prefetch_bucket_size=unit_elems)
    if style == "overlap":
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True)
        if stage < 3:
            zero["allgather_partitions"] = True
        if stage < 3 and offload == "cpu":
            zero["round_robin_gradients"] = True
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    adam = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
            "adam_w_mode": True, **({"torch_adam": False} if offload == "cpu"
                                    else {"torch_adam": True, "fused": True})}
    return {"train_micro_batch_size_per_gpu": micro, "train_batch_size": micro * world,
            "gradient_accumulation_steps": 1, "bf16": {"enabled": False},
            "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": adam},
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}


def census_run(side: str, stage: int, offload: str, style: str, dims: dict) -> dict[str, Any]:
    """In a gang worker: one run of ``side``; live private bytes at the three points."""
    from bmray.actors.train.config import TrainConfig

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = _batch(dims["vocab"], dims["seq"], dims["micro"], rank)
    if side == "deepspeed":
        deepspeed_gang_env()            # imports first: its module-level tensors are not state
        from deepspeed.utils import logger
        logger.setLevel(logging.ERROR)
    census = TensorCensus()
    out: dict[str, Any] = {}
    model = fresh_model(gpt_config(dims["vocab"], dims["d_model"], dims["layers"], dims["seq"]))
    psi = sum(p.numel() for p in model.parameters())
    if side == "ours":
        from bmray.actors.parallel.zero.stage12 import Zero
        from bmray.actors.parallel.zero.stage3 import Zero3

        cfg = TrainConfig(lr=3e-4, warmup_steps=0, device="cpu", echo=False)
        z = (Zero3(offload_optimizer=offload) if stage == 3 else
             Zero(stage=stage, offload_optimizer=offload, bucket_mb=dims["bucket_mb"]))
        z.setup(model, cfg)
        out["setup"] = census.live()
        for i in range(2):
            z.forward_backward(batch, 1.0)
            if i == 1:
                out["at_step"] = census.live()
            z.clip_and_step(1.0)
            z.flush()
        out["after_step"] = census.live()
        report = z.memory_report()
        out["report"] = report["model_state_bytes"]
        out["comm_buffer_bytes"] = report.get("comm_buffer_bytes", 0)
    else:
        import deepspeed
        groups = decay_groups(model.parameters(), 0.1)
        unit = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        conf = ds_conf(stage, offload, style, int(dims["bucket_mb"] * MB / 4), unit,
                       dims["micro"], world)
        engine, *_ = deepspeed.initialize(
            model=model, config=conf, dist_init_required=False, model_parameters=groups)
        del model, groups
        out["setup"] = census.live()
        for i in range(2):
            loss = engine(**batch).loss
            engine.backward(loss)
            del loss
            if i == 1:
                out["at_step"] = census.live()
            engine.step()
        out["after_step"] = census.live()
        out["config"] = conf
        destroy_engine(engine)
    out["psi"] = psi
    return out


def _worst(values: list) -> Any:
    """The larger rank's figure (per key of a census reading); other values as rank 0's."""
    if isinstance(values[0], int):
        return max(values)
    if isinstance(values[0], dict) and all(isinstance(v, int) for v in values[0].values()):
        return {k: max(v[k] for v in values) for k in values[0]}
    return values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--offload", nargs="+", default=["none", "cpu"])
    ap.add_argument("--ds-config", choices=["plain", "overlap", "both"], default="overlap")
    add_model_args(ap, d_model=256, layers=4, vocab=2048)
    ap.add_argument("--out", default=result_path(__file__, "state_census.json"))
    args = ap.parse_args()
    from bmray.cluster import connect, shutdown
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    dims = dict(d_model=args.d_model, layers=args.layers, vocab=args.vocab, seq=64, micro=8,
                bucket_mb=25.0)
    styles = ["plain", "overlap"] if args.ds_config == "both" else [args.ds_config]
    connect(num_cpus=8, log_to_driver=False)
    rows = []
    try:
        for stage in args.stages:
            for offload in args.offload:
                with WorkerGroup(ScalingConfig(num_workers=2, cpus_per_worker=1)) as group:
                    row: dict[str, Any] = {"stage": stage, "offload": offload}
                    for side, style in [("ours", "-")] + [("deepspeed", s) for s in styles]:
                        res = group.execute(census_run, side, stage, offload, style, dims)
                        key = side if side == "ours" else f"deepspeed_{style}"
                        row[key] = {k: _worst([r[k] for r in res]) for k in res[0]}
                    rows.append(row)
                    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "config"}
                                          if isinstance(v, dict) else v)
                                      for k, v in row.items()}), flush=True)
    finally:
        shutdown()
    write_json(args.out, {
        "bench": "state_census", "dims": dims, "workers": 2, "param_dtype": "fp32",
        "unit": "bytes per rank (max over ranks): tensor storages alive, new since before the "
                "model was built (bench/live_bytes.TensorCensus); private: anonymous memory; "
                "mapped: shared-memory segments (our transport's slots, comm_buffer_bytes)",
        "rows": rows, "torch": torch.__version__}, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
