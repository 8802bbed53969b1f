"""Dynamic loss scaling: forced overflows are skipped and back the scale off, clean windows grow
it, the scale sequence equals torch.amp.GradScaler's, all ranks skip together.

Tolerance: scales are compared exactly (they are fp32 numbers computed the same way);
fp16-computed gradients against fp32 ones with rtol 1e-2 (fp16 has an 11-bit mantissa).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bmray.actors.parallel.zero.loss_scaler import DynamicLossScaler, LossScalerConfig, StaticLossScaler, unscale_
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
INF = float("inf")


def grads_with(overflow: bool, value: float = 8.0) -> list[torch.Tensor]:
    g = [torch.full((5,), value), torch.full((3,), value, dtype=torch.float16)]
    if overflow:
        g[1][1] = INF
    return g


# ------------------------------------------------------------------------------ state machine

def test_forced_overflow_halves_the_scale_and_restarts_the_window():
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=1024.0, growth_interval=3))
    assert scaler.scale(torch.tensor(2.0)).item() == 2048.0
    for _ in range(2):                                  # two clean steps: not yet a window
        grads = grads_with(False, value=1024.0)
        assert scaler.unscale_and_check(grads) is False
        assert all(torch.equal(g, torch.ones_like(g)) for g in grads)   # unscaled in place
        scaler.update(False)
    assert scaler.scale_value == 1024.0 and scaler.growth_tracker == 2
    assert scaler.unscale_and_check(grads_with(True)) is True
    scaler.update(True)
    assert scaler.scale_value == 512.0 and scaler.growth_tracker == 0
    assert scaler.skipped_steps == 1
    nan = [torch.tensor([1.0, float("nan")])]
    assert scaler.unscale_and_check(nan) is True          # NaN counts as an overflow too


def test_growth_after_growth_interval_clean_steps():
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=4.0, growth_interval=5,
                                                growth_factor=2.0))
    scales = []
    for _ in range(12):
        scaler.update(scaler.unscale_and_check(grads_with(False)))
        scales.append(scaler.scale_value)
    assert scales == [4.0] * 4 + [8.0] * 5 + [16.0] * 3


def test_backoff_stops_at_min_scale():
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=8.0, min_scale=2.0))
    for expected in (4.0, 2.0, 2.0, 2.0):
        scaler.update(scaler.unscale_and_check(grads_with(True)))
        assert scaler.scale_value == expected
    assert scaler.skipped_steps == 4


def gradscaler_scales(pattern, **kwargs) -> list[float]:
    """torch.amp.GradScaler's scale after each step of ``pattern`` (True: an inf gradient)."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    gs = torch.amp.GradScaler("cpu", **kwargs)
    out = []
    for overflow in pattern:
        gs.scale(torch.ones(()))                          # sets up its scale lazily
        p.grad = torch.full((3,), INF if overflow else 1.0)
        gs.step(opt)
        gs.update()
        out.append(gs.get_scale())
    return out


@pytest.mark.parametrize("factors", [(2.0, 0.5, 3), (1.5, 0.3, 2), (2.0, 0.25, 1)])
def test_scale_sequence_equals_torch_gradscaler(factors):
    growth, backoff, interval = factors
    rng = random.Random(0)
    pattern = ([False] * 10 + [True] * 3 +
               [rng.random() < 0.25 for _ in range(200)])
    kwargs = dict(init_scale=2.0 ** 16, growth_factor=growth, backoff_factor=backoff,
                  growth_interval=interval)
    expected = gradscaler_scales(pattern, **kwargs)
    ours = DynamicLossScaler(LossScalerConfig(**kwargs, min_scale=1e-30))
    got = []
    for overflow in pattern:
        ours.update(ours.unscale_and_check([torch.full((3,), INF if overflow else 1.0)]))
        got.append(ours.scale_value)
    assert got == expected
    assert len(set(got)) > 5                               # the scale really moved both ways


def test_unscale_without_fused_kernel(monkeypatch):
    """The foreach fallback (torch builds without the fused kernel) gives the same results."""
    fused = [grads_with(o, 6.0) for o in (False, True)]
    flags = [unscale_(g, 0.5) for g in fused]
    monkeypatch.delattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
    plain = [grads_with(o, 6.0) for o in (False, True)]
    assert [unscale_(g, 0.5).item() for g in plain] == [f.item() for f in flags] == [0.0, 1.0]
    for a, b in zip(fused[0], plain[0]):
        assert torch.equal(a, b) and torch.equal(a, torch.full_like(a, 3.0))
    assert unscale_([], 0.5) is None and unscale_([None], 0.5) is None


def test_state_dict_round_trip():
    cfg = LossScalerConfig(init_scale=256.0, growth_interval=4)
    a = DynamicLossScaler(cfg)
    for overflow in (True, False, False):
        a.update(a.unscale_and_check(grads_with(overflow)))
    state = a.state_dict()
    assert state == {"scale": 128.0, "growth_tracker": 2, "skipped_steps": 1}
    b = DynamicLossScaler(cfg)
    b.load_state_dict(copy.deepcopy(state))
    assert b.state_dict() == state
    for _ in range(2):           # both continue identically: the window completes in 2 steps
        for s in (a, b):
            s.update(s.unscale_and_check(grads_with(False)))
    assert a.state_dict() == b.state_dict() and b.scale_value == 256.0


def test_disabled_and_static_scalers_do_nothing_for_bf16():
    off = DynamicLossScaler(LossScalerConfig(enabled=False))
    loss = torch.tensor(3.0)
    assert off.scale(loss) is loss and off.scale_value == 1.0
    grads = grads_with(True)
    assert off.unscale_and_check(grads) is False           # no checks at all
    assert grads[1][1].item() == INF and grads[0][0].item() == 8.0
    off.update(True)
    assert off.scale_value == 1.0 and off.skipped_steps == 0
    static = StaticLossScaler()
    assert static.scale(loss) is loss and static.unscale_and_check(grads) is False
    fixed = StaticLossScaler(4.0)
    assert fixed.scale(loss).item() == 12.0
    g = [torch.full((2,), 8.0)]
    assert fixed.unscale_and_check(g) is False and g[0].tolist() == [2.0, 2.0]
    fixed.update(True)
    assert fixed.state_dict() == {"scale": 4.0}


def test_config_validation():
    assert LossScalerConfig() == LossScalerConfig(init_scale=65536.0, growth_factor=2.0,
                                                  backoff_factor=0.5, growth_interval=2000,
                                                  min_scale=1.0, enabled=True)
    cfg = from_dict(LossScalerConfig, {"init_scale": "1e3", "growth_interval": 10},
                    "train.loss_scale")
    assert cfg.init_scale == 1000.0 and cfg.growth_interval == 10
    bad = [({"init_scale": 0}, "train.loss_scale.init_scale"),
           ({"init_scale": INF}, "train.loss_scale.init_scale"),
           ({"growth_factor": 1.0}, "train.loss_scale.growth_factor"),
           ({"backoff_factor": 1.0}, "train.loss_scale.backoff_factor"),
           ({"backoff_factor": 0}, "train.loss_scale.backoff_factor"),
           ({"growth_interval": 0}, "train.loss_scale.growth_interval"),
           ({"growth_interval": 2.5}, "train.loss_scale.growth_interval"),
           ({"min_scale": 1e6}, "train.loss_scale.min_scale"),
           ({"min_scale": -1.0}, "train.loss_scale.min_scale"),
           ({"enabled": "no"}, "train.loss_scale.enabled"),
           ({"init": 2.0}, "unknown key")]
    for mapping, key in bad:
        with pytest.raises(ConfigError, match=key):
            from_dict(LossScalerConfig, mapping, "train.loss_scale")


# ------------------------------------------------------------------------------ fp16 training

def fp16_step(master: nn.Module, half: nn.Module, opt, scaler, x, y) -> bool:
    """One mixed-precision step: fp16 compute copy, scaled backward, unscaled fp32 master
    gradients, optimizer step on the fp32 master weights unless a gradient overflowed.
    Returns found_inf."""
    with torch.no_grad():
        for hp, mp in zip(half.parameters(), master.parameters()):
            hp.copy_(mp)
    half.zero_grad(set_to_none=True)
    loss = F.mse_loss(half(x.half()).float(), y)
    scaler.scale(loss).backward()
    for mp, hp in zip(master.parameters(), half.parameters()):
        mp.grad = hp.grad.float()
    found_inf = scaler.unscale_and_check(mp.grad for mp in master.parameters())
    scaler.update(found_inf)
    if not found_inf:
        opt.step()
    return found_inf


def test_fp16_training_skips_overflow_steps():
    torch.manual_seed(0)
    master = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    half = copy.deepcopy(master).half()
    opt = torch.optim.SGD(master.parameters(), lr=0.1)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    # an fp32 reference gradient at the initial weights
    ref = copy.deepcopy(master)
    F.mse_loss(ref(x), y).backward()
    # a scale that overflows fp16 (max 65504) in backward: steps are skipped, scale halves
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0 ** 24, growth_interval=1000))
    history = []
    while True:
        before = [p.detach().clone() for p in master.parameters()]
        found = fp16_step(master, half, opt, scaler, x, y)
        changed = any(not torch.equal(b, p) for b, p in zip(before, master.parameters()))
        history.append((found, scaler.scale_value))
        if not found:
            break
        assert not changed                      # skipped: master weights untouched
        assert len(history) < 20
    assert changed                              # the clean step updated the weights
    assert len(history) >= 3 and all(f for f, _ in history[:-1])
    scales = [s for _, s in history]
    assert scales[:-1] == [2.0 ** (23 - i) for i in range(len(scales) - 1)]
    assert scales[-1] == scales[-2]             # a clean step leaves the scale (window 1000)
    # the unscaled fp16 gradients are the fp32 gradients (up to fp16 rounding)
    for p, r in zip(master.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-2, atol=1e-4)


# ------------------------------------------------------------------------------ across ranks

def _rank_steps():
    """Steps on one gang rank; returns (found_inf, scale) after each."""
    rank = dist.get_rank()
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=1024.0, growth_interval=2))
    out = []
    # 1: overflow on rank 1 only; 2, 3: clean everywhere (the scale grows back);
    # 4: rank 1 has no gradients of its own (a ZeRO rank with an empty shard), rank 0 a NaN
    steps = [grads_with(rank == 1), grads_with(False), grads_with(False),
             [torch.tensor([float("nan")])] if rank == 0 else []]
    for grads in steps:
        found = scaler.unscale_and_check(grads)
        scaler.update(found)
        out.append((found, scaler.scale_value))
    return out


def test_overflow_on_one_rank_skips_every_rank(ray_session):
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    with WorkerGroup(ScalingConfig(num_workers=2)) as group:
        r0, r1 = group.execute(_rank_steps)
    assert r0 == r1 == [(True, 512.0), (False, 512.0), (False, 1024.0), (True, 512.0)]


# ------------------------------------------------------------------------------ from config

@pytest.mark.parametrize("kind", ["zero", "zero3", "mesh"])
def test_train_loss_scale_config_drives_the_strategies_scaler(kind):
    """``train.loss_scale`` (YAML → TrainConfig) is the scaler fp16 ZeRO / mesh training uses:
    a clean run of 5 steps with a window of 2 doubles the configured initial scale twice,
    and a scale too large for fp16 backs off by the configured factor on the first step."""
    from bmray.actors.parallel.mesh import MeshParallel
    from bmray.actors.train.config import TrainConfig
    from bmray.actors.train.loop import Trainer, seed_everything
    from bmray.actors.parallel.zero.stage12 import Zero
    from bmray.actors.parallel.zero.stage3 import Zero3
    from bmray.models import ModelConfig, build_model, objective_for

    def run(loss_scale, steps):
        cfg = from_dict(TrainConfig, {"max_steps": steps, "lr": 1e-3, "warmup_steps": 0,
                                      "device": "cpu", "echo": False,
                                      "loss_scale": loss_scale}, "train")
        mcfg = ModelConfig(family="gpt", vocab_size=64, d_model=16, n_heads=2, n_layers=1,
                           d_ff=32, max_seq_len=16, dropout=0.0)
        seed_everything(0)
        data = iter([torch.randint(1, 64, (2, 9)) for _ in range(steps)])
        strategy = {"zero": lambda: Zero(stage=1, param_dtype="fp16"),
                    "zero3": lambda: Zero3(param_dtype="fp16"),
                    "mesh": lambda: MeshParallel(param_dtype="fp16")}[kind]()
        trainer = Trainer(build_model(mcfg), objective_for(mcfg), data, cfg, strategy=strategy)
        trainer.fit()
        return trainer.strategy.scaler

    clean = run({"init_scale": 64.0, "growth_interval": 2, "growth_factor": 2.0}, 5)
    assert clean.scale_value == 256.0 and clean.skipped_steps == 0
    huge = run({"init_scale": 2.0 ** 40, "backoff_factor": 0.25, "growth_interval": 1000}, 1)
    assert huge.skipped_steps == 1 and huge.scale_value == 2.0 ** 38
