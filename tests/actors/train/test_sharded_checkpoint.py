"""Sharded ZeRO checkpoints (strategy.sharded_checkpoint, actors/train/sharded_state.py): every rank
writes only its own shard, and the checkpoint loads at another world size and stage (and in a
single process) and continues the run exactly (losses rtol 1e-5 / atol 1e-6, as
tests/actors/parallel/test_zero.py)."""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.sharded_state import consolidate_sharded, is_sharded_state
from bmray.actors.parallel.zero.stage12 import Zero, ZeroConfig
from bmray.actors.parallel.zero.stage3 import Zero3, Zero3Config
from bmray.models.typed_config import ConfigError

from tests.actors.parallel.test_zero import CFG, ZCFG, assert_matches, make_trainer, reference, weights
from tests.actors.parallel.test_zero3 import on, resume_zero3
from tests.tiny_corpus import build_pack

torch.set_num_threads(1)
STEPS = list(range(11, 21))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("sharded_pack"), eval_blocks=14)


def _save(group, rank, pack, root, kind):
    world = dist.get_world_size(group)
    strategy = (Zero(stage=2, sharded_checkpoint=True, group=group, **ZCFG) if kind == "zero2"
                else Zero3(sharded_checkpoint=True, group=group))
    trainer = make_trainer(pack, CFG, strategy, rank, world)
    trainer.fit(until=10)
    return {"path": trainer.save(root)}


def _rank_states(path):
    manifest = ckpt.read_manifest(path)
    out = []
    for name in manifest["files"]:
        with open(os.path.join(path, name), "rb") as fh:
            out.append(torch.load(io.BytesIO(fh.read()), weights_only=True))
    return manifest, out


def test_config_is_validated_and_default_unchanged():
    assert ZeroConfig().sharded_checkpoint is False and Zero3Config().sharded_checkpoint is False
    assert Zero().replicated and Zero3().replicated
    with pytest.raises(ConfigError, match="sharded_checkpoint"):
        ZeroConfig(sharded_checkpoint="yes")
    with pytest.raises(ConfigError, match="sharded_checkpoint"):
        Zero3Config(sharded_checkpoint=1)
    assert not Zero(sharded_checkpoint=True).replicated
    assert not Zero3(sharded_checkpoint=True).replicated


def test_zero2_sharded_resumes_at_zero3_and_single_process(pack, gang, tmp_path):
    """ZeRO-2 on 2 workers writes 2 rank files, each with ~1/2 of the optimizer state; the
    checkpoint resumes at ZeRO-3 on 4 workers and in a single process exactly."""
    ref, ref_result = reference(pack)
    path = on(gang, 2, _save, pack, str(tmp_path / "ck"), "zero2")[0]["path"]
    manifest, states = _rank_states(path)
    assert manifest["sharded_state"] and manifest["files"] == ["rank_00000.pt", "rank_00001.pt"]
    single = make_trainer(pack, CFG)
    psi = sum(p.numel() for p in single.strategy.module.parameters() if p.requires_grad)
    trainable = {n for n, p in single.strategy.module.named_parameters(remove_duplicate=False)
                 if p.requires_grad}
    for r, st in enumerate(states):
        assert is_sharded_state(st) and st["sharded"]["shard_rank"] == r
        n = sum(u[k].numel() for u in st["sharded"]["units"]
                for k in ("master", "exp_avg", "exp_avg_sq"))
        assert abs(n - 3 * psi / 2) <= 0.05 * 3 * psi, (n, psi)    # ≈ 1/N, never the full
        assert "embed.pos.weight" in st["model"]                   # frozen: not sharded
        assert not trainable & set(st["model"])                    # trainable: only shards
    _, full = consolidate_sharded(path)
    assert set(full["model"]) == set(single.strategy.module.state_dict())
    single.restore(path)
    result = single.fit()
    assert_matches({"losses": result.losses, "grad_norms": result.grad_norms,
                    "weights": weights(single)}, ref, ref_result, STEPS)
    for out in on(gang, 4, resume_zero3, pack, path):
        assert_matches(out, ref, ref_result, STEPS)


def test_zero3_sharded_resumes_at_zero1_one_process_and_a_damaged_shard_is_named(pack, gang, tmp_path):
    ref, ref_result = reference(pack)
    path = on(gang, 2, _save, pack, str(tmp_path / "ck3"), "zero3")[0]["path"]
    _, states = _rank_states(path)
    assert len(states) == 2 and all(is_sharded_state(s) for s in states)
    # the frozen positional embedding is sharded too (shard_frozen): half of it in each file
    for st in states:
        assert "embed.pos.weight" not in st["model"]
        [frozen] = st["sharded"]["frozen_units"]
        assert frozen["values"].numel() == 32 * 32 // 2
        assert [e["names"] for e in frozen["params"]] == [["embed.pos.weight"]]
    _, full = consolidate_sharded(path)
    assert torch.equal(full["model"]["embed.pos.weight"],
                       reference(pack)[0].strategy.module.embed.pos.weight)   # unchanged
    trainer = make_trainer(pack, CFG, Zero(stage=1, **ZCFG))
    trainer.restore(path)
    result = trainer.fit()
    assert_matches({"losses": result.losses, "grad_norms": result.grad_norms,
                    "weights": weights(trainer)}, ref, ref_result, STEPS)
    # one shard file truncated, then lost: the error names it, before the model is touched
    shard = os.path.join(path, "rank_00001.pt")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    fresh = make_trainer(pack, CFG)
    with pytest.raises(ckpt.CorruptCheckpointError,
                       match=r"rank_00001.pt'? is truncated or damaged: \d+ bytes, the manifest "
                             r"recorded \d+"):
        fresh.restore(path)
    os.remove(shard)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"rank_00001.pt'? is missing"):
        fresh.restore(path)
    assert fresh.step == 0
