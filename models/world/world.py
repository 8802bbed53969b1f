"""`World`: a deterministic synthetic encyclopedia, generated lazily one entity at a time.

Everything is a pure function of (seed, entity id), so any entity, page, question or relevance
list can be produced on its own, in any order, in O(1) memory: that is what lets the same code
write a few kilobytes for a test and gigabytes for a benchmark.

- Entity ``i`` has type ``BLOCK[i % 20]`` and index ``j`` among its type.
- A relation (person born_in city, ...) maps source index ``j`` to target
  ``sigma(pi(j) mod N_target)`` with ``pi``, ``sigma`` seeded affine permutations of the sources
  and targets, so targets are hit evenly and the inverse ("who was born in this city?") is
  computed exactly, without a table. A country's
  capital is the first of its cities under that inverse, so capital and located-in always agree.
- Attribute values come from a `random.Random` seeded by SplitMix64 of (seed, id) (Steele, Lea &
  Flood 2014); derived values stay consistent (a company is founded 22-55 years after its
  founder's birth; a document's region is its entity's country's region).
- Pages state facts through paraphrase templates (`schema`), in shuffled order; back-references on
  a target's page ("Cities in X include A, B.") restate the sources' facts. Each rendered sentence
  records its claims ``(subject, attribute, start, end)`` and the entities it names, which is how
  QA spans (SQuAD, Rajpurkar et al. 2016) and graded relevance labels (for nDCG, Järvelin &
  Kekäläinen 2002) are exact rather than guessed.
"""
from __future__ import annotations

import json
import math
import random
import string
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Iterator

from bmray.models.world import schema
from bmray.models.world.config import MIN_ENTITIES, WorldConfig
from bmray.models.world.names import MAX_ENTITIES, NameBook

_MASK64 = (1 << 64) - 1
_TAG_NAMES, _TAG_GIVEN, _TAG_ATTR, _TAG_DOC, _TAG_QA, _TAG_RET, _TAG_SPLIT, _TAG_REL = range(1, 9)

# Relations whose forward map is a balanced affine assignment; the country's capital is derived.
RELATIONS = tuple((t, attr, kind) for t, attrs in schema.ATTRIBUTES.items()
                  for attr, kind in attrs if kind in schema.TYPES and (t, attr) != ("country", "capital"))


def _mix(*parts: int) -> int:
    """SplitMix64 folded over ``parts``: a stable, well-spread 64-bit hash of a tuple of ints."""
    h = 0
    for p in parts:
        h = (h ^ (p & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


def dumps(record: dict) -> str:
    """The one JSON encoding used for every file, so byte counts and hashes are reproducible."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Fact:
    """One ground-truth fact. ``value`` is an entity id for relations, else the raw value."""
    subject: int
    attribute: str
    kind: str          # a target entity type (relation), "year", "number" or "choice"
    value: int | str
    text: str          # how the value is written in documents (and the QA answer)

    @property
    def is_relation(self) -> bool:
        return self.kind in schema.TYPES


@dataclass(frozen=True)
class Entity:
    id: int
    type: str
    name: str
    facts: tuple[Fact, ...]
    region: str        # derived: the region of the country the entity belongs to

    def fact(self, attribute: str) -> Fact:
        for f in self.facts:
            if f.attribute == attribute:
                return f
        raise KeyError(f"{self.type} has no attribute {attribute!r}")

    def to_record(self) -> dict:
        return {"id": self.id, "type": self.type, "name": self.name,
                "attributes": {f.attribute: f.value for f in self.facts}}


@dataclass(frozen=True)
class Claim:
    """Document text ``[start, end)`` states the value of ``subject``'s ``attribute``."""
    subject: int
    attribute: str
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    id: str
    entity_id: int
    index: int         # 0: the main article
    title: str
    text: str
    label: str         # entity type
    region: str
    split: str
    claims: tuple[Claim, ...]
    mentions: frozenset[int]

    def to_record(self) -> dict:
        return {"id": self.id, "entity_id": self.entity_id, "title": self.title, "text": self.text,
                "label": self.label, "region": self.region, "split": self.split}


class _Affine:
    """pi(j) = (a*j + b) mod n with gcd(a, n) = 1: a seeded permutation with an exact inverse."""

    def __init__(self, n: int, rng: random.Random):
        self.n = n
        a = 1
        if n > 2:
            a = rng.randrange(1, n)
            while math.gcd(a, n) != 1:
                a = rng.randrange(1, n)
        self.a, self.b = a, rng.randrange(n)
        self.a_inv = pow(a, -1, n) if n > 1 else 0

    def __call__(self, j: int) -> int:
        return (self.a * j + self.b) % self.n

    def inverse(self, q: int) -> int:
        return (self.a_inv * (q - self.b)) % self.n


def _parse(template: str) -> tuple[tuple, tuple[str, ...]]:
    pieces = tuple((lit, field, spec) for lit, field, spec, _ in string.Formatter().parse(template))
    attrs = tuple(f for _, f, _ in pieces if f not in (None, "S", "list"))
    return pieces, attrs


def _render(pieces: tuple, values: dict) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """Fill a parsed template; return the text and the character span of every field value."""
    out: list[str] = []
    pos = 0
    spans: dict[str, list[tuple[int, int]]] = {}
    for literal, field, spec in pieces:
        if literal:
            out.append(literal)
            pos += len(literal)
        if field is None:
            continue
        value = values[field]
        items = value if isinstance(value, list) else [value]
        if spec == "a":
            article = "an " if items[0][0].lower() in "aeiou" else "a "
            out.append(article)
            pos += len(article)
        for i, item in enumerate(items):
            if i:
                sep = " and " if i == len(items) - 1 else ", "
                out.append(sep)
                pos += len(sep)
            spans.setdefault(field, []).append((pos, pos + len(item)))
            out.append(item)
            pos += len(item)
    return "".join(out), spans


_FACT_TEMPLATES = {t: tuple(_parse(s) for s in ts) for t, ts in schema.FACT_TEMPLATES.items()}
_BACKREF_TEMPLATES = {k: tuple(_parse(s)[0] for s in ts) for k, ts in schema.BACKREF_TEMPLATES.items()}
_FILLERS = {t: tuple(_parse(s)[0] for s in ts) for t, ts in schema.FILLERS.items()}


class World:
    """The world named by a `WorldConfig`; see the module docstring for how it is built."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config = config if config is not None else WorldConfig()
        self.n_entities = (estimate_entities(config) if config.size_bytes is not None
                           else config.n_entities)
        seed = config.seed
        self._names = NameBook(_mix(seed, _TAG_NAMES))
        self._slots = {}                               # type -> (offset in block, slots per block)
        for t in schema.TYPES:
            self._slots[t] = (schema.BLOCK.index(t), schema.BLOCK.count(t))
        full, rest = divmod(self.n_entities, len(schema.BLOCK))
        self.type_counts = {t: full * k + min(max(rest - off, 0), k)
                            for t, (off, k) in self._slots.items()}
        self._rel = {}                                  # (type, attr) -> (pi on sources, sigma on targets)
        for i, (t, attr, kind) in enumerate(RELATIONS):
            rng = random.Random(_mix(seed, _TAG_REL, i))
            self._rel[(t, attr)] = (_Affine(self.type_counts[t], rng),
                                    _Affine(self.type_counts[kind], rng))
        # Per-instance caches, bounded so that streaming a huge world stays O(1) in memory.
        # Neighbours are spread at random over the id axis, so large caches would not raise the
        # hit rate of a big world, only its memory; these catch the repeats within one entity.
        self.name = lru_cache(maxsize=1024)(self._name)
        self.entity = lru_cache(maxsize=256)(self._entity)
        self.documents = lru_cache(maxsize=16)(self._documents)

    # ---- ids, names, relations -------------------------------------------------------------
    def locate(self, eid: int) -> tuple[str, int]:
        """Entity id -> (type, index among entities of that type)."""
        if not 0 <= eid < self.n_entities:
            raise IndexError(f"entity {eid} outside [0, {self.n_entities})")
        block, slot = divmod(eid, len(schema.BLOCK))
        t = schema.BLOCK[slot]
        off, k = self._slots[t]
        return t, block * k + slot - off

    def eid_of(self, type_: str, j: int) -> int:
        off, k = self._slots[type_]
        block, r = divmod(j, k)
        return block * len(schema.BLOCK) + off + r

    def _name(self, eid: int) -> str:
        t, _ = self.locate(eid)
        core = self._names.core(eid)
        h = _mix(self.config.seed, _TAG_GIVEN, eid)
        if t == "person":
            return f"{self._names.given_names[h % len(self._names.given_names)]} {core}"
        if t == "company":
            return f"{core} {schema.COMPANY_SUFFIXES[h % len(schema.COMPANY_SUFFIXES)]}"
        if t == "river":
            return f"{core} River"
        return core

    def _target(self, t: str, attr: str, j: int) -> int:
        """Index of the entity that source ``j`` of type ``t`` points at through ``attr``:
        ``sigma(pi(j) mod N_target)``, which hits every target evenly when sources outnumber
        targets and a scattered subset when they do not."""
        if (t, attr) == ("country", "capital"):         # the first city mapped to the country
            pi, sigma = self._rel[("city", "country")]
            return pi.inverse(sigma.inverse(j))
        pi, sigma = self._rel[(t, attr)]
        return sigma(pi(j) % sigma.n)

    def _sources(self, t: str, attr: str, j_target: int) -> list[int]:
        """Inverse of `_target`: indices of all type-``t`` entities whose ``attr`` is ``j_target``."""
        if (t, attr) == ("country", "capital"):
            pi, sigma = self._rel[("city", "country")]
            q = pi(j_target)
            return [sigma(q)] if q < sigma.n else []
        pi, sigma = self._rel[(t, attr)]
        return [pi.inverse(q) for q in range(sigma.inverse(j_target), pi.n, sigma.n)]

    def backrefs(self, eid: int) -> list[tuple[str, str, list[int]]]:
        """(source type, attribute, source ids) for every relation pointing at ``eid``."""
        t, j = self.locate(eid)
        out = []
        for src, attr in schema.BACKREF_TEMPLATES:
            if dict(schema.ATTRIBUTES[src])[attr] == t:
                ids = [self.eid_of(src, s) for s in self._sources(src, attr, j)]
                if ids:
                    out.append((src, attr, ids))
        return out

    def neighbors(self, eid: int) -> list[int]:
        """Entities whose pages may name ``eid``: its relation targets and its back-references."""
        seen = {eid}
        out = []
        ids = [f.value for f in self.entity(eid).facts if f.is_relation]
        ids += [s for _, _, srcs in self.backrefs(eid) for s in srcs]
        for x in ids:
            if x not in seen:
                seen.add(x)
                out.append(x)
        return out

    # ---- facts -----------------------------------------------------------------------------
    def _entity(self, eid: int) -> Entity:
        t, j = self.locate(eid)
        rng = random.Random(_mix(self.config.seed, _TAG_ATTR, eid))
        facts: list[Fact] = []
        for attr, kind in schema.ATTRIBUTES[t]:
            if kind in schema.TYPES:
                value = self.eid_of(kind, self._target(t, attr, j))
                text = self.name(value)
            elif kind == "choice":
                value = text = rng.choice(schema.CHOICES[(t, attr)])
            elif (t, attr) == ("company", "founded"):
                founder = self.entity(facts[-1].value)        # "founder" precedes "founded"
                value = founder.fact("birth_year").value + rng.randint(22, 55)
                text = str(value)
            elif kind == "year":
                value = rng.randint(1820, 1975) if t == "person" else rng.randint(800, 1850)
                text = str(value)
            elif (t, attr) == ("city", "population"):
                value = int(round(10 ** rng.uniform(3.5, 6.5)))
                text = f"{value:,}"
            else:                                              # river length in km
                value = rng.randint(40, 2400)
                text = str(value)
            facts.append(Fact(eid, attr, kind, value, text))
        by_attr = {f.attribute: f for f in facts}
        if t == "country":
            region = by_attr["region"].value
        else:
            via = {"city": "country", "river": "country", "person": "born_in",
                   "company": "headquarters"}[t]
            region = self.entity(by_attr[via].value).region
        return Entity(eid, t, self.name(eid), tuple(facts), region)

    # ---- documents -------------------------------------------------------------------------
    def _split(self, *ids: int) -> str:
        u = _mix(self.config.seed, _TAG_SPLIT, *ids) / 2.0 ** 64
        return "eval" if u < self.config.eval_fraction else "train"

    def _documents(self, eid: int) -> tuple[Document, ...]:
        entity = self.entity(eid)
        backrefs = self.backrefs(eid)
        return tuple(self._document(entity, k, backrefs) for k in range(self.config.docs_per_entity))

    def _document(self, entity: Entity, k: int, backrefs: list) -> Document:
        cfg = self.config
        rng = random.Random(_mix(cfg.seed, _TAG_DOC, entity.id, k))
        t, name = entity.type, entity.name
        by_attr = {f.attribute: f for f in entity.facts}
        if k == 0:
            keep = list(by_attr)
        else:
            keep = [a for a in by_attr if rng.random() < cfg.fact_keep_prob] or [rng.choice(list(by_attr))]
        own: list[tuple[str, list[Claim], set[int]]] = []
        remaining = set(keep)
        while remaining:                   # cover the kept facts with randomly chosen paraphrases
            pieces, attrs = rng.choice([pt for pt in _FACT_TEMPLATES[t]
                                        if pt[1] and remaining.issuperset(pt[1])])
            remaining.difference_update(attrs)
            values = {"S": name, **{a: by_attr[a].text for a in attrs}}
            text, spans = _render(pieces, values)
            claims = [Claim(entity.id, a, *spans[a][0]) for a in attrs]
            mentions = {entity.id} | {by_attr[a].value for a in attrs if by_attr[a].is_relation}
            own.append((text, claims, mentions))
        other: list[tuple[str, list[Claim], set[int]]] = []
        for src, attr, ids in backrefs:
            if k > 0 and rng.random() >= cfg.fact_keep_prob:
                continue
            listed = ids if len(ids) <= cfg.max_list else sorted(rng.sample(ids, cfg.max_list))
            pieces = rng.choice(_BACKREF_TEMPLATES[(src, attr)])
            text, spans = _render(pieces, {"S": name, "list": [self.name(x) for x in listed]})
            s = spans["S"][0]
            other.append((text, [Claim(x, attr, *s) for x in listed], {entity.id, *listed}))
        n_fill = rng.randint(0, 1) if k == 0 else rng.randint(1, 2)
        for pieces in rng.sample(_FILLERS[t], n_fill):
            other.append((_render(pieces, {"S": name})[0], [], {entity.id}))
        if k == 0:                          # the main article opens with the entity's own facts
            rng.shuffle(own)
            rng.shuffle(other)
            sentences = own + other
        else:
            sentences = own + other
            rng.shuffle(sentences)
        parts, claims, mentions, pos = [], [], set(), 0
        for text, cls, ms in sentences:
            if parts:
                pos += 1                    # the joining space
            claims += [Claim(c.subject, c.attribute, c.start + pos, c.end + pos) for c in cls]
            mentions |= ms
            parts.append(text)
            pos += len(text)
        if k == 0:
            title = name
        else:
            titles = schema.SECONDARY_TITLES[t]
            title = titles[(k - 1) % len(titles)].format(S=name)
            if k - 1 >= len(titles):
                title += f" ({(k - 1) // len(titles) + 1})"
        return Document(id=f"doc-{entity.id}-{k}", entity_id=entity.id, index=k, title=title,
                        text=" ".join(parts), label=t, region=entity.region,
                        split=self._split(0, entity.id, k), claims=tuple(claims),
                        mentions=frozenset(mentions))

    # ---- labels ----------------------------------------------------------------------------
    def relevance(self, eid: int, attribute: str) -> list[tuple[str, int]]:
        """Graded relevance of every page for a question about (eid, attribute).

        2: the page states that fact; 1: the page names the entity without stating it.
        Only the entity's and its neighbours' pages can name it, so only those are scanned.
        """
        graded = []
        for c in [eid] + self.neighbors(eid):
            for d in self.documents(c):
                if any(cl.subject == eid and cl.attribute == attribute for cl in d.claims):
                    graded.append((d.id, 2))
                elif eid in d.mentions:
                    graded.append((d.id, 1))
        graded.sort(key=lambda x: -x[1])   # stable: pages keep entity order within a grade
        return graded

    # ---- streams ---------------------------------------------------------------------------
    def _range(self, start: int, stop: int | None) -> range:
        return range(start, self.n_entities if stop is None else min(stop, self.n_entities))

    def iter_entities(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """The fact table: {id, type, name, attributes} (relation values are entity ids)."""
        for eid in self._range(start, stop):
            yield self.entity(eid).to_record()

    def iter_documents(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """{id, entity_id, title, text, label, region, split} for entities in [start, stop)."""
        for eid in self._range(start, stop):
            for doc in self.documents(eid):
                yield doc.to_record()

    def iter_classification(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """{id, text, label, label_id, region, region_id, split}: the entity type is the easy
        label (its words are in the text); the region needs the country behind a city or person."""
        for rec in self.iter_documents(start, stop):
            yield {"id": rec["id"], "text": rec["text"], "label": rec["label"],
                   "label_id": schema.TYPES.index(rec["label"]), "region": rec["region"],
                   "region_id": schema.REGIONS.index(rec["region"]), "split": rec["split"]}

    def iter_qa(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Extractive QA: {id, question, answer, answer_start, answer_end, context_id, [context],
        entity_id, attribute, split} with ``context[answer_start:answer_end] == answer``."""
        cfg = self.config
        for eid in self._range(start, stop):
            entity = self.entity(eid)
            docs = self.documents(eid)
            rng = random.Random(_mix(cfg.seed, _TAG_QA, eid))
            attr_index = {f.attribute: i for i, f in enumerate(entity.facts)}
            for fact in entity.facts:
                bearing = [(d, c) for d in docs for c in d.claims
                           if c.subject == eid and c.attribute == fact.attribute]
                for r in range(cfg.qa_per_fact):
                    doc, claim = rng.choice(bearing)
                    question = rng.choice(schema.QUESTIONS[(entity.type, fact.attribute)])
                    rec = {"id": f"qa-{eid}-{fact.attribute}-{r}",
                           "question": question.format(S=entity.name),
                           "answer": doc.text[claim.start:claim.end],
                           "answer_start": claim.start, "answer_end": claim.end,
                           "context_id": doc.id}
                    if cfg.qa_include_context:
                        rec["context"] = doc.text
                    rec.update(entity_id=eid, attribute=fact.attribute,
                               split=self._split(1, eid, attr_index[fact.attribute], r))
                    yield rec

    def iter_retrieval(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """{id, query, entity_id, attribute, answer, relevant: [{doc_id, relevance}], split}."""
        cfg = self.config
        for eid in self._range(start, stop):
            entity = self.entity(eid)
            rng = random.Random(_mix(cfg.seed, _TAG_RET, eid))
            for fact in rng.sample(entity.facts, min(cfg.retrieval_per_entity, len(entity.facts))):
                query = rng.choice(schema.QUESTIONS[(entity.type, fact.attribute)])
                yield {"id": f"q-{eid}-{fact.attribute}",
                       "query": query.format(S=entity.name), "entity_id": eid,
                       "attribute": fact.attribute, "answer": fact.text,
                       "relevant": [{"doc_id": d, "relevance": g}
                                    for d, g in self.relevance(eid, fact.attribute)],
                       "split": self._split(2, eid, entity.facts.index(fact))}


def estimate_entities(config: WorldConfig) -> int:
    """Entities needed for ``documents.jsonl`` to weigh about ``config.size_bytes``.

    Measured, not guessed: the first 200 entities (ten whole type blocks) of a probe world with the
    same settings are rendered and their bytes per entity extrapolated linearly (every per-entity
    quantity, back-reference counts included, has a mean independent of the world's size).
    """
    if config.size_bytes is None:
        return config.n_entities
    probe = World(replace(config, size_bytes=None, n_entities=1000))
    sample = 200
    per_entity = sum(len(dumps(r).encode()) + 1 for r in probe.iter_documents(0, sample)) / sample
    return max(MIN_ENTITIES, min(MAX_ENTITIES, round(config.size_bytes / per_entity)))
