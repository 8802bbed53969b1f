"""Readers for the text-classification data shipped in the repository (``data/classification``).

TREC (Li & Roth 2002): ``COARSE:fine question`` per line; TREC.train holds one byte that is
not UTF-8 (0xF0 on line 66), so both files are read as latin-1, which maps every byte to one
character and leaves the ASCII lines unchanged. AG News (Zhang et al. 2015): only the test
file is shipped (``text<TAB>label``), so ``split_train_test`` makes a seeded per-class split.
``few_shot`` draws k examples per class (the k = 16/32 few-shot setting of LM-BFF and PET).
Sources, licences and counts: data/README.md.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DATA_ROOT = Path(__file__).resolve().parents[2] / "data" / "classification"
TREC_SPLITS = {"train": "TREC.train", "test": "TREC.test"}


@dataclass(frozen=True)
class Example:
    """One input of a classification task; ``label`` is the class name (a string)."""
    text_a: str
    text_b: str | None = None
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def load_trec(split: str, coarse: bool = True, root: str | Path | None = None) -> list[Example]:
    """TREC questions of ``split`` ("train": 5,452, "test": 500); label = coarse class (6)
    or, with ``coarse=False``, ``COARSE:fine`` (50 in train). ``meta`` holds both."""
    if split not in TREC_SPLITS:
        raise ValueError(f"load_trec: split {split!r} is not one of {sorted(TREC_SPLITS)}")
    path = Path(root or DATA_ROOT) / "trec" / TREC_SPLITS[split]
    out = []
    with open(path, encoding="latin-1", newline="\n") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            fine, sep, text = line.partition(" ")
            if not sep or ":" not in fine:
                raise ValueError(f"{path}:{lineno}: expected 'COARSE:fine question', got {line!r}")
            coarse_label = fine.split(":", 1)[0]
            out.append(Example(text, None, coarse_label if coarse else fine,
                               {"coarse": coarse_label, "fine": fine, "line": lineno}))
    return out


def load_agnews(root: str | Path | None = None) -> list[Example]:
    """The 7,600 AG News test rows (1,900 per class: World, Sports, Business, Sci/Tech)."""
    path = Path(root or DATA_ROOT) / "agnews" / "test.tsv"
    out = []
    with open(path, encoding="utf-8", newline="\n") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'text<TAB>label', got {line!r}")
            out.append(Example(text, None, label, {"line": lineno}))
    return out


def by_label(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Examples grouped by label, labels in sorted order, examples in input order."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.label].append(ex)
    return {label: groups[label] for label in sorted(groups)}


def split_train_test(examples: Sequence[Example], test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A stratified split: in every class ``round(test_fraction * n)`` examples, drawn with
    ``random.Random(seed)``, go to test. Same input and seed, same split, on any machine."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_train_test: test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    train, test = [], []
    for label, group in by_label(examples).items():
        idx = list(range(len(group)))
        rng.shuffle(idx)
        n_test = round(test_fraction * len(group))
        test_idx = set(idx[:n_test])
        for i, ex in enumerate(group):
            (test if i in test_idx else train).append(ex)
    return train, test


def few_shot(examples: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
    """k examples of every class, drawn with ``random.Random(seed)``, classes in sorted order.

    A class with fewer than k examples is an error naming it (TREC's ABBR has 86 in train)."""
    if k < 1:
        raise ValueError(f"few_shot: k must be >= 1, got {k}")
    rng = random.Random(seed)
    out = []
    for label, group in by_label(examples).items():
        if len(group) < k:
            raise ValueError(f"few_shot: class {label!r} has {len(group)} examples, fewer than k={k}")
        out.extend(rng.sample(group, k))
    return out
