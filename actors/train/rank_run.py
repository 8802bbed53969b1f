"""A ranker training run from a typed config: ``rank_config_from_dict`` + ``run_rank``.

    cfg = rank_config_from_dict(load_yaml("configs/rank_cross_encoder.yaml"))
    report = run_rank(cfg)          # out_dir/artifact (safetensors + manifest), report.json

``kind`` picks what is trained: ``cross_encoder`` (LCE over the first stage's top results,
evaluated as a re-ranker of that first stage), ``dual_encoder`` (InfoNCE over in-batch + mined
negatives, ANCE refresh every ``negatives.refresh_every`` steps, evaluated as an exact dense
index) or ``span_pretrain`` (Contriever cropping on the training collection's documents, no
labels; evaluated like a dual encoder). The base is the offline MiniLM or a BERT of ours
(BPE trained on the training collection), or ``base.init``: the encoder of an earlier
run's artifact (pre-train with spans, then fine-tune). Every metric is measured before and
after training on each ``data.eval`` collection. Docs: docs/retrieval.md.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import seed_everything
from bmray.actors.train.rank import (METRICS, evaluate_retriever, pretrain_spans,
                                     train_cross_encoder, train_dual_encoder, training_queries)
from bmray.models.config import ModelConfig
from bmray.models.delta.base import base_identity
from bmray.models.families.registry import build_model
from bmray.models.retrieval.collections import LOADERS, Collection, world_collection
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.contrastive import (DualEncoder, DualEncoderConfig,
                                                ExactDenseRetriever)
from bmray.models.retrieval.cross_encoder import (CrossEncoder, CrossEncoderConfig,
                                                  CrossEncoderReranker)
from bmray.models.retrieval.encoder import load_minilm_encoder
from bmray.models.retrieval.negatives import NegativeMiner
from bmray.models.retrieval.rank_artifact import (build_encoder, load_ranker, read_manifest,
                                                  save_ranker)
from bmray.models.retrieval.spans import SpanConfig
from bmray.models.retrieval.tokenization import BertTextTokenizer
from bmray.models.retrieval.types import Retriever
from bmray.models.tokenizer import train_bpe
from bmray.models.typed_config import ConfigError, check_choice, check_int, from_dict
from bmray.models.world import World, WorldConfig

__all__ = ["RankBaseConfig", "RankDataConfig", "NegativesConfig", "RankConfig",
           "rank_config_from_dict", "run_rank", "KINDS", "EVAL_SETS"]

KINDS = ("cross_encoder", "dual_encoder", "span_pretrain")
EVAL_SETS = ("world-train", "world-eval", "cisi", "medline")
FIRST_STAGES = ("minilm", "bm25", "base", "none")


@dataclass(frozen=True)
class RankBaseConfig:
    kind: str = "bert"                   # "bert" (ours, `model`) | "minilm" (the offline one)
    model: ModelConfig | None = None     # bert: the architecture (family bert)
    init: str | None = None              # an earlier run's artifact dir: start from its encoder

    def __post_init__(self) -> None:
        check_choice("base.kind", self.kind, ("bert", "minilm"))
        if self.kind == "bert" and self.model is None and self.init is None:
            raise ConfigError("base.model: required for base.kind bert (or base.init)")
        if self.model is not None and self.model.family != "bert":
            raise ConfigError(f"base.model.family: must be bert, got {self.model.family!r}")


@dataclass(frozen=True)
class RankDataConfig:
    collection: str = "world"            # training queries: world (train split) | cisi | medline
    n_entities: int = 200                # world size
    world_seed: int = 0
    eval: list[str] = field(default_factory=lambda: ["world-eval"])

    def __post_init__(self) -> None:
        check_choice("data.collection", self.collection, ("world", *LOADERS))
        check_int("data.n_entities", self.n_entities, minimum=2)
        for i, name in enumerate(self.eval):
            check_choice(f"data.eval[{i}]", name, EVAL_SETS)


@dataclass(frozen=True)
class NegativesConfig:
    first_stage: str = "minilm"          # mine from: minilm (dense) | bm25 | base (the start encoder) | none
    depth: int = 100                     # candidates mined (and re-ranked at evaluation)
    hard_pool: int = 30                  # negatives are drawn from the top hard_pool of those
    per_query: int = 7                   # cross-encoder: negatives per group; dual: hard negatives
    refresh_every: int = 0               # dual_encoder: re-mine from the current encoder (ANCE)

    def __post_init__(self) -> None:
        check_choice("negatives.first_stage", self.first_stage, FIRST_STAGES)
        check_int("negatives.depth", self.depth, minimum=1)
        check_int("negatives.hard_pool", self.hard_pool, minimum=1)
        check_int("negatives.per_query", self.per_query, minimum=0)
        check_int("negatives.refresh_every", self.refresh_every, minimum=0)


@dataclass(frozen=True)
class RankConfig:
    kind: str
    out_dir: str = "runs/rank"
    seed: int = 0
    batch: int = 8                       # queries (documents for span_pretrain) per step
    base: RankBaseConfig = field(default_factory=RankBaseConfig)
    data: RankDataConfig = field(default_factory=RankDataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    cross_encoder: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    dual_encoder: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    spans: SpanConfig = field(default_factory=SpanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_int("batch", self.batch, minimum=1)
        if self.kind == "cross_encoder" and self.negatives.first_stage == "none":
            raise ConfigError("negatives.first_stage: a cross-encoder needs a first stage to "
                              "mine negatives from and to re-rank (minilm or base)")
        if self.kind == "cross_encoder" and self.negatives.per_query < 1:
            raise ConfigError("negatives.per_query: a cross-encoder group needs >= 1 negative")
        if self.negatives.refresh_every and self.kind != "dual_encoder":
            raise ConfigError("negatives.refresh_every: only a dual_encoder refreshes negatives")
        if self.base.init is not None and self.kind == "cross_encoder":
            raise ConfigError("base.init: only dual_encoder / span_pretrain start from an "
                              "earlier run's encoder")


def rank_config_from_dict(raw: dict[str, Any]) -> RankConfig:
    """The typed config; unknown keys and bad values raise ConfigError naming the key path."""
    return from_dict(RankConfig, raw, "config")


# ---------------------------------------------------------------- building blocks

def collection(cfg: RankDataConfig, name: str) -> Collection:
    if name.startswith("world"):
        world = World(WorldConfig(seed=cfg.world_seed, n_entities=cfg.n_entities))
        return world_collection(world, "train" if name in ("world", "world-train") else "eval")
    return LOADERS[name]()


def build_base(cfg: RankConfig, train: Collection
               ) -> tuple[torch.nn.Module, Any, int, ModelConfig | None]:
    """(encoder, tokenizer, hidden size, model config) the run starts from."""
    b = cfg.base
    if b.init is not None:
        manifest = read_manifest(b.init)
        if manifest["kind"] != "dual_encoder":
            raise ConfigError(f"base.init: {b.init!r} holds a {manifest['kind']}, not a "
                              f"dual encoder's encoder")
        start = load_ranker(b.init)
        mc_raw = manifest["base"]["model_config"]
        mc = from_dict(ModelConfig, mc_raw, "base.init.model_config") if mc_raw else None
        hidden = mc.d_model if mc else start.encoder.config.hidden_size
        return start.encoder, start.tokenizer, hidden, mc
    if b.kind == "minilm":
        enc, tok, hidden = build_encoder("minilm", None, None)
        return enc, tok, hidden, None
    bpe = train_bpe(list(train.documents.values()) + list(train.queries.values()),
                    b.model.vocab_size, "bert", n_sentinels=0)
    specials = {k: v for k, v in bpe.special_ids().items() if k != "sentinel_ids"}
    mc = dataclasses.replace(b.model, **specials)
    if bpe.vocab_size > mc.vocab_size:
        raise ConfigError(f"base.model.vocab_size: smaller than the tokenizer's {bpe.vocab_size}")
    return build_model(mc), BertTextTokenizer(bpe, mc.max_seq_len), mc.d_model, mc


def first_stage(cfg: RankConfig, encoder: torch.nn.Module, tokenizer: Any,
                documents: dict[str, str]) -> Retriever | None:
    kind = cfg.negatives.first_stage
    if kind == "none":
        return None
    if kind == "minilm":
        return ExactDenseRetriever(load_minilm_encoder(), documents)
    if kind == "bm25":
        return BM25Index.build(list(documents), list(documents.values()))
    # a frozen copy: the encoder being trained must not change the first stage's queries
    dual = DualEncoder(copy.deepcopy(encoder), tokenizer, cfg.dual_encoder)
    return ExactDenseRetriever(dual.text_encoder(), documents)


def measure(model: torch.nn.Module, cfg: RankConfig, sets: dict[str, Collection],
            stages: dict[str, Retriever | None]) -> dict[str, dict[str, float]]:
    out = {}
    for name, coll in sets.items():
        if isinstance(model, CrossEncoder):
            retriever = CrossEncoderReranker(stages[name], model, coll.documents, cfg.negatives.depth)
        else:
            retriever = ExactDenseRetriever(model.text_encoder(), coll.documents)
        out[name] = evaluate_retriever(retriever, coll, METRICS, cfg.negatives.depth)
    return out


def run_rank(cfg: RankConfig) -> dict[str, Any]:
    """Train, measure before/after, save ``out_dir/artifact`` and ``out_dir/report.json``."""
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = collection(cfg.data, "world-train" if cfg.data.collection == "world"
                       else cfg.data.collection)
    sets = {name: collection(cfg.data, name) for name in cfg.data.eval}
    encoder, tokenizer, hidden, mc = build_base(cfg, train)
    identity = base_identity(encoder)
    if cfg.kind == "cross_encoder":
        model: torch.nn.Module = CrossEncoder(encoder, tokenizer, hidden, cfg.cross_encoder)
    else:
        model = DualEncoder(encoder, tokenizer, cfg.dual_encoder)
    stages = {}
    if cfg.kind == "cross_encoder":   # first stages are fixed: built once, before training
        stages = {name: first_stage(cfg, encoder, tokenizer, c.documents) for name, c in sets.items()}
    first = {name: evaluate_retriever(stage, sets[name], METRICS, cfg.negatives.depth)
             for name, stage in stages.items()}
    before = measure(model, cfg, sets, stages)
    data = training_queries(train)
    t0 = time.perf_counter()
    tcfg = dataclasses.replace(cfg.train, metrics_path=cfg.train.metrics_path
                               or str(out / "metrics.jsonl"))
    n = cfg.negatives
    if cfg.kind == "span_pretrain":
        result = pretrain_spans(model, list(train.documents.values()), tcfg, cfg.batch,
                                cfg.spans, cfg.seed)
        builds = 0
    else:
        if cfg.kind == "dual_encoder" and n.refresh_every:
            factory = lambda: ExactDenseRetriever(model.text_encoder(), train.documents)  # noqa: E731
        else:
            fixed = first_stage(cfg, encoder, tokenizer, train.documents)
            factory = (lambda: fixed) if fixed is not None else None
        miner = (NegativeMiner(factory, data.queries, data.qrels, n.refresh_every, n.depth)
                 if factory is not None else None)
        if cfg.kind == "cross_encoder":
            result = train_cross_encoder(model, data, miner, tcfg, cfg.batch, n.per_query,
                                         n.hard_pool, cfg.seed)
        else:
            result = train_dual_encoder(model, data, miner, tcfg, cfg.batch, n.per_query,
                                        n.hard_pool, cfg.seed)
        builds = miner.builds if miner is not None else 0
    seconds = time.perf_counter() - t0
    after = measure(model, cfg, sets, stages)
    art = save_ranker(out / "artifact", model, "minilm" if mc is None else "bert", mc, identity,
                      {"objective": cfg.kind})
    losses = [result.losses[s] for s in sorted(result.losses)]
    report = {"kind": cfg.kind, "config": dataclasses.asdict(cfg), "steps": result.step,
              "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "train_seconds": seconds,
              "negative_index_builds": builds, "first_stage": first, "before": before,
              "after": after,
              "artifact": str(art), "base_identity": identity}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
