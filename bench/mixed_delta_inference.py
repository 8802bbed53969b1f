"""Mixed-delta batch inference on one MiniLM: bmray's ``DeltaModel.mixed`` against PEFT.

Eight LoRA deltas (rank r, alpha, on ``query`` and ``value``; A Kaiming-uniform, B drawn
N(0, 0.05) so every delta changes the output) on one all-MiniLM-L6-v2 ``BertModel`` (dropout 0,
eval, ``torch.inference_mode``). A batch of ``--batch`` rows × ``--seq`` word pieces of AG News,
each row assigned one of the eight deltas at random (seeded). The same weights on both sides:
ours are copied into PEFT's eight adapters (``get_peft_model`` + ``add_adapter``). Sides:

* ``bmray mixed``: ``with model.mixed(assignment): model(**batch)`` — one forward;
* ``PEFT mixed``: ``model(**batch, adapter_names=assignment)`` — PEFT's per-sample LoRA, one
  forward (its recommended way to serve several LoRA adapters in one batch);
* ``PEFT one after another``: each delta's rows as a sub-batch with ``set_adapter(name)``,
  outputs put back in row order (what one does without per-sample routing);
* ``bmray one after another``: the same with ``mixed([name] * rows)`` per sub-batch;
* ``bmray mixed methods``: ours only (PEFT cannot mix methods in a batch): 8 deltas of three
  methods — 3 LoRA (as above), 3 parallel bottleneck adapters on ``attention.output.dense``
  (bottleneck 16, up-projection drawn N(0, 0.05)), 2 prefixes (length 10, finalised) — one
  forward; and ``bmray mixed methods, one after another``, the same deltas per sub-batch.

Before timing, every side's output must agree (allclose, 1e-4) with PEFT's mixed output (the
LoRA sides) or with the sub-batches run one after another (the mixed-methods side).

Timing: one process, torch on 1 thread; the sides alternate forward by forward (A B C ..., so
every side is measured next to every other, minutes apart from none) in rounds whose order
rotates (``bench.common.balanced_order``); each round one untimed pass then ``--steps`` timed.
"× PEFT mixed" = PEFT mixed's median forward time / the side's (> 1: faster), with a 90%
bootstrap interval over rounds; quote ratios, not times (shared, noisy machine).

    .venv/bin/python bench/mixed_delta_inference.py
    .venv/bin/python bench/mixed_delta_inference.py --quick --out /tmp/mixed.json

Goal: ``bmray mixed`` ≥ 1.0 × ``PEFT mixed``.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

import peft
import torch
import transformers
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (environment, balanced_order, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, write_json)
from bench.lora_finetune import (AGNEWS, REPO, agnews_batches, copy_lora_into_peft,  # noqa: E402
                                 interval_summary, load_minilm, peft_lora_layers)
from bmray.models.delta.adapter import AdapterConfig  # noqa: E402
from bmray.models.delta.lora import LoraConfig  # noqa: E402
from bmray.models.delta.model import DeltaModel  # noqa: E402
from bmray.models.delta.prefix import PrefixConfig  # noqa: E402

N_DELTAS = 8
PEER = "PEFT mixed"
GOAL_SIDE = "bmray mixed"


def lora_config(args: Any) -> LoraConfig:
    return LoraConfig(targets=("query", "value"), rank=args.rank, alpha=args.alpha)


def lora_model(base: nn.Module, args: Any, names: list[str]) -> DeltaModel:
    """Our DeltaModel with one LoRA delta per name, B drawn N(0, 0.05) (seeded)."""
    model = DeltaModel(copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    for name in names:
        delta = model.add(name, lora_config(args))
        with torch.no_grad():
            for site in delta.sites.values():
                site.B.normal_(0, 0.05, generator=g)
    return model.eval()


def peft_model(base: nn.Module, args: Any, ours: DeltaModel, names: list[str]) -> nn.Module:
    """PEFT's model with one adapter per name, A and B copied from ``ours``."""
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["query", "value"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    layers = peft_lora_layers(model)
    for name in names:
        copy_lora_into_peft(dict(ours.get(name).sites.items()), layers, name)
    return model.eval()


def methods_model(base: nn.Module, args: Any, names: list[str]) -> DeltaModel:
    """3 LoRA, 3 parallel adapters, 2 prefixes (non-zero, seeded) on one base."""
    model = DeltaModel(copy.deepcopy(base))
    g = torch.Generator().manual_seed(2)
    for i, name in enumerate(names):
        if i < 3:
            delta = model.add(name, lora_config(args))
            params = [s.B for s in delta.sites.values()]
        elif i < 6:
            delta = model.add(name, AdapterConfig(targets=("attention.output.dense",),
                                                  bottleneck=16, style="parallel"))
            params = [s.up.weight for s in delta.sites.values()]
        else:
            delta = model.add(name, PrefixConfig(length=10, reparam_hidden=0))
            params = []
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05, generator=g)
    return model.eval()


def groups(assignment: list[str]) -> dict[str, torch.Tensor]:
    """delta name → its rows (in order of first appearance)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(assignment):
        out.setdefault(name, []).append(i)
    return {n: torch.tensor(r) for n, r in out.items()}


def one_after_another(run: Callable[[str, dict], torch.Tensor], batch: dict,
                      assignment: list[str]) -> torch.Tensor:
    """Each delta's rows as a sub-batch through ``run(name, sub_batch)``, back in row order."""
    out = None
    for name, rows in groups(assignment).items():
        sub = {k: v.index_select(0, rows) for k, v in batch.items()}
        h = run(name, sub)
        if out is None:
            out = h.new_empty((len(assignment),) + h.shape[1:])
        out.index_copy_(0, rows, h)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed forwards per side per round")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(REPO, "bench/results/mixed_delta_inference.json"))
    args = parse_args(ap, {"rounds": 6, "steps": 1})
    torch.set_num_threads(1)
    t_start = time.time()

    base, tokenizer = load_minilm()
    raw = agnews_batches(tokenizer, args.batch, args.seq, 1)[0]
    batch = {"input_ids": raw["input_ids"], "attention_mask": raw["attention_mask"]}
    names = [f"d{i}" for i in range(N_DELTAS)]
    rng = random.Random(0)
    assignment = [rng.choice(names) for _ in range(args.batch)]

    ours = lora_model(base, args, names)
    theirs = peft_model(base, args, ours, names)
    mixed_methods = methods_model(base, args, names)

    def ours_mixed() -> torch.Tensor:
        with ours.mixed(assignment):
            return ours(**batch).last_hidden_state

    def peft_mixed() -> torch.Tensor:
        return theirs(**batch, adapter_names=assignment).last_hidden_state

    def peft_run(name: str, sub: dict) -> torch.Tensor:
        theirs.set_adapter(name)
        return theirs(**sub).last_hidden_state

    def ours_run(model: DeltaModel) -> Callable[[str, dict], torch.Tensor]:
        def run(name: str, sub: dict) -> torch.Tensor:
            with model.mixed([name] * sub["input_ids"].shape[0]):
                return model(**sub).last_hidden_state
        return run

    def methods_mixed() -> torch.Tensor:
        with mixed_methods.mixed(assignment):
            return mixed_methods(**batch).last_hidden_state

    sides: dict[str, Callable[[], torch.Tensor]] = {
        GOAL_SIDE: ours_mixed,
        PEER: peft_mixed,
        "PEFT one after another": lambda: one_after_another(peft_run, batch, assignment),
        "bmray one after another": lambda: one_after_another(ours_run(ours), batch, assignment),
        "bmray mixed methods": methods_mixed,
        "bmray mixed methods, one after another":
            lambda: one_after_another(ours_run(mixed_methods), batch, assignment),
    }
    lora_sides = list(sides)[:4]

    with torch.inference_mode():
        outs = {name: fn() for name, fn in sides.items()}
        bare = base(**batch).last_hidden_state
        check = {}
        for name in lora_sides:
            err = (outs[name] - outs[PEER]).abs().max().item()
            torch.testing.assert_close(outs[name], outs[PEER], rtol=1e-4, atol=1e-4)
            check[name] = {"vs": PEER, "max_abs_diff": err}
        ref = outs["bmray mixed methods, one after another"]
        torch.testing.assert_close(outs["bmray mixed methods"], ref, rtol=1e-4, atol=1e-4)
        check["bmray mixed methods"] = {
            "vs": "bmray mixed methods, one after another",
            "max_abs_diff": (outs["bmray mixed methods"] - ref).abs().max().item()}
        check["deltas_change_output"] = {
            "min_row_max_abs_change_vs_base":
                (outs[PEER] - bare).abs().amax(dim=(1, 2)).min().item(),
            "mixed_methods_min_row_change":
                (outs["bmray mixed methods"] - bare).abs().amax(dim=(1, 2)).min().item()}
        assert check["deltas_change_output"]["min_row_max_abs_change_vs_base"] > 1e-3
        assert check["deltas_change_output"]["mixed_methods_min_row_change"] > 1e-3

        times: dict[str, list[list[float]]] = {s: [] for s in sides}
        order = balanced_order(list(sides), args.rounds)
        for r in range(args.rounds):
            rotation = order[r * len(sides):(r + 1) * len(sides)]
            for name in rotation:
                times[name].append([])
            for step in range(args.steps + 1):               # step 0: untimed warm-up
                for name in rotation:
                    t0 = time.perf_counter()
                    sides[name]()
                    if step:
                        times[name][-1].append(time.perf_counter() - t0)

    peer_t = times[PEER]
    rows = []
    for name in sides:
        r = ratio_with_interval(peer_t, times[name])
        paired = interval_summary([statistics.median(p) / statistics.median(o)
                                   for o, p in zip(times[name], peer_t)])
        rows.append({"side": name, "like_for_like": name in lora_sides,
                     "median_forward_s": pooled_median(times[name]),
                     "rows_per_s": args.batch / pooled_median(times[name]),
                     "ratio_vs_peft_mixed": r["ratio"], "interval": r["interval"],
                     "paired_round_ratio": paired, "forward_s": times[name]})
    seq_ratio = ratio_with_interval(times["PEFT one after another"], times[GOAL_SIDE])
    meth_seq = ratio_with_interval(times["bmray mixed methods, one after another"],
                                   times["bmray mixed methods"])

    print(f"\nMiniLM BertModel, {N_DELTAS} LoRA deltas r={args.rank} alpha={args.alpha:g} on "
          f"query+value, batch {args.batch}x{args.seq} AG News, each row a random delta "
          f"({len(groups(assignment))} used), inference_mode, 1 thread; {args.rounds} rotating "
          f"rounds x {args.steps} forwards, interleaved; '× PEFT mixed' = PEFT mixed median / "
          f"the side's, 90% bootstrap interval over rounds; '†' = ours only (mixed methods), "
          f"not like for like")
    print(f"{'side':40s} {'rows/s':>7s} {'× PEFT mixed':>12s} {'90% interval':>14s} "
          f"{'paired p05–p95':>15s}")
    for r in rows:
        mark = " " if r["like_for_like"] else "†"
        print(f"{mark}{r['side']:39s} {r['rows_per_s']:7.1f} {r['ratio_vs_peft_mixed']:12.3f} "
              f"{r['interval'][0]:6.3f}–{r['interval'][1]:6.3f} "
              f"{r['paired_round_ratio']['p05']:7.3f}–{r['paired_round_ratio']['p95']:6.3f}")
    goal = next(r for r in rows if r["side"] == GOAL_SIDE)
    met = goal["ratio_vs_peft_mixed"] >= 1.0
    print(f"goal: bmray mixed ≥ 1.0 × PEFT mixed → {'met' if met else 'NOT met'}"
          f"{' (interval above 1)' if goal['interval'][0] >= 1.0 else ''} "
          f"({goal['ratio_vs_peft_mixed']:.3f}); bmray mixed vs PEFT one after another: "
          f"{seq_ratio['ratio']:.3f} ({seq_ratio['interval'][0]:.3f}–"
          f"{seq_ratio['interval'][1]:.3f}); mixed methods vs their one-after-another: "
          f"{meth_seq['ratio']:.3f} ({meth_seq['interval'][0]:.3f}–"
          f"{meth_seq['interval'][1]:.3f})")
    write_json(args.out, {
        "bench": "mixed_delta_inference", "args": vars(args),
        "model": "all-MiniLM-L6-v2 BertModel (dropout 0, eval, inference_mode)", "data": AGNEWS,
        "assignment": assignment, "deltas": names,
        "peer_config": {"peft.get_peft_model + add_adapter x7": {"LoraConfig": {
            "r": args.rank, "lora_alpha": args.alpha, "target_modules": ["query", "value"],
            "lora_dropout": 0.0}}, "forward": "model(**batch, adapter_names=assignment)",
            "peft": peft.__version__},
        "ours_config": {"DeltaModel.add x8": {"LoraConfig": {
            "targets": ["query", "value"], "rank": args.rank, "alpha": args.alpha}},
            "forward": "with model.mixed(assignment): model(**batch)"},
        "mixed_methods_deltas": {"d0-d2": "lora (as above)",
                                 "d3-d5": "adapter parallel, attention.output.dense, bottleneck 16",
                                 "d6-d7": "prefix length 10, reparam_hidden 0"},
        "output_check": check, "rows": rows,
        "ratio_vs_peft_one_after_another": seq_ratio,
        "mixed_methods_ratio_vs_one_after_another": meth_seq,
        "goal": {"side": GOAL_SIDE, "peer": PEER, "ratio": 1.0, "met": met,
                 "interval_above": goal["interval"][0] >= 1.0},
        "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
