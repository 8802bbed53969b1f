"""models/structure.py: the block finder and the families' tensor-parallel plans as data."""
from __future__ import annotations

import pytest
from torch import nn

from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.structure import (TensorParallelPlan, find_blocks, module_at, planned_modules,
                                    tensor_parallel_parameters, tp_plan_of)

FAMILIES = ("gpt", "bert", "electra", "t5")


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=40, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                max_seq_len=32, dropout=0.0)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_numbers_blocks_over_the_block_lists(family):
    model = build_model(tiny(family))
    blocks = find_blocks(model)
    want = [(f"{path}.{i}", b) for path in type(model).block_lists
            for i, b in enumerate(model.get_submodule(path))]
    assert [n for n, _ in blocks] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(blocks, want))
    assert find_blocks(model, [type(model).block_lists[-1]]) == want[-2:]


def test_find_blocks_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="`block_lists` attribute"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="'nope' is not a submodule of GPT"):
        find_blocks(build_model(tiny("gpt")), ["nope"])
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert [n for n, _ in find_blocks(holder, ["layers"])] == ["layers.0", "layers.1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_plan_entry_names_a_module_of_the_family(family):
    """No silent typo: each block entry exists in some block, each model entry in the model,
    as the layer the style needs."""
    model = build_model(tiny(family))
    plan = tp_plan_of(model)
    assert isinstance(plan, TensorParallelPlan)
    found = {path: [] for path in plan.blocks}
    for _, block in find_blocks(model):
        for path in plan.blocks:
            if module_at(block, path) is not None:
                found[path].append(module_at(block, path))
    cross = family == "t5"
    for path, mods in found.items():
        assert mods or (path.startswith("cross_attn.") and not cross), (family, path)
        assert all(isinstance(m, nn.Linear) for m in mods)
    for path, style in plan.model.items():
        want = nn.Embedding if style == "vocab" else nn.Linear
        assert isinstance(module_at(model, path), want), (family, path)
    assert plan.vocab_parallel == (family == "gpt")


def test_split_parameters_follow_megatron():
    gpt = build_model(tiny("gpt"))
    names = tensor_parallel_parameters(gpt)
    per_block = {"attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight",
                 "attn.k_proj.bias", "attn.v_proj.weight", "attn.v_proj.bias",
                 "attn.out_proj.weight", "ffn.up.weight", "ffn.up.bias", "ffn.down.weight"}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in per_block} | {
        "embed.tok.weight", "lm_head.weight"}
    t5 = tensor_parallel_parameters(build_model(tiny("t5")))
    assert "decoder_blocks.0.cross_attn.q_proj.weight" in t5
    assert not any(n.startswith(("shared", "lm_head")) for n in t5)
    moe = build_model(tiny("gpt", moe={"num_experts": 2, "every": 1}))
    assert not any(".experts." in n for n in tensor_parallel_parameters(moe))
    assert tensor_parallel_parameters(nn.Linear(2, 2)) == set()
    assert [n for n, _, _ in planned_modules(gpt, tp_plan_of(gpt))][-2:] == ["embed.tok", "lm_head"]


def test_plan_validation():
    with pytest.raises(ValueError, match="style must be one of"):
        TensorParallelPlan({"ffn.up": "vocab"})
    with pytest.raises(ValueError, match="dotted module path"):
        TensorParallelPlan({".up": "column"})
    with pytest.raises(ValueError, match="exactly one"):
        TensorParallelPlan({}, {"lm_head": "column"})
    plan = TensorParallelPlan({"ffn.up": "column"})
    with pytest.raises(TypeError):
        plan.blocks["ffn.down"] = "row"


def test_find_blocks_reads_an_instance_block_lists():
    """A wrapper (a delta-tuned model holds its base as ``base``) names its base's blocks."""
    wrapper = nn.Module()
    wrapper.base = build_model(tiny("gpt"))
    wrapper.block_lists = ("base.blocks",)
    assert [n for n, _ in find_blocks(wrapper)] == [
        f"base.blocks.{i}" for i in range(len(wrapper.base.blocks))]
