"""All-reduce data parallelism against references: the single-worker trainer (losses, eval and
final weights for 1, 2 and 4 workers), torch autograd + a hand all-reduce (accumulated
gradients under no_sync), and a count of the collectives actually issued.

Every run is compared on its per-step losses, per-step pre-clip gradient norms and final
weights, with clipping and without; a bucket all-reduce scaled by 2 (tests/equivalence.py
``scaled_reduction``) must fail those checks. Tolerances and the optimizer's eps:
tests/equivalence.py (gradients of the hand all-reduce: the weight tolerance).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.train.checkpoints import load_checkpoint, read_manifest
from bmray.actors.parallel.buckets import bucket_assignment
from bmray.actors.parallel.data_parallel import STATS_SLOTS, DataParallel, DataParallelConfig
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream, eval_batches
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

from tests.equivalence import EPS, WEIGHT_TOL, assert_same_run, scaled_reduction
from tests.tiny_corpus import BLOCK, build_pack

torch.set_num_threads(1)
CFG = TrainConfig(max_steps=20, lr=3e-3, eps=EPS, warmup_steps=3, grad_clip=0.5, device="cpu",
                  echo=False)
NO_CLIP = dataclasses.replace(CFG, grad_clip=0.0)
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """(pack path, vocab size): a real BPE tokenizer and packed corpus, built once."""
    return build_pack(tmp_path_factory.mktemp("dp_pack"), eval_blocks=14)


class MaskSome(CausalLM):
    """Ignores the labels of even token ids: ranks and micro-batches get uneven target counts."""

    def __call__(self, blocks, generator=None):
        batch = super().__call__(blocks, generator)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] % 2 == 0, -100)
        return batch


def build(vocab: int, unused: bool = False) -> tuple[nn.Module, ModelConfig]:
    mc = ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                     max_seq_len=32, dropout=0.0)          # tie_embeddings: a shared Parameter
    model = build_model(mc)
    if unused:
        model.never_used = nn.Linear(8, 8)                 # gets no gradient, ever
    return model, mc


def make_trainer(pack, cfg, *, rank=0, world=1, strategy=None, objective=None, batch=8,
                 unused=False, ckpt=None, init_seed=0) -> Trainer:
    path, vocab = pack
    seed_everything(init_seed)
    model, mc = build(vocab, unused)
    stream = BlockStream(path, BLOCK, batch, rank, world, seed=0)
    evals = lambda: eval_batches(path, BLOCK, 5, rank, world)   # 5+5+4: some shares empty
    return Trainer(model, objective or CausalLM(), stream, cfg, strategy=strategy,
                   eval_data=evals, checkpoint=ckpt, model_config=mc, seed=0)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.strategy.module.state_dict().items()}


_REFERENCE: dict = {}


def single_worker_reference(pack, cfg: TrainConfig):
    """(trainer, result) of the single-process run, computed once per module and config."""
    key = (pack, repr(cfg))
    if key not in _REFERENCE:
        ref = make_trainer(pack, cfg)
        _REFERENCE[key] = ref, ref.fit()
    return _REFERENCE[key]


# ---------------------------------------------------------------- worker functions

def _dp_fit(pack, cfg, dp_cfg, objective=None, unused=False, ckpt_dir=None, split_at=None,
            fault=None):
    """Train on this gang rank; with ``ckpt_dir``, stop at ``split_at``, rebuild everything
    from another init and resume from the checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = CheckpointConfig(dir=ckpt_dir, keep_last=0) if ckpt_dir else None
    trainer = make_trainer(pack, cfg, rank=rank, world=world, objective=objective,
                           unused=unused, ckpt=ckpt, strategy=DataParallel(dp_cfg))
    losses, norms = {}, {}
    if ckpt_dir:
        first = trainer.fit(until=split_at)
        losses.update(first.losses)
        norms.update(first.grad_norms)
        trainer = make_trainer(pack, cfg, rank=rank, world=world, objective=objective,
                               unused=unused, ckpt=ckpt, strategy=DataParallel(dp_cfg),
                               init_seed=123 + rank)     # replicas differ until the restore
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        result = trainer.fit()
    losses.update(result.losses)
    norms.update(result.grad_norms)
    return {"losses": losses, "grad_norms": norms, "eval": result.eval,
            "weights": weights(trainer),
            "shm": trainer.strategy.uses_shared_memory,
            "memory": trainer.strategy.memory_report(), "checkpoint": result.checkpoint}


def _count_collectives_and_order(pack, bucket_mb):
    """no_sync issues no collective; the synced backward launches every bucket but the last
    once, the first before backward has finished; the last (the statistics carrier) waits for
    the step's statistics or ``clip_and_step``; the reduced gradients equal a hand all-reduce
    of autograd's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(max_steps=1, micro_batches=2, device="cpu")
    trainer = make_trainer(pack, cfg, rank=rank, world=world, objective=MaskSome(),
                           strategy=DataParallel(bucket_mb=bucket_mb, first_bucket_mb=None,
                                                 transport="process_group"))
    strategy = trainer.strategy
    reference = copy.deepcopy(strategy.module)
    for p in reference.parameters():
        p.grad = None
    batches = trainer.micro_batches(next(trainer._data_iter), 0)

    events: list[tuple[str, object]] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        events.append(("all_reduce", tensor.numel()))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    names = {id(p): n for n, p in strategy.module.named_parameters()}
    hooks = [p.register_post_accumulate_grad_hook(lambda p: events.append(("grad", names[id(p)])))
             for p in strategy.params]          # registered after ours: runs after ours
    try:
        with strategy.no_sync():
            strategy.forward_backward(batches[0], 0.5)
        in_no_sync = list(events)
        events.clear()
        strategy.forward_backward(batches[1], 0.25)
        synced = list(events)
        events.clear()
        strategy._wait_all()
        at_step = list(events)
    finally:
        dist.all_reduce = real_all_reduce
        for h in hooks:
            h.remove()
    got = {n: p.grad.clone() for n, p in strategy.module.named_parameters()}
    # reference: plain autograd on a copy, then one all-reduce per gradient
    for batch, w in zip(batches, (0.5, 0.25)):
        (reference(**batch).loss * w).backward()
    expected = {}
    for n, p in reference.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        expected[n] = g
    return {"no_sync": in_no_sync, "synced": synced, "at_step": at_step, "got": got,
            "expected": expected, "buckets": [b.buffer.numel() for b in strategy.buckets],
            "extra": [b.extra for b in strategy.buckets],
            "views": all(p.grad.untyped_storage().data_ptr() in
                         {b.buffer.untyped_storage().data_ptr() for b in strategy.buckets}
                         for p in strategy.params)}


def _strategy(kind: str):
    if kind == "data_parallel":     # counted at torch.distributed: not in shared memory
        return DataParallel(bucket_mb=0.01, first_bucket_mb=None, transport="process_group")
    if kind == "zero3":
        from bmray.actors.parallel.zero.stage3 import Zero3
        return Zero3()
    from bmray.actors.parallel.zero.stage12 import Zero
    return Zero(stage=int(kind[-1]), bucket_mb=0.01)


def _stats_ride_with_the_gradients(pack, kind):
    """All-reduces per training step, and the carried sums (counts past fp32's 2**24)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(max_steps=5, device="cpu", echo=False)
    trainer = make_trainer(pack, cfg, rank=rank, world=world, strategy=_strategy(kind))
    strategy = trainer.strategy
    trainer.fit(until=2)            # step 1 reduces its own target count; later steps read ahead
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        losses = trainer.fit(until=4).losses
    finally:
        dist.all_reduce = real_all_reduce
    batch = trainer.micro_batches(next(trainer._data_iter), 9)[0]
    sums = []
    for wait_first in (False, True):        # waited after clip_and_step, or before it
        strategy.forward_backward(batch, 1.0)
        wait = strategy.reduce_step_stats([0.1 * (rank + 1), -2.5], [2 ** 40 + rank, 3])
        if wait_first:
            sums.append(wait())
        strategy.clip_and_step(1.0)
        if not wait_first:
            sums.append(wait())
    buckets = [b.buffer.numel() for b in strategy.buckets] if kind == "data_parallel" else None
    return {"calls": calls, "buckets": buckets,
            "losses": [losses[s] for s in sorted(losses)], "sums": sums}


# ---------------------------------------------------------------- tests

def test_bucket_assignment_follows_ddp_rule():
    ps = [nn.Parameter(torch.zeros(n)) for n in (10, 300, 5, 5, 1000, 3)]
    ps.append(nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    got = bucket_assignment(ps, bucket_bytes=1200, first_bucket_bytes=40)
    # first bucket closes at >= 40 bytes; then >= 1200 bytes; float64 never shares a bucket
    assert got == [[0], [1], [2, 3, 4], [5], [6]]
    assert sorted(i for b in got for i in b) == list(range(len(ps)))
    with pytest.raises(ConfigError, match="strategy.bucket_mb"):
        DataParallelConfig(bucket_mb=0)


@pytest.mark.parametrize("workers,transport,cfg", [(1, "auto", CFG), (2, "auto", CFG),
                                                   (4, "auto", CFG), (4, "process_group", CFG),
                                                   (2, "auto", NO_CLIP)],
                         ids=["1", "2", "4", "4-gloo", "2-no-clip"])
def test_same_losses_norms_eval_and_weights_as_single_worker(pack, gangs, workers, transport,
                                                             cfg, tmp_path):
    """``auto`` sums the buckets in shared memory (one host), ``process_group`` over gloo."""
    ref, ref_result = single_worker_reference(pack, cfg)
    assert cfg.grad_clip == 0 or min(ref_result.grad_norms.values()) > cfg.grad_clip
    dp_cfg = DataParallelConfig(bucket_mb=0.01, first_bucket_mb=0.002,   # several buckets
                                transport=transport)
    ckpt_dir = str(tmp_path / "ck") if workers == 2 else None    # 2 workers: stop + resume
    outs = gangs(workers).execute(_dp_fit, pack, cfg, dp_cfg, ckpt_dir=ckpt_dir, split_at=10)
    assert outs[0]["memory"]["num_buckets"] > 3
    assert all(out["shm"] == (transport == "auto" and workers > 1) for out in outs)
    # the shared-memory slots are reported beside the model state: one 1 MB slot per rank
    assert all(out["memory"]["comm_buffer_bytes"] == (workers * (64 + (1 << 20))
                                                      if out["shm"] else 0) for out in outs)
    steps = sorted(ref_result.losses)
    assert steps == list(range(1, 21))
    ref_w = weights(ref)
    for out in outs:                                   # every rank reports the same numbers
        assert sorted(out["losses"]) == steps
        assert_same_run(out, ref_result.losses, ref_result.grad_norms, ref_w, steps)
        assert out["eval"]["eval_tokens"] == ref_result.eval["eval_tokens"]
        assert out["eval"]["loss"] == pytest.approx(ref_result.eval["loss"], rel=1e-5)
    if ckpt_dir:
        # rank 0 alone wrote the replicated state; a single process can load it
        manifest = read_manifest(outs[0]["checkpoint"])
        assert manifest["files"] == ["rank_00000.pt"] and manifest["train_world_size"] == 2
        _, state = load_checkpoint(outs[0]["checkpoint"])
        for name, tensor in ref_w.items():
            torch.testing.assert_close(state["model"][name], tensor, **WEIGHT_TOL)


@pytest.mark.parametrize("workers,micro", [(2, 3), (4, 2)])
def test_accumulation_with_uneven_micro_batches_matches_one_big_batch(pack, gangs, workers, micro):
    """8 blocks / 2 ranks / 3 micro-batches = 2+1+1 blocks; ignored labels make the target
    counts differ by rank and micro-batch. Reference: one process, one micro-batch."""
    ref_cfg = TrainConfig(max_steps=6, lr=3e-3, eps=EPS, warmup_steps=0, device="cpu",
                          echo=False)
    ref = make_trainer(pack, ref_cfg, objective=MaskSome())
    ref_result = ref.fit()
    cfg = dataclasses.replace(ref_cfg, micro_batches=micro)
    outs = gangs(workers).execute(_dp_fit, pack, cfg,
                                  DataParallelConfig(bucket_mb=0.01, first_bucket_mb=None),
                                  objective=MaskSome())
    ref_w = weights(ref)
    for out in outs:
        assert_same_run(out, ref_result.losses, ref_result.grad_norms, ref_w, range(1, 7))


@pytest.mark.parametrize("transport", ["auto", "process_group"])
def test_a_wrong_gradient_scale_fails_the_checks(pack, gangs, transport):
    """Buckets that send 2× their gradients (a missing 1/N) over either transport: the norm
    check fails with clipping on, the weights too without it."""
    dp_cfg = DataParallelConfig(bucket_mb=0.01, first_bucket_mb=0.002, transport=transport)
    for cfg in (CFG, NO_CLIP):
        ref, ref_result = single_worker_reference(pack, cfg)
        out = gangs(2).execute(_dp_fit, pack, cfg, dp_cfg, fault=2.0)[0]
        with pytest.raises(AssertionError, match="grad norms"):
            assert_same_run(out, out["losses"], ref_result.grad_norms, None, range(1, 21))
        if cfg is NO_CLIP:
            with pytest.raises(AssertionError, match="weight"):
                assert_same_run(out, out["losses"], None, weights(ref), range(1, 21))


def test_no_sync_skips_communication_and_buckets_overlap_backward(pack, gangs):
    outs = gangs(2).execute(_count_collectives_and_order, pack, 0.01)
    for out in outs:
        assert out["views"]                                   # gradient_as_bucket_view
        assert not [e for e in out["no_sync"] if e[0] == "all_reduce"]
        launches = [i for i, e in enumerate(out["synced"]) if e[0] == "all_reduce"]
        grads = [i for i, e in enumerate(out["synced"]) if e[0] == "grad"]
        # each bucket once: the last one (with its statistics slots) at the step
        assert [out["synced"][i][1] for i in launches] == out["buckets"][:-1]
        assert out["at_step"] == [("all_reduce", out["buckets"][-1])]
        assert out["extra"] == [0] * (len(out["buckets"]) - 1) + [STATS_SLOTS]
        assert len(out["buckets"]) >= 3
        assert launches[0] < grads[-1]        # communication started before backward ended
        for name, g in out["expected"].items():
            torch.testing.assert_close(out["got"][name], g, **WEIGHT_TOL, msg=name)


@pytest.mark.parametrize("kind", ["data_parallel", "zero1", "zero2", "zero3"])
def test_step_statistics_ride_with_the_gradients(pack, gangs, kind):
    """The logged loss and the next step's target count cost no collective of their own:
    data parallelism carries them in the last gradient bucket's spare slots (after the first
    step a step issues one all-reduce per bucket and nothing else), ZeRO in the global
    grad-norm all-reduce (one small all-reduce per step). Sums are exact for counts and
    fp32 (bucket) or fp64 (norm) for values, waited for before or after ``clip_and_step``."""
    world = 4 if kind == "data_parallel" else 2
    outs = gangs(world).execute(_stats_ride_with_the_gradients, pack, kind)
    for out in outs:
        # step 3 reduces its own target count (fit(until=2) had no next step to read ahead);
        # step 4's count rode in step 3's reduction, its statistics in its own; then the
        # end-of-run eval sums (cross-entropy, tokens)
        if kind == "data_parallel":
            assert out["calls"] == [1] + out["buckets"] * 2 + [2]
        else:
            # one small all-reduce a step: 1 (norm) + the values + input tokens [+ next count]
            first, step3, step4, last = [n for n in out["calls"] if n < 64]
            assert (first, last) == (1, 2) and step3 == step4 + 1 > 3
        assert out["losses"] == outs[0]["losses"] and len(out["losses"]) == 2
        for values, counts in out["sums"]:
            assert counts == [world * 2 ** 40 + sum(range(world)), 3 * world]
            assert values == pytest.approx([0.1 * sum(range(1, world + 1)), -2.5 * world],
                                           rel=1e-6)


def test_unused_and_tied_parameters(pack, gangs):
    """A parameter no rank uses gets no update (as in one process: AdamW skips grad None);
    the tied embedding / output matrix is one Parameter with one slot."""
    cfg = TrainConfig(max_steps=4, lr=3e-3, eps=EPS, warmup_steps=0, device="cpu", echo=False)
    ref = make_trainer(pack, cfg, unused=True)
    ref.fit()
    assert ref.strategy.module.never_used.weight.grad is None
    outs = gangs(2).execute(_dp_fit, pack, cfg,
                            DataParallelConfig(bucket_mb=0.01, find_unused_parameters=True),
                            unused=True)
    ref_w = weights(ref)
    for out in outs:
        for name, tensor in ref_w.items():
            torch.testing.assert_close(out["weights"][name], tensor, **WEIGHT_TOL, msg=name)
    n_params = sum(p.numel() for p in ref.strategy.module.parameters())   # tied: counted once
    assert outs[0]["memory"]["grad_bytes"] == 4 * n_params


def test_an_unknown_transport_is_a_config_error():
    from bmray.actors.parallel.zero.stage12 import ZeroConfig
    from bmray.actors.parallel.zero.stage3 import Zero3Config

    for make in (DataParallelConfig, ZeroConfig, Zero3Config):
        with pytest.raises(ConfigError, match="strategy.transport"):
            make(transport="tcp")
