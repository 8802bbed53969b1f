"""The shipped classification data: counts as data/README.md states them, byte-identity of the
files with their sha256 prefixes, and determinism of the splits and few-shot samples."""
from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from bmray.models.data.classification import (DATA_ROOT, Example, few_shot, load_agnews, load_trec,
                                              split_train_test)

SHA256 = {"trec/TREC.train": "9e4c8bdcaffb96ed", "trec/TREC.test": "033f22c028c2bbba",
          "agnews/test.tsv": "e4217edd939f618f"}


@pytest.mark.parametrize("rel", sorted(SHA256))
def test_files_are_the_sources_bytes(rel):
    assert hashlib.sha256((DATA_ROOT / rel).read_bytes()).hexdigest()[:16] == SHA256[rel]


def test_trec_counts():
    train, test = load_trec("train"), load_trec("test")
    assert len(train) == 5452 and len(test) == 500
    assert Counter(e.label for e in train) == {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223,
                                               "LOC": 835, "NUM": 896}
    assert Counter(e.label for e in test) == {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65,
                                              "LOC": 81, "NUM": 113}
    assert len({e.label for e in load_trec("train", coarse=False)}) == 50
    assert len({e.label for e in load_trec("test", coarse=False)}) == 42
    assert test[0].text_a and test[0].text_b is None and ":" in test[0].meta["fine"]


def test_trec_reads_the_non_utf8_byte():
    line66 = load_trec("train")[65]
    assert line66.meta["line"] == 66 and "sister\xf0city" in line66.text_a and line66.label == "LOC"


def test_trec_bad_split():
    with pytest.raises(ValueError, match="dev"):
        load_trec("dev")


def test_agnews_counts():
    rows = load_agnews()
    assert len(rows) == 7600
    assert Counter(e.label for e in rows) == {"World": 1900, "Sports": 1900, "Business": 1900,
                                              "Sci/Tech": 1900}
    assert rows[0].text_a.startswith("Unions representing workers at Turner   Newall")


def test_split_is_stratified_deterministic_and_disjoint():
    rows = load_agnews()
    train, test = split_train_test(rows, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == 7600
    assert Counter(e.label for e in test) == {lab: 475 for lab in ("World", "Sports", "Business",
                                                                   "Sci/Tech")}
    assert {e.meta["line"] for e in train}.isdisjoint({e.meta["line"] for e in test})
    again = split_train_test(rows, test_fraction=0.25, seed=3)
    assert [e.meta["line"] for e in again[1]] == [e.meta["line"] for e in test]
    other = split_train_test(rows, test_fraction=0.25, seed=4)
    assert [e.meta["line"] for e in other[1]] != [e.meta["line"] for e in test]


@pytest.mark.parametrize("k", [16, 32])
def test_few_shot_k_per_class_deterministic(k):
    train = load_trec("train")
    a, b, c = few_shot(train, k, seed=1), few_shot(train, k, seed=1), few_shot(train, k, seed=2)
    assert Counter(e.label for e in a) == {lab: k for lab in ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")}
    assert a == b and a != c
    assert len({e.meta["line"] for e in a}) == len(a)          # no example drawn twice


def test_few_shot_too_few_names_the_class():
    rows = [Example("x", label="a")] * 3 + [Example("y", label="b")] * 20
    with pytest.raises(ValueError, match="'a' has 3"):
        few_shot(rows, 16)
