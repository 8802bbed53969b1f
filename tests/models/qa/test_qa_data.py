"""QA data: COVID-QA's shifted offsets repaired, the split by document, world null questions."""
import json

import pytest

from bmray.models.qa.data import (load_covid_qa, repair_start, split_by_context,
                                  world_examples)


def test_repair_start_finds_the_nearest_occurrence():
    ctx = "ab cat dog cat"
    assert repair_start(ctx, "cat", 3) == 3
    assert repair_start(ctx, "cat", 4) == 3          # shifted by +1
    assert repair_start(ctx, "cat", 12) == 11        # nearest of the two
    assert repair_start(ctx, "cow", 3) is None
    assert repair_start(ctx, "cat", 8, max_shift=1) is None


def test_covid_qa_offsets_repaired_and_split_by_document():
    covid = load_covid_qa()
    assert len(covid.examples) == 1380 and covid.repaired == 234 and covid.dropped == 0
    for e in covid.examples:
        s, t = e.span
        assert e.context[s:t] == e.answers[0] and e.answers[0] == e.answers[0].strip()
    train, evals = split_by_context(covid.examples, 0.2, seed=0)
    assert {e.context_id for e in train}.isdisjoint({e.context_id for e in evals})
    assert len(train) + len(evals) == 1380 and 0.1 < len(evals) / 1380 < 0.35
    assert split_by_context(covid.examples, 0.2, seed=0) == (train, evals)


def test_bad_covid_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_covid_qa(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 2}))
    with pytest.raises(ValueError, match="not a SQuAD-format"):
        load_covid_qa(bad)


def test_world_unanswerables_are_other_pages_without_the_answer(world_qa):
    ex = world_examples(world_qa, unanswerable=0.5, seed=0)
    real = [e for e in ex if e.answers]
    null = [e for e in ex if not e.answers]
    assert len(real) == len(world_qa) and len(null) == round(0.5 * len(world_qa))
    by_id = {r["id"]: r for r in world_qa}
    for e in null:
        r = by_id[e.id.split("-null-")[0]]
        assert e.question == r["question"] and e.span is None
        assert r["answer"] not in e.context and e.context_id != r["context_id"]
    with pytest.raises(ValueError, match="need their context"):
        world_examples([{k: v for k, v in world_qa[0].items() if k != "context"}])
