"""Text -> index terms for BM25: lower-casing, a token pattern, stop words and a stemmer.

Why these defaults: Pyserini's (Lucene's ``EnglishAnalyzer``) pipeline is lower-case ->
English stop words -> Porter stemmer, and BM25 baselines are quoted with it. The stop set is
Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`` (33 words), not bm25s's longer list; the
token pattern is bm25s's / scikit-learn's ``(?u)\\b\\w\\w+\\b`` (words of two or more word
characters) rather than Lucene's StandardTokenizer (Unicode UAX#29 rules), so one-letter tokens
are dropped. Stemming is PyStemmer (C): ``"porter"`` is Porter (1980) as Lucene's
PorterStemFilter, ``"snowball"`` is Porter2 (Snowball English).

Speed: one regex pass per text and one C stemmer call per *distinct* word, memoised, so a
corpus pays for each word once and a query for its unseen words only.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Sequence

import Stemmer

from bmray.models.typed_config import ConfigError

LUCENE_ENGLISH_STOP_WORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is",
    "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there",
    "these", "they", "this", "to", "was", "will", "with"))
STOP_SETS = {"lucene": LUCENE_ENGLISH_STOP_WORDS, "none": frozenset()}
STEMMERS = {"porter": "porter", "snowball": "english", None: None}
DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"


@dataclass(frozen=True)
class AnalyzerConfig:
    """How text becomes terms; saved in every index manifest so queries are analysed alike."""

    lowercase: bool = True
    stopwords: Literal["lucene", "none"] = "lucene"
    stemmer: Literal["porter", "snowball"] | None = "porter"
    token_pattern: str = DEFAULT_TOKEN_PATTERN

    def __post_init__(self) -> None:
        if self.stopwords not in STOP_SETS:
            raise ConfigError(f"analyzer.stopwords: {self.stopwords!r} is not one of "
                             f"{sorted(STOP_SETS)}")
        if self.stemmer not in STEMMERS:
            raise ConfigError(f"analyzer.stemmer: {self.stemmer!r} is not one of "
                             f"{[s for s in STEMMERS]}")
        try:
            re.compile(self.token_pattern)
        except re.error as exc:
            raise ConfigError(f"analyzer.token_pattern: {self.token_pattern!r} is not a valid "
                             f"regular expression: {exc}") from exc

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Analyzer:
    """``tokens(text) -> [term, ...]`` under an ``AnalyzerConfig``, with a stem cache."""

    config: AnalyzerConfig = field(default_factory=AnalyzerConfig)

    def __post_init__(self) -> None:
        self.pattern = re.compile(self.config.token_pattern)
        self.stop = STOP_SETS[self.config.stopwords]
        algo = STEMMERS[self.config.stemmer]
        self.stemmer = Stemmer.Stemmer(algo) if algo else None
        self.cache: dict[str, str] = {}

    def __getstate__(self) -> dict:          # PyStemmer objects do not pickle (Ray actors)
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self.__post_init__()

    def learn(self, words: Iterable[str]) -> None:
        """Cache the term of every word not yet seen ("" for a stop word): one C stemmer call
        for all of them."""
        cache, stop = self.cache, self.stop
        new = list({w for w in words if w not in cache})
        keep = [w for w in new if w not in stop]
        stems = self.stemmer.stemWords(keep) if self.stemmer else keep
        cache.update(dict.fromkeys(new, ""))
        cache.update(zip(keep, stems))

    def tokens(self, text: str) -> list[str]:
        return self.tokens_batch([text])[0]

    def tokens_batch(self, texts: Sequence[str]) -> list[list[str]]:
        """Terms of each text: one regex pass each, then cached word -> term lookups."""
        find, cache = self.pattern.findall, self.cache
        raw = [find(t.lower()) for t in texts] if self.config.lowercase else \
            [find(t) for t in texts]
        try:                                   # the common case: every word seen before
            return [[s for w in ws if (s := cache[w])] for ws in raw]
        except KeyError:
            self.learn(w for ws in raw for w in ws)
            return [[s for w in ws if (s := cache[w])] for ws in raw]
