"""Data pipeline tests: readers, packing and BlockStream, each against a brute-force reference."""
from __future__ import annotations

import gzip
import json
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bmray.models.data import (BlockStream, CorpusReader, PackMismatchError, eval_batches, pack_corpus,
                         read_pack_meta)
from bmray.models.tokenizer import train_bpe
from bmray.models.typed_config import ConfigError

BLOCK = 16


def make_docs(n: int = 60, seed: int = 0) -> list[str]:
    """Documents with single newlines, unicode and varied lengths (no blank lines inside)."""
    rng = random.Random(seed)
    words = ["river", "stone", "Zürich", "naïve", "東京", "42", "the", "of", "a", "🙂"]
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
                 for _ in range(rng.randint(1, 3))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs()


@pytest.fixture(scope="module")
def tok(docs):
    return train_bpe(docs, vocab_size=300, family="gpt")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, docs):
    """The same documents as .txt, .jsonl, .jsonl.gz and a multi-row-group .parquet."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jsonl = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs))
    (d / "c.jsonl").write_text(jsonl, encoding="utf-8")
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(jsonl)
    pq.write_table(pa.table({"body": docs}), d / "c.parquet", row_group_size=7)
    return d


def reference_stream(tok, docs) -> np.ndarray:
    """The token stream the pack must hold: each document's ids followed by </s>."""
    eos = tok.special_ids()["eos_id"]
    return np.array([i for d in docs for i in tok.encode(d) + [eos]], dtype=np.int64)


def read_all(path, split="train") -> np.ndarray:
    """Every block of a pack split, in file order (the test may materialise; the stream may not)."""
    table = pq.read_table(f"{path}/{split}.parquet")
    return table.column(0).combine_chunks().flatten().to_numpy().reshape(-1, BLOCK)


# ---------------------------------------------------------------- readers
@pytest.mark.parametrize("name,kw", [
    ("c.txt", {}), ("c.jsonl", {"text_field": "body"}), ("c.jsonl.gz", {"text_field": "body"}),
    ("c.parquet", {"text_field": "body"}),
])
def test_readers_give_the_same_docs(corpus_dir, docs, name, kw):
    assert list(CorpusReader(str(corpus_dir / name), **kw)) == docs
    uri = (corpus_dir / name).as_uri()                   # file:///... ; s3:// goes the same way
    assert uri.startswith("file://")
    assert list(CorpusReader(uri, **kw)) == docs


def test_reader_glob_directory_and_doc_sep(corpus_dir, docs, tmp_path):
    assert list(CorpusReader(str(corpus_dir / "*.parquet"), text_field="body")) == docs
    assert list(CorpusReader(corpus_dir.as_uri() + "/c.jsonl*", text_field="body")) == docs * 2
    sub = tmp_path / "dir"
    (sub / "nested").mkdir(parents=True)
    (sub / "a.txt").write_text("one\ntwo\n\nthree")
    (sub / "nested" / "b.txt").write_text("four\r\n")
    (sub / "_SUCCESS").write_text("")
    assert list(CorpusReader(str(sub))) == ["one\ntwo", "three", "four"]
    assert list(CorpusReader(str(sub), doc_sep="line")) == ["one", "two", "three", "four"]
    assert list(CorpusReader(str(sub), doc_sep="file")) == ["one\ntwo\n\nthree", "four"]


def test_reader_streams_lazily(tmp_path):
    """The first document comes out before the (corrupt) rest of the file is ever parsed."""
    path = tmp_path / "lazy.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n{not json\n")
    it = iter(CorpusReader(str(path)))
    assert next(it) == "first"
    with pytest.raises(ValueError, match="lazy.jsonl:2"):
        next(it)


def test_reader_errors(corpus_dir, tmp_path):
    missing = str(tmp_path / "no_such_corpus")
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        CorpusReader(missing)
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        CorpusReader((tmp_path / "no_such_corpus").as_uri() + "/*.txt")
    with pytest.raises(ConfigError, match="'text'.*body"):
        list(CorpusReader(str(corpus_dir / "c.parquet")))
    with pytest.raises(ConfigError, match="text_field"):
        list(CorpusReader(str(corpus_dir / "c.jsonl")))
    with pytest.raises(ConfigError, match="doc_sep"):
        CorpusReader(str(corpus_dir / "c.txt"), doc_sep="page")


# ---------------------------------------------------------------- packing
def test_pack_equals_reference_stream(tmp_path, corpus_dir, docs, tok):
    reader = CorpusReader(str(corpus_dir / "c.jsonl"), text_field="body")
    meta = pack_corpus(reader, tok, BLOCK, str(tmp_path / "pack"), row_group_size=5,
                       eval_blocks=3, batch_docs=7)
    ref = reference_stream(tok, docs)
    n_full = len(ref) // BLOCK
    train, held = read_all(tmp_path / "pack"), read_all(tmp_path / "pack", "eval")
    assert len(held) == 3 and len(train) == n_full - 3
    np.testing.assert_array_equal(np.concatenate([train, held]).ravel(), ref[: n_full * BLOCK])
    assert meta.n_tokens == len(ref) and meta.n_dropped_tail == len(ref) % BLOCK
    assert meta.n_docs == len(docs) and meta.source == reader.source
    assert meta.tokenizer_hash == tok.hash and read_pack_meta(str(tmp_path / "pack")) == meta
    pf = pq.ParquetFile(tmp_path / "pack" / "train.parquet")
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    assert sizes[:-1] == [5] * (len(sizes) - 1) and 0 < sizes[-1] <= 5
    assert pf.schema_arrow.field("tokens").type == pa.list_(pa.int32(), BLOCK)


def test_pack_reuse_mismatch_and_uri(tmp_path, docs, tok):
    out = (tmp_path / "pack").as_uri()                   # packs live on any pyarrow filesystem
    meta = pack_corpus(docs, tok, BLOCK, out, source="mem")

    class Exploding:                                     # a reused pack is not re-tokenized
        hash = tok.hash

        def special_ids(self):
            return tok.special_ids()

        def encode_batch(self, texts):
            raise AssertionError("re-tokenized a matching pack")

    assert pack_corpus(docs, Exploding(), BLOCK, out, source="mem") == meta
    with pytest.raises(PackMismatchError, match="block_len: pack has 16, now 8"):
        pack_corpus(docs, tok, 8, out, source="mem")
    other = train_bpe(docs[:10], vocab_size=280, family="gpt")
    with pytest.raises(PackMismatchError, match="tokenizer_hash"):
        pack_corpus(docs, other, BLOCK, out, source="mem")
    repacked = pack_corpus(docs, other, 8, out, source="mem", if_mismatch="repack")
    assert repacked.block_len == 8 and repacked.tokenizer_hash == other.hash
    with pytest.raises(ConfigError, match="too few"):
        pack_corpus(["tiny"], tok, 1024, str(tmp_path / "tiny"))


# ---------------------------------------------------------------- BlockStream
@pytest.fixture(scope="module")
def pack(tmp_path_factory, tok):
    """~100 blocks in row groups of 4 (a ragged last one), 5 eval blocks; the block count is not
    a multiple of the batch size 8, so global batches straddle epochs."""
    path = str(tmp_path_factory.mktemp("packs") / "p")
    meta = pack_corpus(make_docs(70, seed=3), tok, BLOCK, path, row_group_size=4, eval_blocks=5)
    assert meta.n_train_blocks % 4 != 0 and meta.n_train_blocks % 8 != 0
    return path


def reference_order(path, seed: int, epochs: int) -> np.ndarray:
    """The documented order, brute force: per epoch, row groups permuted by rng(seed, e), rows of
    row group g by rng(seed, e, g); epochs concatenated. Returns blocks [n, BLOCK]."""
    blocks = read_all(path)
    pf = pq.ParquetFile(f"{path}/train.parquet")
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    starts = np.cumsum([0] + sizes)
    order = []
    for e in range(epochs):
        for g in np.random.default_rng([seed, e]).permutation(len(sizes)):
            order.extend(starts[g] + np.random.default_rng([seed, e, g]).permutation(sizes[g]))
    return blocks[np.array(order)]


def test_stream_matches_reference_order_and_world_sizes(pack):
    G, seed = 8, 5
    n = read_pack_meta(pack).n_train_blocks
    steps = (2 * n) // G + 3                              # past two epoch boundaries
    ref = reference_order(pack, seed, epochs=3)
    for world in (1, 2, 4):
        streams = [BlockStream(pack, BLOCK, G, rank=r, world_size=world, seed=seed)
                   for r in range(world)]
        for s in range(steps):
            parts = [next(st) for st in streams]
            assert all(p.dtype == torch.int64 and p.shape == (G // world, BLOCK) for p in parts)
            np.testing.assert_array_equal(torch.cat(parts).numpy(), ref[s * G:(s + 1) * G])
        assert len({str(st.state_dict()) for st in streams}) == 1
    assert streams[0].state_dict()["epoch"] == 2
    # Each epoch is a permutation of all blocks, and epochs differ.
    first = ref[:n]
    assert sorted(map(bytes, first)) == sorted(map(bytes, read_all(pack)))
    assert not np.array_equal(first, ref[n:2 * n])


def test_stream_unshuffled_is_file_order(pack):
    st = BlockStream(pack, BLOCK, 6, shuffle=False)
    got = torch.cat([next(st) for _ in range(5)]).numpy()
    np.testing.assert_array_equal(got, read_all(pack)[:30])


def test_stream_resume_exact(pack):
    G = 8
    full = BlockStream(pack, BLOCK, G, seed=1)
    seq = [next(full) for _ in range(20)]
    part = BlockStream(pack, BLOCK, G, seed=1)
    for _ in range(13):
        next(part)
    state = part.state_dict()
    resumed = BlockStream(pack, BLOCK, G, seed=1)
    resumed.load_state_dict(state)
    for s in range(13, 20):
        assert torch.equal(next(resumed), seq[s])
    # Resume at another world size, and from a pickled stream (shipped to a Ray actor).
    halves = [BlockStream(pack, BLOCK, G, rank=r, world_size=2, seed=1) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    clone = pickle.loads(pickle.dumps(halves[1]))
    for s in range(13, 20):
        a, b = next(halves[0]), next(halves[1])
        assert torch.equal(torch.cat([a, b]), seq[s])
        assert torch.equal(next(clone), b)


def test_stream_reads_row_groups_lazily(tmp_path, tok, monkeypatch):
    path = str(tmp_path / "many")
    meta = pack_corpus(make_docs(200, seed=7), tok, BLOCK, path, row_group_size=2)
    n_rg = pq.ParquetFile(f"{path}/train.parquet").num_row_groups
    assert n_rg > 60
    reads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        reads.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    whole = lambda *a, **k: pytest.fail("read the whole pack")  # noqa: E731
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", whole)
    st = BlockStream(path, BLOCK, 4, rank=1, world_size=2, seed=0)
    for step in range(1, 6):
        next(st)
        # Rank 1 needs 2 blocks per step -> at most 2 row groups of 2 rows each per step,
        # and none decoded twice (the current row group is kept while its rows are used).
        assert len(reads) <= 2 * step and len(reads) == len(set(reads))
    assert len(reads) < n_rg and meta.n_train_blocks > 100


def test_stream_errors(pack, tmp_path, tok):
    with pytest.raises(ConfigError, match="not divisible by world_size=3"):
        BlockStream(pack, BLOCK, 8, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="block_len"):
        BlockStream(pack, BLOCK * 2, 8)
    with pytest.raises(FileNotFoundError, match="missing_pack"):
        BlockStream(str(tmp_path / "missing_pack"), BLOCK, 8)
    pack_corpus(make_docs(10), tok, BLOCK, str(tmp_path / "noeval"))       # eval_blocks=0
    with pytest.raises(ConfigError, match="eval split .* has no blocks"):
        BlockStream(str(tmp_path / "noeval"), BLOCK, 8, split="eval")
    with pytest.raises(ValueError, match="out of range"):
        BlockStream(pack, BLOCK, 8).load_state_dict({"epoch": 0, "position": 10**6})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_eval_split_once(pack, world):
    G = 3 if world != 2 else 2                        # 5 eval blocks: last global batch short
    per_rank = [list(eval_batches(pack, BLOCK, G, rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1       # same number of batches on every rank
    got = torch.cat([b for step in zip(*per_rank) for b in step]).numpy()
    np.testing.assert_array_equal(got, read_all(pack, "eval"))
