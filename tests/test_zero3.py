"""ZeRO stage 3 (actors/zero3.py) against references: the single-process trainer (per-step
losses and final weights, 20 steps, 1/2/4 workers, with and without parameter offload), a
transformers BertModel trained by SingleProcess, the 16Ψ/N memory formula, parameters really
freed between uses and prefetched, and checkpoints moving between stage 3 and stage 1 /
a single process.

One gang of 4 Ray workers (cluster.gang.WorkerGroup) runs everything: a run on N < 4
workers uses a process group of the first N of them (``dist.new_group``) and the others sit
it out — the same strategy code on N processes, without starting a gang per world size (the
gang start, not the training, is what costs time on a 2-core machine).

Tolerance (fp32): as tests/test_zero.py — ranks sum gradients in another order and the grad
norm is summed from shards, so results differ by rounding only: losses rtol 1e-5 / atol 1e-6,
weights rtol 1e-5 / atol 1e-5. Memory: model-state bytes per rank within 10% of 16Ψ/N
(bf16 parameters, Ψ = trainable parameters).
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from actors import checkpoint as ckpt
from actors.activation_checkpointing import apply_activation_checkpointing
from actors.strategies import build_strategy, strategy_from_dict
from actors.strategy import SingleProcess
from actors.train_config import TrainConfig
from actors.zero import Zero
from actors.zero3 import Zero3, Zero3Config
from models.config import ModelConfig
from models.registry import build_model
from models.typed_config import ConfigError

from tests.test_zero import (CFG, LOSS_TOL, assert_matches, bert_batches, build_bert,
                             make_trainer, reference, weights)
from tests.tiny_corpus import build_pack

torch.set_num_threads(1)


def consolidated(trainer) -> dict[str, torch.Tensor]:
    """Final weights through the strategy (a collective under stage 3: every rank calls it)."""
    state = trainer.strategy.state_dict()["model"]
    return {k: v.detach().float().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("zero3_pack"), eval_blocks=14)


@pytest.fixture(scope="module")
def gang(ray_session):
    from cluster.gang import ScalingConfig, WorkerGroup

    group = WorkerGroup(ScalingConfig(num_workers=4)).start()
    yield group
    group.shutdown()


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

def _fit(group, rank, pack, cfg, variants):
    world = dist.get_world_size(group)
    outs = {}
    for offload in variants:
        trainer = make_trainer(pack, cfg, Zero3(offload_params=offload, group=group), rank,
                               world)
        pos = trainer.strategy.module.embed.pos.weight.detach().clone()
        result = trainer.fit()
        outs[offload] = {"losses": result.losses, "weights": consolidated(trainer),
                         "initial_pos": pos, "memory": trainer.strategy.memory_report()}
    # one bf16 step for the memory formula
    mcfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    t = make_trainer(pack, mcfg, Zero3(param_dtype="bf16", group=group), rank, world)
    outs["bf16"] = dict(t.strategy.memory_report(), loss=t.fit().losses[1])
    return outs


def _checkpoint_save(group, rank, pack, root):
    trainer = make_trainer(pack, CFG, Zero3(group=group), rank, dist.get_world_size(group))
    losses = trainer.fit(until=10).losses
    return {"losses": losses, "path": trainer.save(root)}     # a collective under ZeRO


def _checkpoint_resume(group, rank, pack, path):
    torch.manual_seed(99)
    trainer = make_trainer(pack, CFG, Zero3(group=group), rank, dist.get_world_size(group))
    trainer.restore(path)
    return {"losses": trainer.fit().losses, "weights": consolidated(trainer)}


def run_bert(strategy, rank=0, world=1, steps=3):
    """tests.test_zero.run_bert, reading the weights through the strategy's state_dict."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0, device="cpu", echo=False)
    strategy.setup(build_bert(), cfg)
    losses = []
    for batch in bert_batches(steps):
        share = {k: v.chunk(world)[rank] for k, v in batch.items()}
        result = strategy.forward_backward(share, 1.0 / world)
        losses.append(strategy.all_reduce_sum([float(result.loss) / world])[0])
        strategy.clip_and_step(cfg.grad_clip)
    strategy.flush()
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


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_same_losses_weights_and_memory(pack, gang, workers):
    ref, ref_result = reference(pack)
    module = ref.strategy.module
    psi = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert psi % 2 == 1                                     # not divisible by 2 or 4
    steps = list(range(1, 21))
    outs = on(gang, workers, _fit, pack, CFG, (False, True))
    assert len(outs) == workers
    for out in outs:
        for offload in (False, True):
            o = out[offload]
            assert sorted(o["losses"]) == steps
            assert_matches(o, ref, ref_result, steps)
            torch.testing.assert_close(o["weights"]["embed.pos.weight"], o["initial_pos"],
                                       rtol=0, atol=0)      # frozen: unchanged
            mem = o["memory"]
            assert mem["trainable_params"] == psi and mem["frozen_param_bytes"] == 32 * 32 * 4
            where = "host" if offload else "device"
            assert mem["by_location"]["param"][where] == mem["param_bytes"] > 0
        bf16 = out["bf16"]
        predicted = 16 * psi / workers
        assert abs(bf16["model_state_bytes"] - predicted) <= 0.1 * predicted, bf16
        assert bf16["param_bytes"] == pytest.approx(2 * psi / workers, rel=0.05)
        assert bf16["grad_bytes"] == pytest.approx(2 * psi / workers, rel=0.05)
        assert bf16["optimizer_bytes"] == pytest.approx(12 * psi / workers, rel=0.05)
        assert abs(bf16["loss"] - ref_result.losses[1]) < 0.05      # bf16 trains


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


def _steps(strategy, model, batches):
    strategy.setup(model, TrainConfig(lr=1e-2, warmup_steps=0, device="cpu", echo=False))
    losses = []
    for batch in batches:
        losses.append(float(strategy.forward_backward(batch, 1.0).loss))
        strategy.clip_and_step(1.0)
    return losses, {k: v.detach().float().clone() for k, v in strategy.state_dict()["model"].items()}


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

    ref_losses, ref_w = _steps(SingleProcess("cpu"), make(), batches)
    z = Zero3()
    losses, w = _steps(z, make(), batches)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **LOSS_TOL)
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    if case == "toy":
        # layer 3 is frozen (no unit); the weight tied between layers 0 and 2 is the root's
        assert [u.name for u in z.units] == ["layers.0", "layers.1", "layers.2", "<root>"]
        assert z._unit_of[id(z.module.layers[0][0].weight)] is z.root
        assert torch.equal(w["layers.0.0.weight"], w["layers.2.0.weight"])
        torch.testing.assert_close(w["layers.1.0.bias"], Toy().layers[1][0].bias.detach())
        assert z.memory_report()["trainable_params"] == sum(
            p.numel() for p in Toy().parameters() if p.requires_grad)


def test_wraps_transformers_bert_from_outside(gang):
    """Tolerances as tests/test_zero.py's Bert test (weights atol 1e-4 = lr / 10)."""
    ref_losses, ref_w, _ = run_bert(SingleProcess("cpu"))
    for losses, w, mem in on(gang, 2, _bert):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **LOSS_TOL)
        for name, tensor in ref_w.items():
            torch.testing.assert_close(w[name], tensor, rtol=1e-5, atol=1e-4, msg=name)
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
    assert_matches({"losses": single.fit().losses, "weights": weights(single)}, ref,
                   ref_result, steps)
    sp = make_trainer(pack, CFG)
    sp.fit(until=10)
    sp_path = sp.save(str(tmp_path / "ck1"))
    for out in on(gang, 2, _checkpoint_resume, pack, sp_path):
        assert_matches(out, ref, ref_result, steps)
