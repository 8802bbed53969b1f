"""BitFit: a bias delta is exactly tuning the bias (Ben Zaken et al. 2022). The reference is torch
autograd on an unfrozen copy of the plain model whose biases train."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bmray.models.config import ModelConfig
from bmray.models.delta.bitfit import BitFitConfig
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
TARGETS = ("q_proj", "v_proj", "ffn.up", "ln_1", "ln_f")


def tiny_gpt():
    torch.manual_seed(0)
    return build_model(ModelConfig(family="gpt", vocab_size=48, d_model=32, n_heads=4,
                                   n_layers=2, d_ff=64, max_seq_len=32, dropout=0.0))


def test_bitfit_is_bias_tuning():
    base = tiny_gpt()
    plain = copy.deepcopy(base)                  # the reference: its own biases, unfrozen
    model = DeltaModel(base)
    delta = model.add("b", BitFitConfig(targets=TARGETS))
    assert len(delta.sites) == 2 * 4 + 1
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, site in delta.sites.items():
            site.bias.normal_(0, 0.1, generator=g)
            plain.get_submodule(key.replace(":", ".")).bias.add_(site.bias)   # b + δ
    x = torch.randint(0, 48, (3, 10), generator=g)
    out = model(x[:, :-1], labels=x[:, 1:])
    ref = plain(x[:, :-1], labels=x[:, 1:])
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for key, site in delta.sites.items():
        torch.testing.assert_close(site.bias.grad, plain.get_submodule(key.replace(":", ".")).bias.grad,
                                   rtol=1e-5, atol=1e-7)
    assert model.num_trainable() == sum(s.bias.numel() for s in delta.sites.values())


def test_bitfit_rows():
    model = DeltaModel(nn.Sequential(nn.Linear(4, 3)))
    delta = model.add("b", BitFitConfig(targets=("0",)))
    with torch.no_grad():
        delta.sites["0"].bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(3, 4)
    plain = x @ model.base[0].weight.T + model.base[0].bias
    with model.mixed([None, "b", None]):
        out = model(x)
    torch.testing.assert_close(out, plain + torch.tensor([[0.0], [1.0], [0.0]]) * torch.tensor([1.0, 2.0, 3.0]))


def test_bitfit_needs_a_bias():
    model = DeltaModel(tiny_gpt())
    with pytest.raises(ConfigError, match=r"lm_head.*no bias"):
        model.add("b", BitFitConfig(targets=("ln_f", "lm_head")))
    assert not model.deltas
    with pytest.raises(ConfigError, match=r"delta\.targets"):
        BitFitConfig(targets="ln_f")
