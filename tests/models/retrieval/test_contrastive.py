"""Dual-encoder training: InfoNCE against the formula, mined negatives, ANCE refresh, span pairs,
and the exact index against faiss Flat."""
from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.rank import (evaluate_retriever, pretrain_spans, train_dual_encoder,
                                     training_queries)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.retrieval.collections import world_collection
from bmray.models.retrieval.contrastive import (DualEncoder, DualEncoderConfig,
                                                ExactDenseRetriever, info_nce)
from bmray.models.retrieval.negatives import NegativeMiner, mine_negatives
from bmray.models.retrieval.rank_data import PoolObjective, query_rows
from bmray.models.retrieval.spans import SpanConfig, SpanObjective, crop
from bmray.models.retrieval.tokenization import BertTextTokenizer
from bmray.models.tokenizer import train_bpe
from bmray.models.typed_config import ConfigError
from bmray.models.world import World, WorldConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    coll = world_collection(World(WorldConfig(n_entities=30)), "train")
    tok = train_bpe(list(coll.documents.values()) + list(coll.queries.values()), 400, "bert")
    return coll, tok


def dual(tok, seed=0, temperature=0.05):
    specials = {k: v for k, v in tok.special_ids().items() if k != "sentinel_ids"}
    mc = ModelConfig(family="bert", vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=2,
                     d_ff=64, max_seq_len=128, dropout=0.0, **specials)
    torch.manual_seed(seed)
    return DualEncoder(build_model(mc), BertTextTokenizer(tok, 128),
                       DualEncoderConfig(temperature=temperature, max_length=128))


def nce_by_hand(q, p, tau, exclude=None):
    """-log( e^{s(q_i,p_i)/tau} / sum_{j not excluded} e^{s(q_i,p_j)/tau} ), averaged."""
    q, p = q.double().numpy(), p.double().numpy()
    total = 0.0
    for i in range(len(q)):
        den = sum(math.exp(float(q[i] @ p[j]) / tau) for j in range(len(p))
                  if exclude is None or not exclude[i][j])
        total += -math.log(math.exp(float(q[i] @ p[i]) / tau) / den)
    return total / len(q)


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def test_info_nce_in_batch_and_with_hard_negatives_is_the_formula():
    q, p = unit(4, 8, 0), unit(4, 8, 1)
    assert float(info_nce(q, p, 0.1)) == pytest.approx(nce_by_hand(q, p, 0.1), rel=1e-5)
    pool = torch.cat([p, unit(6, 8, 2)])                      # 4 positives + 6 hard negatives
    assert float(info_nce(q, pool, 0.05)) == pytest.approx(nce_by_hand(q, pool, 0.05), rel=1e-5)
    ex = torch.zeros(4, 10, dtype=torch.bool)
    ex[0, 2] = ex[3, 7] = True
    assert float(info_nce(q, pool, 0.05, ex)) == pytest.approx(
        nce_by_hand(q, pool, 0.05, ex.tolist()), rel=1e-5)
    with pytest.raises(ValueError, match="pool passages"):
        info_nce(q, p[:2], 0.1)
    with pytest.raises(ConfigError, match="dual_encoder.temperature"):
        DualEncoderConfig(temperature=0)


def test_dual_encoder_forward_is_info_nce_of_mean_pooled_unit_vectors(world):
    coll, tok = world
    model = dual(tok, temperature=0.2).eval()
    qs, ps = ["Where is Krokeirai?", "Who founded Poudrubi?"], list(coll.documents.values())[:3]
    qt, pt = model.tokenize(qs), model.tokenize(ps)
    with torch.no_grad():
        out = model(qt["input_ids"], qt["attention_mask"], pt["input_ids"], pt["attention_mask"])

        def emb(t):
            h = model.encoder.encode(t["input_ids"], t["attention_mask"])
            m = t["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            return e / e.norm(dim=1, keepdim=True)
        eq, ep = emb(qt), emb(pt)
    assert torch.allclose(out.logits, eq @ ep.T, atol=1e-5)
    assert float(out.loss) == pytest.approx(nce_by_hand(eq, ep, 0.2), rel=1e-4)


class Everything:
    """A stand-in retriever ranking every document, judged relevant ones first."""

    def __init__(self, coll):
        self.coll, self.calls = coll, 0

    def search(self, queries, k):
        self.calls += 1
        inv = {t: q for q, t in self.coll.queries.items()}
        out = []
        for text in queries:
            rel = self.coll.qrels.get(inv[text], {})
            order = sorted(self.coll.documents, key=lambda d: (-rel.get(d, 0), d))
            out.append([(d, 1.0) for d in order[:k]])
        return out


def test_mined_negatives_never_include_a_judged_relevant_document(world):
    coll, _ = world
    data = training_queries(coll)
    mined = mine_negatives(Everything(coll), data.queries, data.qrels, depth=40)
    assert set(mined) == set(data.queries)
    for q, docs in mined.items():
        relevant = {d for d, g in coll.qrels[q].items() if g > 0}
        assert docs and not set(docs) & relevant
        assert len(docs) == 40 - len(relevant & set(sorted(coll.documents, key=lambda d: (
            -coll.qrels[q].get(d, 0), d))[:40]))


def test_pool_objective_negatives_and_exclusions(world):
    coll, tok = world
    data = training_queries(coll)
    miner = NegativeMiner(lambda: Everything(coll), data.queries, data.qrels, depth=40)
    seen = []
    obj = PoolObjective(data, miner, lambda texts: (seen.append(list(texts)) or
                                                   {"input_ids": torch.zeros(len(texts), 1)}),
                        n_hard=2)
    rows = query_rows(len(data.qids))[:6]
    batch = obj(rows, torch.Generator().manual_seed(3))
    queries, pool = seen[0], seen[1]
    assert len(queries) == 6 and len(pool) == 6 + 12
    text_to_doc = {t: d for d, t in coll.documents.items()}
    pool_ids = [text_to_doc[t] for t in pool]
    for i, q in enumerate(data.qids[:6]):
        rel = {d for d, g in coll.qrels[q].items() if g > 0}
        assert pool_ids[i] in data.positives[q]
        assert not set(pool_ids[6 + 2 * i: 8 + 2 * i]) & rel       # its own hard negatives
        for j, d in enumerate(pool_ids):
            assert bool(batch["exclude"][i, j]) == (j != i and d in rel)
    assert obj.num_targets(batch) == 6


def test_the_miner_refreshes_from_the_current_encoder(world):
    coll, tok = world
    data = training_queries(coll)
    model = dual(tok)
    built = []

    def factory():
        built.append(model.encoder.embed.tok.weight.detach().clone())
        return ExactDenseRetriever(model.text_encoder(), coll.documents)

    miner = NegativeMiner(factory, data.queries, data.qrels, refresh_every=4, depth=20)
    assert miner.builds == 1 and not miner.maybe_refresh(3)
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=1, weight_decay=0.0, device="cpu",
                      echo=False)
    res = train_dual_encoder(model, data, miner, cfg, batch_queries=8, n_hard=1)
    assert res.step == 10 and sorted(res.losses) == list(range(1, 11))
    # built at step 0, refreshed after steps 4 and 8 (not after the last), each time from
    # the weights the encoder had then
    assert miner.builds == 3 and miner.refreshed_at == 8 and len(built) == 3
    assert not torch.equal(built[0], built[1]) and not torch.equal(built[1], built[2])
    with pytest.raises(ValueError, match="refresh_every"):
        NegativeMiner(factory, data.queries, data.qrels, refresh_every=-1)


def test_dual_encoder_training_raises_ndcg(world):
    coll, tok = world
    data = training_queries(coll)
    model = dual(tok)
    index = lambda: ExactDenseRetriever(model.text_encoder(), coll.documents)  # noqa: E731
    before = evaluate_retriever(index(), coll, ("ndcg@10",))["ndcg@10"]
    cfg = TrainConfig(max_steps=40, lr=2e-3, warmup_steps=2, weight_decay=0.0, device="cpu",
                      echo=False)
    res = train_dual_encoder(model, data, None, cfg, batch_queries=8)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert evaluate_retriever(index(), coll, ("ndcg@10",))["ndcg@10"] > before + 0.05


def test_exact_index_ranks_as_faiss_flat(world):
    coll, tok = world
    enc = dual(tok).text_encoder()
    ex = ExactDenseRetriever(enc, coll.documents)
    qs = list(coll.queries.values())[:5]
    flat = faiss.IndexFlatIP(ex.vectors.shape[1])
    flat.add(ex.vectors)
    scores, idx = flat.search(enc.encode(qs), 10)
    ours = ex.search(qs, 10)
    for h, s, i in zip(ours, scores, idx):
        assert np.allclose([x for _, x in h], s, atol=1e-5)
        # same documents up to ties at equal scores
        assert {d for d, x in h if x > s[-1] + 1e-5} == {ex.ids[j] for j, x in zip(i, s)
                                                         if x > s[-1] + 1e-5}


def test_span_pairs_come_from_the_same_document(world):
    coll, tok = world
    docs = list(coll.documents.values())
    g = torch.Generator().manual_seed(0)
    cfg = SpanConfig(min_ratio=0.2, max_ratio=0.5, min_words=3)
    for w in [d.split() for d in docs[:20]]:
        a, b = crop(w, cfg, g)
        assert 0 <= a < b <= len(w)
        assert min(len(w), 3) <= b - a <= max(3, round(0.5 * len(w)))
    seen = []
    obj = SpanObjective(docs, lambda t: (seen.append(list(t)) or
                                         {"input_ids": torch.zeros(len(t), 1)}), cfg)
    rows = torch.tensor([[0], [5], [0], [7]])
    batch = obj(rows, torch.Generator().manual_seed(1))
    for (i,), x, y in zip(rows.tolist(), seen[0], seen[1]):
        text = " " + " ".join(docs[i].split()) + " "
        assert f" {x} " in text and f" {y} " in text
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[0, 2] = expect[2, 0] = True                          # the same document twice
    assert torch.equal(batch["exclude"], expect)
    with pytest.raises(ConfigError, match="spans"):
        SpanConfig(min_ratio=0.6, max_ratio=0.5)


def test_span_pretraining_lowers_its_loss(world):
    coll, tok = world
    model = dual(tok)
    cfg = TrainConfig(max_steps=30, lr=2e-3, warmup_steps=2, weight_decay=0.0, device="cpu",
                      echo=False)
    res = pretrain_spans(model, list(coll.documents.values()), cfg, batch_docs=16)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2
