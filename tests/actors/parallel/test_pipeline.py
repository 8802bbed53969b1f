"""Pipeline parallelism (bmray.actors.parallel.pipeline: schedule, stage, engine) against references:

* the pure schedules: every micro-batch forward then backward exactly once, the in-flight peak
  (m for GPipe, min(p - stage, m) for 1F1B), and a unit-time simulation of all stages giving
  the bubble (p-1)/(m+p-1) exactly; ``partition_balanced`` against brute force;
* the engine on a gang of 4 Ray workers (p = 2 on a subgroup of the first two, p = 4 on all),
  both schedules, m = 4 micro-batches of uneven sizes: the gradients gathered from the stages
  by canonical name (the tied embedding on both end stages) and the summed weighted loss equal
  a single-process forward + backward of the plain model on the full batch; the union of the
  stages' state dicts is the plain state dict; forward-only evaluation gives the same loss;
* the measured idle fraction at p = 2 within 5 points of the formula, and the activation
  memory held (1F1B <= p micro-batches, GPipe m);
* bad input: more stages than layers, unknown schedule or balance, unsupported families.

Tolerance (fp32): the pipeline computes the same operations as the single process on each
micro-batch, but the full-batch reference sums its gradient over all rows at once where the
pipeline accumulates micro-batch by micro-batch, so results differ by rounding only: losses and
gradients rtol 1e-5 / atol 1e-6 (gradients are ~1e-3..1e-1 here, so atol 1e-6 is far below any
real error: a micro-batch dropped or counted twice changes them by >1e-3).
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.distributed as dist

from bmray.actors.parallel.pipeline.engine import PipelineEngine
from bmray.actors.parallel.pipeline.schedule import (bubble_fraction, gpipe_schedule,
                                                     one_f_one_b_schedule, partition_balanced,
                                                     peak_inflight, simulate)
from bmray.actors.parallel.pipeline.stage import layer_costs, split_stage, tied_parameters
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-6)
SIZES = (3, 1, 2, 2)            # uneven micro-batch sizes (rows)
T = 8


def tiny_config(**kw) -> ModelConfig:
    base = dict(family="gpt", vocab_size=64, d_model=32, n_heads=2, n_layers=4, d_ff=64,
                max_seq_len=16, dropout=0.0, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


def tiny_gpt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(**kw))


def micro_batches(sizes=SIZES, vocab=64, seed=1) -> tuple[list[dict], list[float]]:
    """Micro-batches with some ignored labels, and the token weights n_i / N (their weighted
    sum of mean losses is the full batch's mean loss)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        ids = torch.randint(0, vocab, (b, T), generator=g)
        labels = torch.randint(0, vocab, (b, T), generator=g)
        labels[torch.rand(b, T, generator=g) < 0.2] = -100
        batches.append({"input_ids": ids, "labels": labels})
    counts = [int((mb["labels"] != -100).sum()) for mb in batches]
    return batches, [c / sum(counts) for c in counts]


def full_batch_reference(**kw) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients (every state-dict name, tied ones too) of the plain model on the
    concatenated batch."""
    model = tiny_gpt(**kw)
    batches, _ = micro_batches()
    full = {k: torch.cat([mb[k] for mb in batches]) for k in ("input_ids", "labels")}
    out = model(**full)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return float(out.loss.detach()), grads


# ---------------------------------------------------------------- pure schedules

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_schedules_are_complete_and_hold_the_expected_activations(schedule):
    fn = gpipe_schedule if schedule == "gpipe" else one_f_one_b_schedule
    for p, m in itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 4, 8, 13]):
        for s in range(p):
            actions = fn(m, p, s)
            assert sorted(actions) == sorted([("F", i) for i in range(m)] +
                                             [("B", i) for i in range(m)])
            assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(m))
            want = m if schedule == "gpipe" else min(p - s, m)
            assert peak_inflight(actions) == want, (p, m, s)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_simulated_bubble_equals_the_formula(schedule):
    for p, m in itertools.product([1, 2, 3, 4, 8], [1, 2, 4, 8, 13]):
        for t_f, t_b in [(1.0, 1.0), (1.0, 2.0)]:          # backward ~ 2x forward too
            sim = simulate(schedule, m, p, t_f, t_b)
            assert sim["makespan"] == pytest.approx((m + p - 1) * (t_f + t_b))
            for idle in sim["idle_fraction"]:
                assert idle == pytest.approx(bubble_fraction(p, m), abs=1e-12)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_one_f_one_b_phases():
    # stage 0 of 4, m = 6: 3 warm-up forwards, 3 steady pairs, 3 cool-down backwards
    assert one_f_one_b_schedule(6, 4, 0) == [
        ("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4), ("B", 1), ("F", 5),
        ("B", 2), ("B", 3), ("B", 4), ("B", 5)]
    assert one_f_one_b_schedule(2, 4, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]


def brute_force_max(costs, k):
    best = math.inf
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_partition_balanced_is_optimal():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.choice([0.0, rng.uniform(0, 10), float(rng.randint(1, 4))])
                 for _ in range(n)]
        ranges = partition_balanced(costs, k)
        assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(lo < hi for lo, hi in ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        got = max(sum(costs[lo:hi]) for lo, hi in ranges)
        assert got == pytest.approx(brute_force_max(costs, k), abs=1e-9), (costs, k)
    assert partition_balanced([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]


def test_bad_input_raises_config_error():
    with pytest.raises(ConfigError, match="cannot fill 3 stages"):
        partition_balanced([1.0, 2.0], 3)
    with pytest.raises(ConfigError, match="cannot fill 5 stages"):
        split_stage(tiny_gpt(), 0, 5)
    with pytest.raises(ConfigError, match="schedule.*'zb'.*1f1b"):
        PipelineEngine(split_stage(tiny_gpt(), 0, 1), None, 0, 1, schedule="zb")
    with pytest.raises(ConfigError, match="balance.*'flops'"):
        split_stage(tiny_gpt(), 0, 2, balance="flops")
    with pytest.raises(ConfigError, match="'time' needs a sample"):
        split_stage(tiny_gpt(), 0, 2, balance="time")
    with pytest.raises(ConfigError, match="'bert'.*supported families: \\['gpt'\\]"):
        torch.manual_seed(0)
        split_stage(build_model(ModelConfig(family="bert", vocab_size=64, d_model=32,
                                            n_heads=2, n_layers=2, d_ff=64)), 0, 2)
    with pytest.raises(ConfigError, match="supported families"):
        split_stage(torch.nn.Linear(2, 2), 0, 1)
    with pytest.raises(ConfigError, match="moe"):
        split_stage(tiny_gpt(moe={"num_experts": 2}), 0, 2)
    with pytest.raises(ConfigError, match="ranges"):
        split_stage(tiny_gpt(), 0, 2, ranges=[(0, 3), (2, 4)])


# ---------------------------------------------------------------- cutting (one process)

def test_stages_keep_canonical_names_and_untie_a_copy():
    model = tiny_gpt()
    plain = model.state_dict()
    stages = [split_stage(model, s, 3) for s in range(3)]
    # by params: embed and head make layers 0 and 3 the heaviest, so the middle stage gets two
    assert [s.layer_range for s in stages] == [(0, 1), (1, 3), (3, 4)]
    union: dict[str, torch.Tensor] = {}
    for s in stages:
        for k, v in s.state_dict().items():
            assert k not in union, k
            union[k] = v
    assert sorted(union) == sorted(plain)
    assert all(torch.equal(union[k], plain[k]) for k in plain)
    assert any(k.startswith("blocks.3.") for k in stages[2].state_dict())
    # the last stage's output matrix is a copy; the given model stays tied
    assert stages[2].lm_head.weight is not stages[0].embed.tok.weight
    assert model.lm_head.weight is model.embed.tok.weight
    assert tied_parameters(stages[0]) == [stages[0].embed.tok.weight]
    assert tied_parameters(stages[2]) == [stages[2].lm_head.weight]
    assert tied_parameters(stages[1]) == []
    one = split_stage(tiny_gpt(), 0, 1)                 # one stage keeps the tie itself
    assert one.lm_head.weight is one.embed.tok.weight and tied_parameters(one) == []


def test_layer_costs_put_embed_and_head_on_the_end_layers():
    model = tiny_gpt(tie_embeddings=False)
    costs = layer_costs(model, "params")
    block = sum(p.numel() for p in model.blocks[0].parameters())
    embed = sum(p.numel() for p in model.embed.parameters())
    head = sum(p.numel() for p in model.lm_head.parameters()) + 2 * 32
    assert costs == [block + embed, block, block, block + head]
    batches, _ = micro_batches()
    grads_before = [p.grad for p in model.parameters()]
    timed = layer_costs(model, "time", sample=batches[0])
    assert len(timed) == 4 and all(c > 0 for c in timed)
    assert [p.grad for p in model.parameters()] == grads_before     # left as found (None)
    lo, hi = split_stage(model, 0, 2, balance="time", sample=batches[0]).layer_range
    assert lo == 0 and 1 <= hi <= 3


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_single_stage_engine_equals_plain_model(smoothing):
    loss_ref, grads_ref = full_batch_reference(label_smoothing=smoothing)
    model = tiny_gpt(label_smoothing=smoothing)
    stage = split_stage(model, 0, 1)
    engine = PipelineEngine(stage, None, 0, 1, schedule="1f1b")
    batches, weights = micro_batches()
    results = engine.run(batches, weights)
    loss = sum(w * float(r.loss) for w, r in zip(weights, results))
    assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
    for name, p in stage.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(p.grad, grads_ref[name], **TOL)
    # one stage never waits on a peer: its idle time is only the wall clock's noise around the
    # compute (up to 0.17 seen on this shared 2-core machine); a stage waiting on a peer that is
    # not there idles most of the step. The bubble itself is measured in bench/pipeline_bubble.py
    assert engine.stats.peak_inflight == 1 and engine.stats.idle_fraction < 0.5


def test_custom_loss_fn_is_called_with_logits_labels_and_config():
    """The composite strategy passes its own loss (e.g. vocab-parallel cross-entropy): it gets
    (logits, labels, model config) and may return a bare loss."""
    from bmray.models.layers.losses import cross_entropy

    seen = []

    def loss_fn(logits, labels, config):
        seen.append((tuple(logits.shape), config.vocab_size))
        return 2.0 * cross_entropy(logits, labels)

    loss_ref, _ = full_batch_reference()
    engine = PipelineEngine(split_stage(tiny_gpt(), 0, 1, loss_fn=loss_fn), None, 0, 1)
    batches, weights = micro_batches()
    results = engine.run(batches, weights)
    assert seen == [((b, T, 64), 64) for b in SIZES]
    assert all(r.metrics == {} for r in results)
    loss = sum(w * float(r.loss) for w, r in zip(weights, results))
    assert loss == pytest.approx(2.0 * loss_ref, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- multi-rank (gang of 4)

class LazyWeight:
    """A weight whose value is known late (the trainer's token count still being all-reduced):
    counts how often it is converted."""

    def __init__(self, value: float):
        self.value, self.calls = value, 0

    def __float__(self) -> float:
        self.calls += 1
        return self.value


def _stage_group(p: int):
    """(group, stage) for a pipeline over the first ``p`` ranks; stage None if not in it.
    Every rank calls new_group (a collective over WORLD)."""
    world = dist.get_world_size()
    group = dist.new_group(list(range(p))) if p < world else None
    rank = dist.get_rank()
    return group, (rank if rank < p else None)


def _equivalence(p, schedule):
    group, stage = _stage_group(p)
    if stage is None:
        return None
    torch.set_num_threads(1)
    module = split_stage(tiny_gpt(), stage, p)
    engine = PipelineEngine(module, group, stage, p, schedule=schedule)
    batches, weights = micro_batches()
    lazy = [LazyWeight(w) for w in weights]
    local = engine.run(batches, lazy)
    results = engine.broadcast_losses(local)
    grads = {n: prm.grad.clone() for n, prm in module.named_parameters()}
    eval_loss = engine.evaluate({k: torch.cat([mb[k] for mb in batches])
                                 for k in ("input_ids", "labels")})
    return {"local_losses": [float(r.loss) for r in local],
            "losses": [float(r.loss) for r in results],
            "metrics": [r.metrics for r in results], "grads": grads,
            "state": module.state_dict(), "stats": engine.stats.as_dict(),
            "eval_loss": None if eval_loss is None else float(eval_loss),
            "weight_calls": [w.calls for w in lazy]}


@pytest.mark.parametrize("p,schedule", [(2, "gpipe"), (2, "1f1b"), (4, "gpipe"),
                                        (4, "1f1b")])
def test_pipeline_equals_full_batch(gangs, p, schedule):
    outs = [o for o in gangs(4).execute(_equivalence, p, schedule) if o is not None]
    assert len(outs) == p
    loss_ref, grads_ref = full_batch_reference()
    batches, weights = micro_batches()
    m = len(batches)
    # every name of the plain model appears on exactly one stage, with the full-batch grad
    seen = [n for o in outs for n in o["grads"]]
    assert sorted(seen) == sorted(grads_ref) and len(seen) == len(set(seen))
    for o in outs:
        for name, g in o["grads"].items():
            torch.testing.assert_close(g, grads_ref[name], **TOL, msg=name)
    # the tied copies stay equal (summed gradients), and the state dicts compose
    torch.testing.assert_close(outs[0]["grads"]["embed.tok.weight"],
                               outs[-1]["grads"]["lm_head.weight"], rtol=0, atol=0)
    plain = tiny_gpt().state_dict()
    union = {k: v for o in outs for k, v in o["state"].items()}
    assert sorted(union) == sorted(plain) and all(torch.equal(union[k], plain[k]) for k in plain)
    # losses: real on the last stage, NaN elsewhere until broadcast
    last = outs[-1]["local_losses"]
    assert sum(w * x for w, x in zip(weights, last)) == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
    assert all(math.isnan(x) for o in outs[:-1] for x in o["local_losses"])
    assert all(o["losses"] == last for o in outs)
    assert all("lm_acc" in mt for o in outs for mt in o["metrics"])
    assert outs[-1]["eval_loss"] == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
    assert all(o["eval_loss"] is None for o in outs[:-1])
    # weights are converted once each, on the last stage only (where the loss is)
    assert outs[-1]["weight_calls"] == [1] * m
    assert all(o["weight_calls"] == [0] * m for o in outs[:-1])
    # activations held: GPipe all m micro-batches, 1F1B at most p (min(p - stage, m))
    for s, o in enumerate(outs):
        st = o["stats"]
        want = m if schedule == "gpipe" else min(p - s, m)
        assert st["peak_inflight"] == want
        assert st["peak_activation_bytes"] > 0
    if schedule == "1f1b":
        assert outs[0]["stats"]["peak_inflight"] <= p


# ---------------------------------------------------------------- measured bubble (p = 2)

BUBBLE_CFG = dict(family="gpt", vocab_size=128, d_model=256, n_heads=4, n_layers=8, d_ff=1024,
                  max_seq_len=64, dropout=0.0, tie_embeddings=True)


def _bubble(m, repeats):
    """Per schedule, this stage's stats of ``repeats`` steps at p = 2 (after a warm-up step).
    Per-stage compute (4 blocks: ~35 ms per micro-batch forward, ~70 ms backward) is large
    against the p2p transfer of a 4x64x256 fp32 activation (~0.5 ms) and against the head and
    loss that only the last stage runs (~1.5 ms, mostly Python; the formula assumes equal
    stages), so what is measured is the schedule's bubble, not the transport or an
    imbalance."""
    group, stage = _stage_group(2)
    if stage is None:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = split_stage(build_model(ModelConfig(**BUBBLE_CFG)), stage, 2)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 64), generator=g),
                "labels": torch.randint(0, 128, (4, 64), generator=g)} for _ in range(m)]
    out = {}
    for schedule in ("gpipe", "1f1b"):
        engine = PipelineEngine(module, group, stage, 2, schedule=schedule)
        steps = []
        for r in range(repeats + 1):
            engine.run(batches, [1.0 / m] * m)
            module.zero_grad(set_to_none=True)
            if r:
                steps.append(engine.stats.as_dict())
        out[schedule] = steps
    return out


def pipeline_idle(step: list[dict]) -> float:
    """Idle over step time, summed over the stages of one step."""
    return sum(s["idle_s"] for s in step) / sum(s["idle_s"] + s["busy_s"] for s in step)


def test_measured_bubble_matches_formula_p2(gangs):
    """p = 2, m = 4, both schedules: the lower quartile of 16 steps' measured pipeline idle
    fractions (idle time over step time, summed over the stages) is within 5 points of
    (p-1)/(m+p-1) = 0.2. Each stage's own fraction is not held to it: it also moves with how
    much faster its process ran that step than its peer's (here +-10 points between runs; the
    formula assumes equal stages), which moves idle time from one stage to the other.
    Both stages have a core each (the other two workers of the gang wait); the measurement
    needs those cores free of other work (on a machine loaded by other jobs no step is
    undisturbed, and this test fails)."""
    m, repeats = 4, 16
    outs = [o for o in gangs(4).execute(_bubble, m, repeats) if o is not None]
    formula = bubble_fraction(2, m)
    for schedule in ("gpipe", "1f1b"):
        stage_steps = [o[schedule] for o in outs]
        # Noise (another process on a core, a late message) mostly adds idle time to the
        # schedule's own bubble, so a low quantile of the steps estimates the bubble; a schedule
        # that idles more (or a measurement that counts less) fails in every step. Not the
        # minimum: a single step also comes out low now and then (a stage preempted mid-compute
        # counts the stretch as busy while its peer's wait is already over), e.g. 0.156 below a
        # bulk of 0.20-0.25 in an otherwise clean run, and a full suite once saw 0.145.
        fractions = [pipeline_idle([steps[k] for steps in stage_steps])
                     for k in range(len(stage_steps[0]))]
        ranked = sorted(range(len(fractions)), key=fractions.__getitem__)
        best = ranked[len(ranked) // 4]
        step = [steps[best] for steps in stage_steps]
        pipeline = fractions[best]
        idle = [s["idle_fraction"] for s in step]
        assert abs(pipeline - formula) < 0.05, (schedule, pipeline, idle, formula)
        assert [s["peak_inflight"] for s in step] == ([m, m] if schedule == "gpipe" else [2, 1])
    # activations held by stage 0: 1F1B keeps p = 2 micro-batches, GPipe all m = 4
    gpipe, one_f = (outs[0][s][0]["peak_activation_bytes"] for s in ("gpipe", "1f1b"))
    assert one_f / gpipe == pytest.approx(2 / m, rel=0.02)
