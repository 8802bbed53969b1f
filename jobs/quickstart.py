"""The README's first command: the whole pre-training path in a few minutes on a laptop.

    bmray quickstart [--steps 300] [--address ...]

It generates a small synthetic world (models.world), trains a byte-level BPE tokenizer on it,
packs the corpus into Parquet blocks, trains a small GPT on a Ray worker (embedded local Ray
unless RAY_ADDRESS/--address is given) while printing the falling loss, and finally asks the
model to complete sentences whose last word is a fact of the world, next to the true answer.
"""
from __future__ import annotations

import argparse
import os
import sys

from bmray.jobs.pretrain import load_config, print_report, run
from bmray.models.typed_config import ConfigError
from bmray.models.world import World, WorldConfig

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "quickstart.yaml")


def fact_prompts(world: WorldConfig, n: int = 3) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: first sentences of main articles with the last word cut off."""
    pairs = []
    for doc in World(world).iter_documents():
        if not doc["id"].endswith("-0") or doc["split"] != "train":
            continue
        sentence = doc["text"].split(". ")[0].rstrip(".")
        head, _, last = sentence.rpartition(" ")
        if head:
            pairs.append((head, last))
        if len(pairs) == n:
            break
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bmray quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    args = ap.parse_args(argv)
    overrides = [f"train.max_steps={args.steps}"] if args.steps else []
    try:
        raw = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    world = WorldConfig(**raw["data"]["world"])
    prompts = fact_prompts(world)
    print(f"[bmray] quickstart: synthetic world of {world.n_entities} entities -> BPE tokenizer "
          f"-> packed blocks -> GPT, {raw['train']['max_steps']} steps", flush=True)
    report = run(raw, args.address, samples=[p for p, _ in prompts])
    print_report(report)
    print(f"[bmray] {report['parameters']:,} parameters, {report['wall_s']:.0f} s in the worker")
    print("[bmray] greedy completions of facts from the world (truth in brackets):")
    for prompt, answer in prompts:
        completion = report["samples"][prompt][len(prompt):].split(".")[0]
        print(f"    {prompt} ->{completion}   [{answer}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
