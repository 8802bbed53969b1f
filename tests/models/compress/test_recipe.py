"""Recipes: typed parsing with errors naming ``recipe[i].key``, the stage registry (one entry
adds a technique), checks before any compute (calibration data, group sizes, n:m shapes,
target names, quantize last), and what each applied stage records against facts read off the
model by hand."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from bmray.models.compress.quant import QuantLinear
from bmray.models.compress.recipe import (STAGES, NoOptions, StageContext, StageKind,
                                          StructuredConfig, apply_stage, check_recipe,
                                          parse_recipe, recipe_to_list, register, replay_stage)
from bmray.models.typed_config import ConfigError
from tests.models.compress.test_artifact import CTX, D, F, H, L, classifier

torch.set_num_threads(1)


def test_parse_types_each_stage_and_round_trips():
    raw = [{"kind": "distill", "student_layers": [0, 2], "steps": 5, "kd_weight": 1.0},
           {"kind": "prune", "method": "wanda", "sparsity": 0.3, "recovery_steps": 2},
           {"kind": "structured", "heads": 0.25},
           {"kind": "moefy", "num_experts": 4, "top_k": 1},
           {"kind": "lowrank", "targets": ["up"], "energy": 0.9},
           {"kind": "share", "groups": [["a.0", "a.1"]]},
           {"kind": "quantize", "bits": 4, "group_size": 16}]
    stages = parse_recipe(raw)
    assert [s.kind for s in stages] == [r["kind"] for r in raw]
    assert stages[0].options.student_layers == (0, 2) and stages[0].config.kd_weight == 1.0
    assert stages[1].config.sparsity == 0.3 and stages[1].options.recovery_steps == 2
    assert stages[6].config.scheme == "int4"                       # bits: 4 means int4
    again = parse_recipe(recipe_to_list(stages))
    assert again == stages


@pytest.mark.parametrize("raw, match", [
    ([{"kind": "prune", "sparsity": 1.0}], r"recipe\[0\]\.sparsity: must be a number in \[0, 1\)"),
    ([{"kind": "prune", "sparsity": -0.1}], r"recipe\[0\]\.sparsity"),
    ([{"kind": "prune"}, {"kind": "quantize", "bits": 3}],
     r"recipe\[1\]\.bits: 3 is not one of \[4, 8\]"),
    ([{"kind": "quantize", "bits": 4, "scheme": "w8a8"}], r"recipe\[0\]\.bits: 4 does not match"),
    ([{"kind": "quantize", "scheme": "int3"}], r"recipe\[0\]\.scheme: 'int3' is not one of"),
    ([{"kind": "quantize", "group_size": 7}], r"recipe\[0\]\.group_size: must be even"),
    ([{"kind": "zip"}], r"recipe\[0\]\.kind: 'zip' is not one of \['distill'"),
    ([{"sparsity": 0.5}], r"recipe\[0\]\.kind: missing"),
    ([{"kind": "prune", "sparsty": 0.5}], r"recipe\[0\]\.sparsty: unknown key for a prune stage"),
    ([{"kind": "distill", "temperature": 0}], r"recipe\[0\]\.temperature: must be a number > 0"),
    ([{"kind": "distill", "steps": 0}], r"recipe\[0\]\.steps: must be >= 1"),
    ([{"kind": "structured", "heads": 1.5}], r"recipe\[0\]\.heads: must be a number in \[0, 1\)"),
    ([{"kind": "structured"}], r"recipe\[0\]\.heads / neurons: both are 0"),
    ([{"kind": "moefy", "num_experts": 4, "top_k": 5}], r"recipe\[0\]\.top_k: must be <= 4"),
    ([{"kind": "lowrank", "targets": ["up"], "energy": 1.5}], r"recipe\[0\]\.energy"),
    ([{"kind": "prune", "recovery_steps": -1}], r"recipe\[0\]\.recovery_steps: must be >= 0"),
    ([{"kind": "prune", "sparsity": "half"}], r"recipe\[0\]\.sparsity: expected a number"),
    ([{"kind": "quantize"}, {"kind": "prune"}], r"recipe\[0\]\.kind: 'quantize' must be the last"),
    ([], r"recipe: expected a non-empty list"),
    (["prune"], r"recipe\[0\]: expected a mapping"),
])
def test_bad_stages_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(raw)


@pytest.mark.parametrize("raw, match", [
    ([{"kind": "prune", "method": "wanda"}], r"recipe\[0\]: method wanda needs calibration data"),
    ([{"kind": "structured", "heads": 0.5}],
     r"recipe\[0\]: importance 'gradient' needs calibration"),
    ([{"kind": "prune"}, {"kind": "moefy"}],
     r"recipe\[1\]: a moefy stage \(its routers\) needs calibration"),
])
def test_calibration_is_required_before_any_compute(raw, match):
    with pytest.raises(ConfigError, match=match):
        check_recipe(parse_recipe(raw), classifier(), has_data=False)
    check_recipe(parse_recipe(raw), classifier(), has_data=True)


@pytest.mark.parametrize("raw, match", [
    ([{"kind": "quantize", "bits": 4, "group_size": 48}],
     r"recipe\[0\]\.group_size: 48 does not divide in_features 32 of layer"),
    ([{"kind": "prune", "method": "n:m", "n": 1, "m": 3}], r"recipe\[0\]\.m: 3 does not divide"),
    ([{"kind": "prune"}, {"kind": "lowrank", "targets": ["nope"], "rank": 2}],
     r"recipe\[1\]\.targets"),
    ([{"kind": "prune", "targets": ["nope"]}], r"recipe\[0\]\.targets"),
])
def test_model_checks_before_any_compute(raw, match):
    model = classifier()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        check_recipe(parse_recipe(raw), model, has_data=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_structural_stage_defers_later_checks_to_their_turn():
    # after lowrank the shapes may differ: the quantize check waits for its stage
    stages = parse_recipe([{"kind": "lowrank", "targets": ["up"], "rank": 2},
                           {"kind": "quantize", "bits": 4, "group_size": 48}])
    check_recipe(stages, classifier(), has_data=True)
    model, _ = apply_stage(classifier(), stages[0], CTX)
    with pytest.raises(ConfigError, match=r"recipe\[1\]\.group_size: 48 does not divide"):
        apply_stage(model, stages[1], CTX)


def test_distill_record_and_student_init():
    teacher = classifier()
    stage = parse_recipe([{"kind": "distill", "student_layers": [1, 3], "steps": 1}])[0]
    no_training = StageContext(train=lambda module, steps, lr: {"steps": 0})
    student, rec = apply_stage(copy.deepcopy(teacher), stage, no_training)
    assert rec["student_layers"] == [1, 3]
    assert len(student.backbone.blocks) == 2 and student.backbone.config.n_layers == 2
    for i, j in enumerate([1, 3]):
        for (n, a), (_, b) in zip(student.backbone.blocks[i].state_dict().items(),
                                  teacher.backbone.blocks[j].state_dict().items()):
            assert torch.equal(a, b), n
    assert torch.equal(student.head.weight, teacher.head.weight)
    default = parse_recipe([{"kind": "distill", "steps": 1}])[0]
    _, rec = apply_stage(copy.deepcopy(teacher), default, no_training)
    assert rec["student_layers"] == [0, 2]                        # DistilBERT: every other
    with pytest.raises(ConfigError, match=r"recipe\[0\]: 1 training steps asked, but no trainer"):
        apply_stage(copy.deepcopy(teacher), default, StageContext())


def test_prune_record_is_the_zeros_in_the_weights():
    stage = parse_recipe([{"kind": "prune", "method": "magnitude", "sparsity": 0.4}])[0]
    model, rec = apply_stage(classifier(), stage, CTX)
    mods = dict(model.named_modules())
    for name, s in rec["layers"].items():
        w = mods[name].weight
        assert not hasattr(mods[name], "parametrizations")          # masks baked in
        assert s == pytest.approx(float((w == 0).float().mean()))
        assert s == pytest.approx(round(0.4 * w.numel()) / w.numel())
    zeros = sum(int((mods[n].weight == 0).sum()) for n in rec["layers"])
    total = sum(mods[n].weight.numel() for n in rec["layers"])
    assert rec["sparsity"] == pytest.approx(zeros / total)


def test_quantize_record_lists_the_quantized_layers_within_half_a_step():
    original = classifier()
    stage = parse_recipe([{"kind": "quantize", "scheme": "int8", "skip": ["decoder"]}])[0]
    model, rec = apply_stage(copy.deepcopy(original), stage, CTX)
    mods, orig = dict(model.named_modules()), dict(original.named_modules())
    assert sorted(rec["layers"]) == sorted(n for n, m in mods.items() if isinstance(m, QuantLinear))
    assert not any(n.endswith("decoder") for n in rec["layers"])
    for n in rec["layers"]:
        w = orig[n].weight.detach()
        s = w.abs().amax(1, keepdim=True) / 127                     # per-channel absmax scale
        err = (mods[n].dequantized_weight() - w).abs()
        assert bool((err <= s / 2 + 1e-7).all()), n
        assert rec["shapes"][n] == [w.shape[0], w.shape[1], True]


def test_structured_and_lowrank_records_match_the_modules():
    stage = parse_recipe([{"kind": "structured", "heads": 0.5, "neurons": 0.25,
                           "per_layer": True}])[0]
    model, rec = apply_stage(classifier(), stage, CTX)
    for i in range(L):
        attn, ffn = model.backbone.blocks[i].attn, model.backbone.blocks[i].ffn
        assert attn.q_proj.out_features == (H // 2) * (D // H)
        assert rec["sizes"]["heads"][f"backbone.blocks.{i}.attn"] == H // 2
        assert ffn.up.out_features == rec["sizes"]["ffn"][f"backbone.blocks.{i}.ffn"] == F - F // 4
    assert rec["removed"] == {"heads": L * H // 2, "neurons": L * F // 4}
    stage = parse_recipe([{"kind": "lowrank", "targets": ["up"], "rank": 3}])[0]
    model, rec = apply_stage(classifier(), stage, CTX)
    assert rec["ranks"] == {f"backbone.blocks.{i}.ffn.up": 3 for i in range(L)}
    assert model.backbone.blocks[0].ffn.up.first.out_features == 3


def test_a_new_technique_is_one_registry_entry():
    @dataclasses.dataclass(frozen=True)
    class ScaleHead:
        factor: float = 2.0

    def apply(model, cfg, opts, ctx, where):
        with torch.no_grad():
            model.head.weight.mul_(cfg.factor)
        return model, {"factor": cfg.factor}

    register(StageKind("scale_head", ScaleHead, NoOptions, apply, lambda m, r: m,
                       structural=False))
    try:
        stage = parse_recipe([{"kind": "scale_head", "factor": 3.0}])[0]
        base = classifier()
        model, rec = apply_stage(copy.deepcopy(base), stage, CTX)
        assert rec == {"factor": 3.0}
        assert torch.equal(model.head.weight, base.head.weight * 3.0)
        assert replay_stage(base, "scale_head", rec) is base
        with pytest.raises(ConfigError, match=r"recipe\[0\]\.factr: unknown key"):
            parse_recipe([{"kind": "scale_head", "factr": 3.0}])
    finally:
        del STAGES["scale_head"]


def test_structured_config_refuses_weight_importance_for_heads():
    with pytest.raises(ConfigError, match="importance: 'weight' scores FFN neurons only"):
        StructuredConfig(heads=0.5, importance="weight")
