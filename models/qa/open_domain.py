"""Open-domain QA: retrieve the top-k passages, read each, aggregate the answers.

Retriever-reader (Chen et al. 2017, DrQA; Karpukhin et al. 2020, DPR): any ``Retriever``
(BM25, dense, hybrid) gives the k best passages; the reader gives each passage's best span.
Answers are pooled by their SQuAD-normalised string, so one answer read in several passages
can add up (evidence aggregation, Wang et al. 2018): ``aggregate="sum"`` sums the candidates'
softmax weights over the k spans (w_i = exp(s_i) / sum_j exp(s_j), s = start + end logit),
``"max"`` keeps the single best span. A passage where the reader abstains (null score over
its threshold) contributes nothing, unless every passage abstains and ``allow_null`` is
False: then every span competes. Top-k passage recall counts a question when a gold answer
string occurs (normalised, as whole words) in one of its k passages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from bmray.models.qa.reader import Prediction
from bmray.models.qa.squad_metrics import normalize_answer, score_question
from bmray.models.retrieval.types import Retriever

ReadFn = Callable[[Sequence[str], Sequence[str]], list[Prediction]]
AGGREGATES = ("sum", "max")


@dataclass(frozen=True)
class OpenAnswer:
    """The chosen answer ("" when none), its aggregate score, the ids of the passages it was
    read from, and the ranked passage ids the retriever returned."""

    answer: str
    score: float
    supporting: tuple[str, ...]
    retrieved: tuple[str, ...]


class OpenDomainQA:
    """``reader(questions, contexts) -> [Prediction]`` (e.g. ``functools.partial(read,
    span_reader, tokenizer, ...)``); ``passages``: passage id -> text, the retriever's ids."""

    def __init__(self, retriever: Retriever, reader: ReadFn, passages: Mapping[str, str],
                 top_k: int = 5, aggregate: str = "sum", allow_null: bool = False):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate: {aggregate!r} is not one of {list(AGGREGATES)}")
        self.retriever, self.reader, self.passages = retriever, reader, passages
        self.top_k, self.aggregate, self.allow_null = top_k, aggregate, allow_null

    def retrieve(self, questions: Sequence[str]) -> list[list[str]]:
        hits = self.retriever.search(list(questions), self.top_k)
        unknown = {d for h in hits for d, _ in h if d not in self.passages}
        if unknown:
            raise KeyError(f"the retriever returned {len(unknown)} passage id(s) not in "
                           f"passages, e.g. {sorted(unknown)[:3]} (an index of another corpus?)")
        return [[d for d, _ in h] for h in hits]

    def answer(self, questions: Sequence[str]) -> list[OpenAnswer]:
        ranked = self.retrieve(questions)
        pairs = [(i, d) for i, ids in enumerate(ranked) for d in ids]
        preds = self.reader([questions[i] for i, _ in pairs], [self.passages[d] for _, d in pairs])
        per_q: list[list[tuple[str, Prediction]]] = [[] for _ in questions]
        for (i, d), p in zip(pairs, preds):
            per_q[i].append((d, p))
        return [self.combine(read, tuple(ids)) for read, ids in zip(per_q, ranked)]

    def combine(self, read: Sequence[tuple[str, Prediction]], retrieved: tuple[str, ...]
                ) -> OpenAnswer:
        """Pool one question's per-passage predictions into its answer."""
        cands = [(d, p.answer, p.score) for d, p in read if p.answer]
        if not cands and not self.allow_null:
            cands = [(d, p.text, p.score) for d, p in read if p.text]
        if not cands:
            return OpenAnswer("", 0.0, (), retrieved)
        top = max(s for _, _, s in cands)
        z = sum(math.exp(s - top) for _, _, s in cands)
        pooled: dict[str, list] = {}
        for d, text, s in cands:
            key = normalize_answer(text)
            weight = math.exp(s - top) / z if self.aggregate == "sum" else s
            entry = pooled.setdefault(key, [text, s, 0.0 if self.aggregate == "sum" else weight, []])
            if s > entry[1]:
                entry[0], entry[1] = text, s          # the surface form of the best span
            entry[2] = entry[2] + weight if self.aggregate == "sum" else max(entry[2], weight)
            entry[3].append(d)
        text, _, score, docs = max(pooled.values(), key=lambda e: e[2])
        return OpenAnswer(text, float(score), tuple(docs), retrieved)


def answer_in(passage: str, gold: str) -> bool:
    """Whether the normalised ``gold`` occurs as whole words in the normalised passage."""
    g = normalize_answer(gold)
    return bool(g) and f" {g} " in f" {normalize_answer(passage)} "


def evaluate_open_domain(qa: OpenDomainQA, questions: Sequence[str],
                         golds: Sequence[Sequence[str]], ks: Sequence[int] = (1, 5)
                         ) -> dict[str, float]:
    """Top-k passage recall for each k <= top_k and end-to-end EM / F1, in percent."""
    if len(questions) != len(golds):
        raise ValueError(f"{len(questions)} questions but {len(golds)} gold lists")
    if not questions:
        raise ValueError("evaluate_open_domain: no questions")
    answers = qa.answer(questions)
    out: dict[str, float] = {}
    for k in sorted({min(k, qa.top_k) for k in ks} | {qa.top_k}):
        hit = [any(answer_in(qa.passages[d], g) for d in a.retrieved[:k] for g in gs)
               for a, gs in zip(answers, golds)]
        out[f"recall@{k}"] = 100.0 * sum(hit) / len(hit)
    scores = [score_question(a.answer, gs) for a, gs in zip(answers, golds)]
    out["exact"] = 100.0 * sum(s[0] for s in scores) / len(scores)
    out["f1"] = 100.0 * sum(s[1] for s in scores) / len(scores)
    out["questions"] = float(len(questions))
    return out
