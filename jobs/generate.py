"""Sample text from a pre-trained GPT checkpoint, streaming to stdout.

    bmray generate --config configs/poetry.yaml --prompt "Shall I compare thee" --prompt "O"
    bmray generate --config configs/poetry.yaml --strategy sample --temperature 0.8 --top-p 0.9 \\
        --stop "\\n\\n" --max-new-tokens 80 --seed 0 --prompt "When"

``--config`` is the pre-training experiment: it names the checkpoint (``checkpoint.dir``, its
latest step, or ``--checkpoint`` for another directory) and the tokenizer (``data``'s). A
sample ends at ``</s>``, a ``--stop`` string (cut, as OpenAI does) or ``--max-new-tokens``;
``--document-start`` puts ``</s>`` before each prompt (where a document starts in training). Text is streamed as it is generated
(``--no-stream``: all prompts in one left-padded batch, printed at the end); ``--json`` also
writes ``[{"prompt", "sample"}]``. Bad flags exit 2 naming the key; a missing checkpoint or
tokenizer, or a checkpoint of a family that does not generate left to right, exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.experiment import experiment_from_dict
from bmray.actors.train.gpt_checkpoint import GPTCheckpointError, load_gpt, locate_gpt
from bmray.models.config import ModelConfig
from bmray.models.generation import GenerationConfig, generate, stream
from bmray.models.text_stream import TextChunker
from bmray.models.tokenizer import Tokenizer
from bmray.models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml


class GenerateError(RuntimeError):
    """A checkpoint or tokenizer that cannot serve: the message says which and why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmray generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the pre-training experiment YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an experiment value, e.g. checkpoint.dir=runs/x")
    ap.add_argument("--checkpoint", default=None,
                    help="a checkpoint directory or root (default: the experiment's "
                         "checkpoint.dir)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", default=None, help="one prompt per line")
    ap.add_argument("--strategy", default="sample", help="greedy | sample | beam")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--stop", action="append", default=[],
                    help="stop string (repeatable; backslash escapes such as \\n are read)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--document-start", action="store_true",
                    help="prepend </s> to each prompt, as documents start in the packed corpus")
    ap.add_argument("--no-stream", action="store_true", help="batch all prompts, print at the end")
    ap.add_argument("--json", default=None, help="also write the samples here as JSON")
    return ap.parse_args(argv)


def generation_config(args: argparse.Namespace, mc: ModelConfig) -> GenerationConfig:
    stops = [s.encode("utf-8").decode("unicode_escape") if "\\" in s else s for s in args.stop]
    raw: dict[str, Any] = {"strategy": args.strategy, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_k": args.top_k,
                           "top_p": args.top_p, "num_beams": args.num_beams, "stop": stops,
                           "seed": args.seed, "eos_id": mc.eos_id, "pad_id": mc.pad_id}
    return from_dict(GenerationConfig, raw, "generation")


def load_model(raw: dict[str, Any], checkpoint: str | None) -> tuple[torch.nn.Module, Tokenizer]:
    """The GPT of the checkpoint (eval mode) and the experiment's tokenizer, both checked."""
    exp = experiment_from_dict(raw)
    if not (checkpoint or exp.checkpoint.dir):
        raise ConfigError("checkpoint.dir: not set in the experiment; pass --checkpoint")
    try:
        return load_gpt(*locate_gpt(exp, checkpoint))
    except GPTCheckpointError as exc:
        raise GenerateError(str(exc)) from exc


def run(args: argparse.Namespace) -> list[dict[str, str]]:
    raw = apply_overrides(load_yaml(args.config), args.overrides)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        raise ConfigError("prompt: give at least one --prompt or a --prompts-file")
    model, tok = load_model(raw, args.checkpoint)
    mc = model.config
    gen = generation_config(args, mc)
    start = [mc.eos_id] if args.document_start else []     # a packed document follows </s>
    ids = [start + tok.encode(p) for p in prompts]

    def decode(tokens: list[int]) -> str:
        return tok.decode(tokens, skip_special_tokens=True)

    samples = []
    if args.no_stream or gen.strategy == "beam":
        out = generate(model, ids, gen, tokenizer=tok)
        width = max(map(len, ids))
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            text = decode(row)
            samples.append({"prompt": prompt, "sample": text})
            print(f"{prompt}{text}\n", flush=True)
        return samples
    for prompt, p_ids in zip(prompts, ids):
        print(prompt, end="", flush=True)
        chunker = TextChunker(decode)
        for step in stream(model, [p_ids], gen, tokenizer=tok):
            print(chunker.push(0, step[0]), end="", flush=True)
        print(chunker.flush(0), end="\n\n", flush=True)
        samples.append({"prompt": prompt, "sample": decode(chunker.tokens[0])})
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        samples = run(args)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    except (GenerateError, ckpt.CheckpointError) as exc:
        print(f"[bmray] generate failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(samples, fh, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
