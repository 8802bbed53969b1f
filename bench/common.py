"""What the benchmarks share: the real data path, from the synthetic world to packed blocks."""
from __future__ import annotations


def world_pack(root: str, block_len: int, vocab: int, n_entities: int = 300) -> str:
    """Synthetic-world corpus → BPE tokenizer → packed Parquet blocks under ``root``/pack."""
    from models.data import CorpusReader, pack_corpus
    from models.tokenizer import train_bpe
    from models.world import WorldConfig, write_world

    write_world(WorldConfig(seed=0, n_entities=n_entities), f"{root}/world",
                parts=("documents",))
    reader = CorpusReader(f"{root}/world/documents.jsonl")
    tok = train_bpe(reader, vocab_size=vocab, family="gpt")
    pack_corpus(reader, tok, block_len, f"{root}/pack")
    return f"{root}/pack"


def balanced_order(names: list[str], repeats: int) -> list[str]:
    """Run order for ``repeats`` interleaved repeats of each of ``names``: round r is the
    list rotated by r (A B, B A, ... for two; A B C, B C A, C A B, ... for three). On a shared
    machine the position in a round (right after another run's teardown, or first after a
    pause) has a cost of its own; over len(names) rounds every side takes every position."""
    order: list[str] = []
    for r in range(repeats):
        k = r % len(names)
        order.extend(names[k:] + names[:k])
    return order
