"""Saving and loading one delta alone: round trip, the manifest, the artifact's size, loading onto
another base (DeltaBaseMismatch naming both) and damaged artifacts (errors naming the path)."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from bmray.models.config import ModelConfig
from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.base import base_identity
from bmray.models.delta.io import (DeltaArtifactError, DeltaBaseMismatch, load_delta, read_manifest)
from bmray.models.delta.lora import LoraConfig
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


def gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(family="gpt", vocab_size=48, d_model=32, n_heads=4, n_layers=2, d_ff=64,
               max_seq_len=32, dropout=0.0)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg))


def trained(seed=0, **kw):
    model = DeltaModel(gpt(seed, **kw))
    model.add("lora", LoraConfig(targets=("q_proj", "v_proj"), rank=4))
    model.add("ad", AdapterConfig(targets=("ffn.down",), bottleneck=8, style="parallel"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in model.deltas.values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


X = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["lora", "ad"])
def test_round_trip(tmp_path, name):
    model = trained()
    out = model(X).logits
    model.save(name, tmp_path / name)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    delta = model.get(name)
    assert manifest["format"] == "bmray-delta/1" and manifest["method"] == delta.config.method
    assert manifest["config"] == json.loads(json.dumps(delta.config.to_dict()))
    assert manifest["base"] == base_identity(model.base)
    assert manifest["num_parameters"] == delta.num_trainable()
    assert set(manifest["tensors"]) == set(delta.state_dict())
    assert len(manifest["sites"]) == len(delta.sites)
    # small: the delta's float32 bytes plus a header, not the base
    size = (tmp_path / name / "delta.safetensors").stat().st_size
    assert 4 * delta.num_trainable() <= size <= 4 * delta.num_trainable() + 8192
    assert size < 0.5 * 4 * sum(p.numel() for p in model.base.parameters())

    # onto a fresh base with the same weights: the other delta too, so outputs must match
    other = "ad" if name == "lora" else "lora"
    model.save(other, tmp_path / other)
    fresh = DeltaModel(gpt())
    for n in ("lora", "ad"):                      # attach in the original order
        loaded = fresh.load(tmp_path / n)
        assert all(torch.equal(v, model.get(n).state_dict()[k])
                   for k, v in loaded.state_dict().items())
    torch.testing.assert_close(fresh(X).logits, out, rtol=1e-6, atol=1e-6)

    # without a base: sites from the tensors' shapes, then attached
    alone = load_delta(tmp_path / name)
    assert not alone.attached
    assert all(torch.equal(v, delta.state_dict()[k]) for k, v in alone.state_dict().items())
    alone.attach(gpt())


def test_wrong_base_names_both(tmp_path):
    model = trained()
    model.save("lora", tmp_path / "d")
    want = base_identity(model.base)["weights_sha256"][:12]
    other = gpt(seed=1)
    have = base_identity(other)["weights_sha256"][:12]
    with pytest.raises(DeltaBaseMismatch, match=rf"GPT \(weights sha256 {want}\).*GPT \(weights "
                                                rf"sha256 {have}\).*configs are equal"):
        DeltaModel(other).load(tmp_path / "d")
    with pytest.raises(DeltaBaseMismatch, match=r"config differs at \['d_ff'\]"):
        load_delta(tmp_path / "d", base=gpt(d_ff=96))
    assert isinstance(DeltaBaseMismatch("x"), ConfigError)


def test_damaged_artifacts_name_the_path(tmp_path):
    model = trained()
    d = model.save("lora", tmp_path / "d")
    base = model.base
    with pytest.raises(DeltaArtifactError, match=r"nowhere.*manifest\.json: no delta manifest"):
        load_delta(tmp_path / "nowhere")

    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DeltaArtifactError, match=r"manifest\.json: not valid JSON"):
        load_delta(d, base)
    (d / "manifest.json").write_text(json.dumps({**manifest, "format": "bmray-delta/9"}))
    with pytest.raises(DeltaArtifactError, match=r"manifest\.json: format 'bmray-delta/9'"):
        read_manifest(d)
    (d / "manifest.json").write_text(json.dumps({**manifest, "config": {**manifest["config"],
                                                                         "rnak": 2}}))
    with pytest.raises(ConfigError, match=r"manifest\.json:config: unknown key.*rnak"):
        load_delta(d, base)
    (d / "manifest.json").write_text(json.dumps(manifest))

    good = (d / "delta.safetensors").read_bytes()
    (d / "delta.safetensors").write_bytes(good[:40])
    with pytest.raises(DeltaArtifactError, match=r"delta\.safetensors: not a readable safetensors"):
        load_delta(d, base)
    (d / "delta.safetensors").unlink()
    with pytest.raises(DeltaArtifactError, match=r"delta\.safetensors: the delta's tensors are missing"):
        load_delta(d, base)

    tensors = {k: v.detach().clone() for k, v in model.get("lora").state_dict().items()}
    first = sorted(tensors)[0]
    for bad, what in [({**tensors, "sites.blocks:0:attn:q_proj.C": torch.zeros(2)}, "unexpected"),
                      ({k: v for k, v in tensors.items() if k != first}, "missing"),
                      ({**tensors, first: torch.zeros(3, 3)}, "shape mismatch")]:
        safetensors.torch.save_file(bad, str(d / "delta.safetensors"))
        with pytest.raises(DeltaArtifactError, match=rf"delta\.safetensors: .*{what} \[\(?'"):
            load_delta(d, base)
    safetensors.torch.save_file(tensors, str(d / "delta.safetensors"))
    assert load_delta(d, base).num_trainable() == model.get("lora").num_trainable()


def test_merged_lora_is_not_saved(tmp_path):
    model = trained()
    model.merge("lora")
    with pytest.raises(ConfigError, match="unmerge first"):
        model.save("lora", tmp_path / "d")
