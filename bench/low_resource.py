"""Low-resource inference: greedy generation of a GPT far larger than its memory budget, streamed
(bmray.models.compress.streaming), tokens/s against the same model all-resident.

The model: our GPT family with random weights (seed 0), by default d_model 320, 32 blocks,
vocabulary 1024: ~158 MB of fp32 weights. Each run builds a streamed copy with
``memory_limit = fraction × model bytes + cache_reserve`` (``kv_cache_reserve`` for the prompt
+ new tokens), for every fraction in ``--fractions`` (1/8 makes the model ≥ 4× the budget),
with int8-resident blocks on / off, the host / disk store and prefetch on / off; the
all-resident model (plain ``generate`` on the unwrapped model) is the reference. A config whose
budget cannot hold even the buffer is recorded with its ConfigError (the smallest workable
``memory_limit``), not run. Before timing, every streamed run's greedy tokens must equal the
resident model's (fp32 store) — with int8-resident blocks the tokens may differ and the share
equal is recorded.

Timing: one process, torch on ``--threads`` threads (the prefetch copy is one more thread),
rounds rotate the order of the runs (``bench.common.balanced_order``); in each round every run
builds its streamed model (not timed), generates once to warm up, then ``--gens`` timed greedy
generations of ``--new`` tokens after a ``--prompt``-token prompt, batch ``--batch``. "×
resident" is the resident model's median time over the run's (< 1: slower), with a 90%
bootstrap interval over rounds. Memory per run: the streamed model's accounting (peak bytes in
use, always ≤ memory_limit) and the process's RSS (psutil, sampled at every block) above the
RSS before the run was built (the reference model the runs are copied from stays alive and
outside it). The disk store reads from the page cache on a machine with free memory: the disk
numbers measure the store's path, not a cold disk. ``--device cuda`` runs the blocks on a GPU
(host/disk stores in host memory, copies on a side stream) and records the device's peak
allocation above the run's start as well.

    .venv/bin/python bench/low_resource.py                 # full run
    .venv/bin/python bench/low_resource.py --quick --out /tmp/low_resource.json

Writes bench/results/low_resource.json and the curve bench/results/low_resource.png.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from fractions import Fraction
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (MB, balanced_order, environment, fresh_model, gpt_config,  # noqa: E402
                          parse_args, pooled_median, ratio_with_interval, result_path, trim,
                          write_json)
from bmray.models.compress.streaming import (StreamConfig, kv_cache_reserve,  # noqa: E402
                                             plan_for, stream_model)
from bmray.models.generation import GenerationConfig, generate  # noqa: E402
from bmray.models.typed_config import ConfigError  # noqa: E402

RESIDENT = "all-resident"


def run_name(fraction: str, int8: bool, store: str, prefetch: bool) -> str:
    return f"{fraction} {'int8' if int8 else 'fp32'} {store} {'prefetch' if prefetch else 'sync'}"


def model_bytes(model: torch.nn.Module) -> int:
    """Weights of the model, a tied matrix once."""
    seen = {t.data_ptr(): t.numel() * t.element_size()
            for t in list(model.parameters()) + list(model.buffers())}
    return sum(seen.values())


def timed_generations(model: torch.nn.Module, prompt: torch.Tensor, cfg: GenerationConfig,
                      gens: int) -> tuple[list[float], torch.Tensor]:
    """One warm-up generation, then ``gens`` timed ones: (seconds each, the last tokens)."""
    out = generate(model, prompt, cfg)
    times = []
    for _ in range(gens):
        t0 = time.perf_counter()
        out = generate(model, prompt, cfg)
        times.append(time.perf_counter() - t0)
    return times, out


def one_run(spec: dict[str, Any], ref: torch.nn.Module, prompt: torch.Tensor,
            gen_cfg: GenerationConfig, gens: int, device: str) -> dict[str, Any]:
    """Build the streamed copy of ``ref`` for ``spec``, time it, close it."""
    trim()
    process = psutil.Process()
    before = process.memory_info().rss
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if on_gpu else 0
    if spec["name"] == RESIDENT:
        model = copy.deepcopy(ref).to(device)
        times, out = timed_generations(model, prompt, gen_cfg, gens)
        gpu_peak = torch.cuda.max_memory_allocated() - gpu_before if on_gpu else None
        del model
        return {"times": times, "tokens": out.cpu(), "gpu_peak_delta": gpu_peak}
    cfg = StreamConfig(spec["memory_limit"], int8_resident=spec["int8"],
                       prefetch=spec["prefetch"], store=spec["store"],
                       cache_reserve=spec["cache_reserve"], device=device)
    streamed = stream_model(copy.deepcopy(ref), cfg)
    try:
        trim()
        streamed.reset_peak()
        times, out = timed_generations(streamed, prompt, gen_cfg, gens)
        return {"times": times, "tokens": out.cpu(), "peak_bytes": streamed.peak_bytes,
                "gpu_peak_delta": (torch.cuda.max_memory_allocated() - gpu_before
                                   if on_gpu else None),
                "rss_delta": streamed.peak_rss - before,
                "resident_bytes": streamed.resident_bytes,
                "buffer_bytes": streamed.buffer_bytes,
                "resident_blocks": len(streamed.plan.resident),
                "streamed_blocks": len(streamed.plan.streamed)}
    finally:
        streamed.close()
        del streamed


def plot(path: str, fractions: list[str], table: dict[str, Any], title: str) -> None:
    """Throughput relative to all-resident against the budget, one line per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [float(Fraction(f)) for f in fractions]
    variants = sorted({row["variant"] for row in table.values() if "variant" in row})
    for variant in variants:
        pts = [(float(Fraction(row["fraction"])), row["ratio"]["ratio"])
               for row in table.values() if row.get("variant") == variant and "ratio" in row]
        if pts:
            pts.sort()
            style = "-" if "prefetch" in variant else "--"
            marker = "o" if "host" in variant else "s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker,
                    label=variant)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, fractions)
    ax.set_xlabel("weight budget (fraction of the model's bytes; + KV-cache reserve)")
    ax.set_ylabel("tokens/s ÷ all-resident")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=320)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=24, help="new tokens per generation")
    ap.add_argument("--gens", type=int, default=2, help="timed generations per run per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fractions", nargs="+", default=["1/8", "1/4", "1/2", "1"])
    ap.add_argument("--stores", nargs="+", default=["host", "disk"])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (blocks run on the GPU)")
    ap.add_argument("--out", default=result_path(__file__, "low_resource.json"))
    ap.add_argument("--png", default=None, help="default: the JSON path with .png")
    args = parse_args(ap, {"d_model": 64, "layers": 8, "vocab": 256, "new": 4, "gens": 1,
                           "rounds": 1})
    torch.set_num_threads(args.threads)
    t_start = time.time()
    seq = args.prompt + args.new
    model_cfg = gpt_config(args.vocab, args.d_model, args.layers, seq)
    ref = fresh_model(model_cfg).eval()
    total = model_bytes(ref)
    reserve = kv_cache_reserve(args.layers, args.batch, seq, args.d_model)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    gen_cfg = GenerationConfig(max_new_tokens=args.new)

    specs: dict[str, dict[str, Any]] = {RESIDENT: {"name": RESIDENT}}
    skipped: dict[str, Any] = {}
    for fraction in args.fractions:
        limit = int(Fraction(fraction) * total) + reserve
        for int8 in (True, False):
            for store in args.stores:
                for prefetch in (True, False):
                    name = run_name(fraction, int8, store, prefetch)
                    spec = {"name": name, "fraction": fraction, "memory_limit": limit,
                            "int8": int8, "store": store, "prefetch": prefetch,
                            "cache_reserve": reserve,
                            "variant": f"{'int8' if int8 else 'fp32'} {store} "
                                       f"{'prefetch' if prefetch else 'sync'}"}
                    try:        # the plan alone: a budget below the buffer is refused early
                        plan = plan_for(ref, StreamConfig(limit, int8_resident=int8,
                                                          prefetch=prefetch, store=store,
                                                          cache_reserve=reserve))
                        specs[name] = {**spec, "minimum_limit": plan.minimum_limit}
                    except ConfigError as exc:
                        skipped[name] = {**spec, "error": str(exc)}

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
    for name in balanced_order(list(specs), args.rounds):
        runs[name].append(one_run(specs[name], ref, prompt, gen_cfg, args.gens, args.device))

    ref_tokens = runs[RESIDENT][0]["tokens"]
    ref_times = [r["times"] for r in runs[RESIDENT]]
    new_tokens = args.batch * args.new
    table: dict[str, Any] = {}
    for name, rs in runs.items():
        times = [r["times"] for r in rs]
        med = pooled_median(times)
        row: dict[str, Any] = {"median_s": med, "tokens_per_s": new_tokens / med,
                               "times_s": times}
        if name == RESIDENT and args.device != "cpu":
            row["gpu_peak_delta_mb"] = max(r["gpu_peak_delta"] for r in rs) / MB
        if name != RESIDENT:
            spec = specs[name]
            same = [bool(torch.equal(r["tokens"], ref_tokens)) for r in rs]
            if not spec["int8"]:
                assert all(same), f"{name}: streamed fp32 tokens differ from the resident model's"
            agree = statistics.mean(float((r["tokens"] == ref_tokens).float().mean()) for r in rs)
            row.update({k: spec[k] for k in ("fraction", "memory_limit", "minimum_limit", "int8",
                                             "store", "prefetch", "variant")},
                       ratio=ratio_with_interval(ref_times, times),
                       tokens_equal_resident=all(same), token_agreement=agree,
                       peak_bytes=max(r["peak_bytes"] for r in rs),
                       within_limit=all(r["peak_bytes"] <= spec["memory_limit"] for r in rs),
                       rss_delta_mb=statistics.median(r["rss_delta"] for r in rs) / MB,
                       gpu_peak_delta_mb=(max(r["gpu_peak_delta"] for r in rs) / MB
                                          if args.device != "cpu" else None),
                       resident_mb=rs[0]["resident_bytes"] / MB,
                       buffer_mb=rs[0]["buffer_bytes"] / MB,
                       resident_blocks=rs[0]["resident_blocks"],
                       streamed_blocks=rs[0]["streamed_blocks"],
                       model_over_limit=total / spec["memory_limit"])
        table[name] = row

    title = (f"GPT d{args.d_model} x{args.layers} blocks ({total / MB:.0f} MB fp32), greedy "
             f"batch {args.batch}, {args.prompt}+{args.new} tokens, {args.threads} thread(s)")
    print(f"\n{title}; memory_limit = fraction x model + KV reserve {reserve / MB:.1f} MB; "
          f"'x resident' = resident median time / run's, 90% bootstrap interval over "
          f"{args.rounds} rounds")
    print(f"{'run':32s} {'limit MB':>8s} {'model/lim':>9s} {'res/str':>7s} {'tok/s':>7s} "
          f"{'x resident':>10s} {'90% interval':>13s} {'peak MB':>8s} {'RSS+ MB':>8s} "
          f"{'=res':>5s}")
    for name, row in table.items():
        if name == RESIDENT:
            print(f"{name:32s} {'':>8s} {'':>9s} {'':>7s} {row['tokens_per_s']:7.1f} "
                  f"{1.0:10.3f}")
            continue
        r = row["ratio"]
        print(f"{name:32s} {row['memory_limit'] / MB:8.1f} {row['model_over_limit']:9.1f} "
              f"{row['resident_blocks']:3d}/{row['streamed_blocks']:<3d} "
              f"{row['tokens_per_s']:7.1f} {r['ratio']:10.3f} "
              f"{r['interval'][0]:6.3f}–{r['interval'][1]:6.3f} {row['peak_bytes'] / MB:8.1f} "
              f"{row['rss_delta_mb']:8.1f} {'yes' if row['tokens_equal_resident'] else 'no':>5s}")
    for name, row in skipped.items():
        print(f"{name:32s} refused: {row['error'][:110]}")
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    plot(png, args.fractions, table, title)
    write_json(args.out, {
        "bench": "low_resource", "args": vars(args), "model": model_cfg.__dict__,
        "model_bytes": total, "kv_cache_reserve": reserve,
        "reference": "the same model all-resident, plain bmray.models.generation.generate",
        "runs": table, "refused": skipped, "png": png,
        "method": "memory_limit = fraction x model bytes + kv_cache_reserve; peak_bytes = the "
                  "streamed model's accounting; rss_delta_mb = peak RSS sampled at every block "
                  "above the RSS before the run was built (median over rounds)",
        "wall_s": time.time() - t_start, **environment()})
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
