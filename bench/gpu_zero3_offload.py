"""The largest GPT our ZeRO + CPU offload trains on one GPU, with its tokens/s and MFU (bf16).

For a single CUDA device (written for an H100): climbs a ladder of GPT sizes (125M to 65B
parameters), and for each rung trains a few steps with our ZeRO — stage 3 with CPU offload when
the code base has it (``Zero(stage=3)`` accepted or an ``actors.parallel.zero.stage3`` module),
else stage 2 with ``offload_optimizer="cpu"`` — on bf16 parameters, with activation
checkpointing, in a one-rank process group the rung initialises itself (nccl; gloo with
``--dry-run``). The ladder stops at the first rung that does not train (CUDA out of memory, host
memory too small, or the rung's process killed); the largest rung that trained is the answer.

Each rung runs in its own child process: a CUDA OOM leaves the allocator fragmented, and a
host OOM is a SIGKILL that would otherwise take the whole ladder with it. Before a rung starts,
its host memory need (fp32 master + Adam moments on the host, 12 bytes per parameter, plus
the fp32 model built on the host, 4 bytes — 2 with ``--build-on-device``) is checked against
the free host memory, so the rung is skipped with a message instead of waking the OOM killer.
On a 128 GiB host that bound (~16 bytes per parameter: ~7B) comes before the GPU's 80 GB
(stage 3 at one rank keeps ~4 bytes per parameter on the GPU). ``--offload-params`` also moves
stage 3's bf16 parameter shard to the host.

Throughput: median step time over ``--steps`` timed steps after ``--warmup-steps``;
tokens/s = micro_batch × grad_accum × seq / step. MFU (Chowdhery et al. 2022, appendix B) uses the model
FLOPs of a decoder, without the recompute of activation checkpointing:

    FLOPs per token = 6Ψ + 12 · n_layers · d_model · seq      (Ψ: parameters)
    MFU = tokens/s × FLOPs per token / (--peak-tflops × 1e12)

``--peak-tflops`` defaults to 989 (H100 SXM, dense bf16); 756 for H100 PCIe, 989 for H200.
Writes bench/results/gpu_zero3_offload.json (``--out``) after every rung, so a run cut short
still leaves what it measured.

    python bench/gpu_zero3_offload.py                      # on a GPU machine
    python bench/gpu_zero3_offload.py --ladder 1.3B 6.7B   # named rungs only
    python bench/gpu_zero3_offload.py --dry-run            # CPU: tiny ladder, 2 steps each

Without a CUDA device (and without ``--dry-run``) it prints "no CUDA device: run on a GPU
machine" and exits 0. ``--dry-run`` runs the same code path on the CPU with tiny rungs and a
simulated out-of-memory above ``--fake-oom-params`` parameters, so the ladder's logic (child
processes, OOM handling, JSON) is exercised without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (d_model, n_layers) — GPT-3 paper shapes (Brown et al. 2020, table 2.1) and above
LADDER = {
    "125M": (768, 12), "350M": (1024, 24), "760M": (1536, 24), "1.3B": (2048, 24),
    "2.7B": (2560, 32), "6.7B": (4096, 32), "13B": (5120, 40), "20B": (6144, 44),
    "30B": (7168, 48), "40B": (8192, 48), "65B": (8192, 80),
}
DRY_LADDER = {"dry-a": (32, 1), "dry-b": (64, 2), "dry-c": (96, 2), "dry-d": (128, 3)}


def n_params(d_model: int, n_layers: int, vocab: int, seq: int) -> int:
    """Ψ of models.families.gpt's GPT (tied embeddings, learned positions, biases, LayerNorms)."""
    d, f = d_model, 4 * d_model
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return vocab * d + seq * d + n_layers * block + 2 * d


def flops_per_token(psi: int, d_model: int, n_layers: int, seq: int) -> float:
    return 6 * psi + 12 * n_layers * d_model * seq


# ---------------------------------------------------------------- which ZeRO we have

def strategy_factory(offload: str = "cpu", offload_params: bool = False):
    """(description, zero-argument factory): our stage 3 + offload if importable, else stage 2
    with the optimizer offloaded."""
    from bmray.actors.parallel.zero.stage12 import Zero
    from bmray.models.typed_config import ConfigError

    common = dict(param_dtype="bf16", offload_optimizer=offload)
    if offload == "disk":
        common["disk_dir"] = tempfile.mkdtemp(prefix="gpu_zero3_offload_")
    s3 = dict(stage=3, **common)
    if offload_params:
        s3["offload_params"] = True
    try:
        Zero(**s3)
        return "Zero(stage=3, offload_optimizer=%s)" % offload, lambda: Zero(**s3)
    except (ConfigError, ValueError, TypeError):
        pass
    try:
        import bmray.actors.parallel.zero.stage3 as z3
        for name in ("Zero3", "ZeroStage3", "Zero"):
            cls = getattr(z3, name, None)
            for kw in (s3, {k: v for k, v in s3.items() if k != "stage"}):
                if cls is None:
                    break
                try:
                    cls(**kw)
                    return (f"bmray.actors.parallel.zero.stage3.{name}({kw})", lambda cls=cls, kw=kw: cls(**kw))
                except Exception:       # noqa: BLE001 - try the next spelling
                    continue
    except ImportError:
        pass
    s2 = dict(stage=2, **common)
    return (f"Zero(stage=2, offload_optimizer={offload}) (no stage 3 in this code base)",
            lambda: Zero(**s2))


# ---------------------------------------------------------------- one rung (child process)

class SimulatedOOM(RuntimeError):
    """--dry-run's stand-in for torch.cuda.OutOfMemoryError."""


def _is_oom(exc: BaseException) -> bool:
    import torch

    return (isinstance(exc, (torch.cuda.OutOfMemoryError, SimulatedOOM))
            or "out of memory" in str(exc).lower())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rung(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps + args.warmup_steps`` steps of one rung; never raises on OOM."""
    import torch
    import torch.distributed as dist

    from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
    from bmray.actors.train.config import TrainConfig
    from bmray.actors.train.loop import Trainer, seed_everything
    from bmray.models import ModelConfig, build_model, objective_for

    cuda = not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))
    d, layers = args.d_model, args.n_layers
    cfg = ModelConfig(family="gpt", vocab_size=args.vocab, d_model=d,
                      n_heads=max(1, d // args.head_dim), n_layers=layers, d_ff=4 * d,
                      max_seq_len=args.seq, dropout=0.0)
    psi = n_params(d, layers, args.vocab, args.seq)
    out: dict[str, Any] = {"rung": args.rung, "d_model": d, "n_layers": layers, "params": psi,
                           "seq": args.seq, "micro_batch": args.micro_batch,
                           "grad_accum": args.grad_accum}
    phase = "build"
    try:
        describe, factory = strategy_factory(args.offload, args.offload_params)
        out["strategy"] = describe
        if args.dry_run and psi > args.fake_oom_params:
            raise SimulatedOOM(f"simulated: {psi:,} params > --fake-oom-params "
                               f"{args.fake_oom_params:,}")
        seed_everything(0)
        t0 = time.perf_counter()
        prev = torch.get_default_dtype()
        if args.build_on_device:
            torch.set_default_dtype(torch.bfloat16)   # no fp32 copy of a 10B+ model anywhere
        try:
            with torch.device(device if args.build_on_device else "cpu"):
                model = build_model(cfg)
        finally:
            torch.set_default_dtype(prev)
        actual = sum(p.numel() for p in model.parameters())
        if actual != psi:
            out["params_formula"], psi = psi, actual
            out["params"] = psi
        if args.activation_checkpointing:       # every block, as actors/train/experiment.py does
            out["checkpointed_blocks"] = len(apply_activation_checkpointing(model, "all"))
        phase = "setup"
        n_steps = args.warmup_steps + args.steps
        gen = torch.Generator().manual_seed(0)
        # token 0 is the pad id (ignored by CausalLM): draw from 1..vocab-1
        batches = [torch.randint(1, args.vocab, (args.micro_batch * args.grad_accum,
                                                  args.seq + 1), generator=gen)
                   for _ in range(n_steps)]
        tcfg = TrainConfig(max_steps=n_steps, lr=1e-4, warmup_steps=0, log_every=1,
                           micro_batches=args.grad_accum, echo=False, device=str(device))
        trainer = Trainer(model, objective_for(cfg), iter(batches), tcfg, strategy=factory(),
                          model_config=cfg)
        out["setup_s"] = time.perf_counter() - t0
        phase = "step"
        steps, losses = [], []
        for i in range(n_steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            row = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup_steps:
                steps.append(time.perf_counter() - t)
            losses.append(row["loss"])
        step = statistics.median(steps)
        tokens = args.micro_batch * args.grad_accum * args.seq
        fpt = flops_per_token(psi, d, layers, args.seq)
        out.update(status="ok", steps_s=steps, median_step_s=step, losses=losses,
                   tokens_per_s=tokens / step, flops_per_token=fpt,
                   achieved_tflops=tokens / step * fpt / 1e12,
                   mfu=tokens / step * fpt / (args.peak_tflops * 1e12))
        try:
            rep = trainer.strategy.memory_report()
            out["memory_report"] = {k: v for k, v in rep.items() if k != "by_location"}
        except Exception:       # noqa: BLE001 - the report is a bonus
            pass
    except Exception as exc:  # noqa: BLE001 - classified below
        out.update(status="oom" if _is_oom(exc) else "error", phase=phase,
                   error=f"{type(exc).__name__}: {str(exc)[:500]}")
    if cuda:
        out["max_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["max_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2 ** 30
    try:
        import resource
        out["max_host_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    except Exception:       # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------- the ladder (parent)

def host_bytes_needed(psi: int, build_on_device: bool, offload_params: bool = False) -> int:
    """fp32 master + exp_avg + exp_avg_sq on the host (12Ψ), fp32 gradient staging (4Ψ),
    the bf16 parameter shard with ``--offload-params`` (2Ψ), and the model as built on the host
    (4Ψ fp32) unless it is built on the device. On a 128 GiB host this, not the GPU's 80 GB,
    is what bounds the ladder (~7B parameters)."""
    return psi * (16 + (2 if offload_params else 0) + (0 if build_on_device else 4))


def host_bytes_free() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh}
        return info.get("MemAvailable", 0)


def child_command(args: argparse.Namespace, name: str, d: int, layers: int) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rung", name,
           "--d-model", str(d), "--n-layers", str(layers), "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
           "--grad-accum", str(args.grad_accum),
           "--head-dim", str(args.head_dim), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--peak-tflops", str(args.peak_tflops),
           "--offload", args.offload, "--fake-oom-params", str(args.fake_oom_params)]
    for flag in ("dry_run", "build_on_device", "activation_checkpointing", "offload_params"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
        elif flag != "dry_run":
            cmd.append("--no-" + flag.replace("_", "-"))
    return cmd


def run_ladder(args: argparse.Namespace) -> dict[str, Any]:
    ladder = DRY_LADDER if args.dry_run else LADDER
    names = args.ladder or list(ladder)
    unknown = [n for n in names if n not in ladder]
    if unknown:
        raise SystemExit(f"--ladder: unknown rung(s) {unknown}; choose from {list(ladder)}")
    device = "cpu (dry run)"
    if not args.dry_run:
        import torch
        device = torch.cuda.get_device_name(0)
    result: dict[str, Any] = {"bench": "gpu_zero3_offload", "device": device,
                              "args": vars(args), "rungs": [], "largest_trained": None}
    t_start = time.time()
    print(f"{'rung':>6s} {'params':>8s} {'status':>7s} {'step s':>8s} {'tokens/s':>9s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'GPU GB':>7s}  strategy / note", flush=True)
    for name in names:
        d, layers = ladder[name]
        psi = n_params(d, layers, args.vocab, args.seq)
        need = host_bytes_needed(psi, args.build_on_device, args.offload_params)
        free = host_bytes_free()
        elapsed = time.time() - t_start
        if elapsed > args.time_budget_s:
            rung = {"rung": name, "params": psi, "status": "skipped",
                    "error": f"time budget: {elapsed:.0f} s > --time-budget-s"}
        elif need > free and not args.dry_run:
            rung = {"rung": name, "params": psi, "status": "host-oom",
                    "error": f"needs ~{need / 2**30:.0f} GiB of host memory, "
                             f"{free / 2**30:.0f} GiB available"}
        else:
            try:
                proc = subprocess.run(child_command(args, name, d, layers),
                                      capture_output=True, text=True,
                                      timeout=max(30.0, args.time_budget_s - elapsed))
            except subprocess.TimeoutExpired as exc:
                proc = subprocess.CompletedProcess(exc.cmd, 124, exc.stdout or "",
                                                   f"timed out after {exc.timeout:.0f} s")
                if isinstance(proc.stdout, bytes):
                    proc.stdout = proc.stdout.decode(errors="replace")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if line:
                rung = json.loads(line[-1][len("RESULT "):])
            else:       # killed (host OOM killer: -9) or crashed before reporting
                rung = {"rung": name, "params": psi,
                        "status": ("killed" if proc.returncode < 0 else
                                   "timeout" if proc.returncode == 124 else "error"),
                        "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        result["rungs"].append(rung)
        ok = rung.get("status") == "ok"
        if ok:
            result["largest_trained"] = {k: rung[k] for k in (
                "rung", "params", "tokens_per_s", "mfu", "achieved_tflops", "strategy")}
        size = f"{psi / 1e9:.2f}B" if psi >= 1e8 else f"{psi / 1e6:.3f}M"
        print(f"{name:>6s} {size:>8s} {rung['status']:>7s} "
              f"{rung.get('median_step_s', float('nan')):8.2f} "
              f"{rung.get('tokens_per_s', float('nan')):9.0f} "
              f"{rung.get('achieved_tflops', float('nan')):8.1f} "
              f"{rung.get('mfu', float('nan')):6.3f} "
              f"{rung.get('max_gpu_allocated_gb', float('nan')):7.1f}  "
              f"{rung.get('strategy', '') if ok else rung.get('error', '')}", flush=True)
        write(args.out, result)
        if not ok:
            break       # sizes only grow: the previous rung is the largest that trains
    return result


def write(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny rungs, 2 steps, simulated OOM: exercises the logic")
    ap.add_argument("--ladder", nargs="+", help=f"rung names (default all): {list(LADDER)}")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step: the host-side Adam step is paid "
                         "once per grad_accum x micro_batch x seq tokens")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per rung")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense bf16 TFLOP/s of the GPU (H100 SXM 989, PCIe 756)")
    ap.add_argument("--offload", default="cpu", choices=["cpu", "disk"],
                    help="where the optimizer state goes")
    ap.add_argument("--offload-params", action=argparse.BooleanOptionalAction, default=False,
                    help="stage 3: keep the bf16 parameter shard in host memory too")
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                    default=True)
    ap.add_argument("--build-on-device", action=argparse.BooleanOptionalAction, default=True,
                    help="build the model in bf16 on the GPU (no fp32 host copy)")
    ap.add_argument("--time-budget-s", type=float, default=540.0,
                    help="start no new rung after this many seconds")
    ap.add_argument("--fake-oom-params", type=int, default=10 ** 18,
                    help="--dry-run: rungs above this many parameters raise a simulated OOM")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_zero3_offload.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rung", help=argparse.SUPPRESS)
    ap.add_argument("--d-model", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n-layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_rung(args)), flush=True)
        os._exit(0)          # skip interpreter teardown (process-group and CUDA exit hangs)

    if args.dry_run:
        # tiny everything, and the second-largest rung "runs out of memory"
        args.seq, args.micro_batch, args.vocab, args.head_dim = 32, 2, 256, 32
        args.steps, args.warmup_steps = 1, 1           # 2 steps per rung
        args.build_on_device = False
        if args.fake_oom_params == 10 ** 18:
            d, layers = DRY_LADDER["dry-c"]
            args.fake_oom_params = n_params(d, layers, args.vocab, args.seq) - 1
        if args.out == os.path.join(HERE, "results", "gpu_zero3_offload.json"):
            # not a result: keep bench/results/ for GPU runs
            args.out = os.path.join(tempfile.gettempdir(), "gpu_zero3_offload_dryrun.json")
    else:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine (or --dry-run to exercise the logic "
                  "on the CPU)")
            sys.exit(0)

    result = run_ladder(args)
    best = result["largest_trained"]
    if best:
        print(f"largest that trains: {best['rung']} ({best['params']:,} params) with "
              f"{best['strategy']}: {best['tokens_per_s']:.0f} tokens/s, MFU "
              f"{best['mfu']:.3f} at --peak-tflops {args.peak_tflops:g}")
    else:
        print("no rung trained")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
