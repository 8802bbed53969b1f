"""Exact match and token F1 with SQuAD's official answer normalisation (v2.0 evaluation script).

``normalize_answer`` lower-cases, removes punctuation, removes the articles a/an/the and
collapses whitespace (Rajpurkar et al. 2016, sec. 5; ``evaluate-v2.0.py``). F1 is over the
bag of normalised tokens: precision = common / |pred|, recall = common / |gold|. A question is
scored against each gold answer and keeps the maximum. Unanswerable questions (SQuAD v2,
Rajpurkar et al. 2018) have no gold answer: the gold is then ``""`` and only the empty
prediction scores 1 (EM and F1); an empty prediction against a real answer scores 0.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (the script's order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1; if either side normalises to no tokens, 1 when both do, else 0."""
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_or_null(golds: Sequence[str]) -> list[str]:
    """The gold answers that normalise to something; none → ``[""]`` (unanswerable)."""
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def score_question(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the maximum over the gold answers."""
    golds = gold_or_null(golds)
    return (max(exact_match(prediction, g) for g in golds),
            max(f1_score(prediction, g) for g in golds))


def squad_evaluate(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]
                   ) -> dict[str, float]:
    """Mean EM and F1 in percent over every question in ``golds`` (a missing prediction is a
    ValueError naming it), plus the split into answerable (``has_ans_*``) and unanswerable
    (``no_ans_*``) questions where there are any, and the counts."""
    if not golds:
        raise ValueError("squad_evaluate: no questions")
    missing = [q for q in golds if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    rows = {q: (score_question(predictions[q], g), gold_or_null(g) != [""])
            for q, g in golds.items()}
    out: dict[str, float] = {"total": float(len(rows))}
    for name, keep in (("", lambda a: True), ("has_ans_", bool), ("no_ans_", lambda a: not a)):
        scores = [s for s, answerable in rows.values() if keep(answerable)]
        if scores:
            out[f"{name}exact"] = 100.0 * sum(s[0] for s in scores) / len(scores)
            out[f"{name}f1"] = 100.0 * sum(s[1] for s in scores) / len(scores)
            if name:
                out[f"{name}total"] = float(len(scores))
    return out
