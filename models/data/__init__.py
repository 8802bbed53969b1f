"""Corpus data pipeline: read documents -> pack into token blocks once -> stream blocks by rank.

    reader = CorpusReader("corpus/*.jsonl")                   # or s3://bucket/corpus/, file://...
    tok = train_bpe(reader, vocab_size=8192, family="gpt")    # models.tokenizer
    pack_corpus(reader, tok, block_len=257, out_path="packs/c", eval_blocks=64)
    stream = BlockStream("packs/c", 257, global_batch_size=32, rank=r, world_size=n, seed=0)
    blocks = next(stream)                                     # LongTensor[32 // n, 257]

readers.py: documents from text / JSONL / Parquet on any pyarrow filesystem.
packing.py: the pack format (Parquet blocks + meta.json) and pack_corpus.
stream.py:  BlockStream (world-size independent order, resumable) and eval_batches.

Design and references: docs/models.md, "Data pipeline".
"""
from bmray.models.data.packing import (PackMeta, PackMismatchError, pack_corpus, read_pack_meta)
from bmray.models.data.readers import CorpusConfig, CorpusReader, read_documents, resolve_files
from bmray.models.data.stream import BlockStream, eval_batches

__all__ = ["BlockStream", "CorpusConfig", "CorpusReader", "PackMeta", "PackMismatchError",
           "eval_batches", "pack_corpus", "read_documents", "read_pack_meta", "resolve_files"]
