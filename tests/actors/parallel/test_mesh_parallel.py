"""dp × tp × pp (actors/mesh_parallel.py) against single-process training of the same GPT.

For each mesh the README lists — (tp=2), (pp=2, GPipe and 1F1B), (dp=2, tp=2), (dp=2, pp=2),
(tp=2, pp=2) and (dp=2, tp=2, pp=2 with ZeRO-1) — 10 optimizer steps on the tiny corpus give the
same losses and the same final weights (gathered into the full model's state dict) as the
SingleProcess trainer on the same global batches.

The model is chosen to exercise the awkward cases: tied embeddings (split over TP as a
vocabulary-parallel matrix, and a copy on each end of the pipeline), d_ff = 63 (uneven TP
slices), a frozen positional embedding, 2 heads (one per TP rank), 2 layers (one per stage).

Each mesh is compared on its per-step losses, its per-step pre-clip gradient norms and its
final weights; two meshes also run without clipping, one with the optimizer offloaded to host
memory, and a dp reduction scaled by 2 (tests/equivalence.py ``scaled_reduction``) must fail
the checks.

Tolerance (fp32): the parallel runs sum the same terms in another order — TP splits the matmul
reductions and the softmax normaliser, the pipeline accumulates micro-batch gradients in
schedule order, dp sums over replicas, and the clipping norm is summed from slices — so
results differ by rounding only: tests/equivalence.py's tolerances and eps.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.mesh import MeshParallel, MeshParallelConfig
from bmray.actors.parallel.registry import strategy_from_dict
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

from tests.actors.parallel import test_zero as zero_tests
from tests.equivalence import EPS, assert_same_run, scaled_reduction
from tests.tiny_corpus import BLOCK, build_pack

torch.set_num_threads(1)

STEPS = 10
CFG = TrainConfig(max_steps=STEPS, micro_batches=2, lr=3e-3, eps=EPS, warmup_steps=2,
                  grad_clip=0.5, device="cpu", echo=False)
NO_CLIP = dataclasses.replace(CFG, grad_clip=0.0)

# (workers, strategy options): the meshes the README lists, dp = workers / (tp * pp)
MESHES = [
    (2, dict(tp=2)),
    (2, dict(pp=2, schedule="gpipe")),
    (2, dict(pp=2, schedule="1f1b")),
    (4, dict(tp=2)),
    (4, dict(pp=2)),
    (4, dict(tp=2, pp=2)),
    (4, dict(tp=2, zero_stage=2)),
    (8, dict(tp=2, pp=2, zero_stage=1)),
    (8, dict(tp=2, pp=2, zero_stage=0, sequence_parallel=True)),
]


def mesh_id(case) -> str:
    n, o = case
    dp = n // (o.get("tp", 1) * o.get("pp", 1))
    parts = [f"{k}{v}" for k, v in (("dp", dp), ("tp", o.get("tp", 1)), ("pp", o.get("pp", 1)))
             if v > 1]
    extra = [o["schedule"]] if "schedule" in o else []
    extra += [f"zero{o['zero_stage']}"] if "zero_stage" in o else []
    extra += ["sp"] if o.get("sequence_parallel") else []
    return "-".join(parts + extra)


def build(vocab: int) -> nn.Module:
    """tests/test_zero.py's tiny GPT with 2 layers (one per pipeline stage)."""
    return zero_tests.build(vocab, n_layers=2)


def make_trainer(pack, cfg, strategy=None, rank=0, world=1) -> Trainer:
    return zero_tests.make_trainer(pack, cfg, strategy, rank, world, n_layers=2)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("mesh_pack"), eval_blocks=14)


_REFERENCES: dict = {}


def single_process(pack, cfg=CFG):
    """(result, final weights) of the single-process run of ``cfg``, once per module."""
    if repr(cfg) not in _REFERENCES:
        trainer = make_trainer(pack, cfg)
        result = trainer.fit()
        _REFERENCES[repr(cfg)] = result, {k: v.detach().clone() for k, v in
                                          trainer.strategy.module.state_dict().items()}
    return _REFERENCES[repr(cfg)]


@pytest.fixture(scope="module")
def reference(pack):
    return single_process(pack)


@pytest.fixture(scope="module")
def gang_of(ray_session):
    """One gang at a time (8 logical CPUs: a gang of 8 leaves no room for another)."""
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    current: dict = {}

    def get(n: int):
        if n not in current:
            for group in current.values():
                group.shutdown()
            current.clear()
            current[n] = WorkerGroup(ScalingConfig(num_workers=n)).start()
        return current[n]

    yield get
    for group in current.values():
        group.shutdown()


# ---------------------------------------------------------------- worker functions

def _fit(pack, cfg, options, fault=None):
    strategy = MeshParallel(**options)
    rank, world = strategy.data_shard(dist.get_rank(), dist.get_world_size())
    trainer = make_trainer(pack, cfg, strategy, rank, world)
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        result = trainer.fit()
    state = trainer.strategy.state_dict()          # a collective: every rank calls it
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "weights": {k: v.detach().float().clone() for k, v in state["model"].items()},
            "memory": trainer.strategy.memory_report()}


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("case", MESHES, ids=[mesh_id(c) for c in MESHES])
def test_mesh_matches_single_process(pack, reference, gang_of, case):
    workers, options = case
    ref_result, ref_weights = reference
    assert min(ref_result.grad_norms.values()) > CFG.grad_clip     # clipping at every step
    outs = gang_of(workers).execute(_fit, pack, CFG, options)
    steps = sorted(ref_result.losses)
    assert len(steps) == STEPS
    for rank, out in enumerate(outs):
        assert_same_run(out, ref_result.losses, ref_result.grad_norms,
                        ref_weights if rank == 0 else None, steps, what=f"rank {rank}")
    mesh = outs[-1]["memory"]["mesh"]
    assert mesh["dp"] * mesh["tp"] * mesh["pp"] == workers


# without clipping; and with the optimizer state in host memory
VARIANTS = [(4, dict(tp=2), NO_CLIP), (8, dict(tp=2, pp=2, zero_stage=1), NO_CLIP),
            (4, dict(tp=2, zero_stage=2, offload_optimizer="cpu"), CFG)]


@pytest.mark.parametrize("case", VARIANTS,
                         ids=[mesh_id(c[:2]) + ("-no-clip" if c[2] is NO_CLIP else "-offload")
                              for c in VARIANTS])
def test_mesh_variants_match_single_process(pack, gang_of, case):
    workers, options, cfg = case
    ref_result, ref_weights = single_process(pack, cfg)
    outs = gang_of(workers).execute(_fit, pack, cfg, options)
    for rank, out in enumerate(outs):
        assert_same_run(out, ref_result.losses, ref_result.grad_norms,
                        ref_weights if rank == 0 else None, sorted(ref_result.losses),
                        what=f"rank {rank}")
    if "offload_optimizer" in options:
        by_location = outs[0]["memory"]["by_location"]["optimizer"]
        assert by_location["host"] > 0 and by_location["device"] == 0


def test_a_wrong_dp_gradient_scale_fails_the_checks(pack, gang_of):
    """(dp=2, tp=2) whose data-parallel reduction sends 2× its input: the norm check fails
    with clipping on, and the weights too without it."""
    for cfg in (CFG, NO_CLIP):
        ref_result, ref_weights = single_process(pack, cfg)
        out = gang_of(4).execute(_fit, pack, cfg, dict(tp=2), 2.0)[0]
        steps = sorted(ref_result.losses)
        with pytest.raises(AssertionError, match="grad norms"):
            assert_same_run(out, out["losses"], ref_result.grad_norms, None, steps)
        if cfg is NO_CLIP:
            with pytest.raises(AssertionError, match="weight"):
                assert_same_run(out, out["losses"], None, ref_weights, steps)


def test_config_errors():
    with pytest.raises(ConfigError, match="strategy.tp"):
        MeshParallelConfig(tp=0)
    with pytest.raises(ConfigError, match="zero_stage"):
        MeshParallelConfig(pp=2, zero_stage=2)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        MeshParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="schedule"):
        MeshParallelConfig(pp=2, schedule="zigzag")
    with pytest.raises(ConfigError, match="strategy"):
        strategy_from_dict({"kind": "mesh", "tp": 2, "stages": 2})
    spec = strategy_from_dict({"kind": "mesh", "tp": 2, "pp": 2})
    assert spec.model_parallel_size() == 4


# ---------------------------------------------------------------- checkpoints across meshes

def _save_mesh(pack, options, root):
    strategy = MeshParallel(**options)
    rank, world = strategy.data_shard(dist.get_rank(), dist.get_world_size())
    trainer = make_trainer(pack, CFG, strategy, rank, world)
    losses = trainer.fit(until=5).losses
    return {"losses": losses, "path": trainer.save(root)}      # a collective


def _resume_mesh(pack, options, path):
    strategy = MeshParallel(**options)
    rank, world = strategy.data_shard(dist.get_rank(), dist.get_world_size())
    torch.manual_seed(99)          # the restore must overwrite everything
    trainer = make_trainer(pack, CFG, strategy, rank, world)
    trainer.restore(path)
    result = trainer.fit()
    state = trainer.strategy.state_dict()
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "weights": {k: v.detach().float().clone() for k, v in state["model"].items()}}


def assert_continues(out, reference, steps):
    ref_result, ref_weights = reference
    assert_same_run(out, ref_result.losses, ref_result.grad_norms, ref_weights, steps)


def test_checkpoints_move_between_meshes_and_single_process(pack, reference, gang_of, tmp_path):
    """Saved at step 5 on (dp=2, tp=2, pp=2), resumed on (dp=4, tp=2) and by a single process;
    and a single-process checkpoint resumed on (dp=2, tp=2, pp=2): each continues exactly
    as the uninterrupted single-process run."""
    gang = gang_of(8)
    saved = gang.execute(_save_mesh, pack, dict(tp=2, pp=2), str(tmp_path / "mesh"))
    path = saved[0]["path"]
    later = range(6, STEPS + 1)
    for rank_out in gang.execute(_resume_mesh, pack, dict(tp=2), path)[:1]:
        assert_continues(rank_out, reference, later)
    single = make_trainer(pack, CFG)
    single.restore(path)
    result = single.fit()
    assert_continues({"losses": result.losses, "grad_norms": result.grad_norms,
                      "weights": {k: v.detach().float() for k, v in
                                  single.strategy.module.state_dict().items()}}, reference, later)

    first = make_trainer(pack, CFG)
    first.fit(until=5)
    single_path = first.save(str(tmp_path / "single"))
    outs = gang.execute(_resume_mesh, pack, dict(tp=2, pp=2, schedule="gpipe"), single_path)
    assert_continues(outs[0], reference, later)
    assert_continues(outs[-1], reference, later)


def test_checkpoint_of_another_model_is_refused(pack, gang_of, tmp_path):
    other = build_model(ModelConfig(family="gpt", vocab_size=pack[1], d_model=16, n_heads=2,
                                    n_layers=2, d_ff=63, max_seq_len=32, dropout=0.0))
    from bmray.actors.train import checkpoints as ckpt
    trainer = make_trainer(pack, CFG)
    trainer.strategy.module.load_state_dict  # the single-process trainer writes the file
    state = trainer.state_dict()
    state["model"] = other.state_dict()
    path = ckpt.save_checkpoint(str(tmp_path / "other"), state["loop"]["step"], state)
    errors = gang_of(8).execute(_resume_error, pack, dict(tp=2, pp=2), path)
    assert all("does not fit the model" in e and "embed.tok.weight" in e for e in errors), errors


def _resume_error(pack, options, path):
    strategy = MeshParallel(**options)
    rank, world = strategy.data_shard(dist.get_rank(), dist.get_world_size())
    trainer = make_trainer(pack, CFG, strategy, rank, world)
    try:
        trainer.restore(path)
    except Exception as exc:        # noqa: BLE001 - the message is what the test checks
        return str(exc)
    return "loaded"


# ---------------------------------------------------------------- mixed precision, recompute

def _fit_low_precision(pack, options):
    from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing
    strategy = MeshParallel(**options)
    rank, world = strategy.data_shard(dist.get_rank(), dist.get_world_size())
    path, vocab = pack
    seed_everything(0)
    model = build(vocab)
    apply_activation_checkpointing(model, "all")
    stream = BlockStream(path, BLOCK, 8, rank, world, seed=0)
    trainer = Trainer(model, CausalLM(), stream, CFG, strategy=strategy, seed=0)
    result = trainer.fit()
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "scale": getattr(trainer.strategy.scaler, "scale_value", None)}


# unit roundoff of the 16-bit formats: bf16 keeps 8 significant bits, fp16 11
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_and_checkpointing_compose(pack, reference, gang_of, dtype):
    """(dp=2, tp=2, pp=2, ZeRO-1) with {dtype} parameters and compute, fp32 masters, activation
    checkpointing on every block, against the fp32 single-process run (an independent
    reference: no 16-bit path of ours in it).

    Tolerance, from the format's unit roundoff u (2^-8 bf16, 2^-11 fp16): every weight and
    activation is rounded with a relative error of at most u, and the loss and the gradient
    norm are means and sums over thousands of such elements, whose errors mostly cancel; so
    over 10 steps their relative error stays below 2u — 7.8e-3 for bf16, 9.8e-4 for fp16.
    Measured on the development machine: bf16 1.1e-4 (losses) and 1.5e-3 (norms), fp16 1.1e-5
    and 1.4e-4. What it must catch moves them by far more: a gradient counted twice or a
    missing loss-scale division multiplies the norm by 2 or by the scale, a skipped dp
    reduction leaves each replica half the batch (another norm at every step)."""
    options = dict(tp=2, pp=2, zero_stage=1, param_dtype=dtype)
    outs = gang_of(8).execute(_fit_low_precision, pack, options)
    ref, _ = reference
    steps = sorted(ref.losses)
    rtol = 2 * UNIT_ROUNDOFF[dtype]
    exp_loss = torch.tensor([ref.losses[s] for s in steps], dtype=torch.float64)
    exp_norm = torch.tensor([ref.grad_norms[s] for s in steps], dtype=torch.float64)
    for out in outs:
        got_loss = torch.tensor([out["losses"][s] for s in steps], dtype=torch.float64)
        got_norm = torch.tensor([out["grad_norms"][s] for s in steps], dtype=torch.float64)
        torch.testing.assert_close(got_loss, exp_loss, rtol=rtol, atol=0.0)
        torch.testing.assert_close(got_norm, exp_norm, rtol=rtol, atol=0.0)
    assert exp_loss[-1] < exp_loss[0] - 0.3                       # it trains
    if dtype == "fp16":                       # no overflow in 10 steps: the scale never fell
        assert {out["scale"] for out in outs} == {CFG.loss_scale.init_scale}
