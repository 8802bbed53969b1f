"""The compressed-model artifact: for every stage kind, the model rebuilt by load_compressed
(base built afresh with other weights, each record's structural change replayed, tensors
loaded) gives exactly the saved model's outputs; a base of another architecture, missing or
corrupt files, and a tensor that does not fit are clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bmray.models.classifier import SequenceClassifier
from bmray.models.compress.artifact import (ArtifactError, ArtifactMismatch, architecture_of,
                                            load_compressed, model_sizes, read_manifest,
                                            save_compressed)
from bmray.models.compress.quant import QuantLinear
from bmray.models.compress.recipe import StageContext, StageRecord, apply_stage, parse_recipe
from bmray.models.config import ModelConfig
from bmray.models.delta.base import base_identity
from bmray.models.families.registry import build_model

torch.set_num_threads(1)
V, D, H, L, F, C = 64, 32, 4, 4, 64, 3


def classifier(seed: int = 0, n_layers: int = L, labels: int = C) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="bert", vocab_size=V, d_model=D, n_heads=H, n_layers=n_layers,
                      d_ff=F, max_seq_len=32, dropout=0.0)
    model = SequenceClassifier(build_model(cfg), D, labels)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    return model.eval()


def batch(seed: int = 0, b: int = 4, t: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, C, (b,), generator=g)}


def sgd_train(module: nn.Module, steps: int, lr: float) -> dict:
    """A plain loop (the job uses the Trainer): enough to move the weights."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    for i in range(steps):
        loss = module(**batch(100 + i)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    return {"steps": steps, "loss": float(loss.detach())}


CTX = StageContext(calibration=lambda: [batch(s) for s in range(3)], train=sgd_train)

RECIPES = {
    "distill": [{"kind": "distill", "student_layers": [0, 3], "steps": 2, "lr": 0.05}],
    "prune": [{"kind": "prune", "method": "wanda", "sparsity": 0.5, "recovery_steps": 1}],
    "structured": [{"kind": "structured", "heads": 0.25, "neurons": 0.5}],
    "quantize_int8": [{"kind": "quantize", "scheme": "int8"}],
    "quantize_w8a8": [{"kind": "quantize", "scheme": "w8a8", "skip": ["head"]}],
    "quantize_int4_qat": [{"kind": "quantize", "bits": 4, "group_size": 16, "qat_steps": 1}],
    "moefy": [{"kind": "moefy", "num_experts": 4, "top_k": 2, "router_steps": 5,
               "targets": ["ffn"]}],
    "lowrank": [{"kind": "lowrank", "targets": ["up", "down"], "rank": 4}],
    # the token table is tied to the MLM decoder here (refused): the segment table only
    "quantize_embeddings": [{"kind": "quantize_embeddings", "targets": ["segment"]}],
    "share": [{"kind": "share", "groups": [["backbone.blocks.0", "backbone.blocks.1"],
                                           ["backbone.blocks.2", "backbone.blocks.3"]],
               "recovery_steps": 1, "lr": 0.01}],
    "share_then_qat": [{"kind": "share", "groups": [["backbone.blocks.0", "backbone.blocks.1"]]},
                       {"kind": "quantize", "bits": 4, "group_size": 16, "qat_steps": 1,
                        "skip": ["decoder"]}],
    "chain": [{"kind": "distill", "student_layers": [1, 2], "steps": 1, "lr": 0.05},
              {"kind": "structured", "neurons": 0.25, "importance": "weight",
               "per_layer": True},
              {"kind": "prune", "method": "2:4"},
              {"kind": "quantize", "scheme": "int8"}],
}


def compress(recipe):
    model = classifier(0)
    arch, ident = architecture_of(model), base_identity(model)
    records = []
    for stage in parse_recipe(recipe):
        model, rec = apply_stage(model, stage, CTX)
        records.append(StageRecord(stage.to_dict(), rec))
    return model, records, arch, ident


@pytest.mark.parametrize("name", list(RECIPES))
def test_round_trip_is_exact_per_stage_kind(tmp_path, name):
    model, records, arch, ident = compress(RECIPES[name])
    before = classifier(0)
    x = batch(7)
    with torch.no_grad():
        want = model(**x).logits
        assert not torch.allclose(want, before(**x).logits)      # the stage did something
    save_compressed(model, tmp_path, records, ident, {"accuracy": 0.5}, architecture=arch)
    loaded = load_compressed(tmp_path, lambda: classifier(seed=123))   # other weights
    with torch.no_grad():
        got = loaded(**x).logits
    assert torch.equal(got, want)
    assert type(loaded) is type(model)
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in model.named_modules()]
    assert model_sizes(loaded) == model_sizes(model)
    m = read_manifest(tmp_path)
    assert m["base"] == ident and m["architecture"] == arch
    assert [r["kind"] for r in m["recipe"]] == [s["kind"] for s in RECIPES[name]]


def test_sizes_shrink_as_the_records_say(tmp_path):
    base = classifier(0)
    full = model_sizes(base)
    # the MLM decoder shares the embedding's weight: quantizing it would add a copy
    model, records, _, _ = compress([{"kind": "quantize", "skip": ["decoder"]}])
    q = model_sizes(model)
    assert q["parameters"] == full["parameters"]                  # codes count as weights
    linears = [m for n, m in base.named_modules() if isinstance(m, nn.Linear)
               and not n.endswith("decoder")]
    w_bytes = sum(m.weight.numel() for m in linears)
    # every Linear's fp32 weight (4 B) becomes int8 (1 B) + one fp32 scale per row
    assert full["bytes"] - q["bytes"] == 3 * w_bytes - 4 * sum(m.out_features for m in linears)
    assert all(isinstance(dict(model.named_modules())[n], QuantLinear)
               for n in records[0].record["layers"])
    model, records, _, _ = compress(RECIPES["structured"])
    sizes = records[0].record["sizes"]
    assert sum(sizes["heads"].values()) == L * H - round(0.25 * L * H)
    assert sum(sizes["ffn"].values()) == L * F - round(0.5 * L * F)


def test_shared_layers_are_quantized_once(tmp_path):
    model, records, arch, ident = compress(RECIPES["share_then_qat"])
    blocks = model.backbone.blocks
    assert isinstance(blocks[1].ffn.up, QuantLinear) and blocks[0].ffn.up is blocks[1].ffn.up
    assert blocks[2].ffn.up is not blocks[3].ffn.up
    save_compressed(model, tmp_path, records, ident, {}, architecture=arch)
    loaded = load_compressed(tmp_path, lambda: classifier(seed=5))
    assert loaded.backbone.blocks[0].ffn.up is loaded.backbone.blocks[1].ffn.up
    assert model_sizes(loaded) == model_sizes(model)


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt", vocab_size=V, d_model=D, n_heads=H, n_layers=2, d_ff=F,
                      max_seq_len=32, dropout=0.0, tie_embeddings=True)
    gpt = build_model(cfg).eval()
    arch = architecture_of(gpt)
    stage = parse_recipe([{"kind": "lowrank", "targets": ["up"], "rank": 4}])[0]
    gpt, rec = apply_stage(gpt, stage, CTX)
    save_compressed(gpt, tmp_path, [StageRecord(stage.to_dict(), rec)], base_identity(gpt), {},
                    architecture=arch)
    m = read_manifest(tmp_path)
    assert len(m["aliases"]) == 1
    loaded = load_compressed(tmp_path, lambda: build_model(cfg))
    ids = batch(3)["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, gpt(ids).logits)


def test_another_architecture_is_refused_naming_both(tmp_path):
    model, records, arch, ident = compress(RECIPES["quantize_int8"])
    save_compressed(model, tmp_path, records, ident, {}, architecture=arch)
    with pytest.raises(ArtifactMismatch, match=r"made from SequenceClassifier\(.*n_layers=4.*"
                                               r"is SequenceClassifier\(.*n_layers=3.*n_layers"):
        load_compressed(tmp_path, lambda: classifier(n_layers=3))
    with pytest.raises(ArtifactMismatch, match="parameter shapes differ"):
        load_compressed(tmp_path, lambda: classifier(labels=C + 1))       # another head


def test_missing_and_corrupt_files(tmp_path):
    model, records, arch, ident = compress(RECIPES["quantize_int8"])
    with pytest.raises(ArtifactError, match="no compressed-model manifest"):
        load_compressed(tmp_path / "nothing", classifier)
    save_compressed(model, tmp_path, records, ident, {}, architecture=arch)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_compressed(tmp_path, classifier)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="tensors are missing"):
        load_compressed(tmp_path, classifier)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "bmray-delta/1"}))
    with pytest.raises(ArtifactError, match="format 'bmray-delta/1' is not"):
        read_manifest(tmp_path)


def test_tensors_that_do_not_fit_the_replayed_model(tmp_path):
    model, records, arch, ident = compress(RECIPES["structured"])
    save_compressed(model, tmp_path, records, ident, {}, architecture=arch)
    m = json.loads((tmp_path / "manifest.json").read_text())
    site = next(iter(m["records"][0]["record"]["sizes"]["ffn"]))
    m["records"][0]["record"]["sizes"]["ffn"][site] += 1          # a record that lies
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="shape/dtype mismatch"):
        load_compressed(tmp_path, classifier)
