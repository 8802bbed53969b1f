"""From an ``ExperimentConfig`` to a running Trainer: data, model, objective, streams.

    trainer = build_trainer(exp, strategy, rank, world_size)
    result = run_experiment(exp)                 # single process; returns TrainResult

The data pipeline (models/data) runs once per corpus: documents (or a synthetic world written on
first use) → BPE tokenizer (trained and saved under ``data.tokenizer_dir``, or loaded from there)
→ packed Parquet blocks under ``data.pack_dir`` (reused while tokenizer, block length and source
are unchanged) → ``BlockStream`` for (rank, world_size).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import torch

from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
from bmray.actors.parallel.strategy import Strategy
from bmray.actors.train.experiment import ExperimentConfig
from bmray.actors.train.loop import TrainResult, Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream, CorpusReader, eval_batches, pack_corpus
from bmray.models.data.readers import resolve_files
from bmray.models.families.registry import build_model
from bmray.models.objectives import objective_for
from bmray.models.tokenizer import Tokenizer, train_bpe
from bmray.models.typed_config import ConfigError
from bmray.models.world import WorldConfig, write_world


def prepare_data(exp: ExperimentConfig) -> tuple[Tokenizer, ModelConfig]:
    """Tokenizer (loaded or trained + saved) and pack (reused or written); returns the
    tokenizer and the model config with its special ids set from the tokenizer."""
    d = exp.data
    if d.world is not None:
        ensure_world_corpus(d.world, d.corpus.source)
    tok_dir = d.tokenizer_path
    reader = CorpusReader.from_config(d.corpus)
    try:
        tok = Tokenizer.load(tok_dir)
    except FileNotFoundError:
        t = d.tokenizer
        tok = train_bpe(reader, vocab_size=t.vocab_size, family=t.family,
                        n_sentinels=t.n_sentinels, min_frequency=t.min_frequency)
        tok.save(tok_dir)
    if tok.vocab_size > exp.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {exp.model.vocab_size} is smaller than the "
                          f"tokenizer at {tok_dir!r} ({tok.vocab_size} ids)")
    pack_corpus(reader, tok, d.block_len, d.pack_dir, eval_blocks=d.eval_blocks,
                row_group_size=d.row_group_size)
    specials = tok.special_ids()
    if exp.model.family != "t5":
        specials.pop("sentinel_ids", None)
    return tok, dataclasses.replace(exp.model, **specials)


def ensure_world_corpus(world: WorldConfig, documents: str) -> None:
    """Write the synthetic world's documents to ``documents`` unless a complete world is
    already there. ``world.json`` is written last, so a crash mid-write is regenerated; an
    existing world made from another config is an error rather than silently reused."""
    root = os.path.dirname(documents) or "."
    manifest = f"{root.rstrip('/')}/world.json"
    try:
        fs, path = resolve_files(manifest)
    except (FileNotFoundError, OSError):
        write_world(world, root, parts=("documents",))
        return
    with fs.open_input_stream(path[0]) as fh:
        found = json.loads(fh.read().decode())
    if found.get("config") != dataclasses.asdict(world):
        raise ConfigError(f"data.world: {root!r} holds a world of another config "
                          f"({found.get('config')}); delete it or change data.corpus.source")


def make_streams(exp: ExperimentConfig, rank: int = 0, world_size: int = 1
                 ) -> tuple[BlockStream, Callable[[], Iterator[torch.Tensor]] | None]:
    """(train stream, eval-batches factory or None) for this rank."""
    d = exp.data
    stream = BlockStream(d.pack_dir, d.block_len, d.global_batch_size, rank, world_size,
                         seed=exp.seed, shuffle=d.shuffle)
    if not d.eval_blocks:
        return stream, None
    return stream, lambda: eval_batches(d.pack_dir, d.block_len, d.global_batch_size,
                                        rank, world_size)


def build_trainer(exp: ExperimentConfig, strategy: Strategy | None = None, rank: int = 0,
                  world_size: int = 1) -> Trainer:
    """Tokenizer, pack, model, objective and streams of ``exp``, wired into a Trainer."""
    _, model_cfg = prepare_data(exp)
    seed_everything(exp.seed)
    model = build_model(model_cfg)
    ac = exp.train.activation_checkpointing
    if ac.enabled:
        apply_activation_checkpointing(model, ac.blocks)
    stream, eval_fn = make_streams(exp, rank, world_size)
    return Trainer(model, objective_for(model_cfg), stream, exp.train, strategy=strategy,
                   eval_data=eval_fn, checkpoint=exp.checkpoint, model_config=model_cfg,
                   seed=exp.seed)


def run_experiment(exp: ExperimentConfig, strategy: Strategy | None = None) -> TrainResult:
    """Single-process run of ``exp`` (resumes from ``checkpoint.dir`` when it has one)."""
    return build_trainer(exp, strategy).fit()
