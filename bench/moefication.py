"""MoEfication of the offline MiniLM: FFN compute used against quality kept, and FFN wall clock.

all-MiniLM-L6-v2 (``BertModel``, dropout 0, eval; 6 layers, d_ff 1536, GELU). For each E in
``--experts`` every layer's FFN is MoEfied (``bmray.models.compress.moefy``: balanced k-means
over W1's rows) once; then for each k / E in ``--fractions`` every site gets top_k = k and a
freshly initialised router (seeded) trained on the FFN inputs of calibration sentences (AG News
+ TREC train questions, disjoint from everything evaluated). Per variant:

* FFN compute fraction k / E, and the router's multiply-adds as a fraction of the dense FFN's;
* router recall: share of the ground-truth top-k experts the router picks, on the FFN inputs
  of held-out AG News sentences, mean over the 6 layers (chance = k / E);
* quality retained vs the original model, with the router and with the paper's ground-truth
  ("oracle") selection: cosine of the mean-pooled, normalised sentence embeddings to the
  original's on held-out AG News sentences (mean, min); and the task accuracy of a logistic
  regression probe (torch, LBFGS, fixed seed) trained once on the ORIGINAL model's embeddings
  of a TREC train sample (6 coarse classes) and evaluated on the variant's embeddings of TREC
  test, as a ratio to the original's accuracy (the probe is not retrained per variant);
* FFN wall clock: one MoEfied FFN (layer ``--time-layer``, router included) on
  ``--time-tokens`` real held-out tokens against the original dense FFN (intermediate.dense →
  GELU → output.dense). One process, torch on 1 thread, all variants and the dense FFN
  interleaved call by call in rounds whose order rotates (``bench.common.balanced_order``), one
  untimed call then ``--steps`` timed per turn. "× dense" = dense median / variant median (> 1:
  faster) with a 90% bootstrap interval over rounds (``bench.common``); quote ratios, not times.

    .venv/bin/python bench/moefication.py                        # full run
    .venv/bin/python bench/moefication.py --quick --out /tmp/moefication.json

Goal (the paper, Zhang et al. 2022, on ReLU models): 10–30% of the FFN at > 95% of the quality.
The MiniLM is a GELU model without the paper's ReLU conversion; docs/compression.md discusses it.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import matplotlib
import torch
import torch.nn.functional as F
import transformers
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (environment, balanced_order, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, write_json)
from bench.lora_finetune import REPO, interval_summary, load_minilm  # noqa: E402
from bmray.models.compress.moefy import (MoefiedFFN, MoefyConfig, capture_inputs,  # noqa: E402
                                         expert_recall, moefy, train_router)
from bmray.models.data.classification import load_agnews, load_trec  # noqa: E402

GOAL_FRACTION, GOAL_QUALITY = 0.30, 0.95


# ---------------------------------------------------------------- data and embeddings

def tokenised(tokenizer: Any, texts: list[str], batch: int, max_len: int
              ) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """``texts`` as padded batches, sorted by length (little padding); the order used, so
    outputs can be put back in the texts' order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for s in range(0, len(order), batch):
        enc = tokenizer([texts[i] for i in order[s:s + batch]], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out, order


@torch.no_grad()
def embed(model: nn.Module, data: tuple[list[dict[str, torch.Tensor]], list[int]]) -> torch.Tensor:
    """Mean-pooled (real tokens only), L2-normalised last hidden states, in the texts' order."""
    batches, order = data
    parts = []
    for b in batches:
        h = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        parts.append(F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    emb = torch.cat(parts)
    out = torch.empty_like(emb)
    out[torch.tensor(order)] = emb
    return out


# ---------------------------------------------------------------- the probe

class Probe:
    """Multinomial logistic regression on standardised embeddings: weights and the
    standardisation fitted once on the original model's embeddings, then frozen."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int,
                 seed: int):
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        torch.manual_seed(seed)
        self.linear = nn.Linear(x.size(1), classes)
        z = (x - self.mean) / self.std
        opt = torch.optim.LBFGS(self.linear.parameters(), lr=1.0, max_iter=iters,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self.linear(z), y) + l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.train_accuracy = self.accuracy(x, y)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.linear((x - self.mean) / self.std).argmax(-1) == y).float().mean().item()


# ---------------------------------------------------------------- selections

@contextmanager
def oracle_selection(sites: dict[str, MoefiedFFN]) -> Iterator[None]:
    """Every site runs the paper's ground-truth top-k (largest summed positive activation)
    instead of its router: a forward pre-hook passes ``experts=`` explicitly."""

    def hook(mod: MoefiedFFN, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens = args[0].reshape(-1, args[0].size(-1))
        return args, {**kwargs,
                      "experts": mod.expert_scores(tokens).topk(mod.top_k, dim=-1).indices}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in sites.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reset_router(ffn: MoefiedFFN, seed: int) -> None:
    """The router's own initialisation again, seeded, so every k trains from the same start."""
    torch.manual_seed(seed)
    for mod in ffn.router.modules():
        if isinstance(mod, nn.Linear):
            mod.reset_parameters()


def router_macs(ffn: MoefiedFFN) -> int:
    return sum(m.in_features * m.out_features for m in ffn.router.modules()
               if isinstance(m, nn.Linear))


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = (a * b).sum(-1)            # both normalised
    return {"mean": cos.mean().item(), "min": cos.min().item()}


# ---------------------------------------------------------------- the plot

def plot(runs: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for E in sorted({r["num_experts"] for r in runs}):
        rs = [r for r in runs if r["num_experts"] == E]
        fr = [r["compute_fraction"] for r in rs]
        for sel, style in (("router", "-o"), ("oracle", "--s")):
            axes[0].plot(fr, [r[sel]["cosine_agnews"]["mean"] for r in rs], style,
                         label=f"E={E}, {sel}")
            axes[1].plot(fr, [r[sel]["accuracy_ratio"] for r in rs], style, label=f"E={E}, {sel}")
        t = [r["ffn_speedup"] for r in rs]
        axes[2].errorbar(fr, [x["ratio"] for x in t],
                         yerr=[[x["ratio"] - x["interval"][0] for x in t],
                               [x["interval"][1] - x["ratio"] for x in t]],
                         fmt="-o", capsize=3, label=f"E={E} (router incl.)")
    for ax, title in zip(axes, ("cosine to the original (AG News, mean)",
                                "TREC probe accuracy / original's",
                                "FFN speed × dense (1 thread, 90% interval)")):
        ax.set_xlabel("FFN compute fraction k / E")
        ax.set_title(title, fontsize=10)
        ax.axvspan(0.10, GOAL_FRACTION, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(GOAL_QUALITY, color="r", lw=0.8)
    axes[1].axhline(GOAL_QUALITY, color="r", lw=0.8)
    axes[2].axhline(1.0, color="k", lw=0.8)
    fr = sorted({r["compute_fraction"] for r in runs})
    axes[2].plot(fr, [1 / f for f in fr], ":", color="0.5", label="ideal: E / k")
    axes[2].set_ylim(0, max(2.5, max(r["ffn_speedup"]["interval"][1] for r in runs) * 1.1))
    axes[2].legend(fontsize=8)
    fig.suptitle("MoEfication of all-MiniLM-L6-v2 (grey: the paper's 10–30% of the FFN; "
                 "red: 95% kept)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--router", default="mlp")
    ap.add_argument("--router-hidden", type=int, default=128)
    ap.add_argument("--router-steps", type=int, default=400)
    ap.add_argument("--router-lr", type=float, default=1e-3)
    ap.add_argument("--kmeans-iters", type=int, default=15)
    ap.add_argument("--calib-agnews", type=int, default=512, help="calibration AG News sentences")
    ap.add_argument("--calib-trec", type=int, default=512, help="calibration TREC train questions")
    ap.add_argument("--heldout", type=int, default=256, help="held-out AG News sentences")
    ap.add_argument("--probe-train", type=int, default=2000, help="TREC train sample for the probe")
    ap.add_argument("--trec-test", type=int, default=500, help="TREC test questions (max 500)")
    ap.add_argument("--probe-l2", type=float, default=1e-3)
    ap.add_argument("--probe-iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--time-layer", type=int, default=3)
    ap.add_argument("--time-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed FFN calls per variant per round")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(REPO, "bench/results/moefication.json"))
    ap.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    args = parse_args(ap, {"experts": [16], "fractions": [0.25, 0.5, 1.0], "router_steps": 60,
                           "kmeans_iters": 2, "calib_agnews": 48, "calib_trec": 48,
                           "heldout": 48, "probe_train": 300, "trec_test": 100,
                           "probe_iters": 100, "time_tokens": 512, "rounds": 3, "steps": 2})
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    torch.set_num_threads(1)
    t_start = time.time()

    # ---- data: disjoint calibration / evaluation sets
    rng = random.Random(args.seed)
    agnews = [e.text_a for e in load_agnews()]
    rng.shuffle(agnews)
    calib_ag = agnews[:args.calib_agnews]
    heldout = agnews[args.calib_agnews:args.calib_agnews + args.heldout]
    trec_train = load_trec("train")
    rng.shuffle(trec_train)
    probe_rows = trec_train[:args.probe_train]
    calib_trec = [e.text_a for e in trec_train[args.probe_train:args.probe_train + args.calib_trec]]
    trec_test = load_trec("test")[:args.trec_test]
    classes = sorted({e.label for e in trec_train})
    y_train = torch.tensor([classes.index(e.label) for e in probe_rows])
    y_test = torch.tensor([classes.index(e.label) for e in trec_test])

    base, tok = load_minilm()
    for p in base.parameters():
        p.requires_grad_(False)
    calib = tokenised(tok, calib_ag + calib_trec, args.batch, args.max_len)[0]
    held = tokenised(tok, heldout, args.batch, args.max_len)
    probe_data = tokenised(tok, [e.text_a for e in probe_rows], args.batch, args.max_len)
    test_data = tokenised(tok, [e.text_a for e in trec_test], args.batch, args.max_len)

    ref_held, ref_test = embed(base, held), embed(base, test_data)
    probe = Probe(embed(base, probe_data), y_train, len(classes), args.probe_l2,
                  args.probe_iters, args.seed)
    base_acc = probe.accuracy(ref_test, y_test)
    print(f"original: probe train acc {probe.train_accuracy:.3f}, TREC test acc {base_acc:.3f} "
          f"({time.time() - t_start:.0f}s)", flush=True)

    # ---- the dense FFN timed: layer time_layer of the original model
    layer = base.encoder.layer[args.time_layer]
    inter, out_dense = layer.intermediate, layer.output.dense

    def dense_ffn(x: torch.Tensor) -> torch.Tensor:
        return out_dense(inter.intermediate_act_fn(inter.dense(x)))

    timed: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": dense_ffn}
    runs: list[dict] = []
    calib_inputs = held_inputs = None
    for E in args.experts:
        t_e = time.time()
        model = copy.deepcopy(base)
        result = moefy(model, MoefyConfig(num_experts=E, top_k=E, router=args.router,
                                          router_hidden=args.router_hidden,
                                          kmeans_iters=args.kmeans_iters, seed=args.seed))
        sites = result.sites
        if calib_inputs is None:        # the original model's FFN inputs: the same for every E
            calib_inputs = capture_inputs(model, calib)
            held_inputs = capture_inputs(model, held[0])
        if sorted(calib_inputs) != sorted(sites):
            raise RuntimeError(f"MoEfied sites differ between E: {sorted(sites)}")
        time_site = f"encoder.layer.{args.time_layer}.output.dense"
        x_time = held_inputs[time_site][:args.time_tokens]
        if x_time.size(0) < args.time_tokens:
            raise SystemExit(f"--time-tokens {args.time_tokens}: only {x_time.size(0)} held-out "
                             f"tokens; raise --heldout")
        print(f"E={E}: moefy {time.time() - t_e:.0f}s", flush=True)
        for frac in args.fractions:
            k = round(frac * E)
            if not 1 <= k <= E or abs(k / E - frac) > 1e-9:
                raise SystemExit(f"--fractions {frac}: k / E must be a whole k in [1, {E}]")
            t_v = time.time()
            for i, (name, ffn) in enumerate(sorted(sites.items())):
                ffn.top_k = k
                if k < E:
                    reset_router(ffn, args.seed + i)
                    train_router(ffn, calib_inputs[name], steps=args.router_steps,
                                 lr=args.router_lr, seed=args.seed)
            train_s = time.time() - t_v
            recall = statistics.mean(expert_recall(f, held_inputs[n]) for n, f in sites.items())
            quality = {}
            for sel in ("router", "oracle"):
                with oracle_selection(sites) if sel == "oracle" else nullcontext():
                    emb_held, emb_test = embed(model, held), embed(model, test_data)
                acc = probe.accuracy(emb_test, y_test)
                quality[sel] = {"cosine_agnews": cosine_stats(emb_held, ref_held),
                                "cosine_trec_test": cosine_stats(emb_test, ref_test),
                                "accuracy": acc, "accuracy_ratio": acc / base_acc}
            label = f"E={E} k={k}"
            timed[label] = copy.deepcopy(sites[time_site]).eval()
            timed[label].dense = k == E          # all experts: no router to run
            ffn0 = next(iter(sites.values()))
            dense_macs = 2 * ffn0.up_weight.numel()
            runs.append({"label": label, "num_experts": E, "expert_size": ffn0.expert_size,
                         "top_k": k, "compute_fraction": result.compute_fraction,
                         "router_fraction": router_macs(ffn0) / dense_macs if k < E else 0.0,
                         "router_recall": recall, **quality, "router_train_s": train_s})
            r = quality["router"]
            print(f"  {label}: recall {recall:.3f} cos {r['cosine_agnews']['mean']:.3f} "
                  f"acc ratio {r['accuracy_ratio']:.3f} | oracle cos "
                  f"{quality['oracle']['cosine_agnews']['mean']:.3f} acc ratio "
                  f"{quality['oracle']['accuracy_ratio']:.3f} ({time.time() - t_v:.0f}s)",
                  flush=True)
        del model, result, sites

    # ---- FFN wall clock, interleaved
    names = list(timed)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    with torch.no_grad():
        for i, name in enumerate(balanced_order(names, args.rounds)):
            fn = timed[name]
            fn(x_time)                                           # untimed, after the switch
            samples = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn(x_time)
                samples.append(time.perf_counter() - t0)
            times[name].append(samples)
    for r in runs:
        r["ffn_speedup"] = ratio_with_interval(times["dense"], times[r["label"]])
        r["ffn_speedup_paired"] = interval_summary(
            [statistics.median(d) / statistics.median(v)
             for d, v in zip(times["dense"], times[r["label"]])])
        r["ffn_median_ms"] = pooled_median(times[r["label"]]) * 1e3
    dense_ms = pooled_median(times["dense"]) * 1e3

    # ---- the table
    print(f"\nMoEfication of all-MiniLM-L6-v2 (6 FFNs, d_ff 1536, GELU), {args.router} router "
          f"({args.router_steps} Adam steps on {len(calib_ag)} AG News + {len(calib_trec)} TREC "
          f"sentences); quality vs the original: cosine of mean-pooled embeddings on "
          f"{len(heldout)} held-out AG News sentences, TREC probe (trained on the original's "
          f"embeddings of {len(probe_rows)} questions; original test acc {base_acc:.3f} on "
          f"{len(trec_test)}) accuracy / original's; FFN time: layer {args.time_layer}, "
          f"{args.time_tokens} tokens, 1 thread, {args.rounds} interleaved rounds x "
          f"{args.steps}, dense {dense_ms:.1f} ms, '× dense' = dense / variant, 90% interval")
    print(f"{'E':>3s} {'k':>3s} {'k/E':>6s} {'+router':>7s} {'recall':>6s} | "
          f"{'cos mean':>8s} {'cos min':>7s} {'acc/orig':>8s} | {'oracle cos':>10s} "
          f"{'min':>6s} {'acc/orig':>8s} | {'× dense':>7s} {'90% interval':>13s}")
    for r in runs:
        ro, orc, sp = r["router"], r["oracle"], r["ffn_speedup"]
        print(f"{r['num_experts']:3d} {r['top_k']:3d} {r['compute_fraction']:6.3f} "
              f"{r['compute_fraction'] + r['router_fraction']:7.3f} {r['router_recall']:6.3f} | "
              f"{ro['cosine_agnews']['mean']:8.4f} {ro['cosine_agnews']['min']:7.4f} "
              f"{ro['accuracy_ratio']:8.3f} | {orc['cosine_agnews']['mean']:10.4f} "
              f"{orc['cosine_agnews']['min']:6.4f} {orc['accuracy_ratio']:8.3f} | "
              f"{sp['ratio']:7.2f} {sp['interval'][0]:6.2f}–{sp['interval'][1]:5.2f}")
    goal = {}
    for E in args.experts:
        ok = [r["compute_fraction"] for r in runs if r["num_experts"] == E
              and r["router"]["accuracy_ratio"] >= GOAL_QUALITY
              and r["router"]["cosine_agnews"]["mean"] >= GOAL_QUALITY]
        least = min(ok) if ok else None
        goal[str(E)] = {"least_fraction_at_95": least,
                        "met": least is not None and least <= GOAL_FRACTION}
        print(f"goal (paper: ≤ {GOAL_FRACTION:.0%} of the FFN at ≥ {GOAL_QUALITY:.0%} kept, "
              f"router, cosine and accuracy): E={E}: least k/E at ≥ 95%: "
              f"{'none' if least is None else f'{least:.3f}'} → "
              f"{'met' if goal[str(E)]['met'] else 'NOT met'}")

    plot(runs, png)
    write_json(args.out, {
        "bench": "moefication", "args": vars(args),
        "model": "all-MiniLM-L6-v2 BertModel (dropout 0, eval)",
        "data": {"calibration": f"{len(calib_ag)} AG News + {len(calib_trec)} TREC train "
                                f"(seeded shuffle, disjoint from evaluation)",
                 "cosine": f"{len(heldout)} held-out AG News sentences",
                 "probe_train": f"{len(probe_rows)} TREC train questions (coarse, 6 classes)",
                 "probe_test": f"{len(trec_test)} TREC test questions"},
        "original": {"probe_train_accuracy": probe.train_accuracy, "trec_test_accuracy": base_acc},
        "probe": "torch logistic regression, standardised features, LBFGS "
                 f"({args.probe_iters} iters, l2 {args.probe_l2}), fit once on the original",
        "quality_method": "cosine of L2-normalised mean-pooled last hidden states to the "
                          "original's; probe accuracy / original's probe accuracy",
        "timing_method": f"layer {args.time_layer} FFN, {args.time_tokens} held-out tokens, "
                         "1 thread, interleaved rotating rounds, 1 untimed + steps timed calls; "
                         "variants include their router",
        "runs": runs, "ffn_times_s": times, "dense_ffn_median_ms": dense_ms,
        "goal": {"fraction": GOAL_FRACTION, "quality": GOAL_QUALITY, "per_E": goal},
        "png": png, "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__)})
    print(f"wrote {args.out} and {png} ({time.time() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
