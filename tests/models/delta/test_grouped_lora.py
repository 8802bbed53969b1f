"""A mixed batch of several LoRA deltas runs as one batched product per site (models/delta/
grouped.py): deltas of different ranks and sites, rows with an adapter or no delta beside
them. Outputs and gradients equal each row run alone with only its delta (the plain, unrouted
path); the row-by-row LoRA code is not called; the hooks are gone after the batch. PEFT's
per-sample LoRA is the reference for the same path in test_inference_paths.py."""
from __future__ import annotations

import pytest
import torch

from bmray.models.config import ModelConfig
from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.lora import LoraConfig, LoraSite
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model

torch.set_num_threads(1)
DELTAS = {"r4": LoraConfig(targets=("q_proj", "v_proj"), rank=4, alpha=8.0),
          "r2": LoraConfig(targets=("q_proj", "out_proj"), rank=2, alpha=2.0),
          "r8": LoraConfig(targets=("v_proj", "ffn.up"), rank=8, alpha=4.0),
          "ad": AdapterConfig(targets=("ffn.down",), bottleneck=4)}
ASSIGN = ["r4", "r2", None, "r8", "ad", "r4"]


def delta_model() -> DeltaModel:
    torch.manual_seed(0)
    base = build_model(ModelConfig(family="gpt", vocab_size=48, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=64, max_seq_len=16, dropout=0.0))
    dm = DeltaModel(base)
    g = torch.Generator().manual_seed(1)
    for name, cfg in DELTAS.items():
        delta = dm.add(name, cfg)
        with torch.no_grad():
            for p in delta.parameters():
                p.normal_(0, 0.2, generator=g)           # B non-zero: every delta acts
    return dm.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 48, (len(ASSIGN), 9), generator=torch.Generator().manual_seed(2))


def row_alone(dm, x, i):
    """Row i with its delta alone (the whole one-row batch: the unrouted path)."""
    with dm.mixed([ASSIGN[i]]):
        return dm(input_ids=x[i:i + 1]).logits


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_grouped_lora_equals_each_row_alone(monkeypatch, grad):
    dm, x = delta_model(), ids()
    hooks_before = {n: len(m._forward_hooks) for n, m in dm.base.named_modules()}
    calls = []
    lora = LoraSite.lora
    monkeypatch.setattr(LoraSite, "lora", lambda self, *a, **k: calls.append(1) or lora(
        self, *a, **k))
    with torch.set_grad_enabled(grad):
        with dm.mixed(ASSIGN):
            out = dm(input_ids=x).logits
            assert all(dm.get(n).rows.numel() == 0 for n in ("r4", "r2", "r8"))  # taken over
        assert not calls                                 # no row-by-row LoRA ran
        if grad:
            out.square().sum().backward()
            grads = {n: p.grad.clone() for n, p in dm.named_parameters() if p.grad is not None}
            dm.zero_grad(set_to_none=True)
        ref = torch.cat([row_alone(dm, x, i) for i in range(len(ASSIGN))])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if grad:
            ref.square().sum().backward()
            ref_grads = {n: p.grad for n, p in dm.named_parameters() if p.grad is not None}
            assert grads.keys() == ref_grads.keys() and len(grads) > 0
            for n, g in ref_grads.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert {n: len(m._forward_hooks) for n, m in dm.base.named_modules()} == hooks_before
    assert all(d.rows is None for d in dm.deltas.values())


def test_one_lora_delta_keeps_the_row_by_row_path():
    """With one LoRA delta in the batch nothing is grouped (its rows go the usual way)."""
    dm, x = delta_model(), ids()
    assign = ["r4", None, "ad", "r4", None, "ad"]
    with torch.no_grad(), dm.mixed(assign):
        assert dm.get("r4").rows.tolist() == [0, 3]
        out = dm(input_ids=x).logits
    with torch.no_grad():
        for i, a in enumerate(assign):
            with dm.mixed([a]):
                torch.testing.assert_close(out[i:i + 1], dm(input_ids=x[i:i + 1]).logits,
                                           rtol=1e-5, atol=1e-5)


def test_stacked_factors_follow_an_in_place_update():
    """Without autograd the grouped hook keeps its stacked factors between forwards; an
    in-place change of a factor (an optimizer step) must be seen by the next forward."""
    dm, x = delta_model(), ids()
    with torch.no_grad(), dm.mixed(ASSIGN):
        dm(input_ids=x)
        next(iter(dm.get("r2").sites.values())).B.mul_(3.0)
        out = dm(input_ids=x).logits
    with torch.no_grad():
        ref = torch.cat([row_alone(dm, x, i) for i in range(len(ASSIGN))])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
