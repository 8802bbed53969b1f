"""Bottleneck adapters against their formulas written out here (Houlsby's sequential form,
He et al.'s parallel form), per-row routing, and bad configs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.model import DeltaModel
from bmray.models.delta.registry import delta_config_from_dict
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


def setup(style, activation="relu", scale=1.0):
    torch.manual_seed(0)
    model = DeltaModel(Toy())
    delta = model.add("a", AdapterConfig(targets=("inner",), bottleneck=4, style=style,
                                         activation=activation, scale=scale))
    site = delta.sites["inner"]
    with torch.no_grad():                      # up starts at zero (identity); make it non-zero
        site.up.weight.normal_()
        site.up.bias.normal_()
    return model, site


def reference(model, site, x, style, act, scale):
    W, b = model.base.inner.weight, model.base.inner.bias
    Wd, bd, Wu, bu = site.down.weight, site.down.bias, site.up.weight, site.up.bias
    h = x @ W.T + b
    src = h if style == "sequential" else x
    h = h + scale * (act(src @ Wd.T + bd) @ Wu.T + bu)
    return torch.tanh(h) @ model.base.head.weight.T + model.base.head.bias


@pytest.mark.parametrize("style,activation,scale", [("sequential", "relu", 1.0),
                                                    ("parallel", "gelu", 0.5),
                                                    ("sequential", "gelu", 2.0)])
def test_adapter_matches_formula(style, activation, scale):
    model, site = setup(style, activation, scale)
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(1))
    act = {"relu": torch.relu, "gelu": F.gelu}[activation]
    torch.testing.assert_close(model(x), reference(model, site, x, style, act, scale),
                               rtol=1e-5, atol=1e-6)
    assert site.down.weight.shape == (4, 5 if style == "sequential" else 6)


def test_adapter_starts_as_identity_and_rows_select():
    torch.manual_seed(0)
    model = DeltaModel(Toy())
    x = torch.randn(3, 6)
    bare = model(x)
    model.add("a", AdapterConfig(targets=("inner",), bottleneck=4))
    torch.testing.assert_close(model(x), bare, rtol=0, atol=0)
    with torch.no_grad():
        model.get("a").sites["inner"].up.bias.fill_(1.0)
    with model.mixed(["a", None, "a"]):
        out = model(x)
    full = model(x)
    torch.testing.assert_close(out[1], bare[1], rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full[1], bare[1])


def test_bad_adapter_configs_name_the_key():
    with pytest.raises(ConfigError, match=r"delta\.bottleneck"):
        AdapterConfig(targets=("x",), bottleneck=0)
    with pytest.raises(ConfigError, match=r"delta\.style"):
        delta_config_from_dict({"method": "adapter", "targets": ["x"], "style": "diagonal"})
    with pytest.raises(ConfigError, match=r"delta\.activation"):
        AdapterConfig(targets=("x",), activation="swish")
    with pytest.raises(ConfigError, match=r"delta: unknown key.*bottlenek"):
        delta_config_from_dict({"method": "adapter", "targets": ["x"], "bottlenek": 3})
