"""Mixture-of-experts routing, capacity and load-balancing loss against by-hand references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bmray.models.config import ModelConfig, MoEConfig
from bmray.models.layers.moe import MoEFeedForward, expert_capacity, load_balancing_loss, route
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


def _probs(n=24, e=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, e, generator=g) * 2, dim=-1)


def test_load_balancing_loss_is_fedus_eq4_by_hand():
    probs = _probs()
    p = probs.double().numpy()
    n, e = p.shape
    first = p.argmax(axis=1)
    f = np.array([(first == i).sum() / n for i in range(e)])      # fraction of tokens to expert i
    P = p.mean(axis=0)                                            # mean router prob of expert i
    expected = e * np.sum(f * P)
    got = load_balancing_loss(probs, probs.argmax(dim=1))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_load_balancing_loss_is_one_when_uniform():
    e = 4
    probs = torch.full((8, e), 1 / e)
    first = torch.arange(8) % e
    assert load_balancing_loss(probs, first).item() == pytest.approx(1.0)


def _route_by_hand(p: np.ndarray, k: int, capacity: int):
    """Slot assignment loop: all first choices (token order), then second choices."""
    n, e = p.shape
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    keep = np.zeros((n, k), dtype=bool)
    used = [0] * e
    for j in range(k):
        for t in range(n):
            ex = order[t, j]
            if used[ex] < capacity:
                keep[t, j] = True
            used[ex] += 1
    top = np.take_along_axis(p, order, axis=1)
    gate = top if k == 1 else top / top.sum(axis=1, keepdims=True)
    return order, gate, keep


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_and_capacity_match_a_by_hand_loop(top_k):
    probs = _probs(n=32, e=4, seed=top_k)
    capacity = expert_capacity(32, 4, top_k, capacity_factor=0.75)
    assert capacity == math.ceil(0.75 * top_k * 32 / 4)
    r = route(probs, top_k, capacity)
    order, gate, keep = _route_by_hand(probs.double().numpy(), top_k, capacity)
    np.testing.assert_array_equal(r.expert_index.numpy(), order)
    np.testing.assert_allclose(r.gate.double().numpy(), gate, rtol=1e-6)
    np.testing.assert_array_equal(r.keep.numpy(), keep)
    assert (~r.keep).any(), "capacity factor 0.75 must drop something"


def test_capacity_drops_tokens_beyond_the_first_capacity_routed_to_an_expert():
    """Every token prefers expert 0: only the first `capacity` get through, the rest output 0."""
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(1, 12, 8)
    x[..., 0] = x[..., 0].abs() + 1.0       # positive feature 0 -> expert 0 for every token
    y, _ = moe(x)
    capacity = expert_capacity(12, 4, 1, 1.0)
    assert capacity == 3
    nonzero = y[0].abs().sum(-1) > 0
    assert nonzero.tolist() == [True] * capacity + [False] * (12 - capacity)
    assert float(moe.last_drop_fraction) == pytest.approx(9 / 12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_output_equals_per_token_brute_force(top_k):
    torch.manual_seed(top_k)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=top_k, capacity_factor=1.0)
    x = torch.randn(2, 10, 8)
    y, aux = moe(x)
    tokens = x.reshape(-1, 8)
    probs = torch.softmax(moe.router(tokens), -1)
    order, gate, keep = _route_by_hand(probs.detach().double().numpy(), top_k,
                                       expert_capacity(20, 4, top_k, 1.0))
    expected = torch.zeros_like(tokens)
    for t in range(tokens.size(0)):
        for j in range(top_k):
            if keep[t, j]:
                expected[t] += float(gate[t, j]) * moe.experts[order[t, j]](tokens[t])
    torch.testing.assert_close(y.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    assert aux.item() == pytest.approx(load_balancing_loss(probs, probs.argmax(-1)).item())


def test_router_gets_gradient_from_gate_and_aux_loss():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=1)
    y, aux = moe(torch.randn(2, 6, 8))
    (y.sum() + aux).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k"):
        MoEConfig(top_k=3)
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k"):
        ModelConfig(family="gpt", vocab_size=32, moe={"top_k": 0})
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts"):
        MoEConfig(num_experts=1, top_k=2)
    with pytest.raises(ConfigError, match=r"model\.moe\.capacity_factor"):
        MoEConfig(capacity_factor=0.0)


def test_moe_layers_placed_every_n_and_aux_loss_added_to_loss():
    cfg = ModelConfig(family="gpt", vocab_size=32, d_model=16, n_heads=2, n_layers=4, d_ff=32,
                      max_seq_len=16, dropout=0.0, moe=MoEConfig(num_experts=4, top_k=2, every=2,
                                                                 aux_loss_weight=0.1))
    torch.manual_seed(0)
    model = build_model(cfg)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]
    ids = torch.randint(7, 32, (2, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, lm + out.aux_loss)
    # aux_loss = alpha * sum of the MoE blocks' unweighted balancing losses
    x = model.embed(ids[:, :-1], torch.arange(8).expand(2, 8))
    raw = []
    for blk in model.blocks:
        x, _, a = blk(x)
        if a is not None:
            raw.append(a)
    torch.testing.assert_close(out.aux_loss, 0.1 * torch.stack(raw).sum())
