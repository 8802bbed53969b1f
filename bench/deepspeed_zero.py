"""ZeRO against DeepSpeed: step time and peak memory per rank at stages 1, 2, 3, with and
without CPU optimizer offload, 2 workers on gloo.

Same GPT (``models.build_model``), same initial weights (seeded), same batches (each rank's
slice of the same global batch from ``models.data.BlockStream`` over the synthetic world,
held in memory so Parquet reads are not timed), the same parameter dtype with fp32 master
weights and AdamW moments on both sides, the same AdamW hyper-parameters
and two groups (decay on matrices only), the same warmup + cosine schedule, the same
gradient clipping and micro-batch. Ours is the whole ``actors.trainer.Trainer`` (its buckets
and parameter all-gathers in shared memory between the workers of this host: ``transport:
auto``, actors/shm_transport.py; DeepSpeed's go through gloo) on
``actors.zero.Zero(stage, param_dtype="bf16", offload_optimizer="cpu"|"none")`` (token-weighted
loss, the global loss summed for logging each step, inside the grad-norm all-reduce); DeepSpeed's is the loop its docs show
(``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``) after
``deepspeed.initialize`` inside the same Ray gang (``cluster.gang.WorkerGroup``: one torch
thread per worker, torch.distributed on gloo already initialised — DeepSpeed wraps that group
with ``dist_init_required=False``).

Parameter dtype: ``--param-dtype bf16`` is the mixed-precision setting the issue names
(DeepSpeed refuses fp16 on CPU), but the default is fp32: on this machine's CPU (AVX2, no
AVX512-BF16) a bf16 matmul is ~50x slower than fp32 (256x1024x512: 320 ms against 6.4 ms, one
thread), so a bf16 step of the default GPT takes ~10 s on either side and the comparison
measures torch's bf16 GEMM fallback, not the two ZeRO implementations. With fp32 DeepSpeed
still clones an fp32 master partition (12 bytes per parameter of optimizer state with the two
moments); ours steps this rank's slice of the flat fp32 parameter buffer in place when the
optimizer is not offloaded (8 bytes: the moments; actors/zero.py, "aliased fp32 masters"). The
parameters and gradients cost 4 bytes each instead of 2.

Optimizers: ours always uses torch's fused AdamW kernel over flat shards
(``actors.offload.ShardedAdamW``). DeepSpeed with ``offload_optimizer: cpu`` insists on its
``DeepSpeedCPUAdam`` (``torch_adam: false``); without offload it gets ``torch_adam: true`` and
``fused: true``, i.e. the same torch kernel as ours. Stage 3 of ours runs when the code base has
it (``Zero(stage=3)`` accepted, or an ``actors.zero3`` module); otherwise its cells read n/a.

Measured per rank, per run (a run = fresh model + strategy, ``--warmup-steps`` untimed steps,
``--steps`` timed ones): each step's wall time (median over the timed steps of all repeats is
reported, and the slower rank's median is the row's number); the peak resident set size above
the worker's RSS just before the run built its model (a sampling thread reads /proc/self/statm
every ``--sample-ms``; freed heap is returned to the OS with ``malloc_trim`` before each
baseline, so runs in the same process do not hide behind each other's freed pages); and the
model-state bytes each strategy holds after the last step (ours: ``memory_report()``;
DeepSpeed: the bf16 parameters it keeps (``ds_tensor`` partitions at stage 3), its fp32
partitions, their gradients where it keeps them and its optimizer state tensors).

Each configuration gets a fresh gang (DeepSpeed keeps module-level state, and its ZeRO-3
sometimes aborts at process exit: results are read from the workers, exit codes are not
used), in which each side first makes one short unrecorded run, so one-time costs (lazy
imports, DeepSpeed's op loading, allocator and thread pools) are not charged to either.
Within a configuration ours and DeepSpeed alternate, the order flipping each repeat.
max|dloss| compares the two sides' per-step global losses (same weights, same batches: a
check that they train the same thing).
The machine is shared and noisy: quote the ratios.

    python bench/deepspeed_zero.py [--stages 1 2 3 --offload none cpu --steps 8 --repeats 2]

Goal (issue): our step time <= 1.0x DeepSpeed's at equal or lower memory.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import world_pack  # noqa: E402
from actors.schedule import warmup_cosine  # noqa: E402
from actors.train_config import TrainConfig  # noqa: E402
from models import ModelConfig  # noqa: E402

MB = 2 ** 20


# ---------------------------------------------------------------- ours: stage 3 or not

def ours_factory(stage: int, offload: str, dtype: str = "fp32"):
    """A zero-argument callable building our strategy for (stage, offload), or None when the
    code base has no such stage (stage 3 is being written elsewhere: detect, don't assume)."""
    from models.typed_config import ConfigError
    from actors.zero import Zero

    kwargs = dict(stage=stage, param_dtype=dtype, offload_optimizer=offload)
    try:
        Zero(**kwargs)
        return lambda: Zero(**kwargs)
    except (ConfigError, ValueError, TypeError):
        if stage != 3:
            raise
    try:
        import actors.zero3 as z3
    except ImportError:
        return None
    for name in ("Zero3", "ZeroStage3", "Zero"):
        cls = getattr(z3, name, None)
        if cls is None:
            continue
        for kw in (kwargs, {k: v for k, v in kwargs.items() if k != "stage"}):
            try:
                cls(**kw)
                return lambda cls=cls, kw=kw: cls(**kw)
            except Exception:       # noqa: BLE001 - try the next spelling
                continue
    return None


# ---------------------------------------------------------------- memory

def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Samples this process's RSS on a thread; ``peak`` is the largest seen."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.peak = every_s, _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def ds_model_state(engine) -> dict[str, Any]:
    """Model-state bytes this rank's DeepSpeed engine holds, from its own tensors."""
    opt = engine.optimizer
    rep: dict[str, Any] = {}
    params = list(engine.module.parameters())
    if all(hasattr(p, "ds_tensor") for p in params):          # stage 3: partitions
        rep["param_bytes"] = _nbytes(p.ds_tensor for p in params)
    else:
        rep["param_bytes"] = _nbytes(params)
    fp32 = (getattr(opt, "single_partition_of_fp32_groups", None)        # stage 1/2
            or getattr(opt, "fp32_partitioned_groups_flat", None) or [])   # stage 3
    inner = getattr(opt, "optimizer", None)
    state = []
    if inner is not None:
        for s in inner.state.values():
            state += [v for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    rep["optimizer_bytes"] = _nbytes(fp32) + _nbytes(state)
    grads = [t.grad for t in fp32 if t.grad is not None]                 # offload: fp32 grads
    avg = getattr(opt, "averaged_gradients", None)                       # stage 1/2 on device
    if isinstance(avg, dict):
        grads += [g for gs in avg.values() for g in (gs or []) if torch.is_tensor(g)]
    rep["grad_bytes"] = _nbytes(grads)
    rep["grad_note"] = ("fp32 partition grads / averaged_gradients as held after step(); "
                        "DeepSpeed's IPG and reduce buckets are not counted")
    rep["model_state_bytes"] = rep["param_bytes"] + rep["optimizer_bytes"] + rep["grad_bytes"]
    return rep


# ---------------------------------------------------------------- the two loops (in workers)

def deepspeed_gang_env() -> Any:
    """Inside a gang worker: set the launcher variables DeepSpeed reads (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_*) from the existing gang and import deepspeed, so every side of a
    benchmark starts from the same RSS baseline; returns the worker context."""
    from actors.worker_context import worker_context

    ctx = worker_context()
    os.environ.update(RANK=str(ctx.rank), WORLD_SIZE=str(ctx.world_size),
                      LOCAL_RANK=str(ctx.local_rank),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    import deepspeed  # noqa: F401
    return ctx


def _batches(pack: str, block_len: int, global_batch: int, n: int) -> list[torch.Tensor]:
    import torch.distributed as dist
    from models.data import BlockStream

    stream = BlockStream(pack, block_len, global_batch, dist.get_rank(), dist.get_world_size(),
                         shuffle=False)
    return [next(stream) for _ in range(n)]


def _fresh_model(model_cfg: ModelConfig) -> torch.nn.Module:
    from actors.trainer import seed_everything
    from models import build_model

    seed_everything(0)
    return build_model(model_cfg)


def ours_loop(stage, offload, dtype, model_cfg, cfg: TrainConfig, batches, warmup):
    """(seconds of each timed step, model-state report) of our Trainer on our Zero."""
    import torch.distributed as dist
    from actors.trainer import Trainer
    from models import objective_for

    strategy = ours_factory(stage, offload, dtype)()
    trainer = Trainer(_fresh_model(model_cfg), objective_for(model_cfg), iter(batches), cfg,
                      strategy=strategy, model_config=model_cfg)
    steps, losses = [], []
    for i in range(len(batches)):
        if i == warmup:
            dist.barrier()
        t0 = time.perf_counter()
        row = trainer.train_step(read_ahead=i + 1 < len(batches))     # as fit() does
        if i >= warmup:
            steps.append(time.perf_counter() - t0)
        losses.append(row["loss"])
    trainer.strategy.flush()
    report = trainer.strategy.memory_report()
    report = {k: v for k, v in report.items() if k != "by_location"}
    return steps, losses, report


def ds_config(stage: int, offload: str, dtype: str, cfg: TrainConfig, micro_batch: int,
              world: int, bucket_mb: float) -> dict[str, Any]:
    bucket = int(bucket_mb * MB / (2 if dtype == "bf16" else 4))   # elements, as our bucket_mb
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": bucket,
                            "allgather_bucket_size": bucket}
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    adam = {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps,
            "weight_decay": cfg.weight_decay, "adam_w_mode": True}
    if offload == "cpu":
        adam["torch_adam"] = False            # DeepSpeedCPUAdam: required with offload
    else:
        adam.update(torch_adam=True, fused=True)   # torch's fused AdamW, as ours
    return {"train_micro_batch_size_per_gpu": micro_batch,
            "train_batch_size": micro_batch * world,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": dtype == "bf16"},
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": adam},
            "gradient_clipping": cfg.grad_clip,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def ds_loop(stage, offload, dtype, model_cfg, cfg: TrainConfig, batches, warmup, bucket_mb):
    """(seconds of each timed step, model-state report) of DeepSpeed's engine."""
    import logging

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger
    from models import objective_for

    ds_logger.setLevel(logging.ERROR)
    model = _fresh_model(model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    conf = ds_config(stage, offload, dtype, cfg, batches[0].size(0), dist.get_world_size(),
                     bucket_mb)

    def sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.total_decay_steps) / cfg.lr)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=conf,
                                           lr_scheduler=sched, dist_init_required=False)
    engine.train()
    objective = objective_for(model_cfg)          # the same inputs / labels as our Trainer's
    steps, losses = [], []
    for i, blocks in enumerate(batches):
        if i == warmup:
            dist.barrier()
        t0 = time.perf_counter()
        out = engine(**objective(blocks))
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))     # what a user's logging does each step
        if i >= warmup:
            steps.append(time.perf_counter() - t0)
    report = ds_model_state(engine)
    try:
        engine.destroy()
    except Exception:       # noqa: BLE001 - older engines have no destroy()
        pass
    return steps, losses, report


def worker_run(side, stage, offload, dtype, pack, model_cfg, cfg, block_len, global_batch, warmup,
               bucket_mb, sample_ms):
    """One run on every rank: returns this rank's timings, memory and losses (or the error)."""
    import torch.distributed as dist

    ctx = deepspeed_gang_env()

    batches = _batches(pack, block_len, global_batch, cfg.max_steps)
    _trim()
    dist.barrier()
    base = _rss()
    out: dict[str, Any] = {"rank": ctx.rank, "side": side, "baseline_rss": base}
    try:
        with PeakRSS(sample_ms / 1000) as peak:
            if side == "ours":
                steps, losses, report = ours_loop(stage, offload, dtype, model_cfg, cfg,
                                                  batches, warmup)
            else:
                steps, losses, report = ds_loop(stage, offload, dtype, model_cfg, cfg,
                                                batches, warmup, bucket_mb)
        out.update(steps_s=steps, losses=losses, model_state=report,
                   peak_rss=peak.peak, peak_delta=peak.peak - base)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-3000:]
    _trim()
    return out


# ---------------------------------------------------------------- driver

def connect_ray(num_cpus: int) -> None:
    import ray

    from cluster.connect import _repo_pythonpath
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": _repo_pythonpath()}})


def _summary(runs: list[list[dict]]) -> dict[str, Any]:
    """Per-side numbers from ``runs`` (one list of per-rank results per repeat)."""
    errors = [r["error"] for rep in runs for r in rep if "error" in r]
    if errors:
        return {"error": errors[0],
                "traceback": next(r["traceback"] for rep in runs for r in rep if "error" in r)}
    ranks = sorted({r["rank"] for rep in runs for r in rep})
    per_rank = {}
    for k in ranks:
        rs = [r for rep in runs for r in rep if r["rank"] == k]
        steps = [s for r in rs for s in r["steps_s"]]
        per_rank[k] = {"median_step_s": statistics.median(steps),
                       "peak_delta_mb": statistics.median(r["peak_delta"] for r in rs) / MB,
                       "peak_rss_mb": max(r["peak_rss"] for r in rs) / MB,
                       "baseline_rss_mb": statistics.median(r["baseline_rss"] for r in rs) / MB,
                       "model_state_mb": rs[-1]["model_state"]["model_state_bytes"] / MB,
                       "model_state": rs[-1]["model_state"], "steps_s": steps,
                       "peak_delta_mb_per_repeat": [r["peak_delta"] / MB for r in rs]}
    worst = max(per_rank.values(), key=lambda v: v["median_step_s"])
    return {"median_step_s": worst["median_step_s"], "median_ms": worst["median_step_s"] * 1e3,
            "peak_delta_mb": max(v["peak_delta_mb"] for v in per_rank.values()),
            "model_state_mb": max(v["model_state_mb"] for v in per_rank.values()),
            # the step's loss over all ranks (ours logs it all-reduced; DeepSpeed's out.loss is
            # the rank's own: equal token counts per rank, so the mean over ranks is global)
            "losses": [statistics.fmean(r["losses"][i] for r in runs[-1])
                       for i in range(len(runs[-1][0]["losses"]))],
            "per_rank": per_rank}


def _qualname(factory) -> str | None:
    """module.Class of the strategy a factory builds (stage 3 may be actors.zero3.Zero3)."""
    if factory is None:
        return None
    cls = type(factory())
    return f"{cls.__module__}.{cls.__name__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--offload", nargs="+", default=["none", "cpu"], choices=["none", "cpu"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before each run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side")
    ap.add_argument("--batch", type=int, default=16, help="global batch (blocks)")
    ap.add_argument("--block-len", type=int, default=65)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--bucket-mb", type=float, default=25.0,
                    help="our bucket_mb; DeepSpeed's reduce/allgather bucket in elements")
    ap.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the parameters' dtype on both sides (see the module doc: bf16 "
                         "matmuls are ~50x slower than fp32 on an AVX2 CPU)")
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "deepspeed_zero.json"))
    args = ap.parse_args()

    import deepspeed
    from cluster.gang import ScalingConfig, WorkerGroup

    model_cfg = ModelConfig(family="gpt", vocab_size=args.vocab, d_model=args.d_model,
                            n_heads=max(1, args.d_model // 64), n_layers=args.layers,
                            d_ff=4 * args.d_model, max_seq_len=args.block_len, dropout=0.0)
    n = args.steps + args.warmup_steps
    cfg = TrainConfig(max_steps=n, lr=3e-4, warmup_steps=2, log_every=1, device="cpu",
                      echo=False)
    pack = world_pack(tempfile.mkdtemp(prefix="bmray_ds_bench_"), args.block_len, args.vocab,
                      n_entities=200)
    n_params = sum(p.numel() for p in _fresh_model(model_cfg).parameters())
    connect_ray(num_cpus=max(8, args.workers))
    rows = []
    t_start = time.time()
    for stage in args.stages:
        for offload in args.offload:
            config = f"stage {stage}, offload {offload}"
            have_ours = ours_factory(stage, offload, args.param_dtype) is not None
            sides = (["ours"] if have_ours else []) + ["deepspeed"]
            runs: dict[str, list] = {s: [] for s in sides}
            t0 = time.time()
            with WorkerGroup(ScalingConfig(num_workers=args.workers,
                                           cpus_per_worker=1)) as group:
                # an unrecorded short run of each side first: one-time costs (lazy imports,
                # DeepSpeed's op loading, allocator and thread-pool set-up) are paid before
                # any run whose memory and time are kept
                short = TrainConfig(**{**cfg.__dict__, "max_steps": args.warmup_steps})
                for side in sides:
                    group.execute(worker_run, side, stage, offload, args.param_dtype, pack,
                                  model_cfg, short, args.block_len, args.batch, 0,
                                  args.bucket_mb, args.sample_ms)
                for rep in range(args.repeats):
                    for side in (sides if rep % 2 == 0 else sides[::-1]):
                        runs[side].append(group.execute(
                            worker_run, side, stage, offload, args.param_dtype, pack, model_cfg, cfg,
                            args.block_len, args.batch, args.warmup_steps, args.bucket_mb,
                            args.sample_ms))
            row = {"stage": stage, "offload": offload, "config": config,
                   "ours_strategy": _qualname(ours_factory(stage, offload, args.param_dtype)),
                   "ours": _summary(runs["ours"]) if have_ours else {"error": "n/a"},
                   "deepspeed": _summary(runs["deepspeed"]), "wall_s": time.time() - t0}
            o, d = row["ours"], row["deepspeed"]
            if "error" not in o and "error" not in d:
                row["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(o["losses"],
                                                                        d["losses"]))
                row["ratio_step"] = o["median_step_s"] / d["median_step_s"]
                row["ratio_peak"] = o["peak_delta_mb"] / max(d["peak_delta_mb"], 1e-9)
                row["goal_met"] = row["ratio_step"] <= 1.0 and row["ratio_peak"] <= 1.0
            rows.append(row)
            print(f"[{time.time() - t_start:6.0f} s] {config}: done in {row['wall_s']:.0f} s",
                  flush=True)

    def cell(side: dict, key: str, fmt: str) -> str:
        if "error" in side:
            return "n/a" if side["error"] == "n/a" else "error"
        return format(side[key], fmt)

    print(f"\nGPT d_model={args.d_model} layers={args.layers} vocab={args.vocab} "
          f"({n_params / 1e6:.2f}M params), {args.param_dtype} params + fp32 master/Adam, global batch "
          f"{args.batch}x{args.block_len - 1} tokens on {args.workers} gloo workers x 1 thread; "
          f"{args.steps} timed steps x {args.repeats} interleaved repeats; ms = slower rank's "
          f"median step; peak MB = RSS above the pre-run baseline (max over ranks, median over "
          f"repeats); state MB = model-state bytes per rank as each reports")
    hdr = (f"{'config':22s} {'ours ms':>8s} {'DS ms':>8s} {'ours/DS':>7s} {'ours pk MB':>10s} "
           f"{'DS pk MB':>9s} {'pk o/DS':>7s} {'ours st MB':>10s} {'DS st MB':>9s} "
           f"{'max|dloss|':>10s}")
    print(hdr)
    for r in rows:
        o, d = r["ours"], r["deepspeed"]
        ratio = f"{r['ratio_step']:7.3f}" if "ratio_step" in r else f"{'-':>7s}"
        print(f"{r['config']:22s} {cell(o, 'median_ms', '.1f'):>8s} "
              f"{cell(d, 'median_ms', '.1f'):>8s} {ratio} {cell(o, 'peak_delta_mb', '.1f'):>10s} "
              f"{cell(d, 'peak_delta_mb', '.1f'):>9s} "
              f"{format(r['ratio_peak'], '7.3f') if 'ratio_peak' in r else '-':>7s} "
              f"{cell(o, 'model_state_mb', '.1f'):>10s} {cell(d, 'model_state_mb', '.1f'):>9s} "
              f"{format(r['max_abs_loss_diff'], '.1e') if 'max_abs_loss_diff' in r else '-':>10s}")
    for r in rows:
        for side in ("ours", "deepspeed"):
            e = r[side].get("error")
            if e and e != "n/a":
                print(f"  {r['config']} {side}: {e}")
    judged = [r for r in rows if "goal_met" in r]
    met = bool(judged) and all(r["goal_met"] for r in judged)
    print(f"goal: ours step <= 1.0x DeepSpeed at equal or lower peak memory -> "
          f"{'met' if met else 'NOT met'} (met in {sum(r['goal_met'] for r in judged)} of "
          f"{len(judged)} comparable configs)"
          + (f"; {len(rows) - len(judged)} without a comparison" if len(judged) < len(rows)
             else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"bench": "deepspeed_zero", "args": vars(args), "parameters": n_params,
                   "ds_config_example": {f"offload {o}": ds_config(2, o, args.param_dtype, cfg, args.batch
                                                                   // args.workers,
                                                                   args.workers, args.bucket_mb)
                                         for o in args.offload},
                   "rows": rows, "goal": "ours step <= 1.0x DeepSpeed and peak <= DeepSpeed's",
                   "goal_met": met, "torch": torch.__version__,
                   "deepspeed": deepspeed.__version__, "cpus": os.cpu_count()}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
