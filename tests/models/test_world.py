"""Tests of the synthetic world generator (models/world).

Every check recomputes what it expects from the written files (the fact table in entities.jsonl,
the document texts) with its own brute-force code -- regex scans, sentence splits, the relation
chain -- rather than comparing against stored outputs of the generator.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bmray.models.typed_config import ConfigError, from_dict
from bmray.models.world import REGIONS, TYPES, World, WorldConfig, write_world

SMALL = dict(n_entities=80, docs_per_entity=3)


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as fh:
        return [json.loads(line) for line in fh]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mentions(name: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text) is not None


def _sentence_around(text: str, start: int, end: int) -> str:
    """The sentence holding text[start:end]; sentences end with '. ' (names hold no dots)."""
    left = text.rfind(". ", 0, start)
    right = text.find(". ", end)
    return text[left + 2 if left >= 0 else 0: right if right >= 0 else len(text)]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def _value_text(attr_value, kind_is_entity: bool, entities: dict, attribute: str) -> str:
    if kind_is_entity:
        return entities[attr_value]["name"]
    if attribute == "population":
        return f"{attr_value:,}"
    return str(attr_value)


# Which attributes are relations, by type: the one piece of schema knowledge the tests restate.
RELATION_ATTRS = {("person", "born_in"), ("person", "employer"), ("city", "country"),
                  ("company", "headquarters"), ("company", "founder"), ("country", "capital"),
                  ("river", "country")}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_a")
    manifest = write_world(WorldConfig(seed=0, **SMALL), str(out), formats=("jsonl", "parquet"))
    entities = {e["id"]: e for e in _read_jsonl(out / "entities.jsonl")}
    docs = {d["id"]: d for d in _read_jsonl(out / "documents.jsonl")}
    return out, manifest, entities, docs


def _expected(entities: dict, eid: int, attribute: str) -> str:
    e = entities[eid]
    return _value_text(e["attributes"][attribute], (e["type"], attribute) in RELATION_ATTRS,
                       entities, attribute)


def test_same_seed_gives_identical_files_other_seed_differs(small_world, tmp_path):
    out_a, manifest, entities, _ = small_world
    write_world(WorldConfig(seed=0, **SMALL), str(tmp_path / "b"), formats=("jsonl", "parquet"))
    write_world(WorldConfig(seed=1, **SMALL), str(tmp_path / "c"), formats=("jsonl", "parquet"))
    names = sorted(p.name for p in out_a.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"documents.jsonl", "qa.jsonl", "retrieval.jsonl", "entities.jsonl",
            "documents.parquet", "world.json"} <= set(names)
    for name in names:
        assert _sha(out_a / name) == _sha(tmp_path / "b" / name), name
    for name in ("documents.jsonl", "qa.jsonl", "retrieval.jsonl", "entities.jsonl"):
        assert _sha(out_a / name) != _sha(tmp_path / "c" / name), name
    other = {e["name"] for e in _read_jsonl(tmp_path / "c" / "entities.jsonl")}
    assert len(other & {e["name"] for e in entities.values()}) < 5     # a different world
    assert manifest["files"]["documents.jsonl"]["bytes"] == (out_a / "documents.jsonl").stat().st_size


def test_fact_table_is_consistent(small_world):
    _, manifest, entities, _ = small_world
    names = [e["name"] for e in entities.values()]
    assert len(set(names)) == len(names) == SMALL["n_entities"]
    counts = Counter(e["type"] for e in entities.values())
    assert set(counts) == set(TYPES) and counts == manifest["type_counts"]
    for e in entities.values():
        a = e["attributes"]
        for attr, value in a.items():
            if (e["type"], attr) in RELATION_ATTRS:          # relations point at the right type
                target_type = {"born_in": "city", "employer": "company", "country": "country",
                               "headquarters": "city", "founder": "person",
                               "capital": "city"}[attr]
                assert entities[value]["type"] == target_type
        if e["type"] == "country":                           # the capital lies in the country
            assert entities[a["capital"]]["attributes"]["country"] == e["id"]
        if e["type"] == "company":                           # founded after the founder's birth
            assert a["founded"] - entities[a["founder"]]["attributes"]["birth_year"] >= 20
    # back-references (what a target's page lists) are exactly the inverse of the fact table
    inverse = defaultdict(set)
    for e in entities.values():
        for attr, value in e["attributes"].items():
            if (e["type"], attr) in RELATION_ATTRS:
                inverse[(value, e["type"], attr)].add(e["id"])
    world = World(WorldConfig(seed=0, **SMALL))
    listed = {(eid, src, attr): set(ids) for eid in entities for src, attr, ids in world.backrefs(eid)}
    assert listed == dict(inverse)
    # every country has exactly one capital
    capitals = Counter(e["attributes"]["capital"] for e in entities.values() if e["type"] == "country")
    assert max(capitals.values()) == 1


def test_qa_spans_match_context_and_fact_table(small_world):
    out, _, entities, docs = small_world
    qa = _read_jsonl(out / "qa.jsonl")
    per_pair = Counter((q["entity_id"], q["attribute"]) for q in qa)
    n_attrs = sum(len(e["attributes"]) for e in entities.values())
    assert len(per_pair) == n_attrs and set(per_pair.values()) == {1}
    for q in qa:
        context = q["context"]
        assert context == docs[q["context_id"]]["text"]
        assert context[q["answer_start"]:q["answer_end"]] == q["answer"]
        assert q["answer"] == _expected(entities, q["entity_id"], q["attribute"])
        subject = entities[q["entity_id"]]["name"]
        assert subject in q["question"]
        # the answer sits in a sentence that is about the subject
        assert _mentions(subject, _sentence_around(context, q["answer_start"], q["answer_end"]))
        assert q["split"] in ("train", "eval")


def test_retrieval_labels_match_a_brute_force_scan(small_world):
    out, _, entities, docs = small_world
    queries = _read_jsonl(out / "retrieval.jsonl")
    assert len(queries) == SMALL["n_entities"]
    for q in queries:
        eid, name = q["entity_id"], entities[q["entity_id"]]["name"]
        assert q["answer"] == _expected(entities, eid, q["attribute"])
        graded = {r["doc_id"]: r["relevance"] for r in q["relevant"]}
        grades = [r["relevance"] for r in q["relevant"]]
        assert grades == sorted(grades, reverse=True) and set(grades) <= {1, 2}
        # labelled relevant <=> the page names the entity (scan of the whole corpus)
        naming = {d["id"] for d in docs.values() if _mentions(name, d["text"])}
        assert set(graded) == naming
        # every grade-2 page states the answer in a sentence naming the entity
        for doc_id, g in graded.items():
            stated = any(_mentions(name, s) and q["answer"] in s
                         for s in _sentences(docs[doc_id]["text"]))
            if g == 2:
                assert stated, (q["id"], doc_id)
        assert graded[f"doc-{eid}-0"] == 2          # the main article states every fact


def test_classification_labels_follow_the_fact_table(small_world):
    out, _, entities, docs = small_world

    def region(eid: int) -> str:          # the relation chain, recomputed from the fact table
        e = entities[eid]
        via = {"country": None, "city": "country", "river": "country", "person": "born_in",
               "company": "headquarters"}[e["type"]]
        return e["attributes"]["region"] if via is None else region(e["attributes"][via])

    for d in docs.values():
        e = entities[d["entity_id"]]
        assert d["label"] == e["type"]
        assert d["region"] == region(e["id"])
        assert _mentions(e["name"], d["text"]) and e["name"] in d["title"]
    assert len(docs) == SMALL["n_entities"] * SMALL["docs_per_entity"]
    world = World(WorldConfig(seed=0, **SMALL))
    for rec in world.iter_classification():
        d = docs[rec["id"]]
        assert (rec["text"], rec["label"], rec["region"]) == (d["text"], d["label"], d["region"])
        assert TYPES[rec["label_id"]] == rec["label"] and REGIONS[rec["region_id"]] == rec["region"]


def test_facts_repeat_across_pages_in_varied_wording(small_world):
    """What makes the world learnable: each fact recurs, phrased more than one way."""
    _, _, entities, docs = small_world
    sentences = [(i, s) for i, d in enumerate(docs.values()) for s in _sentences(d["text"])]
    wordings = defaultdict(set)
    repeats = []
    for e in entities.values():
        about = [(i, s) for i, s in sentences if e["name"] in s and _mentions(e["name"], s)]
        for attr in e["attributes"]:
            value = _expected(entities, e["id"], attr)
            hits = [(i, s) for i, s in about if value in s]
            repeats.append(len({i for i, _ in hits}))
            for _, s in hits:
                wordings[(e["type"], attr)].add(s.replace(e["name"], "S").replace(value, "V"))
    assert min(repeats) >= 1 and sum(repeats) / len(repeats) >= 1.8
    assert all(len(w) >= 2 for w in wordings.values()), {k: len(w) for k, w in wordings.items()}


def test_parquet_matches_jsonl(small_world):
    out, _, _, _ = small_world
    for part in ("documents", "qa", "retrieval", "entities"):
        rows = pq.read_table(out / f"{part}.parquet").to_pylist()
        lines = _read_jsonl(out / f"{part}.jsonl")
        if part == "entities":
            rows = [{**r, "attributes": json.loads(r["attributes"])} for r in rows]
        assert rows == lines, part


def test_ranges_stitch_and_match_files(small_world):
    out, _, _, _ = small_world
    world = World(WorldConfig(seed=0, **SMALL))
    whole = list(world.iter_documents())
    assert list(world.iter_documents(0, 33)) + list(world.iter_documents(33)) == whole
    assert whole == _read_jsonl(out / "documents.jsonl")


def _doc_bytes(tmp_path: Path, **cfg) -> int:
    m = write_world(WorldConfig(**cfg), str(tmp_path), parts=("documents",))
    return m["files"]["documents.jsonl"]["bytes"]


def test_size_scales_with_entities_and_size_bytes(tmp_path):
    small = _doc_bytes(tmp_path / "s", n_entities=200, docs_per_entity=2)
    large = _doc_bytes(tmp_path / "l", n_entities=400, docs_per_entity=2)
    assert 1.85 < large / small < 2.15
    target = 150_000
    got = _doc_bytes(tmp_path / "t", size_bytes=target, docs_per_entity=2)
    assert abs(got - target) / target < 0.15
    assert World(WorldConfig(size_bytes=10**9)).n_entities > 100_000      # a gigabyte is reachable


def test_generation_streams(tmp_path):
    world = World(WorldConfig(n_entities=2_000_000, docs_per_entity=1))
    for it in (world.iter_documents(), world.iter_qa(), world.iter_retrieval(),
               world.iter_classification(), world.iter_entities()):
        assert inspect.isgenerator(it)
    t0 = time.perf_counter()
    first = [next(world.iter_documents(1_999_000)) for _ in range(3)]
    assert time.perf_counter() - t0 < 1.0          # no up-front pass over two million entities
    assert first[0]["entity_id"] == 1_999_000
    # memory stays flat while streaming: the peak after 800 entities is not ~4x that after 200
    # (the bounded caches are full by then; a list of all pages would grow linearly)
    world = World(WorldConfig(n_entities=5000, docs_per_entity=1))
    stream = world.iter_documents()
    tracemalloc.start()
    try:
        for _ in range(200):
            next(stream)
        peak_200 = tracemalloc.get_traced_memory()[1]
        for _ in range(600):
            next(stream)
        peak_800 = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_800 < 1.6 * peak_200, (peak_200, peak_800)


@pytest.mark.parametrize("key,value", [("n_entities", 5), ("docs_per_entity", 0),
                                       ("eval_fraction", 1.5), ("size_bytes", -1),
                                       ("fact_keep_prob", 0.0), ("seed", "zero"),
                                       ("retrieval_per_entity", 9), ("n_entities", True)])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"world\.{key}"):
        WorldConfig(**{key: value})


def test_config_from_mapping():
    cfg = from_dict(WorldConfig, {"seed": 3, "n_entities": 40}, "world")
    assert World(cfg).n_entities == 40
    with pytest.raises(ConfigError, match="n_entitys"):
        from_dict(WorldConfig, {"n_entitys": 40}, "world")
    with pytest.raises(ConfigError, match="formats"):
        write_world(WorldConfig(n_entities=20), "/nonexistent/never", formats=("csv",))


def test_parallel_writer_gives_the_same_bytes(tmp_path):
    cfg = WorldConfig(seed=5, n_entities=1500, docs_per_entity=1, retrieval_per_entity=0,
                      qa_per_fact=0)
    write_world(cfg, str(tmp_path / "serial"), formats=("jsonl", "parquet"), parts=("documents",))
    write_world(cfg, str(tmp_path / "parallel"), formats=("jsonl", "parquet"),
                parts=("documents",), num_workers=2)
    for name in ("documents.jsonl", "documents.parquet", "world.json"):
        assert _sha(tmp_path / "serial" / name) == _sha(tmp_path / "parallel" / name), name
