"""Int8 embeddings against the formula written out here (per row: s = max|w| / 127,
q = round(w / s), |w - q·s| ≤ s/2), lookups against torch.nn.functional.embedding over the
dequantised table, a state_dict round trip, the recipe stage and its artifact replay, sizes,
and bad input (tied tables, patterns matching nothing, float codes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmray.models.classifier import SequenceClassifier
from bmray.models.compress.artifact import (architecture_of, load_compressed, model_sizes,
                                            save_compressed)
from bmray.models.compress.quant_embedding import (EmbeddingQuantConfig, QuantEmbedding,
                                                   quantize_embeddings)
from bmray.models.compress.recipe import (StageRecord, apply_stage, check_recipe,
                                          parse_recipe)
from bmray.models.config import ModelConfig
from bmray.models.delta.base import base_identity
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError
from tests.models.compress.test_artifact import CTX, C, D, F as DFF, H, V, batch

torch.set_num_threads(1)


def untied_classifier(seed: int = 0, tie: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="bert", vocab_size=V, d_model=D, n_heads=H, n_layers=2, d_ff=DFF,
                      max_seq_len=32, dropout=0.0, tie_embeddings=tie)
    return SequenceClassifier(build_model(cfg), D, C).eval()


def table(seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(50, 24)
    with torch.no_grad():
        emb.weight.mul_(torch.logspace(-3, 1, 50).unsqueeze(-1))   # rows of very different size
        emb.weight[7].zero_()                                       # an all-zero row
    return emb


def test_codes_and_scales_follow_the_formula_within_half_a_step():
    emb = table()
    q = QuantEmbedding.from_embedding(emb)
    w = emb.weight.detach()
    scale = w.abs().amax(-1).clamp_min(1e-12) / 127
    torch.testing.assert_close(q.scale, scale, rtol=1e-6, atol=0)
    assert q.codes.dtype == torch.int8
    deq = q.dequantized_weight()
    err = (deq - w).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all())
    assert torch.equal(q.codes[7], torch.zeros(24, dtype=torch.int8))
    assert int(q.codes.abs().amax(-1).min()) in (0, 127)        # each row's largest hits ±127


def test_lookup_equals_the_dequantised_rows():
    emb = table()
    q = QuantEmbedding.from_embedding(emb)
    ids = torch.randint(0, 50, (3, 11))
    ids[0, 0] = 7
    reference = F.embedding(ids, q.codes.float() * q.scale.unsqueeze(-1))
    out = q(ids)
    assert out.dtype == torch.float32 and out.shape == (3, 11, 24)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, emb(ids).detach(), rtol=0,
                               atol=float(q.scale.max()) / 2 * 1.001)
    assert torch.equal(q(ids.int()), out)


def test_state_dict_round_trip_and_float_codes_refused():
    q = QuantEmbedding.from_embedding(table())
    state = q.state_dict()
    assert set(state) == {"codes", "scale"}
    fresh = QuantEmbedding(50, 24)
    fresh.load_state_dict(state)
    ids = torch.arange(50)
    assert torch.equal(fresh(ids), q(ids))
    with pytest.raises(ConfigError, match=r"codes: expected int8 codes, got torch.float32"):
        fresh.load_state_dict({"codes": state["codes"].float(), "scale": state["scale"]})
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        q(torch.zeros(2))


def test_quantize_embeddings_replaces_the_selected_tables_only():
    model = untied_classifier()
    x = batch(1)
    with torch.no_grad():
        before = model(**x).logits
    tok = model.backbone.embed.tok.weight.detach().clone()
    names = quantize_embeddings(model, skip=["segment"])
    assert names == ["backbone.embed.tok"]
    assert isinstance(model.backbone.embed.tok, QuantEmbedding)
    assert isinstance(model.backbone.embed.segment, nn.Embedding)
    torch.testing.assert_close(model.backbone.embed.tok.dequantized_weight(), tok, rtol=0,
                               atol=float(tok.abs().max()) / 127 / 2 * 1.001)
    with torch.no_grad():
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)   # small error
    assert not torch.equal(after, before)


def test_a_tied_table_is_refused_naming_both_before_any_change():
    model = untied_classifier(tie=True)
    with pytest.raises(ConfigError, match=r"backbone\.embed\.tok\.weight is tied to "
                                          r"backbone\.mlm_head\.decoder\.weight"):
        quantize_embeddings(model)
    assert isinstance(model.backbone.embed.tok, nn.Embedding)
    assert isinstance(model.backbone.embed.segment, nn.Embedding)     # nothing replaced
    assert quantize_embeddings(model, skip=["tok"]) == ["backbone.embed.segment"]


@pytest.mark.parametrize("kw, match", [
    ({"targets": ["nope"]}, r"targets: 'nope' matches no Embedding of SequenceClassifier; "
                            r"candidates: backbone\.embed\.tok"),
    ({"skip": ["re:.*"]}, r"targets: every embedding matched is skipped"),
    ({"targets": "tok"}, r"targets: expected a list of module-name patterns"),
])
def test_bad_patterns(kw, match):
    with pytest.raises(ConfigError, match=match):
        quantize_embeddings(untied_classifier(), **kw)
    with pytest.raises(ConfigError):
        EmbeddingQuantConfig(skip="x")


def test_max_norm_is_refused():
    with pytest.raises(ConfigError, match="max_norm"):
        QuantEmbedding.from_embedding(nn.Embedding(4, 3, max_norm=1.0))


def test_the_recipe_stage_its_sizes_and_the_artifact_round_trip(tmp_path):
    model = untied_classifier()
    arch, ident = architecture_of(model), base_identity(model)
    full = model_sizes(model)
    stages = parse_recipe([{"kind": "quantize", "scheme": "int8", "skip": ["head"]},
                           {"kind": "quantize_embeddings", "skip": ["segment"]}])
    check_recipe(stages, model, has_data=False)
    records = []
    for stage in stages:
        model, rec = apply_stage(model, stage, CTX)
        records.append(StageRecord(stage.to_dict(), rec))
    assert records[1].record == {"layers": {"backbone.embed.tok": [V, D, None]}}
    sizes = model_sizes(model)
    assert sizes["parameters"] == full["parameters"]     # codes count as the rows they hold
    # the table's fp32 (4 B) becomes int8 (1 B) + one fp32 scale a row, on top of the Linears
    linears = [m for m in untied_classifier().modules()
               if isinstance(m, nn.Linear) and m.out_features != C]
    lin_saved = sum(3 * m.weight.numel() - 4 * m.out_features for m in linears)
    assert full["bytes"] - sizes["bytes"] == lin_saved + 3 * V * D - 4 * V
    save_compressed(model, tmp_path, records, ident, {}, architecture=arch)
    loaded = load_compressed(tmp_path, lambda: untied_classifier(seed=9))   # other weights
    assert isinstance(loaded.backbone.embed.tok, QuantEmbedding)
    x = batch(3)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
    assert model_sizes(loaded) == sizes


def test_the_stage_is_checked_before_compute_and_may_follow_quantize_only():
    model = untied_classifier(tie=True)
    with pytest.raises(ConfigError, match=r"recipe\[0\]\.targets: backbone\.embed\.tok\.weight "
                                          r"is tied"):
        check_recipe(parse_recipe([{"kind": "quantize_embeddings"}]), model, has_data=False)
    with pytest.raises(ConfigError, match=r"recipe\[0\]\.kind: 'quantize' must be the last"):
        parse_recipe([{"kind": "quantize"}, {"kind": "quantize_embeddings"},
                      {"kind": "prune"}])
    with pytest.raises(ConfigError, match=r"recipe\[0\]\.bits: unknown key for a "
                                          r"quantize_embeddings stage"):
        parse_recipe([{"kind": "quantize_embeddings", "bits": 4}])
