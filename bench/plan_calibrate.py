"""Calibrate the planner's step-time model (cluster/cost_model.py ``step_time``) per device kind,
from measured steps, and write the fit to bench/results/plan_calibration.json.

The table the planner reads is cluster/calibration.py; its figures are copied from that JSON
(tests/cluster/test_plan.py checks they agree, and recomputes the H100 fit from the recorded runs).

* ``h100``: from the recorded H100 runs of bench/gpu_zero3_offload.py (no GPU needed here):
  the 6.7B GPT, ZeRO-3 + CPU optimizer offload, bf16, activation checkpointing, micro-batch 4
  × 2048 tokens, timed with 1 micro-batch per step (bench/results/gpu_zero3_offload.json) and
  with 8 (…_accum8.json). A step is ``a + m·c``: the two medians give the per-micro-batch time
  ``c`` (forward + recomputation + backward, stage-3 gathers included) and the per-step time
  ``a`` (PCIe transfers and the host Adam step). ``mfu`` = the cost model's compute of one
  micro-batch at MFU 1 / ``c``; ``host_memory_gbs`` is what makes the cost model's offload term
  equal ``a`` (the other rungs, 125M–2.7B, are left out of the fit: the tests predict them).
* ``cpu``: measured here (``--cpu``), one rank = one core (one thread): ``peak_tflops`` is the
  median rate of a 512³ fp32 matmul, ``mfu`` the cost model's compute of one training step of
  :data:`CPU_FIT` (single process, fp32, ZeRO-0) at MFU 1 over its median measured step time,
  and ``latency_us`` / ``nvlink_gbs`` (the intra-node collective) a 2-rank gloo all-reduce of
  4 bytes (the latency) and of 4 MiB (the bus bandwidth, ring 2(N−1)/N·bytes / time).

    .venv/bin/python bench/plan_calibrate.py            # refit h100 from the recorded JSON
    .venv/bin/python bench/plan_calibrate.py --cpu      # also measure the CPU kind (~1 min)

:func:`time_layout` (the measured step of any dp × tp × pp layout, ZeRO stage, micro-batch
count and checkpointing) is also what tests/cluster/test_plan.py ranks layouts with.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bmray.cluster import cost_model as cm  # noqa: E402
from bmray.models.config import ModelConfig  # noqa: E402
from bmray.models.families.registry import build_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
OUT = os.path.join(RESULTS, "plan_calibration.json")
H100_RUNS = ("gpu_zero3_offload.json", "gpu_zero3_offload_accum8.json")
H100_FIT_RUNG = "6.7B"

# the single-process step the CPU kind's MFU is fitted on (not a shape the tests rank)
CPU_FIT = ModelConfig(family="gpt", vocab_size=512, d_model=128, n_heads=4, n_layers=4,
                      d_ff=512, max_seq_len=128, dropout=0.0)
CPU_FIT_SEQ, CPU_FIT_BATCH = 128, 8


# ------------------------------------------------------------------ a layout and its step
@dataclass(frozen=True)
class Layout:
    """One way to run a step: ranks ``dp·tp·pp``, ZeRO stage over dp, micro-batches, recompute."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batches: int = 1
    checkpointing: bool = False
    schedule: str = "1f1b"

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
                 if v > 1] or ["single"]
        parts += [f"zero{self.zero}"] if self.zero else []
        parts += [f"m{self.micro_batches}"] + (["ckpt"] if self.checkpointing else [])
        return "-".join(parts)


def _strategy(layout: Layout):
    from bmray.actors.parallel.mesh import MeshParallel
    from bmray.actors.parallel.zero.stage12 import Zero
    from bmray.actors.parallel.zero.stage3 import Zero3

    if layout.tp == layout.pp == 1:
        return Zero3() if layout.zero == 3 else Zero(stage=layout.zero)
    return MeshParallel(tp=layout.tp, pp=layout.pp, zero_stage=layout.zero,
                        schedule=layout.schedule)


def time_layout(model_cfg: ModelConfig, layout: Layout, *, seq: int, global_batch: int,
                steps: int = 5, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` optimizer steps (after ``warmup``) of ``layout``, fp32 on
    CPU, one thread per rank; call on every rank of a process group of ``layout.world`` ranks
    (or in one process for a one-rank layout). A step's time is the slowest rank's, each step
    starting from a barrier. Random tokens: only the shapes matter."""
    from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
    from bmray.actors.train.config import TrainConfig
    from bmray.actors.train.loop import Trainer
    from bmray.models.objectives import CausalLM

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != layout.world:
        raise ValueError(f"layout {layout.name} needs {layout.world} ranks, this group has "
                         f"{world}")
    if global_batch % (layout.dp * layout.micro_batches):
        raise ValueError(f"global batch {global_batch} does not split into dp={layout.dp} × "
                         f"{layout.micro_batches} micro-batches")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if layout.checkpointing:
        apply_activation_checkpointing(model)
    strategy = _strategy(layout)
    rank = dist.get_rank() if world > 1 else 0
    replica = strategy.data_shard(rank, world)[0] if hasattr(strategy, "data_shard") else rank
    gen = torch.Generator().manual_seed(replica)
    per_replica = global_batch // layout.dp
    blocks = (torch.randint(1, model_cfg.vocab_size, (per_replica, seq + 1), generator=gen)
              for _ in itertools.count())
    cfg = TrainConfig(max_steps=steps + warmup, micro_batches=layout.micro_batches, lr=1e-4,
                      warmup_steps=0, grad_clip=1.0, device="cpu", echo=False)
    trainer = Trainer(model, CausalLM(), blocks, cfg, strategy=strategy)
    times = []
    for i in range(warmup + steps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(dt))
    return times


def predicted_step(model_cfg: ModelConfig, layout: Layout, *, seq: int, global_batch: int,
                   param_dtype: str, hw: cm.Hardware,
                   offload_optimizer: bool = False) -> cm.StepTime:
    """The cost model's step time of ``layout`` (what the planner ranks it by)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    spec = cm.ModelSpec.from_module(model, model_cfg.family, dropout=model_cfg.dropout)
    return cm.step_time(spec, cm.partition(spec, layout.pp), dp=layout.dp, tp=layout.tp,
                        stage=layout.zero, offload_optimizer=offload_optimizer,
                        offload_params=False, micro_batches=layout.micro_batches,
                        micro_batch=global_batch // (layout.dp * layout.micro_batches),
                        seq=seq, recompute=layout.checkpointing, param_dtype=param_dtype,
                        hw=hw)


# ------------------------------------------------------------------ h100: from the records
def _rung(path: str, name: str) -> dict[str, Any]:
    with open(path) as f:
        rec = json.load(f)
    rung = next(r for r in rec["rungs"] if r["rung"] == name)
    return {"args": rec["args"], "device": rec["device"], **rung}


def fit_h100(results: str = RESULTS) -> dict[str, Any]:
    """``mfu`` and ``host_memory_gbs`` of the h100 kind from the two recorded 6.7B runs."""
    one, eight = (_rung(os.path.join(results, f), H100_FIT_RUNG) for f in H100_RUNS)
    m1, m8 = one.get("grad_accum") or 1, eight["grad_accum"]
    per_mb = (eight["median_step_s"] - one["median_step_s"]) / (m8 - m1)
    per_step = one["median_step_s"] - m1 * per_mb
    args = one["args"]
    cfg = ModelConfig(family="gpt", vocab_size=args["vocab"], d_model=one["d_model"],
                      n_heads=one["d_model"] // args["head_dim"], n_layers=one["n_layers"],
                      d_ff=4 * one["d_model"], max_seq_len=one["seq"], dropout=0.0)
    layout = Layout(zero=3, micro_batches=1, checkpointing=args["activation_checkpointing"])
    base = cm.Hardware(peak_tflops=args["peak_tflops"], mfu=1.0)
    ideal = predicted_step(cfg, layout, seq=one["seq"], global_batch=one["micro_batch"],
                           param_dtype="bf16", hw=base, offload_optimizer=True)
    mfu = ideal.compute / per_mb
    # offload = 8Ψ/pcie + 28Ψ/(host/gpus_per_node): solve for host
    psi = one["params"]
    pcie = 8 * psi / (base.pcie_gbs * 1e9)
    host_gbs = 28 * psi * base.gpus_per_node / ((per_step - pcie) * 1e9)
    return {
        "kind": "h100", "device": one["device"], "peak_tflops": args["peak_tflops"],
        "mfu": mfu, "host_memory_gbs": host_gbs,
        "fitted_from": [f"bench/results/{f} rung {H100_FIT_RUNG}" for f in H100_RUNS],
        "measured": {"median_step_s": {str(m1): one["median_step_s"],
                                       str(m8): eight["median_step_s"]},
                     "per_micro_batch_s": per_mb, "per_step_s": per_step,
                     "model_flops_per_micro_batch_at_mfu_1_s": ideal.compute},
        "method": ("step = a + m·c from the medians at m = 1 and 8 (ZeRO-3, CPU optimizer "
                   "offload, bf16, checkpointing, micro-batch 4 × 2048); mfu = cost-model "
                   "compute of one micro-batch at MFU 1 / c; host_memory_gbs so that the "
                   "cost model's offload term (8Ψ/pcie + 28Ψ·gpus_per_node/host) = a, "
                   "with pcie_gbs and gpus_per_node at their defaults"),
    }


# ------------------------------------------------------------------ cpu: measured here
def gemm_tflops(n: int = 512, reps: int = 30) -> float:
    """Median fp32 matmul rate of one thread (the CPU kind's 'peak')."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _allreduce_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = {}
    for label, numel, reps in (("small", 1, 200), ("large", 2 ** 20, 20)):
        x = torch.ones(numel)
        for _ in range(5):
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        res[label] = statistics.median(times)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def measure_allreduce(world: int = 2) -> dict[str, float]:
    """Median seconds of a gloo all-reduce of 4 bytes and of 4 MiB over ``world`` processes."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        init = "file://" + os.path.join(tmp, "rendezvous")
        mp.spawn(_allreduce_worker, args=(world, init, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def fit_cpu(steps: int = 7) -> dict[str, Any]:
    peak = gemm_tflops()
    layout = Layout()
    times = time_layout(CPU_FIT, layout, seq=CPU_FIT_SEQ, global_batch=CPU_FIT_BATCH,
                        steps=steps)
    step = statistics.median(times)
    ideal = predicted_step(CPU_FIT, layout, seq=CPU_FIT_SEQ, global_batch=CPU_FIT_BATCH,
                           param_dtype="fp32",
                           hw=cm.Hardware(peak_tflops=peak, mfu=1.0, fp32_speed=1.0))
    ar = measure_allreduce(2)
    nbytes = 4 * 2 ** 20
    busbw = 2 * (2 - 1) / 2 * nbytes / max(ar["large"] - ar["small"], 1e-9) / 1e9
    return {
        "kind": "cpu", "device": f"{platform.processor() or platform.machine()}, "
                                 f"{os.cpu_count()} cores, one thread per rank",
        "gpus_per_node": os.cpu_count(), "peak_tflops": peak, "mfu": ideal.compute / step,
        "fp32_speed": 1.0,
        "latency_us": ar["small"] * 1e6, "nvlink_gbs": busbw,
        "fitted_from": ["bench/plan_calibrate.py --cpu (measured on this machine)"],
        "measured": {"gemm_512_tflops": peak, "step_s": times, "median_step_s": step,
                     "model": asdict(CPU_FIT), "seq": CPU_FIT_SEQ, "batch": CPU_FIT_BATCH,
                     "model_flops_at_mfu_1_s": ideal.compute,
                     "allreduce_s": ar, "load_average_1min": os.getloadavg()[0]},
        "method": ("peak = median 512³ fp32 matmul of one thread; mfu = cost-model compute of "
                   "one single-process fp32 ZeRO-0 step of `model` at MFU 1 / its median "
                   "step; latency_us = 2-rank gloo all-reduce of 4 bytes; nvlink_gbs = ring "
                   "bus bandwidth of a 4 MiB all-reduce (latency subtracted)"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="also measure the CPU kind here")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    old = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f).get("kinds", {})
    kinds = {**old, "h100": fit_h100()}
    if args.cpu:
        kinds["cpu"] = fit_cpu()
    out = {"benchmark": "plan_calibration",
           "what": "the planner's step-time model (cluster/cost_model.py step_time) fitted to "
                   "measured steps, per device kind; cluster/calibration.py holds these figures",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "kinds": kinds}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in kinds.items():
        print(f"{k:5} peak {v['peak_tflops']:.4g} TFLOP/s, mfu {v['mfu']:.3f}, "
              + ", ".join(f"{key} {v[key]:.4g}" for key in ("host_memory_gbs", "latency_us",
                                                            "nvlink_gbs") if key in v))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
