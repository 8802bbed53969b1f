"""ZeRO-3 with a frozen base (``shard_frozen``, on by default): the frozen parameters are
sharded like the trainable ones — gathered with their unit, freed after — with no gradient and
no optimizer state, as DeepSpeed's ZeRO-3 partitions every parameter.

The model is delta tuning in miniature: a tiny GPT frozen everywhere except the LayerNorm
biases of blocks 0 and 2 and of the final norm (BitFit-like), so block 1 is a unit of frozen
parameters only, blocks 0 and 2 hold both kinds, and a frozen weight tied between blocks 0
and 2 (the value projection) belongs to the root with the frozen embeddings and head.

Against SingleProcess training of the same model on the whole batch (tests/equivalence.py's
harness: per-step losses, pre-clip gradient norms, final weights, Adam eps 1e-3; clipping on
and off) at 2 and 4 workers, in the variants: default (level 3), a frozen-only block at level 2
with activation-checkpointed blocks, parameter offload, and ``shard_frozen: false`` (today's
replicated frozen base). The frozen parameters are bit-identical after training (fp32).
Memory: the rank keeps 4Φ_f/N bytes of frozen base plus at most N − 1 padding elements per
unit (Φ_f: frozen parameters, fp32), 4Φ_f without sharding; the live-byte measurement of the
same formula is in test_zero_memory.py. A reduce-scatter scaled by 2 fails the norm check.
Every unit with frozen parameters is freed once backward has passed it (before the backward
of the block before it), also when blocks take their input by keyword.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
from bmray.actors.parallel.registry import strategy_from_dict
from bmray.actors.parallel.strategy import SingleProcess
from bmray.actors.parallel.zero.stage3 import Zero3, Zero3Config
from bmray.actors.train.config import TrainConfig
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

from tests.actors.parallel.test_zero3 import lm_batches, on
from tests.equivalence import EPS, LOSS_TOL, NORM_TOL, WEIGHT_TOL, scaled_reduction

torch.set_num_threads(1)
VOCAB, STEPS = 50, 4
TRAIN = dict(lr=1e-2, eps=EPS, warmup_steps=0, device="cpu", echo=False)
TRAINABLE = ("blocks.0.ln_1.bias", "blocks.0.ln_2.bias", "blocks.2.ln_1.bias",
             "blocks.2.ln_2.bias", "ln_f.bias")
# name: (Zero3 options, activation-checkpointed blocks)
VARIANTS = {"default": ({}, ()),
            "levels_checkpointed": ({"block_levels": {"blocks.1": 2}}, (0, 1)),
            "offload_params": ({"offload_params": True}, ()),
            "replicated": ({"shard_frozen": False}, ())}


def frozen_base_gpt(ac_blocks=()) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt", vocab_size=VOCAB, d_model=32, n_heads=2,
                                    n_layers=3, d_ff=64, max_seq_len=32, dropout=0.0))
    model.blocks[2].attn.v_proj.weight = model.blocks[0].attn.v_proj.weight   # tied, frozen
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if name in TRAINABLE:
            p.requires_grad_(True)
    if ac_blocks:
        apply_activation_checkpointing(model, list(ac_blocks))
    return model


def frozen_params() -> dict[str, torch.Tensor]:
    """name → the frozen parameter as built (every name of a tied one), fp32."""
    return {n: p.detach().clone() for n, p in frozen_base_gpt().named_parameters(
        remove_duplicate=False) if not p.requires_grad}


def reference(max_norm: float):
    """SingleProcess on the whole batch: losses, pre-clip norms, final weights."""
    sp = SingleProcess("cpu")
    sp.setup(frozen_base_gpt(), TrainConfig(**TRAIN))
    losses, norms = [], []
    for batch in lm_batches(STEPS, rows=8):
        losses.append(float(sp.forward_backward(batch, 1.0).loss))
        norms.append(float(sp.clip_and_step(max_norm)))
    weights = {k: v.detach().float().clone() for k, v in sp.state_dict()["model"].items()}
    return losses, norms, weights


def _train(group, rank, variant, max_norm, fault=None):
    """Zero3 on this rank's share of each batch (weight 1/N: the ranks' sum is the whole
    batch's mean loss); the first step traced."""
    options, ac_blocks = VARIANTS[variant]
    world = dist.get_world_size(group)
    model = frozen_base_gpt(ac_blocks)
    z = Zero3(group=group, **options)
    z.setup(model, TrainConfig(**TRAIN))
    z.trace = []
    losses, norms = [], []
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        for step, batch in enumerate(lm_batches(STEPS, rows=8)):
            share = {k: v.chunk(world)[rank] for k, v in batch.items()}
            loss = z.forward_backward(share, 1.0 / world).loss
            losses.append(z.all_reduce_sum([float(loss) / world])[0])
            if step == 0:
                trace, z.trace = z.trace, None
                held = {n: p.untyped_storage().nbytes()
                        for n, p in model.named_parameters(remove_duplicate=False)}
            norms.append(float(z.clip_and_step(max_norm)))
    weights = {k: v.detach().float().clone() for k, v in z.state_dict()["model"].items()}
    return {"losses": losses, "norms": norms, "weights": weights, "trace": trace,
            "held_after_step": held, "memory": z.memory_report(),
            "units": [(u.name, len(u.params), 0 if u.frozen is None else len(u.frozen.params),
                       0 if u.frozen is None else u.frozen.numel) for u in z.units]}


def check_same_run(out, ref, what):
    ref_losses, ref_norms, ref_w = ref
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses),
                               **LOSS_TOL, msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(torch.tensor(out["norms"]), torch.tensor(ref_norms),
                               **NORM_TOL, msg=lambda m: f"{what} grad norms: {m}")
    assert out["weights"].keys() == ref_w.keys()
    for name, tensor in ref_w.items():
        torch.testing.assert_close(out["weights"][name], tensor, **WEIGHT_TOL,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


# ---------------------------------------------------------------- tests

def test_shard_frozen_option():
    assert Zero3Config().shard_frozen is True
    spec = strategy_from_dict({"kind": "zero", "stage": 3, "shard_frozen": False})
    assert spec.options.shard_frozen is False
    with pytest.raises(ConfigError, match="strategy.shard_frozen: expected true or false"):
        strategy_from_dict({"kind": "zero", "stage": 3, "shard_frozen": "yes"})


@pytest.mark.parametrize("workers", [2, 4])
def test_frozen_base_trains_as_one_process(gang, workers):
    ref = reference(1.0)
    trained = [n for n, _ in frozen_base_gpt().named_parameters() if n in TRAINABLE]
    assert len(trained) == len(TRAINABLE)
    frozen = frozen_params()
    phi_f = sum(p.numel() for p in frozen_base_gpt().parameters() if not p.requires_grad)
    for variant in VARIANTS:
        for out in on(gang, workers, _train, variant, 1.0):
            what = f"{variant} N={workers}"
            check_same_run(out, ref, what)
            for name, value in frozen.items():          # bit-identical after training
                assert torch.equal(out["weights"][name], value), (what, name)
            mem = out["memory"]
            assert mem["frozen_param_bytes"] == 4 * phi_f
            if variant == "replicated":
                assert [u[0] for u in out["units"]] == ["blocks.0", "blocks.2", "<root>"]
                assert mem["frozen_bytes"] == 4 * phi_f and mem["frozen_saved_bytes"] == 0
                continue
            # units: block 1 frozen only; the tied frozen weight is the root's
            assert [u[:3] for u in out["units"]] == [
                ("blocks.0", 2, 13), ("blocks.1", 0, 16), ("blocks.2", 2, 13), ("<root>", 1, 4)]
            n_units = len(out["units"])
            # 4 bytes per frozen parameter over N ranks, plus the padding of each unit's flat
            assert 4 * phi_f / workers <= mem["frozen_bytes"] \
                <= 4 * phi_f / workers + 4 * (workers - 1) * n_units, mem
            assert mem["frozen_bytes"] == sum(4 * u[3] // workers for u in out["units"])
            assert mem["frozen_saved_bytes"] == 4 * phi_f - mem["frozen_bytes"]
            where = "host" if variant == "offload_params" else "device"
            assert mem["frozen_by_location"][where] == mem["frozen_bytes"]
            # no gradient, master or optimizer state for the frozen base: 16 bytes (fp32:
            # parameter 4 + gradient 4 + two moments 8) per trainable parameter over N, 20
            # with offloaded parameters (a separate fp32 master), plus padding
            assert mem["trainable_params"] == 5 * 32
            per_param = 20 if variant == "offload_params" else 16
            assert per_param * 5 * 32 / workers <= mem["model_state_bytes"] \
                <= per_param * (5 * 32 / workers + (workers - 1) * n_units), mem
            # after a step every parameter, frozen ones included, is freed
            assert set(out["held_after_step"].values()) == {0}, out["held_after_step"]
            t = out["trace"]
            # the frozen-only unit is gathered for forward and again for backward (level 3) or
            # once (level 2), and freed once backward has passed it, before block 0's backward
            level2 = variant == "levels_checkpointed"
            assert sum(e == ("gather", 1) for e in t) == (1 if level2 else 2), t
            for u in (1, 2):
                last_free = max(i for i, e in enumerate(t) if e == ("free", u))
                assert last_free < t.index(("backward", u - 1)), (u, t)


def test_frozen_base_without_clipping(gang):
    ref = reference(0.0)
    for out in on(gang, 2, _train, "default", 0.0):
        check_same_run(out, ref, "no clip")


def test_a_wrong_gradient_scale_fails(gang):
    """A reduce-scatter that sends 2× its input fails the losses and, on its own, the
    pre-clip norms."""
    ref = reference(1.0)
    out = on(gang, 2, _train, "default", 1.0, 2.0)[0]
    with pytest.raises(AssertionError, match="losses"):
        check_same_run(out, ref, "x2")
    with pytest.raises(AssertionError, match="grad norms"):
        check_same_run(dict(out, losses=ref[0]), ref, "x2")


def test_eval_forward_and_state_dict_round_trip():
    """One process: a no-grad forward frees every unit; the consolidated state holds the full
    model (frozen included) and loads back into a fresh Zero3 and into SingleProcess; a state
    without a frozen parameter is an error naming it."""
    z = Zero3()
    model = frozen_base_gpt()
    z.setup(model, TrainConfig(**TRAIN))
    batch = lm_batches(1, rows=8)[0]
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    state = z.state_dict()
    frozen = frozen_params()
    assert set(state["model"]) == set(frozen_base_gpt().state_dict())
    for name, value in frozen.items():
        assert torch.equal(state["model"][name], value), name
    sp = frozen_base_gpt()
    sp.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(float(sp(**batch).loss), loss, **LOSS_TOL)
    again = Zero3()
    again.setup(frozen_base_gpt(), TrainConfig(**TRAIN))
    for u in again.units:                   # spoil the frozen shards: the load must restore
        if u.frozen is not None:
            u.frozen.shard.zero_()
    again.load_state_dict(state)
    for name, value in again.state_dict()["model"].items():
        assert torch.equal(value, state["model"][name]), name
    partial = dict(state, model={k: v for k, v in state["model"].items()
                                 if k != "blocks.1.ffn.up.weight"})
    with pytest.raises(KeyError, match=r"missing \['blocks.1.ffn.up.weight'\]"):
        again.load_state_dict(partial)


class KeywordBlocks(nn.Module):
    """Blocks called with their input by keyword (as some ``transformers`` layers are): a
    frozen Linear, then a trainable LayerNorm; block 1 wholly frozen."""

    block_lists = ("blocks",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(_KeywordBlock() for _ in range(3))
        self.emb.requires_grad_(False)
        self.blocks.requires_grad_(False)
        for i in (0, 2):
            self.blocks[i].norm.requires_grad_(True)
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        for block in self.blocks:
            x = block(x=x)
        loss = nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())
        return types.SimpleNamespace(loss=loss)


class _KeywordBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return x + self.norm(torch.tanh(self.proj(x)))


def test_keyword_inputs_free_frozen_units_after_their_backward():
    """One process: inputs passed by keyword go through the backward watch too, so each
    block with frozen parameters is freed before backward reaches the block before it; the
    run equals SingleProcess and the frozen weights are bit-identical."""
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": (ids := torch.randint(0, 11, (2, 8), generator=g)),
                "labels": ids.roll(1, 1)} for _ in range(3)]
    sp = SingleProcess("cpu")
    sp.setup(KeywordBlocks(), TrainConfig(**TRAIN))
    z = Zero3()
    model = KeywordBlocks()
    z.setup(model, TrainConfig(**TRAIN))
    assert [(u.name, len(u.params), len(u.frozen.params)) for u in z.units] == [
        ("blocks.0", 2, 2), ("blocks.1", 0, 4), ("blocks.2", 2, 2), ("<root>", 1, 1)]
    for step, batch in enumerate(batches):
        z.trace = [] if step == 0 else None
        ref_loss = float(sp.forward_backward(batch, 1.0).loss)
        torch.testing.assert_close(float(z.forward_backward(batch, 1.0).loss), ref_loss,
                                   **LOSS_TOL)
        if step == 0:
            t = z.trace
            for u in (1, 2):
                assert t.index(("free", u), t.index(("backward", u))) < \
                    t.index(("backward", u - 1)), (u, t)
        torch.testing.assert_close(float(z.clip_and_step(1.0)), float(sp.clip_and_step(1.0)),
                                   **NORM_TOL)
    ref_w = sp.state_dict()["model"]
    w = z.state_dict()["model"]
    initial = KeywordBlocks().state_dict()
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor.float(), **WEIGHT_TOL, msg=name)
    for name, p in KeywordBlocks().named_parameters():
        if not p.requires_grad:
            assert torch.equal(w[name], initial[name]), name
