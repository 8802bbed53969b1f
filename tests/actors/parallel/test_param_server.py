"""Parameter-server data parallelism against references: single-worker training (the same
loop with SingleProcess), all-reduce DP (actors/data_parallel.py) and the SSP bound of Ho et
al. 2013; plus the LPT partition bound and zero-copy transfer through Ray's object store."""
from __future__ import annotations

import math
import time
from unittest import mock

import numpy as np
import pytest
import ray
import torch

from bmray.actors.parallel.data_parallel import DataParallel
from bmray.actors.parallel.param_server import ParameterServer, ParamServerConfig, partition
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.cluster.gang import ScalingConfig, WorkerGroup, worker_context
from bmray.cluster.param_server import reset_shards, start_shards, stop_shards
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream, pack_corpus, read_documents
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model
from bmray.models.tokenizer import train_bpe
from bmray.models.world import WorldConfig, write_world

from tests.equivalence import EPS, NORM_TOL

torch.set_num_threads(1)
BLOCK, BATCH, STEPS = 17, 8, 12


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """(pack path, vocab size): synthetic-world documents, a real BPE and a packed corpus."""
    root = tmp_path_factory.mktemp("ps")
    write_world(WorldConfig(seed=3, n_entities=20, docs_per_entity=1), str(root / "world"),
                parts=("documents",))
    texts = list(read_documents(str(root / "world" / "documents.jsonl")))
    tok = train_bpe(texts, vocab_size=300, family="gpt")
    pack_corpus(texts, tok, block_len=BLOCK, out_path=str(root / "pack"), row_group_size=16,
                source="world")
    return str(root / "pack"), tok.vocab_size


def model_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(family="gpt", vocab_size=vocab, d_model=32, n_heads=2, n_layers=1,
                       d_ff=64, max_seq_len=32, dropout=0.0)


def train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=STEPS, micro_batches=2, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                eps=EPS, grad_clip=0.5, device="cpu", echo=False)     # eps: tests/equivalence.py
    return TrainConfig(**{**base, **kw})


class _Slow:
    """A data stream that sleeps before each batch: an artificially slow worker."""

    def __init__(self, stream, delay_s: float):
        self.stream, self.delay_s = stream, delay_s

    def __iter__(self):
        for blocks in self.stream:
            time.sleep(self.delay_s)
            yield blocks


def _state(strategy) -> dict:
    sd = strategy.state_dict()
    names = [n for n, p in strategy.module.named_parameters()]
    optim = sd["optimizer"]["state"]
    order = [i for g in sd["optimizer"]["param_groups"] for i in g["params"]]
    params = [id(p) for g in strategy.optimizer.param_groups for p in g["params"]]
    by_param = dict(zip(params, order))
    moments = {n: (optim[by_param[id(p)]]["exp_avg"].numpy().copy(),
                   optim[by_param[id(p)]]["exp_avg_sq"].numpy().copy())
               for n, p in strategy.module.named_parameters()}
    return {"weights": {n: sd["model"][n].numpy().copy() for n in names}, "moments": moments}


def _run(pack, kind, cfg_kw, shards=None, ps=None, seed=0, ckpt_dir=None, restore=None,
         slow_rank=None, delay_s=0.0, batch=BATCH):
    """Runs inside every gang worker: the same loop as single-worker training, on this rank's
    slice of each global batch, with the parameter server ("ps") or all-reduce DP ("dp")."""
    ctx = worker_context()
    path, vocab = pack
    seed_everything(seed)
    model = build_model(model_cfg(vocab))
    data = BlockStream(path, BLOCK, batch, rank=ctx.rank, world_size=ctx.world_size, seed=seed)
    if ctx.rank == slow_rank:
        data = _Slow(data, delay_s)
    strategy = ParameterServer(shards, ps) if kind == "ps" else DataParallel()
    ckpt = CheckpointConfig(dir=ckpt_dir, every=6, keep_last=0) if ckpt_dir else None
    with mock.patch.object(ray, "put", wraps=ray.put) as put:
        trainer = Trainer(model, CausalLM(), data, train_cfg(**cfg_kw), strategy=strategy,
                          checkpoint=ckpt, seed=seed)
        puts_at_setup = put.call_count
        if restore:
            trainer.restore(restore)
        result = trainer.fit()
        puts = put.call_count - puts_at_setup
    out = {"rank": ctx.rank, "losses": result.losses, "grad_norms": result.grad_norms,
           "puts": puts, "steps": len(result.losses)}
    if ctx.rank == 0:
        out["state"] = _state(strategy)
    if kind == "ps":
        # zero-copy: every parameter is a view of a read-only array mapped from the object store
        views = []
        for lay, bufs in zip(strategy.layouts, strategy._snapshots):
            for s in lay.slots:
                arr, p = bufs[s.group], strategy.params[s.index].detach()
                views.append(not arr.flags.writeable and np.shares_memory(arr, p.numpy())
                             and p.data_ptr() == arr.ctypes.data + 4 * s.offset)
        out["zero_copy_params"] = all(views) and len(views) == len(strategy.params)
        out["staleness_log"] = strategy.staleness_log
    return out


def single_worker(pack, **cfg_kw):
    """Single-worker training with the same loop and data: the reference of every strategy."""
    seed_everything(0)
    trainer = Trainer(build_model(model_cfg(pack[1])), CausalLM(),
                      BlockStream(pack[0], BLOCK, BATCH, seed=0), train_cfg(**cfg_kw), seed=0)
    result = trainer.fit()
    return result, _state(trainer.strategy)


@pytest.fixture(scope="module")
def reference(pack):
    return single_worker(pack)


def _close_states(got, ref, atol):
    for name, w in ref["weights"].items():
        np.testing.assert_allclose(got["weights"][name], w, rtol=0, atol=atol, err_msg=name)
        for a, b in zip(got["moments"][name], ref["moments"][name]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol * 1e-2, err_msg=name)


# ------------------------------------------------------------------------------ partition
def test_partition_is_lpt_balanced_and_complete(pack):
    model = build_model(model_cfg(pack[1]))
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    largest = max(math.prod(s) for _, s in named)
    for k in (1, 2, 3, 5):
        layouts = partition(named, k)
        loads = [lay.numel for lay in layouts]
        assert max(loads) - min(loads) <= largest, (k, loads)
        slots = sorted((s for lay in layouts for s in lay.slots), key=lambda s: s.index)
        assert [(s.name, s.shape) for s in slots] == named          # each parameter exactly once
        for lay in layouts:                                         # contiguous flat buffers
            for g in (0, 1):
                mine = [s for s in lay.slots if s.group == g]
                starts = np.cumsum([0] + [s.numel for s in mine])[:-1]
                assert [s.offset for s in mine] == list(starts)
                assert sum(s.numel for s in mine) == lay.sizes[g]
                assert all((len(s.shape) >= 2) == (g == 0) for s in mine)   # build_adamw groups
    # a small instance with a perfect split, which LPT finds (7+3+2 = 5+4+3)
    sizes = [("a", (7,)), ("b", (5,)), ("c", (4,)), ("d", (3,)), ("e", (3,)), ("f", (2,))]
    loads = sorted(lay.numel for lay in partition(sizes, 2))
    assert loads == [12, 12]


@pytest.fixture(scope="module")
def gang(ray_session):
    """One 2-worker gang and K=2 shard actors for every run of this module (processes start
    once; ``reset_shards`` readies the shards for each run)."""
    shards = start_shards(ParamServerConfig(num_shards=2), train_cfg(), world_size=2)
    try:                    # the shard processes start while the gang is placed
        with WorkerGroup(ScalingConfig(num_workers=2)) as group:
            yield group, shards
    finally:
        stop_shards(shards)


def _run_ps(gang, pack, ps, cfg_kw=None, **kw):
    """One parameter-server run on the gang (shards reset first); (per-rank outs, shard stats)."""
    group, shards = gang
    reset_shards(shards, ps, train_cfg(**(cfg_kw or {})), world_size=2)
    out = group.execute(_run, pack, "ps", cfg_kw or {}, shards, ps, **kw)
    return out, ray.get([s.stats.remote() for s in shards])


# ------------------------------------------------------------------------------ sync mode
def test_sync_ps_matches_single_worker_and_dp_and_resumes(gang, pack, reference, tmp_path):
    ref, ref_state = reference
    ref_losses = ref.losses
    assert min(ref.grad_norms.values()) > train_cfg().grad_clip       # clipped at every step
    ps = ParamServerConfig(num_shards=2, mode="sync")
    out, stats = _run_ps(gang, pack, ps, ckpt_dir=str(tmp_path / "ck"))
    dp = gang[0].execute(_run, pack, "dp", {})
    resumed, _ = _run_ps(gang, pack, ps, restore=str(tmp_path / "ck" / "step_00000006"))

    for o in out:
        assert sorted(o["losses"]) == list(range(1, STEPS + 1))
        got = [o["losses"][s] for s in range(1, STEPS + 1)]
        np.testing.assert_allclose(got, [ref_losses[s] for s in range(1, STEPS + 1)],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, [dp[0]["losses"][s] for s in range(1, STEPS + 1)],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([o["grad_norms"][s] for s in range(1, STEPS + 1)],
                                   [ref.grad_norms[s] for s in range(1, STEPS + 1)],
                                   **NORM_TOL, err_msg="pre-clip gradient norms")
        assert o["zero_copy_params"]
        assert o["puts"] == STEPS                      # one ray.put of the gradients per step
    _close_states(out[0]["state"], ref_state, atol=2e-5)
    _close_states(dp[0]["state"], ref_state, atol=2e-5)
    assert all(s["version"] == STEPS and s["pushes"] == [STEPS, STEPS] for s in stats)
    assert all(s["zero_copy_grads"] for s in stats)
    assert abs(stats[0]["numel"] - stats[1]["numel"]) <= max(
        v.size for v in ref_state["weights"].values())

    # resumed from the PS checkpoint of step 6 (reset shards): the same steps 7..12
    for o in resumed:
        assert sorted(o["losses"]) == list(range(7, STEPS + 1))
        for s in range(7, STEPS + 1):
            assert o["losses"][s] == pytest.approx(out[0]["losses"][s], abs=1e-6)
    _close_states(resumed[0]["state"], out[0]["state"], atol=1e-6)

    # the PS checkpoint is in the single-process format: SingleProcess continues it exactly
    seed_everything(123)
    single = Trainer(build_model(model_cfg(pack[1])), CausalLM(),
                     BlockStream(pack[0], BLOCK, BATCH, seed=0), train_cfg(), seed=0)
    single.restore(str(tmp_path / "ck" / "step_00000006"))
    cont = single.fit()
    for s in range(7, STEPS + 1):
        assert cont.losses[s] == pytest.approx(ref_losses[s], rel=1e-5, abs=1e-5)


def test_sync_ps_without_clipping_matches_single_worker(gang, pack):
    """The shards' summed gradient unclipped: per-step losses, pre-clip norms and weights."""
    ref, ref_state = single_worker(pack, grad_clip=0.0)
    out, _ = _run_ps(gang, pack, ParamServerConfig(num_shards=2, mode="sync"),
                     dict(grad_clip=0.0))
    steps = range(1, STEPS + 1)
    for o in out:
        for key in ("losses", "grad_norms"):
            np.testing.assert_allclose([o[key][s] for s in steps],
                                       [getattr(ref, key)[s] for s in steps], **NORM_TOL,
                                       err_msg=key)
    _close_states(out[0]["state"], ref_state, atol=2e-5)


# ------------------------------------------------------------------------------ async mode
def test_async_ssp_converges_and_never_exceeds_the_staleness_bound(gang, pack):
    steps, bound = 24, 1
    ps = ParamServerConfig(num_shards=2, mode="async", staleness=bound)
    # not an equivalence test: AdamW's usual eps, so 24 steps visibly learn
    cfg_kw = dict(max_steps=steps, lr=2e-3, warmup_steps=2, micro_batches=1, eps=1e-8)
    out, stats = _run_ps(gang, pack, ps, cfg_kw, slow_rank=1, delay_s=0.1)

    # The bound, checked from what each worker saw (not from the shard's own bookkeeping):
    # every push moves every shard's version by one, so a worker at clock c that pulls
    # version v — after its own c-th push was applied as version a ≤ v (read-my-writes) — saw
    # v - c pushes of the other worker; SSP (Ho et al. 2013) promises at least c - s. And a gradient computed on version v and
    # applied as version a waited for a - 1 - v other updates: at most (N-1)(2s+1).
    n = 2
    at_bound = {}
    for o in out:
        log = o["staleness_log"]
        assert [e["clock"] for e in log] == list(range(steps + 1))       # one pull per step
        for prev, e in zip(log, log[1:]):
            c = e["clock"]
            for pulled, applied, before in zip(e["pulled"], e["applied"], prev["pulled"]):
                assert pulled >= applied, (o["rank"], e)                 # read-my-writes
                assert pulled - c >= (n - 1) * (c - bound), (o["rank"], e)
                assert 0 <= applied - 1 - before <= (n - 1) * (2 * bound + 1), (o["rank"], e)
        at_bound[o["rank"]] = sum(e["pulled"][0] - e["clock"] == e["clock"] - bound
                                  for e in log[1:])
    # the slow rank 1 held rank 0 back: rank 0 pulled at the bound most steps
    assert at_bound[0] > steps // 2, at_bound
    for o in out:
        losses = [o["losses"][s] for s in range(1, steps + 1)]
        first, last = np.mean(losses[:5]), np.mean(losses[-5:])
        assert last < first - 1.0, (o["rank"], first, last)        # it learns the corpus
        assert o["zero_copy_params"] and o["puts"] == steps
    for st in stats:
        assert st["pushes"] == [steps] * 2 and st["version"] == 2 * steps   # each push applied
        assert st["zero_copy_grads"]
        # rank 0 blocked in pull, rank 1 (nearly) never did
        assert st["waits"][0] > steps // 2 and st["waits"][1] <= 2, st["waits"]


def test_config_errors_name_the_key():
    from bmray.models.typed_config import ConfigError
    with pytest.raises(ConfigError, match="strategy.mode"):
        ParamServerConfig(mode="hogwild")
    with pytest.raises(ConfigError, match="strategy.staleness"):
        ParamServerConfig(staleness=-1)
    with pytest.raises(ConfigError, match="strategy.num_shards"):
        ParameterServer([object()], ParamServerConfig(num_shards=2))
