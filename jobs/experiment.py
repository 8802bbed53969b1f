"""One experiment = one YAML file = ``ExperimentConfig``: model, data, train, checkpoint, seed.

    exp = load_experiment("configs/tiny_gpt.yaml")     # ConfigError naming the bad key, if any
    result = run_experiment(exp)                        # single process; returns TrainResult

A YAML file has the top-level sections ``model`` (models.config.ModelConfig), ``data``
(:class:`DataConfig`), ``train`` (actors.train_config.TrainConfig), ``checkpoint``
(actors.train_config.CheckpointConfig) and ``seed``. Every section is built with
``models.typed_config.from_dict``: an unknown key, a wrong type, a bad value or a missing corpus
is one ``ConfigError`` whose message names the key path (``train.lr``, ``data.corpus.source``)
— at load time, before any compute is spent.

The data pipeline (models/data) runs once per corpus: documents → BPE tokenizer (trained and
saved under ``data.tokenizer_dir``, or loaded from there) → packed Parquet blocks under
``data.pack_dir`` (reused while tokenizer, block length and source are unchanged) →
``BlockStream`` for (rank, world_size).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from actors.strategy import Strategy
from actors.train_config import CheckpointConfig, TrainConfig
from actors.trainer import TrainResult, Trainer, seed_everything
from models.config import ModelConfig
from models.data import BlockStream, CorpusConfig, CorpusReader, eval_batches, pack_corpus
from models.data.readers import resolve_files
from models.tokenizer import Tokenizer, TokenizerConfig, train_bpe
from models.typed_config import ConfigError, check_positive, from_dict, load_yaml


@dataclass
class DataConfig:
    """Where the corpus is and how it becomes batches (field names follow models/data).

    ``corpus`` may be a mapping (models.data.CorpusConfig: source, format, text_field,
    doc_sep) or just the source string. ``block_len`` is the packed block length: a GPT sees
    ``block_len - 1`` input tokens (the last one is only a target). ``global_batch_size``
    blocks make one optimizer step over all ranks. The last ``eval_blocks`` blocks of the
    corpus are held out for evaluation. ``tokenizer`` defaults to the model's family and
    vocabulary size.
    """

    corpus: CorpusConfig                    # YAML: a mapping, or just the source string
    pack_dir: str                           # packed blocks (local path or URI)
    block_len: int = 129
    global_batch_size: int = 8
    eval_blocks: int = 64
    shuffle: bool = True
    tokenizer: TokenizerConfig | None = None
    tokenizer_dir: str | None = None        # load from / save to here; default <pack_dir>/tokenizer
    row_group_size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = CorpusConfig(source=self.corpus)
        elif isinstance(self.corpus, dict):
            self.corpus = from_dict(CorpusConfig, self.corpus, "data.corpus")
        check_positive("data.block_len", self.block_len)
        if self.block_len < 2:
            raise ConfigError(f"data.block_len: must be >= 2, got {self.block_len}")
        check_positive("data.global_batch_size", self.global_batch_size)
        check_positive("data.eval_blocks", self.eval_blocks, allow_zero=True)
        check_positive("data.row_group_size", self.row_group_size)
        try:
            resolve_files(self.corpus.source)
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"data.corpus.source: {exc}") from exc

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_dir or os.path.join(self.pack_dir, "tokenizer")


@dataclass
class ExperimentConfig:
    """Everything one run needs; ``load_experiment`` builds it from YAML."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if d.tokenizer is None:
            d.tokenizer = TokenizerConfig(vocab_size=m.vocab_size, family=m.family,
                                          n_sentinels=100 if m.family == "t5" else 0)
        if d.tokenizer.family != m.family:
            raise ConfigError(f"data.tokenizer.family: {d.tokenizer.family!r} but model.family "
                              f"is {m.family!r}")
        if d.tokenizer.vocab_size > m.vocab_size:
            raise ConfigError(f"data.tokenizer.vocab_size: {d.tokenizer.vocab_size} is larger "
                              f"than model.vocab_size {m.vocab_size}")
        seq = {"gpt": d.block_len - 1, "bert": d.block_len, "electra": d.block_len}.get(m.family)
        if seq is not None and seq > m.max_seq_len:
            raise ConfigError(f"data.block_len: {d.block_len} gives sequences of {seq} tokens, "
                              f"longer than model.max_seq_len {m.max_seq_len}")


def experiment_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a plain mapping (parsed YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment: expected a mapping of sections, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys are {sorted(fields)}")
    for name in ("model", "data"):
        if name not in raw:
            raise ConfigError(f"{name}: missing section (required)")
    data = raw["data"]
    if isinstance(data, dict) and isinstance(data.get("corpus"), str):
        raw = {**raw, "data": {**data, "corpus": {"source": data["corpus"]}}}
    kwargs: dict[str, Any] = {}
    for name in ("model", "data", "train", "checkpoint"):
        if name in raw:
            kwargs[name] = from_dict(_section_type(name), raw[name], name)
    if "seed" in raw:
        seed = raw["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed: expected an integer, got {seed!r}")
        kwargs["seed"] = seed
    return ExperimentConfig(**kwargs)


def _section_type(name: str) -> type:
    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
            "checkpoint": CheckpointConfig}[name]


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    """Read a YAML experiment; a missing file, bad YAML, an unknown key, a bad value or a
    missing corpus raises one ConfigError naming it."""
    return experiment_from_dict(load_yaml(path))


# ---------------------------------------------------------------- building a run

def prepare_data(exp: ExperimentConfig) -> tuple[Tokenizer, ModelConfig]:
    """Tokenizer (loaded or trained + saved) and pack (reused or written); returns the
    tokenizer and the model config with its special ids set from the tokenizer."""
    d = exp.data
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
    from models.objectives import objective_for     # models/__init__ may re-export these
    from models.registry import build_model

    _, model_cfg = prepare_data(exp)
    seed_everything(exp.seed)
    model = build_model(model_cfg)
    stream, eval_fn = make_streams(exp, rank, world_size)
    return Trainer(model, objective_for(model_cfg), stream, exp.train, strategy=strategy,
                   eval_data=eval_fn, checkpoint=exp.checkpoint, model_config=model_cfg,
                   seed=exp.seed)


def run_experiment(exp: ExperimentConfig, strategy: Strategy | None = None) -> TrainResult:
    """Single-process run of ``exp`` (resumes from ``checkpoint.dir`` when it has one)."""
    return build_trainer(exp, strategy).fit()
