"""Extractive QA examples: the synthetic world's pairs (plus SQuAD v2-style unanswerables)
and COVID-QA (Möller et al. 2020, SQuAD format) with its shifted answer offsets repaired.

An unanswerable question pairs a question with a page of another entity that does not contain
the answer string (the SQuAD v2 idea of a plausible but answer-free context, Rajpurkar et al.
2018). COVID-QA has one paragraph per paper; 234 of its 1,380 ``answer_start`` values are off
by a few characters, so the answer text is searched for near the given offset (nearest first,
within ``max_shift``) and what cannot be found is dropped and counted. Its train/eval split is
by document (a hash of the document id), so no paper is in both.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

COVID_QA_FILE = Path(__file__).resolve().parents[2] / "data" / "qa" / "covid-qa" / "200423_covidQA.json"


@dataclass(frozen=True)
class QAExample:
    """One question over one context; ``answers`` empty and ``answer_start`` None when it is
    unanswerable from this context. ``context[answer_start:][:len(answers[0])] == answers[0]``."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_start: int | None
    context_id: str

    @property
    def span(self) -> tuple[int, int] | None:
        if self.answer_start is None:
            return None
        return self.answer_start, self.answer_start + len(self.answers[0])


def world_examples(records: Iterable[dict[str, Any]], unanswerable: float = 0.0,
                   seed: int = 0) -> list[QAExample]:
    """QAExamples from ``World.iter_qa`` records (with context), plus ``unanswerable`` times as
    many questions each paired with another entity's page that lacks the answer string."""
    recs = [r for r in records]
    if any("context" not in r for r in recs):
        raise ValueError("world QA records need their context (WorldConfig.qa_include_context)")
    out = [QAExample(r["id"], r["question"], r["context"], (r["answer"],), r["answer_start"],
                     r["context_id"]) for r in recs]
    rng = random.Random(seed)
    pages = sorted({(r["context_id"], r["entity_id"], r["context"]) for r in recs})
    for k in range(int(round(unanswerable * len(recs)))):
        r = recs[k % len(recs)]
        others = [p for p in pages if p[1] != r["entity_id"] and r["answer"] not in p[2]]
        if others:
            cid, _, text = rng.choice(others)
            out.append(QAExample(f"{r['id']}-null-{k}", r["question"], text, (), None, cid))
    return out


def repair_start(context: str, text: str, start: int, max_shift: int = 16) -> int | None:
    """The occurrence of ``text`` nearest to ``start`` (0, -1, +1, -2, ...), or None."""
    for shift in range(max_shift + 1):
        for s in ((start,) if shift == 0 else (start - shift, start + shift)):
            if 0 <= s and context.startswith(text, s):
                return s
    return None


@dataclass(frozen=True)
class CovidQA:
    examples: list[QAExample]
    repaired: int            # answers found off their given answer_start
    dropped: int             # answers not found within max_shift: left out


def load_covid_qa(path: str | Path = COVID_QA_FILE, max_shift: int = 16) -> CovidQA:
    """The COVID-QA questions with repaired, whitespace-stripped answer offsets."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COVID-QA file not found: {path}")
    try:
        data = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a SQuAD-format JSON ({e})") from e
    out, repaired, dropped = [], 0, 0
    for article in data:
        for par in article["paragraphs"]:
            context, doc = par["context"], str(par["document_id"])
            for qa in par["qas"]:
                ans = qa["answers"][0]
                text = ans["text"].strip()
                start = repair_start(context, ans["text"], ans["answer_start"], max_shift)
                if start is None or not text:
                    dropped += 1
                    continue
                repaired += start != ans["answer_start"]
                start += len(ans["text"]) - len(ans["text"].lstrip())
                out.append(QAExample(str(qa["id"]), qa["question"].strip(), context, (text,),
                                     start, doc))
    return CovidQA(out, repaired, dropped)


def split_by_context(examples: Sequence[QAExample], eval_fraction: float, seed: int = 0
                     ) -> tuple[list[QAExample], list[QAExample]]:
    """(train, eval): a context id goes to eval when its hash (with ``seed``) falls under
    ``eval_fraction`` — deterministic, and no context is on both sides."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")

    def is_eval(cid: str) -> bool:
        h = hashlib.sha256(f"{seed}:{cid}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0 ** 64 < eval_fraction
    train = [e for e in examples if not is_eval(e.context_id)]
    evals = [e for e in examples if is_eval(e.context_id)]
    return train, evals
