"""Generation throughput: our KV-cache greedy decoding against Hugging Face ``generate``.

Work: one GPT of ours (``--layers`` x ``--d-model``, vocabulary ``--vocab``, GPT-2 init, fp32)
and the same weights exported to ``transformers.GPT2LMHeadModel`` (``export_gpt2``; equal logits
are a test). Each side generates ``--new-tokens`` greedy tokens (no eos: every call does the same
work) for a batch of prompts: batch 1 (one prompt of ``--prompt-len`` tokens) and batch 8
(8 prompts of different lengths, ``--prompt-len`` / 4 .. ``--prompt-len``, left padded with an
attention mask, as HF requires for decoder-only batches).

Sides:
- ``bmray``: ``bmray.models.generation.generate`` (strategy greedy, use_cache).
- ``transformers``: ``GPT2LMHeadModel.generate(input_ids, attention_mask=, do_sample=False,
  num_beams=1, use_cache=True, max_new_tokens=, eos_token_id=None)`` with its default (sdpa)
  attention and DynamicCache: the library's recommended configuration for CPU greedy decoding.

Timing: ``--threads`` torch threads (1 by default); per batch size the sides alternate in rounds
(``bench.common.balanced_order``), each round one warm-up call then ``--steps`` timed calls.
tokens/s = batch x new tokens / call time; "× HF" = our tokens/s over HF's (HF's median call
time / ours), with a 90% bootstrap interval over rounds. Both sides' tokens are compared
(fp32 greedy; a differing row would mean a near-tie, reported as a fraction).

    .venv/bin/python bench/generation.py                 # full run
    .venv/bin/python bench/generation.py --quick --out /tmp/generation.json

Goal: ≥ 1.0 × transformers' tokens/s at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (balanced_order, environment, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, result_path, write_json)
from bmray.models.config import ModelConfig  # noqa: E402
from bmray.models.families.gpt import GPT  # noqa: E402
from bmray.models.families.hf_gpt2 import export_gpt2  # noqa: E402
from bmray.models.generation import GenerationConfig, generate, pad_prompts  # noqa: E402

warnings.filterwarnings("ignore")
OURS, HF = "bmray", "transformers"
Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prompt_batch(batch: int, prompt_len: int, vocab: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random prompts; batch 1 has ``prompt_len`` tokens, larger batches lengths spread
    evenly over [prompt_len / 4, prompt_len], left padded."""
    g = torch.Generator().manual_seed(seed)
    if batch == 1:
        lengths = [prompt_len]
    else:
        lo = max(1, prompt_len // 4)
        lengths = [lo + (prompt_len - lo) * i // (batch - 1) for i in range(batch)]
    prompts = [torch.randint(7, vocab, (n,), generator=g).tolist() for n in lengths]
    return pad_prompts(prompts, pad_id=0)


def sides(model: GPT, hf: transformers.GPT2LMHeadModel, new_tokens: int) -> dict[str, Generate]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, strategy="greedy", use_cache=True,
                           eos_id=None, pad_id=0)

    def ours(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return generate(model, ids, cfg, attention_mask=mask)

    def theirs(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hf.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True,
                           max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)

    return {OURS: ours, HF: theirs}


def time_sides(fns: dict[str, Generate], ids: torch.Tensor, mask: torch.Tensor, rounds: int,
               steps: int) -> dict[str, list[list[float]]]:
    times: dict[str, list[list[float]]] = {s: [] for s in fns}
    for name in balanced_order(list(fns), rounds):
        fn = fns[name]
        fn(ids, mask)                                      # warm-up after the switch
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn(ids, mask)
            samples.append(time.perf_counter() - t0)
        times[name].append(samples)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed calls per side per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=result_path(__file__, "generation.json"))
    args = parse_args(ap, {"rounds": 2, "steps": 1, "layers": 2, "d_model": 128, "heads": 4,
                           "new_tokens": 16})
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc = ModelConfig(family="gpt", vocab_size=args.vocab, d_model=args.d_model,
                     n_heads=args.heads, n_layers=args.layers, d_ff=4 * args.d_model,
                     max_seq_len=args.prompt_len + args.new_tokens, dropout=0.0)
    model = GPT(mc).eval()
    hf = export_gpt2(model)
    fns = sides(model, hf, args.new_tokens)

    runs, table = {}, []
    for batch in args.batch:
        ids, mask = prompt_batch(batch, args.prompt_len, args.vocab, seed=batch)
        with torch.inference_mode():
            a, b = fns[OURS](ids, mask), fns[HF](ids, mask)
        same = (a == b).all(dim=1).float().mean().item() if a.shape == b.shape else 0.0
        times = time_sides(fns, ids, mask, args.rounds, args.steps)
        tokens = batch * args.new_tokens
        rows = {n: {"median_s": pooled_median(times[n]),
                    "tokens_per_s": tokens / pooled_median(times[n])} for n in fns}
        ratio = ratio_with_interval(times[HF], times[OURS])
        runs[f"batch{batch}"] = {"batch": batch, "prompt_lengths": mask.sum(1).tolist(),
                                 "new_tokens": args.new_tokens, "call_s": times, "rows": rows,
                                 "ours_vs_hf": ratio, "same_tokens_fraction": same}
        table.append((batch, rows, ratio, same))

    print(f"\nGPT {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, fp32, "
          f"{args.threads} thread(s); greedy, {args.new_tokens} new tokens, prompts up to "
          f"{args.prompt_len} tokens (batch > 1: different lengths, left padded); {args.rounds} "
          f"rounds x {args.steps} calls, alternating; '× HF' = our tokens/s / HF's, 90% "
          f"bootstrap interval over rounds")
    print(f"{'batch':>5s} {'side':13s} {'call ms':>9s} {'tokens/s':>9s} {'× HF':>6s} "
          f"{'90% interval':>13s} {'same tokens':>11s}")
    for batch, rows, ratio, same in table:
        for n in fns:
            r = rows[n]
            low, high = ratio["interval"]
            extra = (f"{ratio['ratio']:6.3f} {low:6.3f}–{high:6.3f}" if n == OURS
                     else f"{'':6s} {'':13s}")
            print(f"{batch:5d} {n:13s} {1e3 * r['median_s']:9.1f} {r['tokens_per_s']:9.1f} "
                  f"{extra} {same:11.2f}")
    met = all(r["ours_vs_hf"]["ratio"] >= 1.0 for r in runs.values())
    print(f"goal ≥ 1.0 × transformers' tokens/s at every batch → "
          f"{'met' if met else 'NOT met'}")
    write_json(args.out, {
        "bench": "generation", "args": vars(args),
        "model": {"ModelConfig": vars(mc) | {"moe": None}, "parameters":
                  sum(p.numel() for p in model.parameters())},
        "ours_config": "bmray.models.generation.generate, GenerationConfig(strategy='greedy', "
                       "use_cache=True, eos_id=None), torch.no_grad",
        "peer_config": "GPT2LMHeadModel (export_gpt2 of the same weights, sdpa attention).generate("
                       "do_sample=False, num_beams=1, use_cache=True, max_new_tokens=new_tokens, "
                       "eos_token_id=None, pad_token_id=0)",
        "runs": runs, "goal_met": met, "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
