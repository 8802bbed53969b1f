"""Tensor parallelism: step time and memory per rank at tp = 1, 2, 4, ours against PyTorch's
Megatron-style TP (``torch.distributed.tensor.parallel``) and DeepSpeed's AutoTP training.

Every loop trains the same GPT (``models.build_model``; the default is d_model 256, 4 heads,
4 layers, d_ff 1024, vocab 4096, tied embeddings, dropout 0) from the same full initial
weights (seeded, then each loop slices its own shards), on the same batches (seeded random
token blocks, identical on every rank: a TP group reads one batch), with the same AdamW
(two groups: decay on matrices only, torch's fused kernel), warmup + cosine schedule and
global-norm clipping. ``tp`` ranks form one gang (``cluster.gang.WorkerGroup``: one Ray actor
per rank, one torch thread each, gloo); tp = 1 is plain single-rank training for every loop.

The loops (``--loops``):

* ``ours`` — what a user runs: ``actors.train.loop.Trainer`` on
  ``actors.parallel.mesh.MeshParallel(tp=N)`` (dp = pp = 1; ZeRO-1 over a dp group of one,
  i.e. a plain optimizer with an fp32 master copy). Its TP (``actors.parallel.tensor``)
  shards the blocks (q/k/v and ffn.up by columns, out_proj and ffn.down by rows, one Megatron
  "f" for the three projections), the vocabulary (embedding and tied lm_head) and computes the
  vocabulary-parallel cross-entropy; the trainer also logs token accuracy and all-reduces the
  step's loss.
* ``torch`` — PyTorch's own Megatron-style TP: ``parallelize_module`` with ``ColwiseParallel``
  on ``attn.q_proj/k_proj/v_proj`` and ``ffn.up``, ``RowwiseParallel`` on ``attn.out_proj``
  and ``ffn.down`` of every block (DTensor on a CPU ``DeviceMesh`` over gloo; local outputs,
  so the attention's head reshape sees local widths). Embedding, lm_head and loss stay
  replicated. Hand-written loop: forward (the model's own loss), backward, clip, step.
  DTensor refuses optimizer / norm kernels over a mix of DTensor and plain tensors, so the
  loop keeps two fused AdamWs (DTensor parameters, plain ones) and clips with one global norm
  from ``torch.nn.utils.get_total_norm`` of each set (the DTensor one is exact over shards
  and replicas).
* ``torch_vocab`` — the same plus vocabulary parallelism, i.e. ours' partitioning:
  ``embed.tok`` ``RowwiseParallel(input_layouts=Replicate())``, ``lm_head``
  ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` (re-tied to the
  sharded embedding) and the loss under ``loss_parallel()``. tp > 1 only. **The like-for-like
  peer**: it splits what ours splits, so the headline ratio ("× peer") is against it at
  tp > 1 (at tp = 1, where nothing is split, against plain ``torch``); the blocks-only row
  stays as a second column. The full plans are in the JSON (``peer_config``).
* ``deepspeed`` — DeepSpeed's AutoTP *training* path (``tensor_parallel: {autotp_size: N,
  partition_config: ...}`` with the same column / row layer specs as ``torch``, ZeRO stage 0,
  torch's fused AdamW, fp32) after ``deepspeed.initialize`` inside the same gang. Embedding
  and lm_head replicated (its vocab-parallel head needs its own loss hook, which our GPT's
  ``forward`` does not call). Whether it runs is detected, not assumed: an error is
  reported in the table and the JSON. tp = 1: a plain DeepSpeed engine (no AutoTP).

Measured per rank and run (a run = fresh model + strategy, ``--warmup-steps`` untimed steps,
then ``--steps`` timed ones):

* **step ms**: wall time of one optimizer step (forward, backward, clip, step, the loss as a
  float — what a user's logging does); a step of the group takes as long as its slower rank
  (``bench.common.gang_steps``), and the row shows the median over the timed steps of all
  rounds. "× peer" is ours' (or any loop's) step over the peer's, with a bootstrap 90%
  interval over rounds (``bench.common.bootstrap_ratio``).
* **model-state MB/rank**: bytes of the parameters + gradients + optimizer state this rank
  holds, counted from the tensors themselves (local shards of DTensors / DeepSpeed's
  ``LinearLayer``; ours: ``memory_report()``, which includes its fp32 master copy — kept even
  with fp32 parameters, 4 extra bytes per parameter — and its flat gradient bucket);
  gradients are counted after the last backward, before the optimizer step; max over ranks.
* **RSS MB**: the process's peak resident set size above its RSS just before the run
  built its model (a thread samples /proc/self/statm every ``--sample-ms``; freed heap is
  returned with ``malloc_trim`` before each baseline so runs in one process do not hide in
  each other's freed pages); activations, the transient full model every loop builds before
  slicing, communication buffers and allocator slack included; max over ranks, median over
  repeats. ``ru_maxrss`` (the process's lifetime peak, ``resource.getrusage``) is in the JSON.

Loss check: every loop starts from the same full weights, so the per-step losses (and the
first step's gradient norm) must agree with the peer's at the same tp, and with plain tp = 1
training; ``max|dloss|`` is printed for the first steps of the last round.

Transport: every loop's tensor-parallel collectives go through the same gloo process group
(ours' shared-memory transport serves only data-parallel buckets, and dp = 1 here).

Within one tp every loop first makes one short unrecorded run (lazy imports, DeepSpeed's op
build, thread pools), then ``--repeats`` rounds run every loop once, in an order that rotates
from round to round (``bench.common.balanced_order``; 4 loops at tp > 1, 3 at tp = 1: a
multiple of 12 balances both). The machine has 2 cores shared with other work: quote ratios,
not absolute times. At tp = 4 four single-thread ranks share 2 cores, so that row measures
contention (time-slicing, and every collective waiting for a descheduled peer), not a
speed-up; see the printed note.

    python bench/tensor_parallel.py                               # full: tp 1 2 4, 10 steps x 8 rounds
    python bench/tensor_parallel.py --quick --out /tmp/tp.json    # smoke
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (BOOTSTRAP_RESAMPLES, INTERVAL, MB, StepTimer,  # noqa: E402
                          add_timing_args, balanced_order, connect_ray,
                          cpu_train_config, deepspeed_engine, deepspeed_gang_env,
                          destroy_engine, fresh_model, fused_adamw, gang_summary,
                          gpt_config, measured_run, nbytes, parse_args,
                          ratio_with_interval, result_path, warmup_cosine_lr,
                          with_steps, write_json)
from bmray.actors.train.config import TrainConfig  # noqa: E402
from bmray.models import ModelConfig  # noqa: E402

LOOPS = ("ours", "torch", "torch_vocab", "deepspeed")
LABELS = {"ours": "bmray MeshParallel", "torch": "torch TP (blocks)",
          "torch_vocab": "torch TP (+vocab)", "deepspeed": "DeepSpeed AutoTP"}
BLOCKS_ONLY = "torch"                 # the old reference: blocks split, vocabulary replicated
CHECK_STEPS = 4          # losses compared over the first steps


def peer_for(tp: int) -> str:
    """The like-for-like peer at ``tp``: torch TP that also splits the vocabulary (as ours
    does); at tp = 1 nothing is split and plain torch is the peer."""
    return "torch_vocab" if tp > 1 else "torch"


# ---------------------------------------------------------------- shared helpers (workers)

def _batches(model_cfg: ModelConfig, batch: int, seq: int, n: int) -> list[torch.Tensor]:
    """``n`` blocks of ``seq + 1`` random token ids (never the pad id 0), the same on every
    rank (a TP group reads one batch)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(1, model_cfg.vocab_size, (batch, seq + 1), generator=g)
            for _ in range(n)]


def _optim_state_bytes(opt: Any) -> int:
    """Bytes of every state tensor (moments; not the scalar step counters) of ``opt`` and of
    the optimizers it wraps (``.optimizer``), each tensor once."""
    seen, total = set(), 0
    while opt is not None:
        for s in getattr(opt, "state", {}).values():
            for v in (s.values() if isinstance(s, dict) else ()):
                if torch.is_tensor(v) and v.numel() > 1 and id(v) not in seen:
                    seen.add(id(v))
                    total += nbytes([v])
        opt = getattr(opt, "optimizer", None)
    return total


# ---------------------------------------------------------------- ours

def ours_loop(tp, model_cfg, cfg: TrainConfig, batches, warmup):
    """Trainer on MeshParallel(tp=N): (step seconds, losses, first grad norm, state bytes)."""
    from bmray.actors.parallel.mesh import MeshParallel
    from bmray.actors.train.loop import Trainer
    from bmray.models import objective_for

    trainer = Trainer(fresh_model(model_cfg), objective_for(model_cfg), iter(batches), cfg,
                      strategy=MeshParallel(tp=tp), model_config=model_cfg)
    timer, losses, norms = StepTimer(warmup), [], []
    for i in range(len(batches)):
        timer.start(i)
        row = trainer.train_step()
        timer.stop(i)
        losses.append(row["loss"])
        norms.append(row["grad_norm"])
    trainer.strategy.flush()
    rep = trainer.strategy.memory_report()
    state = {k: rep[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                 "model_state_bytes")}
    state["note"] = ("memory_report(): parameters, flat gradient bucket, fp32 master + "
                     "AdamW moments")
    return timer.steps, losses, norms, state


# ---------------------------------------------------------------- torch TP (DTensor)

_MESH: dict[int, Any] = {}


def _mesh(tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    if tp not in _MESH:
        _MESH[tp] = init_device_mesh("cpu", (tp,))
    return _MESH[tp]


def torch_parallelize(model: torch.nn.Module, tp: int, vocab: bool) -> torch.nn.Module:
    """PyTorch's Megatron-style plan on our GPT (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = _mesh(tp)
    for block in model.blocks:
        parallelize_module(block, mesh, {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(), "attn.out_proj": RowwiseParallel(),
            "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel()})
    if vocab:
        tied = model.lm_head.weight is model.embed.tok.weight
        parallelize_module(model, mesh, {
            "embed.tok": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
        if tied:        # both are Shard(0) over the vocabulary: one parameter again
            model.lm_head.weight = model.embed.tok.weight
    return model


def torch_loop(tp, vocab, model_cfg, cfg: TrainConfig, batches, warmup):
    """Hand-written loop on torch TP: (step seconds, losses, grad norms, state bytes)."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    from bmray.models import objective_for

    model = fresh_model(model_cfg)
    if tp > 1:
        torch_parallelize(model, tp, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    dt = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    opts = [fused_adamw(ps, cfg) for ps in (dt, plain) if ps]
    scheds = [warmup_cosine_lr(o, cfg) for o in opts]
    objective = objective_for(model_cfg)
    model.train()

    def clip() -> torch.Tensor:
        if tp == 1:
            return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        sq = torch.zeros(())
        for ps in (dt, plain):
            if ps:
                n = torch.nn.utils.get_total_norm([p.grad for p in ps])
                n = n.full_tensor() if isinstance(n, DTensor) else n
                sq = sq + n.float() ** 2
        total = sq.sqrt()
        for ps in (dt, plain):
            if ps:
                torch.nn.utils.clip_grads_with_norm_(ps, cfg.grad_clip, total)
        return total

    timer, losses, norms, grad_bytes = StepTimer(warmup), [], [], 0
    for i, blocks in enumerate(batches):
        timer.start(i)
        batch = objective(blocks)
        if vocab and tp > 1:
            logits = model(input_ids=batch["input_ids"]).logits
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                       ignore_index=-100)
                loss.backward()
        else:
            loss = model(**batch).loss
            loss.backward()
        norm = clip()
        if i == len(batches) - 1:
            grad_bytes = nbytes(p.grad for p in params)
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        value = float((loss.full_tensor() if isinstance(loss, DTensor) else loss).detach())
        timer.stop(i)
        losses.append(value)
        norms.append(float(norm))
    state = {"param_bytes": nbytes(params), "grad_bytes": grad_bytes,
             "optimizer_bytes": sum(_optim_state_bytes(o) for o in opts)}
    state["model_state_bytes"] = sum(state.values())
    state["note"] = "local shards of parameters, their gradients, AdamW moments"
    return timer.steps, losses, norms, state


# ---------------------------------------------------------------- DeepSpeed AutoTP

def ds_config(tp: int, cfg: TrainConfig, micro_batch: int) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps,
            "weight_decay": cfg.weight_decay, "torch_adam": True, "fused": True}},
        "gradient_clipping": cfg.grad_clip, "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False}
    if tp > 1:
        # no "dtype" key: DeepSpeed 0.19.8 validates it as a torch.dtype and then fails to
        # JSON-print its config on rank 0; AutoTP training does not read it
        conf["tensor_parallel"] = {"autotp_size": tp, "partition_config": {
            "use_default_specs": False, "layer_specs": [
                {"patterns": [r".*\.attn\.[qkv]_proj\.weight$", r".*\.ffn\.up\.weight$"],
                 "partition_type": "column"},
                {"patterns": [r".*\.attn\.out_proj\.weight$", r".*\.ffn\.down\.weight$"],
                 "partition_type": "row"}]}}
    return conf


def ds_loop(tp, model_cfg, cfg: TrainConfig, batches, warmup):
    """DeepSpeed's documented loop on an AutoTP engine: (step s, losses, norms, state)."""
    from deepspeed.runtime.utils import clip_grad_norm_
    from bmray.models import objective_for

    engine = deepspeed_engine(model_cfg, cfg, ds_config(tp, cfg, batches[0].size(0)))
    objective = objective_for(model_cfg)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    timer, losses, norms, grad_bytes = StepTimer(warmup), [], [], 0
    for i, blocks in enumerate(batches):
        timer.start(i)
        out = engine(**objective(blocks))
        engine.backward(out.loss)
        if i == len(batches) - 1:
            grad_bytes = nbytes(p.grad for p in params)
        norm = None
        if i == 0:      # untimed: stage 0 fp32 clips without keeping the norm, so ask the
            #             same utility with max_norm=inf (clip coefficient 1) for the check
            norm = clip_grad_norm_(params, float("inf"), mpu=engine.mpu)
        engine.step()
        value = float(out.loss.detach())
        timer.stop(i)
        losses.append(value)
        norm = engine.get_global_grad_norm() if norm is None else norm
        norms.append(float(norm) if norm is not None else float("nan"))
    state = {"param_bytes": nbytes(params), "grad_bytes": grad_bytes,
             "optimizer_bytes": _optim_state_bytes(engine.optimizer)}
    state["model_state_bytes"] = sum(state.values())
    state["note"] = ("local parameters (AutoTP LinearLayer shards), their gradients, the "
                     "optimizer's state tensors")
    state["layers"] = sorted({type(m).__name__ for m in engine.module.modules()
                              if "Layer" in type(m).__name__})
    destroy_engine(engine)
    return timer.steps, losses, norms, state


# ---------------------------------------------------------------- one run on every rank

def worker_run(loop, tp, model_cfg, cfg, batch, seq, warmup, sample_ms):
    """One run of ``loop`` on this rank: timings, losses, memory, or the error."""
    import torch.distributed as dist

    ctx = deepspeed_gang_env()      # every loop imports deepspeed: equal RSS baselines

    batches = _batches(model_cfg, batch, seq, cfg.max_steps)

    def run():
        if loop == "ours":
            res = ours_loop(tp, model_cfg, cfg, batches, warmup)
        elif loop in ("torch", "torch_vocab"):
            res = torch_loop(tp, loop == "torch_vocab", model_cfg, cfg, batches, warmup)
        else:
            res = ds_loop(tp, model_cfg, cfg, batches, warmup)
        return res, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    out = {"rank": ctx.rank, "loop": loop, **measured_run(run, sample_ms, error_chars=600)}
    if "result" in out:
        (steps, losses, norms, state), ru_maxrss = out.pop("result")
        out.update(steps_s=steps, losses=losses, grad_norms=norms, model_state=state,
                   ru_maxrss=ru_maxrss)
    try:            # a failed collective must not leave the next run's first one skewed
        dist.barrier()
    except Exception:       # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------- driver

def _summary(runs: list[list[dict]]) -> dict[str, Any]:
    """One loop's numbers at one tp from ``runs`` (per round, the per-rank results)."""
    def rank_figures(rs: list[dict]) -> dict[str, Any]:
        steps = [s for r in rs for s in r["steps_s"]]
        return {"median_step_s": statistics.median(steps), "steps_s": steps,
                "ru_maxrss_mb": max(r["ru_maxrss"] for r in rs) / MB}

    summary = gang_summary(runs, rank_figures)
    if "error" in summary:
        return summary
    last = runs[-1]
    summary.update(losses=last[0]["losses"], grad_norms=last[0]["grad_norms"],
                   # all ranks of a TP group must see the same loss
                   rank_loss_spread=max(abs(a - b) for r in last for a, b in
                                        zip(r["losses"], last[0]["losses"])))
    return summary


def _max_diff(a: list[float], b: list[float], n: int = CHECK_STEPS) -> float:
    return max(abs(x - y) for x, y in zip(a[:n], b[:n]))


QUICK = {"tp": [1, 2], "steps": 2, "warmup_steps": 1, "repeats": 2, "d_model": 128,
         "layers": 2, "seq": 64}
TORCH_PLAN = {   # what torch_parallelize applies (for the JSON)
    "blocks.*": {"attn.q_proj": "ColwiseParallel()", "attn.k_proj": "ColwiseParallel()",
                 "attn.v_proj": "ColwiseParallel()", "attn.out_proj": "RowwiseParallel()",
                 "ffn.up": "ColwiseParallel()", "ffn.down": "RowwiseParallel()"},
    "vocabulary (torch_vocab only)": {
        "embed.tok": "RowwiseParallel(input_layouts=Replicate())",
        "lm_head": "ColwiseParallel(output_layouts=Shard(-1), use_local_output=False), "
                   "re-tied to embed.tok",
        "loss": "F.cross_entropy under torch.distributed.tensor.parallel.loss_parallel()"},
    "optimizer": "two torch.optim.AdamW(fused=True) (DTensor and plain parameters), "
                 "clip by one global norm (torch.nn.utils.get_total_norm of each set)",
    "mesh": "init_device_mesh('cpu', (tp,)), gloo"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    add_timing_args(ap, steps=10, warmup_steps=2, repeats=8, repeats_help="rounds, every loop "
                    "once per round in rotating order")
    ap.add_argument("--batch", type=int, default=4, help="blocks per step (every rank)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per block")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--out", default=result_path(__file__, "tensor_parallel.json"))
    args = parse_args(ap, QUICK)

    import deepspeed
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    model_cfg = gpt_config(args.vocab, args.d_model, args.layers, args.seq, heads=args.heads)
    cfg = cpu_train_config(args.steps + args.warmup_steps, log_every=1)
    short = with_steps(cfg, args.warmup_steps)
    n_params = sum(p.numel() for p in fresh_model(model_cfg).parameters())
    connect_ray(num_cpus=max(8, max(args.tp)))
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    for tp in args.tp:
        loops = [lp for lp in args.loops if not (lp == "torch_vocab" and tp == 1)]
        runs: dict[str, list] = {lp: [] for lp in loops}
        t0 = time.time()
        with WorkerGroup(ScalingConfig(num_workers=tp, cpus_per_worker=1)) as group:
            for lp in loops:        # unrecorded: one-time costs are paid before any timing
                group.execute(worker_run, lp, tp, model_cfg, short, args.batch, args.seq, 0,
                              args.sample_ms)
            for lp in balanced_order(loops, args.repeats):
                runs[lp].append(group.execute(worker_run, lp, tp, model_cfg, cfg, args.batch,
                                              args.seq, args.warmup_steps, args.sample_ms))
        summaries = {lp: _summary(runs[lp]) for lp in loops}
        peer = peer_for(tp)
        ref = summaries.get(peer, {})
        blocks = summaries.get(BLOCKS_ONLY, {})
        for lp in loops:
            s = summaries[lp]
            row = {"tp": tp, "loop": lp, "label": LABELS[lp], "peer": peer, **s}
            if "error" not in s and ref and "error" not in ref:
                vs = ratio_with_interval(s["gang_steps_s"], ref["gang_steps_s"])
                row["ratio_vs_peer"] = vs["ratio"]
                row["ratio_vs_peer_interval"] = vs["interval"]
                row["max_abs_loss_diff_vs_peer"] = _max_diff(s["losses"], ref["losses"])
                row["grad_norm_step1_diff_vs_peer"] = abs(s["grad_norms"][0]
                                                          - ref["grad_norms"][0])
            if "error" not in s and blocks and "error" not in blocks:
                row["ratio_vs_torch_blocks"] = s["median_step_s"] / blocks["median_step_s"]
            rows.append(row)
        print(f"[{time.time() - t_start:6.0f} s] tp={tp}: done in {time.time() - t0:.0f} s",
              flush=True)

    # the same run at every tp: compare each row's losses with tp = 1's plain training
    base = {r["loop"]: r for r in rows if r["tp"] == 1 and "error" not in r}
    plain = base.get(BLOCKS_ONLY)         # at tp = 1 the blocks-only loop is plain torch
    for r in rows:
        if plain is not None and "error" not in r:
            r["max_abs_loss_diff_vs_tp1"] = _max_diff(r["losses"], plain["losses"])

    def fmt(r: dict, key: str, spec: str) -> str:
        return "error" if "error" in r else ("-" if key not in r else format(r[key], spec))

    print(f"\nGPT d_model={args.d_model} heads={args.heads} layers={args.layers} "
          f"vocab={args.vocab} ({n_params / 1e6:.2f}M params, tied embeddings), batch "
          f"{args.batch}x{args.seq} tokens (the same on every rank), fp32, gloo, 1 thread per "
          f"rank on {os.cpu_count()} cores; {args.steps} timed steps x {args.repeats} "
          f"rotating rounds.\nstep ms = median group step (a step lasts as long as its "
          f"slower rank); x peer = step ms / the like-for-like peer's at the same tp (torch TP "
          f"with the vocabulary split; plain torch at tp=1; < 1: faster), with its bootstrap "
          f"{INTERVAL:.0%} interval over rounds; x blocks = against blocks-only torch TP; "
          f"state MB = params + grads + optimizer state held per rank (from the tensors, max "
          f"over ranks); RSS MB = peak RSS above the pre-run baseline (max over ranks, median "
          f"over rounds); max|dloss| = over the first {CHECK_STEPS} steps, against the peer at "
          f"the same tp and against plain tp=1 training")
    print(f"{'tp':>2s}  {'loop':20s} {'step ms':>8s} {'x peer':>6s} {'interval':>11s} "
          f"{'x blocks':>8s} {'state MB':>9s} {'RSS MB':>7s} {'|dloss| peer':>12s} "
          f"{'|dloss| tp1':>11s}")
    for r in rows:
        iv = ("-" if "ratio_vs_peer_interval" not in r
              else "{:5.3f}–{:5.3f}".format(*r["ratio_vs_peer_interval"]))
        print(f"{r['tp']:2d}  {r['label']:20s} {fmt(r, 'median_ms', '8.1f'):>8s} "
              f"{fmt(r, 'ratio_vs_peer', '6.3f'):>6s} {iv:>11s} "
              f"{fmt(r, 'ratio_vs_torch_blocks', '8.3f'):>8s} "
              f"{fmt(r, 'model_state_mb', '9.2f'):>9s} {fmt(r, 'peak_delta_mb', '7.1f'):>7s} "
              f"{fmt(r, 'max_abs_loss_diff_vs_peer', '.1e'):>12s} "
              f"{fmt(r, 'max_abs_loss_diff_vs_tp1', '.1e'):>11s}")
    headline = {r["tp"]: {"ratio_vs_peer": r["ratio_vs_peer"],
                          "peer": LABELS[r["peer"]] if r["tp"] > 1 else "plain torch (tp=1)",
                          "interval": r["ratio_vs_peer_interval"]}
                for r in rows if r["loop"] == "ours" and "ratio_vs_peer" in r}
    print("headline (ours' step / like-for-like peer's): " + "; ".join(
        f"tp={tp}: {h['ratio_vs_peer']:.3f} ({h['interval'][0]:.3f}–{h['interval'][1]:.3f}) "
        f"vs {h['peer']}" for tp, h in headline.items()))
    print("first losses (rank 0, last round):")
    for r in rows:
        if "error" not in r:
            print(f"  tp={r['tp']} {r['label']:20s} "
                  + " ".join(f"{x:.5f}" for x in r["losses"][:CHECK_STEPS])
                  + f"   step-1 grad norm {r['grad_norms'][0]:.5f}")
    for r in rows:
        if "error" in r:
            print(f"  tp={r['tp']} {r['label']}: did not run here: {r['error']}")
    cores = os.cpu_count() or 1
    note = (f"This machine has {cores} cores (shared with other work) and every rank runs "
            f"one thread. At tp={max(args.tp)} there are {max(args.tp)} ranks on {cores} "
            f"cores: the ranks are time-sliced, and each of the per-layer collectives waits "
            f"for whichever peer is descheduled, so that row measures contention and "
            f"collective latency under oversubscription, not tensor-parallel speed-up; "
            f"absolute step times there are not comparable with tp=1, and loops that issue "
            f"more (or more, smaller) collectives per step are penalised more than they would "
            f"be on dedicated devices. Only the ratios between loops at the same tp, and the "
            f"memory columns (which do not depend on scheduling), carry over.")
    if max(args.tp) > cores:
        print("note: " + note)
    ds_rows = [r for r in rows if r["loop"] == "deepspeed"]
    ds_status = ("not run" if not ds_rows else
                 "ran (AutoTP training, partition_config, ZeRO stage 0, CPU/gloo)"
                 if all("error" not in r for r in ds_rows)
                 else "failed: " + "; ".join(f"tp={r['tp']}: {r['error']}"
                                             for r in ds_rows if "error" in r))
    print(f"DeepSpeed {deepspeed.__version__} AutoTP: {ds_status}")
    write_json(args.out, {
        "bench": "tensor_parallel", "args": vars(args), "parameters": n_params,
        "model": {k: v for k, v in model_cfg.__dict__.items()
                  if isinstance(v, (int, float, str, bool, type(None)))},
        "loops": {lp: LABELS[lp] for lp in args.loops},
        "reference": {"tp > 1": peer_for(2), "tp = 1": peer_for(1)},
        "peer_config": {"torch": TORCH_PLAN,
                        "deepspeed": ds_config(max(args.tp), cfg, args.batch)},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "interval": INTERVAL},
        "definitions": {
            "median_ms": "median over all rounds' timed steps of the group's step "
                         "(each step: the slower rank's wall time)",
            "ratio_vs_peer": "median_ms / the like-for-like peer's median_ms at "
                             "the same tp (torch TP with the vocabulary split; "
                             "plain torch at tp 1); ratio_vs_peer_interval: "
                             "bootstrap over rounds",
            "ratio_vs_torch_blocks": "median_ms / blocks-only torch TP's",
            "model_state_mb": "params + grads + optimizer state per rank from "
                              "the tensors (max over ranks)",
            "peak_delta_mb": "peak sampled RSS above the pre-run baseline (max "
                             "over ranks, median over rounds)",
            "ru_maxrss_mb": "resource.getrusage lifetime peak RSS of the worker "
                            "process (per rank, JSON only)"},
        "deepspeed_status": ds_status,
        "headline": headline, "contention_note": note, "rows": rows, "torch": torch.__version__,
        "deepspeed": deepspeed.__version__, "cpus": cores,
        "wall_s": time.time() - t_start}, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
