"""Training rankers on the one Trainer: cross-encoders, dual encoders (ANCE refresh), span pre-training.

    ce = CrossEncoder(encoder, tok, hidden)
    miner = NegativeMiner(lambda: first_stage, data.queries, data.qrels, depth=100)
    train_cross_encoder(ce, data, miner, TrainConfig(max_steps=200), batch_queries=8)

Each run streams query (or document) indices through ``RowStream`` and an objective from
models/retrieval/rank_data.py (or spans.py) builds the model's batch, so the strategies, the
checkpoints and the metrics log are the Trainer's. A dual encoder's negatives are refreshed
between Trainer segments: ``fit(until=...)`` stops every ``miner.refresh_every`` steps, the
miner rebuilds its retriever (an exact index over the current encoder: ANCE's refresh, done
synchronously here), and training continues with the new candidates. ``evaluate_retriever``
gives the metric table of any ``Retriever`` on a collection. Docs: docs/retrieval.md.
"""
from __future__ import annotations

from typing import Sequence

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import TrainResult, Trainer
from bmray.models.data.task_rows import RowStream
from bmray.models.retrieval.collections import Collection
from bmray.models.retrieval.contrastive import DualEncoder
from bmray.models.retrieval.cross_encoder import CrossEncoder
from bmray.models.retrieval.metrics import evaluate
from bmray.models.retrieval.negatives import NegativeMiner
from bmray.models.retrieval.rank_data import (GroupObjective, PoolObjective, TrainingQueries,
                                              query_rows)
from bmray.models.retrieval.spans import SpanConfig, SpanObjective
from bmray.models.retrieval.types import Retriever, to_run

__all__ = ["training_queries", "evaluate_retriever", "train_cross_encoder",
           "train_dual_encoder", "pretrain_spans", "METRICS"]

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@100")


def training_queries(collection: Collection) -> TrainingQueries:
    """The collection's judged queries with their documents and judgments."""
    return TrainingQueries(list(collection.judged_queries), collection.queries,
                           collection.documents, collection.qrels)


def evaluate_retriever(retriever: Retriever, collection: Collection,
                       metrics: Sequence[str] = METRICS, k: int = 100) -> dict[str, float]:
    """Mean metrics of ``retriever``'s top ``k`` over the collection's judged queries."""
    qids = list(collection.judged_queries)
    hits = retriever.search([collection.queries[q] for q in qids], k)
    return evaluate(to_run(qids, hits), collection.qrels, tuple(metrics))


def check_batch(batch: int, n: int, what: str) -> None:
    if batch < 1 or batch > n:
        raise ValueError(f"{what}: batch of {batch} but {n} training rows")


def train_cross_encoder(model: CrossEncoder, data: TrainingQueries, miner: NegativeMiner,
                        cfg: TrainConfig, batch_queries: int = 8, n_negatives: int = 7,
                        hard_pool: int = 30, seed: int = 0, **trainer_kw) -> TrainResult:
    """LCE training: ``batch_queries`` queries a step, each (positive + ``n_negatives``)."""
    check_batch(batch_queries, len(data.qids), "cross_encoder")
    objective = GroupObjective(data, miner, model.tokenize, n_negatives, hard_pool)
    stream = RowStream(query_rows(len(data.qids)), batch_queries, seed=seed)
    return Trainer(model, objective, stream, cfg, seed=seed, **trainer_kw).fit()


def train_dual_encoder(model: DualEncoder, data: TrainingQueries, miner: NegativeMiner | None,
                       cfg: TrainConfig, batch_queries: int = 16, n_hard: int = 1,
                       hard_pool: int = 30, seed: int = 0, **trainer_kw) -> TrainResult:
    """InfoNCE over in-batch + ``n_hard`` mined negatives per query (none when ``miner`` is
    None); the miner is refreshed every ``miner.refresh_every`` steps (0: static negatives)."""
    check_batch(batch_queries, len(data.qids), "dual_encoder")
    objective = PoolObjective(data, miner, model.tokenize, n_hard if miner else 0, hard_pool)
    stream = RowStream(query_rows(len(data.qids)), batch_queries, seed=seed)
    trainer = Trainer(model, objective, stream, cfg, seed=seed, **trainer_kw)
    every = miner.refresh_every if miner is not None and miner.refresh_every else cfg.max_steps
    result = None
    while trainer.step < cfg.max_steps:
        segment = trainer.fit(until=min(cfg.max_steps, trainer.step + every))
        if result is None:
            result = segment
        else:
            result.losses.update(segment.losses)
            result.rows.extend(segment.rows)
            result.step, result.checkpoint = segment.step, segment.checkpoint
        if miner is not None and trainer.step < cfg.max_steps:
            miner.maybe_refresh(trainer.step)
    return result if result is not None else trainer.fit()


def pretrain_spans(model: DualEncoder, documents: Sequence[str], cfg: TrainConfig,
                   batch_docs: int = 16, spans: SpanConfig = SpanConfig(), seed: int = 0,
                   **trainer_kw) -> TrainResult:
    """Contrastive span pairs (independent cropping) over unlabelled ``documents``."""
    check_batch(batch_docs, len(documents), "span_pretrain")
    objective = SpanObjective(list(documents), model.tokenize, spans)
    stream = RowStream(query_rows(len(documents)), batch_docs, seed=seed)
    return Trainer(model, objective, stream, cfg, seed=seed, **trainer_kw).fit()
