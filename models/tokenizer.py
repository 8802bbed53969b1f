"""Byte-level BPE tokenizer, trained with the `tokenizers` library and saved beside the model.

BPE (Sennrich et al. 2016) over byte-level pre-tokenization (GPT-2): every string round-trips,
``decode(encode(text)) == text``, and ``<unk>`` never occurs; no normalizer is applied.

Every family shares seven specials at fixed ids, so one pack serves any family::

    <pad>=0  <s>=1  </s>=2  <unk>=3  <mask>=4  <cls>=5  <sep>=6

t5 appends ``n_sentinels`` sentinels ``<extra_id_0> ...`` from id 7 on. ``encode`` adds no
specials itself (the packer and the objectives do), and a literal ``"</s>"`` in corpus text is
encoded as ordinary text. Why byte-level, and the references: docs/models.md, "Tokenizer".
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.fs as pafs
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from bmray.models.typed_config import ConfigError, check_choice

FAMILIES = ("gpt", "bert", "electra", "t5")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>", "<cls>", "<sep>")
# ModelConfig field name of each fixed special, in id order.
_SPECIAL_FIELDS = ("pad_id", "bos_id", "eos_id", "unk_id", "mask_id", "cls_id", "sep_id")
_N_BYTES = 256                      # byte-level base alphabet
TOKENIZER_FILE = "tokenizer.json"   # the `tokenizers` serialisation (loadable by HF as well)
META_FILE = "bmray_tokenizer.json"  # family and sentinel count


@dataclass
class TokenizerConfig:
    """What `train_bpe` needs; maps onto the ``tokenizer:`` section of a YAML config."""
    vocab_size: int = 1024
    family: str = "gpt"
    n_sentinels: int = 100        # t5 only; T5 uses 100 (Raffel et al. 2020)
    min_frequency: int = 2        # a pair seen fewer times is never merged

    def __post_init__(self) -> None:
        check_choice("tokenizer.family", self.family, FAMILIES)
        if self.n_sentinels < 0:
            raise ConfigError(f"tokenizer.n_sentinels: must be >= 0, got {self.n_sentinels}")
        n_special = len(special_tokens(self.family, self.n_sentinels))
        if self.vocab_size < n_special + _N_BYTES:
            raise ConfigError(
                f"tokenizer.vocab_size: {self.vocab_size} is smaller than the {n_special} special "
                f"tokens + {_N_BYTES} byte symbols of a byte-level BPE")
        if self.min_frequency < 0:
            raise ConfigError(f"tokenizer.min_frequency: must be >= 0, got {self.min_frequency}")


def special_tokens(family: str, n_sentinels: int = 100) -> list[str]:
    """The special tokens of ``family`` in id order (ids 0..)."""
    check_choice("tokenizer.family", family, FAMILIES)
    sentinels = [f"<extra_id_{i}>" for i in range(n_sentinels)] if family == "t5" else []
    return list(SPECIAL_TOKENS) + sentinels


def train_bpe(texts: Iterable[str], vocab_size: int, family: str, n_sentinels: int = 100,
              min_frequency: int = 2) -> "Tokenizer":
    """Train a byte-level BPE of ``vocab_size`` tokens (specials and 256 bytes included).

    ``texts`` is streamed once through the Rust trainer (an iterator over a corpus reader is
    fine; nothing is held in Python memory). The vocabulary may come out smaller than asked when
    the corpus has fewer pairs with ``min_frequency`` occurrences.
    """
    cfg = TokenizerConfig(vocab_size=vocab_size, family=family, n_sentinels=n_sentinels,
                          min_frequency=min_frequency)
    backend = _HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.encode_special_tokens = True     # literal "<s>" in the corpus is text, not a special
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens(cfg.family, cfg.n_sentinels),  # ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),       # all 256 bytes, always
        show_progress=False,
    )
    backend.train_from_iterator(_as_str_iter(texts), trainer=trainer)
    return Tokenizer(backend, cfg.family, cfg.n_sentinels)


def _as_str_iter(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"train_bpe expects strings, got {type(t).__name__}")
        yield t


class Tokenizer:
    """A trained `tokenizers` BPE plus the family's special-token ids.

    Thin on purpose: ``backend`` is the `tokenizers.Tokenizer` for anything not wrapped here.
    """

    def __init__(self, backend: _HFTokenizer, family: str, n_sentinels: int = 100) -> None:
        check_choice("tokenizer.family", family, FAMILIES)
        self.backend = backend
        self.backend.encode_special_tokens = True   # not serialised by `tokenizers`: set on load
        self.family = family
        self.n_sentinels = n_sentinels if family == "t5" else 0
        for i, tok in enumerate(special_tokens(family, self.n_sentinels)):
            got = backend.token_to_id(tok)
            if got != i:   # a tokenizer.json from elsewhere, or a corrupt save
                raise ValueError(f"special token {tok!r} has id {got}, expected {i}")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel in Rust)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``decode(encode(t)) == t`` for every string ``t``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    # ------------------------------------------------------------------ metadata
    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> dict:
        """Special ids keyed by ModelConfig field name: pad_id ... sep_id, sentinel_ids.

        ``ModelConfig(..., **tokenizer.special_ids())`` sets them all.
        """
        ids: dict = {field: i for i, field in enumerate(_SPECIAL_FIELDS)}
        start = len(SPECIAL_TOKENS)
        ids["sentinel_ids"] = list(range(start, start + self.n_sentinels))
        return ids

    @property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer: a pack records it to detect a changed tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` (the `tokenizers` format) and ``bmray_tokenizer.json``.

        ``directory`` is a local path or a pyarrow filesystem URI (saved beside a checkpoint).
        """
        fs, root = _fs(directory)
        fs.create_dir(root, recursive=True)
        meta = {"family": self.family, "n_sentinels": self.n_sentinels, "hash": self.hash}
        for name, text in ((TOKENIZER_FILE, self.backend.to_str(pretty=True)),
                           (META_FILE, json.dumps(meta, indent=2) + "\n")):
            with fs.open_output_stream(f"{root}/{name}") as fh:
                fh.write(text.encode("utf-8"))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        fs, root = _fs(directory)
        texts = {}
        for name in (TOKENIZER_FILE, META_FILE):
            if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.File:
                raise FileNotFoundError(f"no tokenizer at {str(directory)!r} (missing {name})")
            with fs.open_input_stream(f"{root}/{name}") as fh:
                texts[name] = fh.read().decode("utf-8")
        meta = json.loads(texts[META_FILE])
        return cls(_HFTokenizer.from_str(texts[TOKENIZER_FILE]), meta["family"],
                   meta["n_sentinels"])

    def __repr__(self) -> str:
        return (f"Tokenizer(family={self.family!r}, vocab_size={self.vocab_size}, "
                f"n_sentinels={self.n_sentinels})")


def _fs(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow filesystem URI."""
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())
