"""Train and evaluate an extractive reader on the one Trainer; save it as an artifact.

    report = run_qa(qa_config_from_dict(load_yaml("configs/qa_world_minilm.yaml")))

The data are the world's QA pairs (its train/eval split, plus SQuAD v2-style unanswerables)
or COVID-QA (split by document). Every training window is one row of the Trainer's stream
(``WindowObjective`` collates the rows' windows); for long contexts ``negative_windows``
keeps that many answer-free windows per window with the answer (sampled, seeded), since most
windows of a 5k-token paper hold no answer. After training, the null threshold is tuned on a
dev slice of the training contexts (F1), then held-out EM/F1 are measured with it. The
artifact is ``out_dir/reader``: model.safetensors + manifest.json (what it is, the base's
identity, the reader settings, the threshold and the figures) + the tokenizer of a family
base. ``load_reader`` rebuilds it and refuses another base. Docs: docs/qa.md.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn

from bmray.actors.train.adapt import load_base_checkpoint, load_minilm
from bmray.actors.train.adapt_config import BaseConfig
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data.task_rows import RowStream
from bmray.models.delta.base import base_identity
from bmray.models.families.registry import build_model
from bmray.models.qa.data import QAExample, load_covid_qa, split_by_context, world_examples
from bmray.models.qa.reader import SpanReader, read, tune_threshold
from bmray.models.qa.squad_metrics import score_question, squad_evaluate
from bmray.models.qa.windows import SpanTokenizer, Window, collate, make_windows
from bmray.models.tokenizer import Tokenizer, train_bpe
from bmray.models.typed_config import (ConfigError, check_choice, check_int, check_positive,
                                       check_sections, from_dict)
from bmray.models.world import World, WorldConfig

DATASETS = ("world", "covid_qa")
ARTIFACT_KIND = "qa_reader"
MINILM_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class QADataConfig:
    """Which questions: ``world`` (``n_entities``; ``unanswerable`` null questions per real
    one, in train and eval) or ``covid_qa`` (``eval_fraction`` of the papers held out).
    ``dev_fraction`` of the training contexts tune the null threshold (0: ``threshold``
    of the reader section is used). Limits cap the questions (a seeded sample)."""

    dataset: str = "world"
    n_entities: int = 30
    unanswerable: float = 0.5
    eval_fraction: float = 0.2
    dev_fraction: float = 0.1
    train_limit: int | None = None
    eval_limit: int | None = None
    dev_limit: int | None = None
    negative_windows: float | None = None     # answer-free windows kept per answer window
    batch_size: int = 16                      # windows per optimizer step

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_int("data.n_entities", self.n_entities, 1)
        check_positive("data.unanswerable", self.unanswerable, allow_zero=True)
        for name in ("eval_fraction", "dev_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0 or (name == "eval_fraction" and value == 0.0):
                raise ConfigError(f"data.{name}: must be in {'(0' if name == 'eval_fraction' else '[0'}"
                                  f", 1), got {value!r}")
        for name in ("train_limit", "eval_limit", "dev_limit"):
            if getattr(self, name) is not None:
                check_int(f"data.{name}", getattr(self, name), 1)
        if self.negative_windows is not None:
            check_positive("data.negative_windows", self.negative_windows, allow_zero=True)
        check_int("data.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class ReaderConfig:
    """Windowing and decoding (HF ``run_qa.py``'s defaults: 384 / 128 / 30)."""

    max_length: int = 384
    doc_stride: int = 128
    max_answer_tokens: int = 30
    threshold: float = 0.0          # used when data.dev_fraction is 0
    head_dropout: float = 0.0
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        check_int("reader.max_length", self.max_length, 8)
        check_int("reader.doc_stride", self.doc_stride, 0)
        if self.doc_stride >= self.max_length // 2:
            raise ConfigError(f"reader.doc_stride: {self.doc_stride} must be below half of "
                              f"reader.max_length {self.max_length}")
        check_int("reader.max_answer_tokens", self.max_answer_tokens, 1)
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"reader.head_dropout: must be in [0, 1), got {self.head_dropout!r}")
        check_int("reader.eval_batch_size", self.eval_batch_size, 1)


@dataclass(frozen=True)
class QAConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    data: QADataConfig = field(default_factory=QADataConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out_dir: str = "runs/qa"

    def __post_init__(self) -> None:
        m = self.base.model
        if m is not None and m.max_seq_len < self.reader.max_length:
            raise ConfigError(f"reader.max_length: {self.reader.max_length} exceeds "
                              f"base.model.max_seq_len {m.max_seq_len}")
        if self.base.kind == "minilm" and self.reader.max_length > 512:
            raise ConfigError(f"reader.max_length: {self.reader.max_length} exceeds the "
                              f"MiniLM's 512 positions")


def qa_config_from_dict(raw: Any) -> QAConfig:
    """Typed config; an unknown or bad key is a ConfigError naming its path."""
    check_sections(raw, [f.name for f in dataclasses.fields(QAConfig)], "qa config")
    return from_dict(QAConfig, raw, "config")


# ---------------------------------------------------------------- data

def sample(examples: list[QAExample], limit: int | None, seed: int) -> list[QAExample]:
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


def load_splits(d: QADataConfig, seed: int
                ) -> tuple[list[QAExample], list[QAExample], list[QAExample], dict[str, Any]]:
    """(train, dev, eval, facts about the data)."""
    if d.dataset == "world":
        recs = list(World(WorldConfig(n_entities=d.n_entities)).iter_qa())
        train = world_examples([r for r in recs if r["split"] == "train"], d.unanswerable, seed)
        evals = world_examples([r for r in recs if r["split"] == "eval"], d.unanswerable, seed + 1)
        facts: dict[str, Any] = {"dataset": "world", "n_entities": d.n_entities}
    else:
        covid = load_covid_qa()
        train, evals = split_by_context(covid.examples, d.eval_fraction, seed)
        facts = {"dataset": "covid_qa", "answers_repaired": covid.repaired,
                 "answers_dropped": covid.dropped}
    dev: list[QAExample] = []
    if d.dev_fraction > 0:
        train, dev = split_by_context(train, d.dev_fraction, seed + 2)
    train, dev, evals = (sample(train, d.train_limit, seed), sample(dev, d.dev_limit, seed),
                         sample(evals, d.eval_limit, seed))
    if not train or not evals:
        raise ConfigError(f"data: {len(train)} training and {len(evals)} eval questions; "
                          f"need some of each")
    facts.update(train_questions=len(train), dev_questions=len(dev), eval_questions=len(evals))
    return train, dev, evals, facts


def training_windows(examples: Sequence[QAExample], tok: SpanTokenizer, r: ReaderConfig,
                     negative_windows: float | None, seed: int) -> list[Window]:
    """Every window with its answer, and answer-free ones (all, or ``negative_windows`` per
    answer window, sampled)."""
    pos, neg = [], []
    for i, ex in enumerate(examples):
        for w in make_windows(ex.question, ex.context, tok, r.max_length, r.doc_stride,
                              answer=ex.span, example=i):
            (pos if w.start_position else neg).append(w)
    if negative_windows is not None:
        keep = min(len(neg), int(round(negative_windows * max(len(pos), 1))))
        neg = random.Random(seed).sample(neg, keep)
    return pos + neg


@dataclass
class WindowObjective:
    """Rows ``[window index]`` → the collated windows; each window is one target."""

    windows: Sequence[Window]
    pad_id: int

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor]:
        return collate([self.windows[i] for i in blocks[:, 0].tolist()], self.pad_id)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0))


# ---------------------------------------------------------------- the reader

@dataclass
class BuiltReader:
    reader: SpanReader
    tokenizer: SpanTokenizer
    identity: dict[str, Any]            # the base encoder's, as built (before training)
    bpe: Tokenizer | None = None        # a family base's tokenizer, saved with the artifact
    model_config: ModelConfig | None = None


def build_reader(cfg: QAConfig, texts: Sequence[str]) -> BuiltReader:
    """The base (MiniLM or our BERT with a BPE trained on ``texts``) under a span head."""
    b = cfg.base
    if b.kind == "minilm":
        encoder, hf_tok = load_minilm(b.dropout)
        encoder.block_lists = ("encoder.layer",)
        tok = SpanTokenizer.from_hf(hf_tok, MINILM_NAME)
        return BuiltReader(SpanReader(encoder, encoder.config.hidden_size, cfg.reader.head_dropout),
                           tok, base_identity(encoder))
    bpe = train_bpe(texts, vocab_size=b.model.vocab_size, family=b.model.family)
    return family_reader(cfg, bpe)


def family_reader(cfg: QAConfig, bpe: Tokenizer, model_config: ModelConfig | None = None
                  ) -> BuiltReader:
    b = cfg.base
    specials = {k: v for k, v in bpe.special_ids().items() if k != "sentinel_ids"}
    mc = model_config or dataclasses.replace(
        b.model, **specials, **({} if b.dropout is None else {"dropout": b.dropout}))
    if bpe.vocab_size > mc.vocab_size:
        raise ConfigError(f"base.model.vocab_size: {mc.vocab_size} is smaller than the "
                          f"tokenizer's {bpe.vocab_size} ids")
    encoder = build_model(mc)
    if b.checkpoint and model_config is None:
        load_base_checkpoint(encoder, mc, b.checkpoint)
    return BuiltReader(SpanReader(encoder, mc.d_model, cfg.reader.head_dropout),
                       SpanTokenizer.from_bmray(bpe), base_identity(encoder), bpe, mc)


# ---------------------------------------------------------------- evaluation

def evaluate_reader(reader: nn.Module, tok: SpanTokenizer, examples: Sequence[QAExample],
                    r: ReaderConfig, threshold: float) -> tuple[dict[str, float], dict[str, float]]:
    """SQuAD EM/F1 (percent) of the reader's answers at ``threshold``, and of its best spans
    (never abstaining), from one read."""
    preds = read(reader, tok, [e.question for e in examples], [e.context for e in examples],
                 r.max_length, r.doc_stride, r.max_answer_tokens, threshold, r.eval_batch_size)
    golds = {e.id: list(e.answers) for e in examples}
    return (squad_evaluate({e.id: p.answer for e, p in zip(examples, preds)}, golds),
            squad_evaluate({e.id: p.text for e, p in zip(examples, preds)}, golds))


def tune_on_dev(reader: nn.Module, tok: SpanTokenizer, dev: Sequence[QAExample],
                r: ReaderConfig) -> tuple[float, float]:
    """(threshold, dev F1 at it): F1 if answered = the span's F1, if abstained = 1 exactly
    when the question has no answer."""
    preds = read(reader, tok, [e.question for e in dev], [e.context for e in dev],
                 r.max_length, r.doc_stride, r.max_answer_tokens, 0.0, r.eval_batch_size)
    answered = [score_question(p.text, e.answers)[1] for p, e in zip(preds, dev)]
    abstained = [score_question("", e.answers)[1] for e in dev]
    t, f1 = tune_threshold([p.null_margin for p in preds], answered, abstained)
    return t, 100.0 * f1


# ---------------------------------------------------------------- artifact

def save_reader(directory: str | Path, built: BuiltReader, cfg: QAConfig, threshold: float,
                metrics: dict[str, Any]) -> Path:
    """model.safetensors + manifest.json (+ the BPE of a family base)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # cloned: tied weights (our BERT's embeddings and MLM decoder) would share storage
    state = {k: v.detach().cpu().clone() for k, v in built.reader.state_dict().items()}
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    if built.bpe is not None:
        built.bpe.save(out / "tokenizer")
    manifest = {"kind": ARTIFACT_KIND, "base_kind": cfg.base.kind, "base": built.identity,
                "model_config": (dataclasses.asdict(built.model_config)
                                 if built.model_config is not None else None),
                "tokenizer": built.tokenizer.name, "reader": dataclasses.asdict(cfg.reader),
                "threshold": threshold, "metrics": metrics}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out


def load_reader(directory: str | Path) -> tuple[SpanReader, SpanTokenizer, dict[str, Any]]:
    """(reader, tokenizer, manifest) of a saved reader; a missing file, another kind of
    artifact or a MiniLM that is not the one it was trained from is a clear error."""
    d = Path(directory)
    path = d / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d}: no manifest.json (not a QA reader artifact)")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != ARTIFACT_KIND:
        raise ValueError(f"{d}: artifact kind {manifest.get('kind')!r}, expected {ARTIFACT_KIND!r}")
    reader_cfg = ReaderConfig(**manifest["reader"])
    if manifest["base_kind"] == "minilm":
        encoder, hf_tok = load_minilm(None)
        have = base_identity(encoder)
        if have["weights_sha256"] != manifest["base"]["weights_sha256"]:
            raise ValueError(f"{d}: trained from base {manifest['base']['weights_sha256'][:12]}, "
                             f"but the installed MiniLM is {have['weights_sha256'][:12]}")
        reader = SpanReader(encoder, encoder.config.hidden_size, reader_cfg.head_dropout)
        tok = SpanTokenizer.from_hf(hf_tok, MINILM_NAME)
    else:
        mc = ModelConfig(**manifest["model_config"])
        bpe = Tokenizer.load(d / "tokenizer")
        cfg = QAConfig(base=BaseConfig(kind="family", model=mc), reader=reader_cfg)
        built = family_reader(cfg, bpe, mc)
        reader, tok = built.reader, built.tokenizer
    if tok.name != manifest["tokenizer"]:
        raise ValueError(f"{d}: tokenizer {tok.name!r} is not the artifact's "
                         f"{manifest['tokenizer']!r}")
    reader.load_state_dict(safetensors.torch.load_file(str(d / "model.safetensors")))
    reader.eval()
    return reader, tok, manifest


# ---------------------------------------------------------------- the run

def run_qa(cfg: QAConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Train, tune the null threshold on dev, measure held-out EM/F1, save; the report."""
    out = Path(out_dir or cfg.out_dir)
    seed_everything(cfg.seed)
    train, dev, evals, facts = load_splits(cfg.data, cfg.seed)
    texts = sorted({e.context for e in train} | {e.question for e in train})
    built = build_reader(cfg, texts)
    windows = training_windows(train, built.tokenizer, cfg.reader, cfg.data.negative_windows,
                               cfg.seed)
    rows = torch.arange(len(windows), dtype=torch.long).unsqueeze(1)
    stream = RowStream(rows, min(cfg.data.batch_size, len(windows)), seed=cfg.seed)
    train_cfg = dataclasses.replace(cfg.train, metrics_path=str(out / "metrics.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(built.reader, WindowObjective(windows, built.tokenizer.pad_id), stream,
                      train_cfg, seed=cfg.seed)
    t0 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    reader = built.reader
    t0 = time.perf_counter()
    threshold, dev_f1 = (tune_on_dev(reader, built.tokenizer, dev, cfg.reader) if dev
                         else (cfg.reader.threshold, None))
    metrics, always = evaluate_reader(reader, built.tokenizer, evals, cfg.reader, threshold)
    eval_s = time.perf_counter() - t0
    report = {"data": facts, "train_windows": len(windows), "steps": trainer.step,
              "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
              "first_loss": result.losses[min(result.losses)] if result.losses else None,
              "final_loss": result.losses[max(result.losses)] if result.losses else None,
              "threshold": threshold, "dev_f1": dev_f1, "eval": metrics,
              "eval_always_answer": always}
    artifact = save_reader(out / "reader", built, cfg, threshold, report)
    report["artifact"] = str(artifact)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
