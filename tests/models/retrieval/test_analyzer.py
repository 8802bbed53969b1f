"""The BM25 analyzer: lower-casing, the token pattern, Lucene's stop words, the two stemmers."""
from __future__ import annotations

import pickle

import pytest

from bmray.models.retrieval.analyzer import (LUCENE_ENGLISH_STOP_WORDS, Analyzer,
                                             AnalyzerConfig)
from bmray.models.typed_config import ConfigError

TEXT = "The libraries are running generously; it is a B-52 in Paris's library."


def test_pipeline_by_hand():
    # lower-cased, 2+ word characters, stop words (the, are, it, is, in) removed, then stemmed
    assert Analyzer(AnalyzerConfig(stemmer=None)).tokens(TEXT) == \
        ["libraries", "running", "generously", "52", "paris", "library"]
    # Porter (1980): libraries -> librari, generously -> gener; Porter2 keeps "generous"
    assert Analyzer().tokens(TEXT) == ["librari", "run", "gener", "52", "pari", "librari"]
    assert Analyzer(AnalyzerConfig(stemmer="snowball")).tokens(TEXT)[2] == "generous"
    assert Analyzer(AnalyzerConfig(stopwords="none", stemmer=None, lowercase=False)).tokens(
        "The cat") == ["The", "cat"]


def test_lucene_stop_set_and_cache():
    assert len(LUCENE_ENGLISH_STOP_WORDS) == 33 and "with" in LUCENE_ENGLISH_STOP_WORDS
    a = Analyzer()
    batch = a.tokens_batch([TEXT, "running libraries", ""])
    assert batch[1] == ["run", "librari"] and batch[2] == []
    assert a.cache["running"] == "run" and a.cache["the"] == ""
    b = pickle.loads(pickle.dumps(a))           # travels to Ray actors
    assert b.tokens(TEXT) == a.tokens(TEXT)


@pytest.mark.parametrize("key,value", [("stopwords", "french"), ("stemmer", "lancaster"),
                                       ("token_pattern", "(")])
def test_bad_config_names_key(key, value):
    with pytest.raises(ConfigError, match=f"analyzer.{key}"):
        AnalyzerConfig(**{key: value})
