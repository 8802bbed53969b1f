"""A DistillationModel under ZeRO-3 on a 2-worker gang equals one process, and its teacher is
sharded as frozen units (``shard_frozen``): no gradient, no optimizer state, 1/N of its bytes.

The model: a 4-layer GPT teacher (d 32) and a narrower 2-layer student (d 16, so the hidden
term trains two projections), loss = 0.5·task + KD + hidden + attention. Against
SingleProcess on the whole batch (tests/equivalence.py: per-step losses, pre-clip gradient
norms, final trainable weights; Adam eps 1e-3): each rank takes half of every batch with
weight 1/2. The teacher's parameters are bit-identical after training; its blocks are units
of frozen parameters only, gathered once per step (forward, under no_grad) and freed; a
reduce-scatter sending 2× its input fails the check.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from bmray.actors.parallel.strategy import SingleProcess
from bmray.actors.parallel.zero.stage3 import Zero3
from bmray.actors.train.config import TrainConfig
from bmray.models.compress.distill import DistillConfig, DistillationModel
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model

from tests.actors.parallel.test_zero3 import lm_batches, on
from tests.equivalence import EPS, LOSS_TOL, NORM_TOL, WEIGHT_TOL, scaled_reduction

torch.set_num_threads(1)
VOCAB, STEPS, WORKERS = 50, 3, 2
TRAIN = dict(lr=1e-2, eps=EPS, warmup_steps=0, device="cpu", echo=False)
CFG = DistillConfig(task_weight=0.5, kd_weight=1.0, hidden_weight=1.0, attention_weight=1.0,
                    temperature=2.0)


def gpt(d_model, layers, seed):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="gpt", vocab_size=VOCAB, d_model=d_model, n_heads=2,
                                   n_layers=layers, d_ff=2 * d_model, max_seq_len=32,
                                   dropout=0.0))


def distillation() -> DistillationModel:
    return DistillationModel(gpt(16, 2, 1), gpt(32, 4, 0), CFG)


def teacher_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gpt(32, 4, 0).state_dict().items()}


def reference(max_norm: float):
    sp = SingleProcess("cpu")
    sp.setup(distillation(), TrainConfig(**TRAIN))
    losses, norms = [], []
    for batch in lm_batches(STEPS, rows=8, vocab=VOCAB):
        losses.append(float(sp.forward_backward(batch, 1.0).loss))
        norms.append(float(sp.clip_and_step(max_norm)))
    weights = {k: v.detach().float().clone() for k, v in sp.state_dict()["model"].items()}
    return losses, norms, weights


def _train(group, rank, max_norm, fault=None):
    world = dist.get_world_size(group)
    model = distillation()
    z = Zero3(group=group)
    z.setup(model, TrainConfig(**TRAIN))
    losses, norms = [], []
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        for step, batch in enumerate(lm_batches(STEPS, rows=8, vocab=VOCAB)):
            z.trace = [] if step == 0 else None
            share = {k: v.chunk(world)[rank] for k, v in batch.items()}
            loss = z.forward_backward(share, 1.0 / world).loss
            losses.append(z.all_reduce_sum([float(loss) / world])[0])
            if step == 0:
                trace = z.trace
            norms.append(float(z.clip_and_step(max_norm)))
    held = {n: p.untyped_storage().nbytes() for n, p in model.named_parameters()}
    weights = {k: v.detach().float().clone() for k, v in z.state_dict()["model"].items()}
    return {"losses": losses, "norms": norms, "weights": weights, "trace": trace,
            "memory": z.memory_report(), "held": held,
            "units": [(u.name, len(u.params), 0 if u.frozen is None else len(u.frozen.params))
                      for u in z.units]}


def check(out, ref, what):
    ref_losses, ref_norms, ref_w = ref
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses),
                               **LOSS_TOL, msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(torch.tensor(out["norms"]), torch.tensor(ref_norms),
                               **NORM_TOL, msg=lambda m: f"{what} grad norms: {m}")
    assert out["weights"].keys() == ref_w.keys()
    for name, tensor in ref_w.items():
        torch.testing.assert_close(out["weights"][name], tensor, **WEIGHT_TOL,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def test_distillation_under_zero3_equals_one_process(gang):
    ref = reference(1.0)
    teacher = teacher_state()
    phi_t = sum(v.numel() for k, v in gpt(32, 4, 0).named_parameters())
    assert ref[2]["projections.0.weight"].shape == (32, 16)
    for out in on(gang, WORKERS, _train, 1.0):
        check(out, ref, "zero3")
        for name, value in teacher.items():                 # bit-identical after training
            assert torch.equal(out["weights"]["teacher." + name], value), name
        # the teacher's blocks: units of frozen parameters only, after the student's
        names = [u[0] for u in out["units"]]
        assert names == ["student.blocks.0", "student.blocks.1", "teacher.blocks.0",
                         "teacher.blocks.1", "teacher.blocks.2", "teacher.blocks.3", "<root>"]
        assert all(u[1] == 0 and u[2] > 0 for u in out["units"][2:6])
        assert all(u[1] > 0 and u[2] == 0 for u in out["units"][:2])
        mem = out["memory"]
        assert mem["frozen_param_bytes"] == 4 * phi_t
        n_units = len(out["units"])
        assert 4 * phi_t / WORKERS <= mem["frozen_bytes"] \
            <= 4 * phi_t / WORKERS + 4 * (WORKERS - 1) * n_units, mem
        trainable = sum(p.numel() for p in distillation().parameters() if p.requires_grad)
        assert mem["trainable_params"] == trainable
        # a teacher unit is gathered once a step (its forward runs without grad) and freed
        t = out["trace"]
        for u in range(2, 6):
            assert sum(e == ("gather", u) for e in t) == 1, (u, t)
        assert set(out["held"].values()) == {0}


def test_a_wrong_gradient_scale_fails(gang):
    ref = reference(1.0)
    out = on(gang, WORKERS, _train, 1.0, 2.0)[0]
    with pytest.raises(AssertionError, match="losses|grad norms"):
        check(out, ref, "x2")
