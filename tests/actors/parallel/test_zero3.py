"""ZeRO stage 3 (actors/zero3.py) against references: the single-process trainer (per-step
losses, pre-clip gradient norms and final weights, 20 steps, 1/2/4 workers, with and without
clipping, with parameter offload, optimizer offload and over gloo), the reduced gradients read
back from the first update against autograd, a transformers BertModel trained by
SingleProcess, the 16Ψ/N memory formula, parameters really freed between uses and
prefetched, checkpoints moving between stage 3 and stage 1 / a single process, per-block ZeRO
levels (2 and 3 mixed, with activation checkpointing: all-gathers counted per unit) and fp16
with an overflow forced on one rank. A reduce-scatter scaled by 2 must fail these checks.

One gang of 4 Ray workers (cluster.gang.WorkerGroup) runs everything: a run on N < 4
workers uses a process group of the first N of them (``dist.new_group``) and the others sit
it out — the same strategy code on N processes, without starting a gang per world size (the
gang start, not the training, is what costs time on a 2-core machine).

Tolerance (fp32) and the optimizer's eps: tests/equivalence.py. Memory: model-state bytes per rank within 10% of 16Ψ/N
(bf16 parameters, Ψ = trainable parameters). Per-block levels (2 workers, 4 steps at lr 3e-3,
the plain model's key biases frozen: see ``tiny_gpt``) use the fp32 tolerance; measured
worst weight difference 3e-6.

fp16 (parameters and gradients in fp16, fp32 masters, against fp32 SingleProcess; two Adam
steps at lr 1e-3 with eps 1e-3, see FP16_TRAIN): losses rtol 1e-3 (measured 4e-6 relative),
weights atol 1e-4 (measured 2e-5; the weights move by up to 2e-3, so a step that was not
skipped — one more update of ~lr — fails it).
"""
from __future__ import annotations

import contextlib
import re
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
from bmray.actors.parallel.registry import build_strategy, strategy_from_dict
from bmray.actors.parallel.strategy import SingleProcess
from bmray.actors.train.config import TrainConfig
from bmray.actors.parallel.zero.stage12 import Zero
from bmray.actors.parallel.zero.stage3 import Zero3, Zero3Config
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

from tests.equivalence import (EPS, LOSS_TOL, NORM_TOL, WEIGHT_TOL, assert_same_run,
                               scaled_reduction)
from tests.actors.parallel.test_zero import (CFG, FIRST_STEP, NO_CLIP, assert_matches,
                             assert_reduced_gradients, autograd_gradients, make_trainer,
                             reference, train_bert, weights)
from tests.tiny_corpus import build_pack

torch.set_num_threads(1)
FP16_LOSS_TOL = dict(rtol=1e-3, atol=0.0)
FP16_WEIGHT_TOL = dict(rtol=0.0, atol=1e-4)
# Adam's eps raised from 1e-8 so that an update is smooth in its gradient: with a tiny eps
# the first step is lr·sign(g), and fp16 rounding flips the sign of near-zero gradients — a
# 2·lr weight difference that says nothing about the strategy.
FP16_TRAIN = dict(lr=1e-3, eps=1e-3, warmup_steps=0, device="cpu", echo=False)


def consolidated(trainer) -> dict[str, torch.Tensor]:
    """Final weights through the strategy (a collective under stage 3: every rank calls it)."""
    state = trainer.strategy.state_dict()["model"]
    return {k: v.detach().float().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("zero3_pack"), eval_blocks=14)


def on(gang, n, fn, *args):
    """``fn(group, rank, *args)`` on the first ``n`` workers of the gang; their results."""
    return [o for o in gang.execute(_on, n, fn, *args) if o is not _IDLE][:n]


_IDLE = "idle"


def _on(n, fn, *args):
    world = dist.get_world_size()
    group = dist.new_group(list(range(n))) if n < world else None   # every rank calls it
    rank = dist.get_rank()
    if rank >= n:
        return _IDLE
    return fn(group, rank, *args)


# ---------------------------------------------------------------- worker functions

VARIANTS = {"default": {}, "offload_params": {"offload_params": True},
            "offload_optimizer": {"offload_optimizer": "cpu"},
            "process_group": {"transport": "process_group"}}


def _fit(group, rank, pack, cfg, variants, fault=None):
    world = dist.get_world_size(group)
    outs = {}
    for variant in variants:        # names of VARIANTS
        trainer = make_trainer(pack, cfg, Zero3(group=group, **VARIANTS[variant]), rank, world)
        with scaled_reduction(fault) if fault else contextlib.nullcontext():
            result = trainer.fit()
        outs[variant] = {"losses": result.losses, "grad_norms": result.grad_norms,
                         "weights": consolidated(trainer),
                         "memory": trainer.strategy.memory_report(),
                         "shm": trainer.strategy.uses_shared_memory}
    # one bf16 step for the memory formula
    mcfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    t = make_trainer(pack, mcfg, Zero3(param_dtype="bf16", group=group), rank, world)
    outs["bf16"] = dict(t.strategy.memory_report(), loss=t.fit().losses[1])
    return outs


def _checkpoint_save(group, rank, pack, root):
    trainer = make_trainer(pack, CFG, Zero3(group=group), rank, dist.get_world_size(group))
    losses = trainer.fit(until=10).losses
    return {"losses": losses, "path": trainer.save(root)}     # a collective under ZeRO


def resume_zero3(group, rank, pack, path):
    torch.manual_seed(99)
    trainer = make_trainer(pack, CFG, Zero3(group=group), rank, dist.get_world_size(group))
    trainer.restore(path)
    result = trainer.fit()
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "weights": consolidated(trainer)}


def run_bert(strategy, rank=0, world=1, steps=3):
    """tests.actors.parallel.test_zero.run_bert, reading the weights through the strategy's state_dict."""
    losses = train_bert(strategy, rank, world, steps)
    state = strategy.state_dict()["model"]
    return losses, {k: v.detach().float().clone() for k, v in state.items()}, \
        strategy.memory_report()


def _bert(group, rank):
    return run_bert(Zero3(block_lists=["bert.encoder.layer"], group=group), rank,
                    dist.get_world_size(group))


# ---------------------------------------------------------------- tests

def test_config_and_routing():
    with pytest.raises(ConfigError, match="strategy.param_dtype"):
        Zero3Config(param_dtype="fp8")
    with pytest.raises(ConfigError, match="strategy.disk_dir"):
        Zero3Config(offload_optimizer="disk")
    spec = strategy_from_dict({"kind": "zero", "stage": 3, "offload_params": True})
    assert spec.kind == "zero3" and spec.options.offload_params
    assert strategy_from_dict(spec.to_dict()) == spec
    assert isinstance(build_strategy(spec, "cpu"), Zero3)
    assert type(build_strategy(strategy_from_dict({"kind": "zero", "stage": 2}), "cpu")) is Zero


@pytest.mark.parametrize("workers,cfg", [(1, CFG), (2, CFG), (4, CFG), (2, NO_CLIP)],
                         ids=["1", "2", "4", "2-no-clip"])
def test_same_losses_norms_weights_and_memory(pack, gang, workers, cfg):
    ref, ref_result = reference(pack, cfg)
    module = ref.strategy.module
    psi = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert psi % 2 == 1                                     # not divisible by 2 or 4
    steps = list(range(1, 21))
    # default transport (auto: shared memory between the workers), parameter offload,
    # optimizer offload, and the same over the process group (gloo)
    variants = tuple(VARIANTS) if cfg is CFG else ("default",)
    outs = on(gang, workers, _fit, pack, cfg, variants)
    assert len(outs) == workers
    for out in outs:
        assert out["default"]["shm"] == (workers > 1)
        assert (out["default"]["memory"]["comm_buffer_bytes"] > 0) == (workers > 1)
        if "process_group" in out:
            assert not out["process_group"]["shm"]
        for variant in variants:
            o = out[variant]
            assert sorted(o["losses"]) == steps
            assert_matches(o, ref, ref_result, steps, what=variant)
            # frozen (and sharded: the root's frozen flat): unchanged, as in SingleProcess
            assert torch.equal(o["weights"]["embed.pos.weight"], module.embed.pos.weight)
            mem = o["memory"]
            assert mem["trainable_params"] == psi and mem["frozen_param_bytes"] == 32 * 32 * 4
            assert mem["frozen_bytes"] == 32 * 32 * 4 // workers
            where = "host" if variant == "offload_params" else "device"
            assert mem["by_location"]["param"][where] == mem["param_bytes"] > 0
            where = "host" if variant == "offload_optimizer" else "device"
            assert mem["by_location"]["optimizer"][where] == mem["optimizer_bytes"] > 0
        bf16 = out["bf16"]
        predicted = 16 * psi / workers
        assert abs(bf16["model_state_bytes"] - predicted) <= 0.1 * predicted, bf16
        assert bf16["param_bytes"] == pytest.approx(2 * psi / workers, rel=0.05)
        assert bf16["grad_bytes"] == pytest.approx(2 * psi / workers, rel=0.05)
        assert bf16["optimizer_bytes"] == pytest.approx(12 * psi / workers, rel=0.05)
        assert abs(bf16["loss"] - ref_result.losses[1]) < 0.05      # bf16 trains


def _first_update(group, rank, pack, fault=None):
    """(weights before, after) one FIRST_STEP of stage 3 (tests/test_zero.py)."""
    trainer = make_trainer(pack, FIRST_STEP, Zero3(group=group), rank, dist.get_world_size(group))
    before = consolidated(trainer)
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        trainer.fit()
    return before, consolidated(trainer)


@pytest.mark.parametrize("workers", [2, 4])
def test_reduced_gradients_equal_autograd(pack, gang, workers):
    """The gradient stage 3 applied at step 1, read back from the update, is the plain
    model's autograd gradient of the whole global batch (tests/test_zero.py)."""
    assert_reduced_gradients(on(gang, workers, _first_update, pack), autograd_gradients(pack))


def test_a_wrong_gradient_scale_fails_the_checks(pack, gang):
    """A reduce-scatter that sends 2× its input fails the norm check (clipping on and off),
    the weights (clipping off) and the direct gradient check."""
    for cfg in (CFG, NO_CLIP):
        ref, ref_result = reference(pack, cfg)
        out = on(gang, 2, _fit, pack, cfg, ("default",), 2.0)[0]["default"]
        with pytest.raises(AssertionError, match="grad norms"):
            assert_same_run(out, out["losses"], ref_result.grad_norms, None, range(1, 21))
        if cfg is NO_CLIP:
            with pytest.raises(AssertionError, match="embed"):
                assert_same_run(out, out["losses"], None, weights(ref), range(1, 21))
    with pytest.raises(AssertionError):
        assert_reduced_gradients(on(gang, 2, _first_update, pack, 2.0),
                                 autograd_gradients(pack))


def test_params_freed_between_uses_and_prefetched(pack):
    """Three blocks, one process: after each block's forward its parameters have no storage,
    the next block's gather starts before the current block's forward ends, backward
    re-gathers and reduces every unit, and at most ~2 blocks + the root are ever gathered."""
    _, vocab = pack
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2,
                                    n_layers=3, d_ff=64, max_seq_len=32, dropout=0.0))
    ref = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2,
                                  n_layers=3, d_ff=64, max_seq_len=32, dropout=0.0))
    ref.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    z = Zero3()
    z.setup(model, cfg)
    storage_after_forward = []
    for blk in model.blocks:        # runs after Zero3's own post-forward hook
        blk.register_forward_hook(lambda m, a, o: storage_after_forward.append(
            sum(p.untyped_storage().nbytes() for p in m.parameters())))
    z.trace = []
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    z.forward_backward(batch, 1.0)
    assert storage_after_forward == [0, 0, 0]
    t = z.trace
    for i in range(2):              # prefetch: gather(i+1) before forward_end(i)
        assert t.index(("gather", i + 1)) < t.index(("forward_end", i)), t
    assert ("backward", 2) in t and t.index(("backward", 2)) < t.index(("backward", 1))
    assert t.index(("gather", 0), t.index(("backward", 1))) < t.index(("backward", 0))
    assert [e[1] for e in t if e[0] == "reduce"] == [2, 1, 0, 3]        # root last
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters() if p.requires_grad)
    mem = z.memory_report()
    units = mem["unit_bytes"]                # blocks..., root
    assert mem["peak_gathered_bytes"] <= units[-1] + 2 * max(units[:-1])
    assert mem["peak_gathered_bytes"] < sum(units)
    # the result is the plain model's: loss and gradients
    out = ref(**batch)
    out.loss.backward()
    norm = z.clip_and_step(0.0)
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
    # eval forward (no grad): gathers, frees again, same logits as the reference model
    z2 = {k: v for k, v in z.state_dict()["model"].items()}
    ref.load_state_dict(z2)
    with torch.no_grad():
        got = z.forward(batch).logits
        exp = ref(**batch).logits
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters() if p.requires_grad)


class Toy(nn.Module):
    """Any module: a weight tied across two blocks (→ the root unit), a frozen bias inside a
    block, a block without trainable parameters (skipped)."""

    block_lists = ("layers",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8))
                                    for _ in range(4))
        self.layers[2][0].weight = self.layers[0][0].weight
        self.layers[1][0].bias.requires_grad_(False)
        self.layers[3].requires_grad_(False)
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        loss = nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())
        return types.SimpleNamespace(loss=loss)


def _steps(strategy, model, batches, **train):
    """Losses, pre-clip gradient norms (clipped at 1.0) and final weights of a few steps."""
    train = dict(dict(lr=1e-2, eps=EPS, warmup_steps=0, device="cpu", echo=False), **train)
    strategy.setup(model, TrainConfig(**train))
    losses, norms = [], []
    for batch in batches:
        losses.append(float(strategy.forward_backward(batch, 1.0).loss))
        norms.append(float(strategy.clip_and_step(1.0)))
    weights = {k: v.detach().float().clone() for k, v in strategy.state_dict()["model"].items()}
    return losses, norms, weights


@pytest.mark.parametrize("case", ["toy", "checkpointed_gpt"])
def test_any_module_ties_frozen_and_activation_checkpointing(pack, case):
    """In one process (world 1, every hook and the gather / free path run): the toy module
    above, and a GPT whose blocks are activation-checkpointed (recomputed in backward while
    their unit is gathered), train exactly as SingleProcess: losses and weights 1e-5."""
    g = torch.Generator().manual_seed(3)
    vocab = 11 if case == "toy" else pack[1]
    batches = [{"input_ids": (ids := torch.randint(0, vocab, (2, 8), generator=g)),
                "labels": ids.roll(1, 1)} for _ in range(4)]

    def make():
        if case == "toy":
            return Toy()
        torch.manual_seed(0)
        model = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2,
                                        n_layers=2, d_ff=64, max_seq_len=32, dropout=0.0))
        apply_activation_checkpointing(model)
        return model

    ref_losses, ref_norms, ref_w = _steps(SingleProcess("cpu"), make(), batches)
    for shard_frozen in (True, False):
        z = Zero3(shard_frozen=shard_frozen)
        losses, norms, w = _steps(z, make(), batches)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **LOSS_TOL)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **NORM_TOL)
        for name, tensor in ref_w.items():
            torch.testing.assert_close(w[name], tensor, **WEIGHT_TOL, msg=name)
        if case != "toy":
            continue
        # layer 3 is frozen: a unit of frozen parameters only when they are sharded, else
        # none; the weight tied between layers 0 and 2 is the root's
        frozen_unit = ["layers.3"] if shard_frozen else []
        assert [u.name for u in z.units] == ["layers.0", "layers.1", "layers.2",
                                             *frozen_unit, "<root>"]
        assert z._unit_of[id(z.module.layers[0][0].weight)] is z.root
        assert torch.equal(w["layers.0.0.weight"], w["layers.2.0.weight"])
        toy = Toy()
        for name, p in toy.named_parameters():      # frozen: bit-identical
            if not p.requires_grad:
                assert torch.equal(w[name], p.detach()), name
        assert z.memory_report()["trainable_params"] == sum(
            p.numel() for p in toy.parameters() if p.requires_grad)


def test_wraps_transformers_bert_from_outside(gang):
    """Tolerances as tests/test_zero.py's Bert test (tests/equivalence.py)."""
    ref_losses, ref_w, _ = run_bert(SingleProcess("cpu"))
    for losses, w, mem in on(gang, 2, _bert):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **LOSS_TOL)
        for name, tensor in ref_w.items():
            torch.testing.assert_close(w[name], tensor, **WEIGHT_TOL, msg=name)
        assert mem["num_units"] == 2 and mem["frozen_param_bytes"] > 0


def test_checkpoint_moves_between_stage3_and_stage1(pack, gang, tmp_path):
    """Save at stage 3 on 2 workers after 10 steps; resume at stage 1 in one process: it
    continues exactly as the uninterrupted run. And back: a single-process checkpoint resumed
    at stage 3 on 2 workers."""
    ref, ref_result = reference(pack)
    path = on(gang, 2, _checkpoint_save, pack, str(tmp_path / "ck3"))[0]["path"]
    _, state = ckpt.load_checkpoint(path)
    single = make_trainer(pack, CFG, Zero(stage=1))
    assert set(state["model"]) == set(single.strategy.module.state_dict())
    single.restore(path)
    steps = list(range(11, 21))
    result = single.fit()
    assert_matches({"losses": result.losses, "grad_norms": result.grad_norms,
                    "weights": weights(single)}, ref, ref_result, steps)
    sp = make_trainer(pack, CFG)
    sp.fit(until=10)
    sp_path = sp.save(str(tmp_path / "ck1"))
    for out in on(gang, 2, resume_zero3, pack, sp_path):
        assert_matches(out, ref, ref_result, steps)


# ---------------------------------------------------------------- per-block ZeRO levels, fp16

def tiny_gpt(n_layers: int, vocab: int = 50) -> nn.Module:
    """A GPT whose key biases are frozen: softmax is invariant to adding q·b_k to every score
    of a query, so their exact gradient is 0 and the computed one is rounding noise, which
    AdamW (g / sqrt(v)) turns into ±lr steps whose sign depends on the summation order — a
    2-rank run and one process would differ by ~lr there and nowhere else."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2,
                                    n_layers=n_layers, d_ff=64, max_seq_len=32, dropout=0.0))
    for block in model.blocks:
        block.attn.k_proj.bias.requires_grad_(False)
    return model


def lm_batches(n: int, rows: int = 4, vocab: int = 50, seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, vocab, (rows, 8), generator=g)),
             "labels": ids.roll(1, 1)} for _ in range(n)]


def _levels(group, rank, batches, levels, ac_blocks):
    """Zero3 with ``block_levels`` on this rank's half of each batch (weight 1/N: the sum over
    ranks is the full batch's mean loss); the first step traced."""
    world = dist.get_world_size(group)
    model = tiny_gpt(4)
    apply_activation_checkpointing(model, ac_blocks)
    z = Zero3(block_levels=levels, group=group)
    z.setup(model, TrainConfig(lr=3e-3, eps=EPS, warmup_steps=0, device="cpu", echo=False))
    held = []       # bytes of each block's full buffers (trainable, frozen) after its forward
    hooks = [b.register_forward_hook(lambda m, a, o: held.append(sum(
        {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
         for p in m.parameters()}.values()))) for b in model.blocks]
    z.trace = []
    losses, norms = [], []
    for step, batch in enumerate(batches):
        share = {k: v.chunk(world)[rank] for k, v in batch.items()}
        loss = z.forward_backward(share, 1.0 / world).loss
        losses.append(z.all_reduce_sum([float(loss) / world])[0])
        if step == 0:
            trace, z.trace = z.trace, None
            for h in hooks:
                h.remove()
            freed = all(p.untyped_storage().nbytes() == 0
                        for p in model.parameters() if p.requires_grad)
        norms.append(float(z.clip_and_step(1.0)))
    weights = {k: v.detach().float().clone() for k, v in z.state_dict()["model"].items()}
    return {"losses": losses, "norms": norms, "weights": weights, "trace": trace, "held": held,
            "freed_after_backward": freed, "memory": z.memory_report()}


def test_block_levels_config():
    """``block_levels``: typed, validated, routed; patterns apply in order; a pattern that
    matches no unit names the units."""
    spec = strategy_from_dict({"kind": "zero", "stage": 3,
                               "block_levels": {"blocks.*": 2, "blocks.0": 3}})
    assert spec.options.block_levels == {"blocks.*": 2, "blocks.0": 3}
    assert strategy_from_dict(spec.to_dict()) == spec
    z = build_strategy(spec, "cpu")
    z.setup(tiny_gpt(3), TrainConfig(device="cpu", echo=False))
    assert [(u.name, u.level) for u in z.units] == [
        ("blocks.0", 3), ("blocks.1", 2), ("blocks.2", 2), ("<root>", 2)]   # later wins
    assert z.memory_report()["unit_levels"] == [3, 2, 2, 2]
    z3 = Zero3()
    z3.setup(tiny_gpt(2), TrainConfig(device="cpu", echo=False))
    assert [u.level for u in z3.units] == [3, 3, 2]                          # default: all 3
    bad = [({"blocks.0": 1}, r"strategy.block_levels.blocks.0: 1 is not one of \[2, 3\]"),
           ({"blocks.0": True}, r"strategy.block_levels.blocks.0: expected an integer"),
           ({"blocks.0": "2"}, r"strategy.block_levels.blocks.0: expected an integer"),
           (["blocks.0"], r"strategy.block_levels: .*expected a mapping"),
           ({"": 2}, r"strategy.block_levels: '' is not a unit-name pattern")]
    for levels, message in bad:
        with pytest.raises(ConfigError, match=message):
            strategy_from_dict({"kind": "zero", "stage": 3, "block_levels": levels})
    for levels in ({"blocks.0": True}, {"blocks.0": 4}):          # built directly, no YAML
        with pytest.raises(ConfigError, match="strategy.block_levels.blocks.0: .* not one of"):
            Zero3Config(block_levels=levels)
    for pattern in ("blocks.3", "layers.*", "<root>"):
        with pytest.raises(ConfigError, match=rf"strategy.block_levels: '{re.escape(pattern)}' "
                                              r"matches no unit; the units are blocks.0, "
                                              r"blocks.1, blocks.2"):
            Zero3(block_levels={pattern: 2}).setup(tiny_gpt(3),
                                                   TrainConfig(device="cpu", echo=False))


def test_mixed_block_levels_and_checkpointing_on_two_workers(gang):
    """Four blocks, blocks.0 at level 2 and blocks.1-3 at level 3, blocks 0 and 2
    activation-checkpointed (so every level x checkpointing pair runs), 2 workers: losses and
    final weights of the plain model trained by SingleProcess (LOSS_TOL, weights 1e-5); the
    level-2 block is all-gathered once per micro-batch and stays gathered after its forward,
    the level-3 ones twice and freed; the peak of gathered bytes is the root + the held block
    + the two level-3 blocks in flight (one computing, one prefetched). All level 2 (FSDP's
    SHARD_GRAD_OP): one gather per unit, every unit held at once."""
    batches = lm_batches(4)
    ref_losses, ref_norms, ref_w = _steps(SingleProcess("cpu"), tiny_gpt(4), batches, lr=3e-3)
    for levels, gathers in (({"blocks.0": 2}, [1, 2, 2, 2, 1]),
                            ({"blocks.*": 2}, [1, 1, 1, 1, 1])):
        for out in on(gang, 2, _levels, batches, levels, [0, 2]):
            torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses),
                                       **LOSS_TOL)
            torch.testing.assert_close(torch.tensor(out["norms"]), torch.tensor(ref_norms),
                                       **NORM_TOL)
            for name, tensor in ref_w.items():
                torch.testing.assert_close(out["weights"][name], tensor, **WEIGHT_TOL, msg=name)
            t = out["trace"]
            assert [sum(e == ("gather", i) for e in t) for i in range(5)] == gathers, t
            assert [e[1] for e in t if e[0] == "reduce"] == [3, 2, 1, 0, 4]
            mem = out["memory"]
            units, unit_levels = mem["unit_bytes"], mem["unit_levels"]
            assert unit_levels == [3 - (g == 1) for g in gathers[:-1]] + [2]     # root: 2
            assert out["held"] == [b if lv == 2 else 0
                                   for b, lv in zip(units[:-1], unit_levels[:-1])]
            assert out["freed_after_backward"]
            root, block = units[-1], units[0]                 # the four blocks are alike
            all_held = unit_levels[1] == 2
            # all level 3 would peak at root + 2 blocks (test_params_freed_between_uses...)
            assert mem["peak_gathered_bytes"] == root + (4 if all_held else 3) * block


def _fp16_overflow(group, rank, batches, overflow_step):
    """fp16 Zero3 with scale 1024; at ``overflow_step`` rank 1 alone gets an inf in one
    gradient element during backward (it lands in one rank's shard after reduce-scatter)."""
    world = dist.get_world_size(group)
    z = Zero3(param_dtype="fp16", group=group)
    z.setup(tiny_gpt(2), TrainConfig(**FP16_TRAIN))
    z.scaler.load_state_dict({"scale": 1024.0, "growth_tracker": 0})
    target = z.module.blocks[1].ffn.up.weight

    def poison(g):
        g = g.clone()
        g[0, 0] = float("inf")
        return g

    steps, losses = [], []
    for step, batch in enumerate(batches):
        handle = target.register_hook(poison) if step == overflow_step and rank == 1 else None
        share = {k: v.chunk(world)[rank] for k, v in batch.items()}
        loss = z.forward_backward(share, 1.0 / world).loss
        losses.append(z.all_reduce_sum([float(loss) / world])[0])
        if handle is not None:
            handle.remove()
        local_inf = any(not bool(torch.isfinite(u.grad_shard).all()) for u in z.units)
        before = [m.detach().clone() for m in z.masters]
        shards = [u.shard.clone() for u in z.units]
        norm = z.clip_and_step(1.0)
        updated = any(not torch.equal(b, m) for b, m in zip(before, z.masters))
        shard_moved = any(not torch.equal(s, u.shard) for s, u in zip(shards, z.units))
        steps.append({"local_inf": local_inf, "updated": updated, "shard_moved": shard_moved,
                      "finite_norm": bool(torch.isfinite(norm)), "scale": z.scaler.scale_value,
                      "adam_steps": int(z.optimizer.inner.step_count)})
    weights = {k: v.detach().float().clone() for k, v in z.state_dict()["model"].items()}
    return {"steps": steps, "losses": losses, "weights": weights,
            "skipped": z.scaler.skipped_steps}


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(gang):
    """fp16 parameters + the dynamic loss scaler under ZeRO-3, 2 workers: an inf forced into
    one rank's gradient at step 2 is found by both ranks (only one holds it in its shard), both
    skip the step (fp32 masters and fp16 shards unchanged, Adam's step count too) and halve
    the scale 1024 → 512; the other steps train. Against SingleProcess fp32 on steps 1 and 3
    only (the skipped batch left out): the module docstring's fp16 tolerance."""
    batches = lm_batches(3)
    ref_losses, _, ref_w = _steps(SingleProcess("cpu"), tiny_gpt(2), [batches[0], batches[2]],
                                  **FP16_TRAIN)
    outs = on(gang, 2, _fp16_overflow, batches, 1)
    assert sum(o["steps"][1]["local_inf"] for o in outs) == 1          # one rank sees it
    for o in outs:
        s = o["steps"]
        assert [x["updated"] for x in s] == [True, False, True]
        assert [x["shard_moved"] for x in s] == [True, False, True]
        assert [x["finite_norm"] for x in s] == [True, False, True]
        assert [x["scale"] for x in s] == [1024.0, 512.0, 512.0]
        assert [x["adam_steps"] for x in s] == [1, 1, 2] and o["skipped"] == 1
        assert not s[0]["local_inf"] and not s[2]["local_inf"]
        got = torch.tensor([o["losses"][0], o["losses"][2]])
        torch.testing.assert_close(got, torch.tensor(ref_losses), **FP16_LOSS_TOL)
        for name, tensor in ref_w.items():
            torch.testing.assert_close(o["weights"][name], tensor, **FP16_WEIGHT_TOL, msg=name)
    assert outs[0]["weights"].keys() == outs[1]["weights"].keys()
    for name, tensor in outs[0]["weights"].items():          # ranks agree bit for bit
        assert torch.equal(tensor, outs[1]["weights"][name]), name
