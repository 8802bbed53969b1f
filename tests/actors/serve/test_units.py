"""The pieces of the app that need no Serve: batch grouping, the key check, generation's
finish reason and batch groups, server-sent events."""
from __future__ import annotations

from bmray.actors.serve.auth import key_matches
from bmray.actors.serve.deployments import search_grouped
from bmray.actors.serve.generate import finish_reason, group_key
from bmray.actors.serve.ingress import sse
from bmray.models.generation import GenerationConfig
from bmray.models.retrieval.bm25 import BM25Index

DOCS = {"d1": "apple banana apple", "d2": "banana cherry", "d3": "cherry cherry date",
        "d4": "apple date elder fig", "d5": "fig grape banana"}


class Recording:
    """A retriever stand-in that records its calls and answers like the wrapped index."""

    def __init__(self, index):
        self.index, self.calls = index, []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return self.index.search(queries, k)


def test_a_batch_is_one_search_per_index_and_k_and_each_call_gets_its_own_hits():
    a = BM25Index.build(list(DOCS), list(DOCS.values()))
    b = BM25Index.build(list(DOCS)[:3], list(DOCS.values())[:3])
    indexes = {"a": Recording(a), "b": Recording(b)}
    calls = [("a", ["apple", "fig"], 2), ("b", ["cherry"], 5), ("a", ["banana"], 2),
             ("a", ["date"], 1), ("b", ["apple banana"], 5)]
    out = search_grouped(indexes, calls)
    for (name, queries, k), got in zip(calls, out):       # reference: each call on its own
        assert got == {"a": a, "b": b}[name].search(queries, k)
    assert indexes["a"].calls == [(["apple", "fig", "banana"], 2), (["date"], 1)]
    assert indexes["b"].calls == [(["cherry", "apple banana"], 5)]


def test_key_matches_only_the_bearer_key():
    key = "k" * 20
    assert key_matches(f"Bearer {key}", key) and key_matches(f"bearer {key}", key)
    for header in (None, "", key, f"Basic {key}", f"Bearer {key}x", f"Bearer {key[:-1]}",
                   "Bearer ", f"Token {key}"):
        assert not key_matches(header, key), header


def test_finish_reason_is_openais():
    cfg = GenerationConfig(max_new_tokens=3, eos_id=2)
    assert finish_reason([5, 6, 7], cfg) == "length"
    assert finish_reason([5, 6, 2], cfg) == "stop"          # eos at the last step
    assert finish_reason([5, 2], cfg) == "stop"
    assert finish_reason([5], cfg) == "stop"                 # a stop string cut the rest
    assert finish_reason([5, 6, 7], GenerationConfig(max_new_tokens=3)) == "length"


def test_seeded_samples_never_share_a_batch_group():
    greedy = {"strategy": "greedy", "max_new_tokens": 8, "stop": ["x"], "seed": None}
    assert group_key(0, greedy) == group_key(1, dict(greedy))
    assert group_key(0, greedy) != group_key(1, {**greedy, "max_new_tokens": 9})
    assert group_key(0, greedy) != group_key(1, {**greedy, "stop": ["y"]})
    seeded = {**greedy, "strategy": "sample", "seed": 3}
    assert group_key(0, seeded) != group_key(1, dict(seeded))


def test_server_sent_events_are_data_lines():
    assert sse({"text": "a\nb"}) == 'data: {"text": "a\\nb"}\n\n'      # one line per event
    assert sse("[DONE]") == "data: [DONE]\n\n"
