"""Open-domain QA with stand-ins: a dict-backed retriever and a table-driven reader, so the
aggregation and the metrics are checked against sums written out here."""
import functools
import math

import pytest

from bmray.models.qa.open_domain import OpenDomainQA, answer_in, evaluate_open_domain
from bmray.models.qa.reader import Prediction, read
from bmray.models.qa.windows import SpanTokenizer

PASSAGES = {"p1": "Paris is the capital of France.", "p2": "The capital, Paris, is large.",
            "p3": "Lyon is a city in France.", "p4": "Rome is the capital of Italy."}


class DictRetriever:
    def __init__(self, table):
        self.table = table

    def search(self, queries, k):
        return [self.table[q][:k] for q in queries]


def table_reader(spans):
    """(question, passage) -> (text, score, null_score); answer "" when null > score."""
    def reader(questions, contexts):
        out = []
        for q, c in zip(questions, contexts):
            text, score, null = spans[(q, c)]
            start = c.find(text)
            out.append(Prediction(text, start, start + len(text), score, null,
                                  "" if null - score > 0 else text))
        return out
    return reader


Q = "capital of France?"
RET = DictRetriever({Q: [("p3", 9.0), ("p1", 8.0), ("p2", 7.0), ("p4", 1.0)]})
SPANS = {(Q, PASSAGES["p1"]): ("Paris", 2.2, 0.0), (Q, PASSAGES["p2"]): ("Paris,", 1.5, 0.0),
         (Q, PASSAGES["p3"]): ("Lyon", 2.5, 0.0), (Q, PASSAGES["p4"]): ("Rome", 9.0, 10.0)}


def test_sum_pools_one_answer_over_passages_max_does_not():
    qa = OpenDomainQA(RET, table_reader(SPANS), PASSAGES, top_k=3, aggregate="sum")
    a = qa.answer([Q])[0]
    z = math.exp(2.2) + math.exp(1.5) + math.exp(2.5)
    assert a.answer == "Paris" and a.supporting == ("p1", "p2")      # "Paris," normalises same
    assert a.score == pytest.approx((math.exp(2.2) + math.exp(1.5)) / z)   # 0.61 vs Lyon's 0.39
    assert a.retrieved == ("p3", "p1", "p2")
    m = OpenDomainQA(RET, table_reader(SPANS), PASSAGES, top_k=3, aggregate="max").answer([Q])[0]
    assert m.answer == "Lyon" and m.score == pytest.approx(2.5)


def test_abstaining_passages_and_the_fallback():
    only_rome = DictRetriever({Q: [("p4", 1.0)]})
    a = OpenDomainQA(only_rome, table_reader(SPANS), PASSAGES, top_k=1).answer([Q])[0]
    assert a.answer == "Rome"                           # every passage abstained: fall back
    a = OpenDomainQA(only_rome, table_reader(SPANS), PASSAGES, top_k=1,
                     allow_null=True).answer([Q])[0]
    assert a.answer == "" and a.supporting == ()
    qa = OpenDomainQA(RET, table_reader(SPANS), PASSAGES, top_k=4)
    assert "p4" not in qa.answer([Q])[0].supporting     # an abstaining passage adds nothing


def test_recall_and_end_to_end_metrics_by_hand():
    assert answer_in("The capital, Paris, is large.", "paris")
    assert not answer_in("Parisian food", "Paris")      # whole words only
    qa = OpenDomainQA(RET, table_reader(SPANS), PASSAGES, top_k=3)
    out = evaluate_open_domain(qa, [Q], [["Paris"]], ks=(1, 2, 3))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 100.0 and out["recall@3"] == 100.0
    assert out["exact"] == 100.0 and out["f1"] == 100.0
    q2 = "capital of Italy?"
    ret = DictRetriever({Q: RET.table[Q], q2: [("p1", 3.0), ("p3", 2.0), ("p4", 1.0)]})
    spans = {**SPANS, (q2, PASSAGES["p1"]): ("Paris is the capital", 3.0, 0.0),
             (q2, PASSAGES["p3"]): ("Lyon", 1.0, 0.0), (q2, PASSAGES["p4"]): ("Rome", 0.0, 5.0)}
    out = evaluate_open_domain(OpenDomainQA(ret, table_reader(spans), PASSAGES, top_k=3),
                               [Q, q2], [["Paris"], ["Rome"]], ks=(1,))
    assert out["recall@1"] == 0.0 and out["recall@3"] == 100.0
    assert out["exact"] == 50.0 and out["f1"] == 50.0


def test_bad_input():
    with pytest.raises(ValueError, match="aggregate"):
        OpenDomainQA(RET, table_reader(SPANS), PASSAGES, aggregate="mean")
    bad = DictRetriever({Q: [("p9", 1.0)]})
    with pytest.raises(KeyError, match="p9"):
        OpenDomainQA(bad, table_reader(SPANS), PASSAGES).answer([Q])


def test_wires_a_real_span_reader(bpe_tokenizer, tiny_reader):
    reader = functools.partial(read, tiny_reader(bpe_tokenizer),
                               SpanTokenizer.from_bmray(bpe_tokenizer), max_length=64, doc_stride=16)
    a = OpenDomainQA(RET, reader, PASSAGES, top_k=2).answer([Q, Q])
    assert len(a) == 2 and a[0] == a[1] and a[0].answer
    assert set(a[0].supporting) <= {"p3", "p1"}
