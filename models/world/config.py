"""`WorldConfig`: the few knobs of the synthetic world, checked when built.

Why a typed dataclass: a world is named by its config alone (same config -> byte-identical files),
so every knob lives here and a bad value is a `ConfigError` naming the key (``world.n_entities``).
"""
from __future__ import annotations

from dataclasses import dataclass

from bmray.models.typed_config import ConfigError, check_int
from bmray.models.world.names import MAX_ENTITIES

#: A block of 20 entity slots repeats along the id axis (see `schema.BLOCK`), so at least one block
#: is needed for every entity type to exist.
MIN_ENTITIES = 20


def _check_fraction(path: str, value, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    bad_lo = value <= 0 if lo_open else value < 0
    bad_hi = value >= 1 if hi_open else value > 1
    if bad_lo or bad_hi:
        interval = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
        raise ConfigError(f"{path}: must lie in {interval}, got {value!r}")


@dataclass
class WorldConfig:
    """How big the world is and how its facts are written out.

    seed:              names every random choice; same seed -> same world, byte for byte.
    n_entities:        number of entities (people, cities, companies, countries, rivers in a fixed
                       8:5:4:1:2 ratio). Ignored when ``size_bytes`` is set.
    size_bytes:        approximate size of ``documents.jsonl`` wanted (e.g. 1_000_000 or 10**9);
                       ``n_entities`` is then derived by `estimate_entities` from a probe world.
    docs_per_entity:   document 0 is the main article (every fact of the entity); documents 1.. are
                       secondary articles restating a random subset with other paraphrases.
    fact_keep_prob:    chance that a secondary article restates a given fact or back-reference.
    max_list:          most names in one back-reference sentence ("Cities in X include A, B and C.").
    qa_per_fact:       question/answer pairs per (entity, attribute), each with its own phrasing and
                       context document.
    retrieval_per_entity: retrieval queries per entity (each about a different attribute).
    eval_fraction:     share of records (documents, QA, queries) whose ``split`` is "eval".
    qa_include_context: put the context text into each QA record (SQuAD-style, self-contained);
                       without it a QA record names only ``context_id``.
    """

    seed: int = 0
    n_entities: int = 200
    size_bytes: int | None = None
    docs_per_entity: int = 3
    fact_keep_prob: float = 0.5
    max_list: int = 5
    qa_per_fact: int = 1
    retrieval_per_entity: int = 1
    eval_fraction: float = 0.1
    qa_include_context: bool = True

    def __post_init__(self) -> None:
        p = "world"
        check_int(f"{p}.seed", self.seed)
        check_int(f"{p}.n_entities", self.n_entities, MIN_ENTITIES, MAX_ENTITIES)
        if self.size_bytes is not None:
            check_int(f"{p}.size_bytes", self.size_bytes, 1)
        check_int(f"{p}.docs_per_entity", self.docs_per_entity, 1, 1000)
        _check_fraction(f"{p}.fact_keep_prob", self.fact_keep_prob, lo_open=True)
        check_int(f"{p}.max_list", self.max_list, 1)
        check_int(f"{p}.qa_per_fact", self.qa_per_fact, 0)
        check_int(f"{p}.retrieval_per_entity", self.retrieval_per_entity, 0, 3)
        _check_fraction(f"{p}.eval_fraction", self.eval_fraction, hi_open=True)
        if not isinstance(self.qa_include_context, bool):
            raise ConfigError(f"{p}.qa_include_context: expected true or false, "
                              f"got {self.qa_include_context!r}")
