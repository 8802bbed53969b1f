"""Activation checkpointing against the reference: the same model, same weights, same seed,
without checkpointing.

Tolerance: none. Non-reentrant checkpointing keeps autograd's graph and recomputes each op
with the same inputs, kernels and (restored) RNG state, so every gradient must be
bit-identical (``torch.equal``), with dropout 0 and with dropout > 0.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bmray.actors.parallel.activation_checkpointing as ac_module
from bmray.actors.parallel.activation_checkpointing import (ActivationCheckpointConfig, CheckpointedBlock,
                                             apply_activation_checkpointing, checkpointed_blocks,
                                             remove_activation_checkpointing)
from bmray.models.config import ModelConfig
from bmray.models.generation import GenerationConfig, generate
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
V, B, T = 64, 2, 12


def make_model(family: str, dropout: float, n_layers: int = 3, seed: int = 0,
               moe: dict | None = None) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, d_model=32, n_heads=2, n_layers=n_layers,
                      d_ff=64, max_seq_len=32, dropout=dropout, moe=moe,
                      n_decoder_layers=2 if family == "t5" else None)
    return build_model(cfg)


def make_batch(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0                                         # a padded row
    if family == "gpt":
        return {"input_ids": ids, "labels": ids.clone()}
    if family == "t5":
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.randint(7, V, (B, 8), generator=g)}
    labels = torch.full((B, T), -100).masked_scatter(
        torch.rand(B, T, generator=g) < 0.3, torch.randint(7, V, (B, T), generator=g))
    labels[:, 1] = ids[:, 1]                                 # at least one target per row
    if family == "bert":
        return {"input_ids": ids, "attention_mask": mask,
                "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T),
                "mlm_labels": labels, "nsp_labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels}   # electra


def train_step(model: nn.Module, batch: dict, seed: int = 123):
    """One training forward + backward from a fixed RNG state: (loss, grads, RNG state after)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, torch.get_rng_state()


def assert_bit_identical(ref, got):
    (ref_loss, ref_grads, ref_rng), (loss, grads, rng) = ref, got
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert torch.equal(rng, ref_rng)          # the outer RNG stream is left as without checkpoints


def n_blocks(model: nn.Module) -> int:
    return sum(len(model.get_submodule(n)) for n in type(model).block_lists)


# ------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("family", ["gpt", "t5", "bert", "electra"])
@pytest.mark.parametrize("blocks", ["all", [0, 2]])
def test_gradients_bit_identical(family, dropout, blocks):
    ref_model = make_model(family, dropout)
    model = copy.deepcopy(ref_model)
    names = apply_activation_checkpointing(model, blocks)
    assert len(names) == (n_blocks(model) if blocks == "all" else 2)
    assert checkpointed_blocks(model) == names
    batch = make_batch(family)
    ref = train_step(ref_model, batch)
    assert_bit_identical(ref, train_step(model, batch))
    if dropout:       # dropout really draws: another seed gives other gradients
        other = train_step(ref_model, batch, seed=7)[1]
        assert any(not torch.equal(other[n], g) for n, g in ref[1].items())


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_gradients_bit_identical_with_moe_blocks(family):
    """MoE feed-forwards (routing, capacity drops, the aux loss returned by the block)
    recompute to the same bits as well."""
    moe = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "every": 2}
    ref_model = make_model(family, dropout=0.1, moe=moe)
    model = copy.deepcopy(ref_model)
    apply_activation_checkpointing(model)
    batch = make_batch(family)
    assert_bit_identical(train_step(ref_model, batch), train_step(model, batch))


def test_dropout_needs_the_preserved_rng(monkeypatch):
    """Negative control: recomputing without restoring the RNG state gives other dropout
    masks and other gradients — so the equality above really tests RNG preservation."""
    ref_model = make_model("gpt", dropout=0.2)
    model = copy.deepcopy(ref_model)
    apply_activation_checkpointing(model)
    monkeypatch.setattr(ac_module, "checkpoint",
                        functools.partial(checkpoint, preserve_rng_state=False))
    batch = make_batch("gpt")
    _, ref_grads, _ = train_step(ref_model, batch)
    _, grads, _ = train_step(model, batch)
    assert any(not torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_names_and_state_dict_unchanged():
    """Blocks keep their place in the module tree: same parameter names and state-dict keys,
    so a checkpoint loads with checkpointing on or off; removing it restores the plain class."""
    ref = make_model("t5", 0.0, n_layers=2)
    model = copy.deepcopy(ref)
    names = apply_activation_checkpointing(model, [1, 2])     # last encoder, first decoder
    assert names == ["encoder_blocks.1", "decoder_blocks.0"]
    assert apply_activation_checkpointing(model, [1, 2]) == names     # idempotent
    assert list(model.state_dict()) == list(ref.state_dict())
    assert type(model.decoder_blocks[0]).__name__ == "CheckpointedTransformerBlock"
    assert isinstance(model.decoder_blocks[0], type(ref.decoder_blocks[0]))
    model.load_state_dict(ref.state_dict())
    # deepcopy and pickle (Ray ships modules) keep the checkpointed blocks
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert checkpointed_blocks(clone) == names
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert checkpointed_blocks(torch.load(buf, weights_only=False)) == names
    assert remove_activation_checkpointing(model) == names
    assert checkpointed_blocks(model) == []
    assert type(model.decoder_blocks[0]) is type(ref.decoder_blocks[0])


# ------------------------------------------------------------------------------ recomputation

def count_block_forwards(model: nn.Module) -> tuple[dict[str, int], list]:
    """Count forwards of each block's first LayerNorm (called once per block forward, also
    by the recomputation, which calls the block's forward directly)."""
    counts: dict[str, int] = {}
    handles = []
    for list_name in type(model).block_lists:
        for i, block in enumerate(model.get_submodule(list_name)):
            name = f"{list_name}.{i}"
            counts[name] = 0

            def hook(*_, name=name):
                counts[name] += 1
            handles.append(block.ln_1.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_recomputation_happens_for_wrapped_blocks_only(family):
    model = make_model(family, dropout=0.1)
    wrapped = apply_activation_checkpointing(model, [0, 2])
    counts, handles = count_block_forwards(model)
    batch = make_batch(family)
    train_step(model, batch)
    assert counts == {n: 2 if n in wrapped else 1 for n in counts}
    # no recomputation (and no checkpoint) in eval mode or without grad
    for mode in ("eval", "no_grad"):
        counts.update(dict.fromkeys(counts, 0))
        if mode == "eval":
            model.eval()
            model(**batch).loss.backward()
        else:
            model.train()
            with torch.no_grad():
                model(**batch)
        assert set(counts.values()) == {1}, mode
    for h in handles:
        h.remove()


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one training forward,
    parameters excluded. For checkpointed blocks torch keeps their inputs instead of their
    activations (not seen by the hooks below, which the checkpoint overrides inside its
    region), so those inputs are added explicitly."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def record(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        record(t)
        return t

    def keep_inputs(module, args, kwargs):
        for v in (*args, *kwargs.values()):
            if torch.is_tensor(v):
                record(v)

    handles = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True)
               for m in model.modules() if isinstance(m, CheckpointedBlock)]
    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    for h in handles:
        h.remove()
    loss.backward()          # the hooks' tensors still work for backward
    return sum(seen.values())


@pytest.mark.parametrize("family", ["gpt", "t5", "bert"])
def test_checkpointing_saves_activation_memory(family):
    ref_model = make_model(family, dropout=0.1, n_layers=4)
    ref = saved_activation_bytes(ref_model, make_batch(family))
    some = copy.deepcopy(ref_model)
    apply_activation_checkpointing(some, [0, 1])
    every = copy.deepcopy(ref_model)
    apply_activation_checkpointing(every)
    some_bytes = saved_activation_bytes(some, make_batch(family))
    all_bytes = saved_activation_bytes(every, make_batch(family))
    assert all_bytes < some_bytes < ref
    assert all_bytes < 0.5 * ref, (all_bytes, ref)


# ------------------------------------------------------------------------------ inference

@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_generation_with_kv_cache_unchanged(family):
    ref = make_model(family, dropout=0.1)
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(model)
    prompt = make_batch(family)["input_ids"][:, :5]
    for strategy in ("greedy", "beam"):
        gc = GenerationConfig(max_new_tokens=6, strategy=strategy, num_beams=2 if strategy == "beam" else 1,
                              use_cache=True)
        assert torch.equal(generate(model, prompt, gc), generate(ref, prompt, gc))
    assert model.training                       # generate restored the mode


def test_use_cache_in_training_mode_returns_the_cache():
    """use_cache=True skips checkpointing even in train mode with grad enabled: the blocks
    return their KV cache, equal to the plain model's."""
    ref = make_model("gpt", dropout=0.0)
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(model)
    counts, handles = count_block_forwards(model)
    ids = make_batch("gpt")["input_ids"]
    out, ref_out = (m.train()(ids, use_cache=True) for m in (model, ref))
    assert len(out.past_key_values) == 3
    for (k, v), (rk, rv) in zip(out.past_key_values, ref_out.past_key_values):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    out.logits.sum().backward()
    assert set(counts.values()) == {1}
    for h in handles:
        h.remove()


# ------------------------------------------------------------------------------ config

def test_config_validation():
    assert ActivationCheckpointConfig() == ActivationCheckpointConfig(enabled=False, blocks=None)
    c = from_dict(ActivationCheckpointConfig, {"enabled": True, "blocks": [0, 3]},
                  "train.activation_checkpointing")
    assert c.enabled and c.blocks == [0, 3]
    bad = [({"enabled": "yes"}, "train.activation_checkpointing.enabled"),
           ({"blocks": [0, -1]}, "train.activation_checkpointing.blocks[1]"),
           ({"blocks": [1, 1]}, "train.activation_checkpointing.blocks"),
           ({"blocks": "some"}, "train.activation_checkpointing.blocks"),
           ({"block": [0]}, "valid keys are ['blocks', 'enabled']")]
    for mapping, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from_dict(ActivationCheckpointConfig, mapping, "train.activation_checkpointing")
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing.blocks: \[5\] out of "
                                          r"range; GPT has 3 blocks"):
        apply_activation_checkpointing(make_model("gpt", 0.0), [0, 5])
    with pytest.raises(ValueError, match="block_lists"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    seq = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    holder = nn.Module()
    holder.layers = seq
    assert apply_activation_checkpointing(holder, [1], block_lists=["layers"]) == ["layers.1"]
    x = torch.randn(3, 2, requires_grad=True)
    seq(x).sum().backward()                  # a checkpointed plain Linear still trains
    assert x.grad is not None


def test_experiment_config_switches_checkpointing_on(tmp_path):
    """`train.activation_checkpointing` in an experiment wraps the chosen blocks of the model
    the job builds; a bad block index is a ConfigError naming the key."""
    import os

    from bmray.actors.parallel.activation_checkpointing import checkpointed_blocks
    from bmray.actors.train.builders import build_trainer
    from bmray.actors.train.experiment import experiment_from_dict
    from bmray.models.typed_config import apply_overrides, load_yaml
    from tests.conftest import REPO

    raw = apply_overrides(load_yaml(os.path.join(REPO, "configs", "gpt-tiny.yaml")), [
        f"data.corpus={tmp_path}/world/documents.jsonl", f"data.pack_dir={tmp_path}/pack",
        "data.world.n_entities=30", "checkpoint.dir=null", "checkpoint.every=0",
        "checkpoint.average_last=0", "train.metrics_path=null",
        "train.activation_checkpointing={enabled: true, blocks: [1]}"])
    trainer = build_trainer(experiment_from_dict(raw))
    assert checkpointed_blocks(trainer.strategy.module) == ["blocks.1"]
    with pytest.raises(ConfigError, match="train.activation_checkpointing.blocks"):
        experiment_from_dict(apply_overrides(
            raw, ["train.activation_checkpointing={enabled: true, blocks: [-1]}"]))
