"""Low-rank factorisation against numpy's SVD, Eckart–Young's error and the energy formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bmray.models.compress.lowrank import (LowRankConfig, LowRankLinear, choose_rank,
                                           factorize_linear, lowrank)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


@pytest.mark.parametrize("shape,bias", [((12, 20), True), ((20, 12), False), ((16, 16), True)])
def test_full_rank_equals_the_original_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    low = factorize_linear(linear, min(shape))
    x = torch.randn(5, shape[1])
    with torch.no_grad():
        torch.testing.assert_close(low(x), linear(x), rtol=1e-5, atol=1e-5)
    assert (low.first.weight.shape, low.second.weight.shape) == ((min(shape), shape[1]),
                                                                 (shape[0], min(shape)))


def test_truncation_is_numpy_svd_with_eckart_young_error():
    torch.manual_seed(1)
    linear = nn.Linear(24, 18)
    w = linear.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    r = 5
    w_r = (u[:, :r] * s[:r]) @ vt[:r]
    low = factorize_linear(linear, r)
    got = (low.second.weight.detach().double() @ low.first.weight.detach().double()).numpy()
    np.testing.assert_allclose(got, w_r, rtol=1e-5, atol=1e-6)
    err2 = np.sum((w - got) ** 2)
    assert err2 == pytest.approx(np.sum(s[r:] ** 2), rel=1e-4)
    torch.testing.assert_close(low.second.bias, linear.bias)


def test_energy_rule_picks_the_formulas_rank():
    # singular values 4, 3, 2, 1: sigma^2 = 16, 9, 4, 1 (total 30); cumulative 16, 25, 29, 30
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])
    for energy, rank in [(0.5, 1), (16 / 30, 1), (0.6, 2), (0.9, 3), (29 / 30, 3), (0.99, 4), (1.0, 4)]:
        assert choose_rank(sigma, energy) == rank, energy
    assert choose_rank(torch.zeros(3), 0.9) == 1
    # and on a built matrix W = Q1 diag(sigma) Q2^T inside lowrank()
    q1, _ = torch.linalg.qr(torch.randn(40, 4, generator=torch.Generator().manual_seed(2)))
    q2, _ = torch.linalg.qr(torch.randn(50, 4, generator=torch.Generator().manual_seed(3)))
    model = nn.Sequential(nn.Linear(50, 40))
    with torch.no_grad():
        model[0].weight.copy_(q1 @ torch.diag(sigma) @ q2.T)
    result = lowrank(model, LowRankConfig(targets=("0",), energy=0.9))
    assert result.ranks == {"0": 3} and isinstance(model[0], LowRankLinear)


def energy_rank(w: np.ndarray, energy: float) -> int:
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(s2) / s2.sum() >= energy)) + 1


def tiny_gpt() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(family="gpt", vocab_size=50, d_model=32, n_heads=2, n_layers=2,
                                   d_ff=64, dropout=0.0)).eval()


def test_model_equals_weights_replaced_by_their_truncation():
    model, reference = tiny_gpt(), tiny_gpt()
    with torch.no_grad():                      # a low-rank-ish spectrum so the energy rule bites
        for m in (model, reference):
            for b in m.blocks:
                b.ffn.up.weight.mul_(torch.logspace(0, -3, 64)[:, None])
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    expected_ranks = {}
    with torch.no_grad():
        for i, b in enumerate(reference.blocks):
            for name in ("up", "down"):
                lin = getattr(b.ffn, name)
                w = lin.weight.double().numpy()
                r = energy_rank(w, 0.95)
                expected_ranks[f"blocks.{i}.ffn.{name}"] = r
                u, s, vt = np.linalg.svd(w, full_matrices=False)
                if r * (lin.in_features + lin.out_features) < w.size:
                    lin.weight.copy_(torch.from_numpy((u[:, :r] * s[:r]) @ vt[:r]))
        result = lowrank(model, LowRankConfig(targets=("up", "down"), energy=0.95))
        got = {**result.ranks, **{n: int(r.split()[1].rstrip(":")) for n, r in result.skipped.items()}}
        assert got == expected_ranks
        assert result.ranks, "expected some layer to be factorised"
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    dense = sum(32 * 64 * 2 for _ in range(2))
    assert result.params_before == dense
    factorised = sum(r * 96 for r in result.ranks.values())
    assert result.params_after == factorised + 32 * 64 * len(result.skipped)
    # the factorised model trains (recovery fine-tune)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.blocks[0].ffn.up.first.weight.grad is not None


def test_a_layer_not_made_smaller_is_skipped():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64))
    result = lowrank(model, LowRankConfig(targets=("0", "1"), rank=4))
    assert list(result.skipped) == ["0"] and "64 weights factorised >= 64 dense" in result.skipped["0"]
    assert result.ranks == {"1": 4}
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], LowRankLinear)


def test_bad_config_and_input():
    for kwargs, key in [(dict(energy=0.0), "lowrank.energy"), (dict(energy=1.5), "lowrank.energy"),
                        (dict(energy=-0.1), "lowrank.energy"), (dict(rank=0), "lowrank.rank"),
                        (dict(rank=2.5), "lowrank.rank"), (dict(), "exactly one"),
                        (dict(rank=2, energy=0.5), "exactly one")]:
        with pytest.raises(ConfigError, match=key):
            LowRankConfig(targets=("up",), **kwargs)
    with pytest.raises(ConfigError, match="lowrank.targets"):
        LowRankConfig(targets="up", rank=2)
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="matches no Linear"):
        lowrank(model, LowRankConfig(targets=("upp",), rank=2))
    with pytest.raises(ConfigError, match="lm_head.weight is shared with.*embed.tok.weight"):
        lowrank(model, LowRankConfig(targets=("up", "lm_head"), rank=2))
    assert isinstance(model.blocks[0].ffn.up, nn.Linear)        # nothing replaced before the error
    with pytest.raises(ValueError, match="rank must be in"):
        factorize_linear(nn.Linear(4, 6), 5)
