"""Checkpoints: atomic save, ``latest``, retention, shape errors, missing paths, averaging —
checked against directly computed references (state dicts, elementwise means)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch import nn

from bmray.actors.train import checkpoints as ck
from bmray.actors.train.checkpoints import (CheckpointError, average_checkpoints, check_compatible,
                               latest_checkpoint, list_checkpoints, load_checkpoint,
                               save_checkpoint)
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model

from tests.tiny_corpus import BLOCK, build_pack

torch.set_num_threads(1)


def linear_state(value: float) -> dict:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.copy_(torch.arange(2.0) * value)
    return {"model": layer.state_dict(), "step_count": torch.tensor(int(value))}


def steps(paths):
    return [int(p.rsplit("step_", 1)[1]) for p in paths]


def test_save_load_roundtrip_latest_and_manifest(tmp_path):
    root = str(tmp_path / "ck")
    state = linear_state(1.5)
    path = save_checkpoint(root, 7, state, manifest={"model_config": {"d_model": 3}})
    assert path == f"{root}/step_00000007"
    assert latest_checkpoint(root) == path
    assert (tmp_path / "ck" / "latest").read_text() == "step_00000007"
    manifest, loaded = load_checkpoint(root)           # a root resolves through ``latest``
    assert manifest["step"] == 7 and manifest["model_config"] == {"d_model": 3}
    assert json.loads((tmp_path / "ck" / "step_00000007" / "manifest.json").read_text())["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)


def test_pyarrow_uri_works_like_a_path(tmp_path):
    root = f"file://{tmp_path}/uri_ck"
    path = save_checkpoint(root, 1, linear_state(2.0))
    assert path.startswith("file://") and latest_checkpoint(root) == path
    _, loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], torch.full((2, 3), 2.0))


def test_retention_keeps_the_last_n(tmp_path):
    root = str(tmp_path / "ck")
    for s in range(1, 6):
        save_checkpoint(root, s, linear_state(float(s)), keep_last=2)
    assert steps(list_checkpoints(root)) == [4, 5]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == \
        ["latest", "step_00000004", "step_00000005"]
    assert latest_checkpoint(root).endswith("step_00000005")


def test_a_crash_mid_save_loses_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    good = save_checkpoint(root, 1, linear_state(1.0))
    real_write = ck._write_bytes

    def crash_on_manifest(fs, path, data):
        if path.endswith(ck.MANIFEST):
            raise OSError("disk full")
        real_write(fs, path, data)

    monkeypatch.setattr(ck, "_write_bytes", crash_on_manifest)
    with pytest.raises(OSError):
        save_checkpoint(root, 2, linear_state(2.0))
    monkeypatch.setattr(ck, "_write_bytes", real_write)
    assert latest_checkpoint(root) == good
    assert steps(list_checkpoints(root)) == [1]        # the half-written one is invisible
    _, loaded = load_checkpoint(root)
    assert torch.equal(loaded["model"]["weight"], torch.full((2, 3), 1.0))
    # the next save of that step cleans up and succeeds
    assert save_checkpoint(root, 2, linear_state(2.0)).endswith("step_00000002")
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ck").iterdir())


def test_latest_falls_back_when_the_pointer_is_stale(tmp_path):
    root = str(tmp_path / "ck")
    save_checkpoint(root, 3, linear_state(3.0))
    (tmp_path / "ck" / "latest").write_text("step_00000099")
    assert latest_checkpoint(root).endswith("step_00000003")


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "step_00000001")
    with pytest.raises(CheckpointError, match="checkpoint not found.*nowhere"):
        load_checkpoint(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        load_checkpoint(str(tmp_path / "empty"))


def test_average_equals_the_elementwise_mean(tmp_path):
    root = str(tmp_path / "ck")
    states = [linear_state(v) for v in (1.0, 2.0, 4.0, 8.0)]
    torch.manual_seed(0)
    for s, state in enumerate(states, 1):
        state["model"]["weight"] += torch.randn(2, 3)   # not a trivial constant
        save_checkpoint(root, s, state)
    paths = list_checkpoints(root)[-3:]
    avg = average_checkpoints(paths)
    for name in ("weight", "bias"):
        expected = torch.stack([st["model"][name] for st in states[-3:]]).mean(0)
        torch.testing.assert_close(avg[name], expected, rtol=0, atol=1e-6)


def tiny_trainer(tmp_path, d_model: int, **ckpt) -> Trainer:
    seed_everything(0)
    mc = ModelConfig(family="gpt", vocab_size=40, d_model=d_model, n_heads=2, n_layers=1,
                     d_ff=32, max_seq_len=16, dropout=0.0)
    data = iter(torch.randint(3, 40, (6, 9), generator=torch.Generator().manual_seed(s))
                for s in range(1000))
    return Trainer(build_model(mc), CausalLM(), data,
                   TrainConfig(max_steps=6, warmup_steps=1, device="cpu"),
                   checkpoint=CheckpointConfig(dir=str(tmp_path / "ck"), **ckpt), model_config=mc)


def test_checkpoint_of_another_shape_names_parameter_and_shapes(tmp_path):
    small = tiny_trainer(tmp_path, d_model=16, every=2)
    small.fit(until=2)
    big = tiny_trainer(tmp_path, d_model=24)
    # the manifest's model config is checked first: it names the field and both values
    with pytest.raises(CheckpointError, match=r"manifest.json'? is of another model: "
                       r"model_config.d_model is 16 in the checkpoint but 24"):
        big.fit()                                            # resume from ``latest``
    assert big.step == 0
    # without a model config in the manifest (a hand-made checkpoint), the shapes are checked
    manifest = tmp_path / "ck" / "step_00000002" / "manifest.json"
    info = json.loads(manifest.read_text())
    del info["model_config"]
    manifest.write_text(json.dumps(info))
    a, b = small.strategy.module.state_dict(), big.strategy.module.state_dict()
    name = next(n for n in b if a[n].shape != b[n].shape)   # the first mismatch, found directly
    with pytest.raises(CheckpointError) as err:
        big.fit()
    msg = str(err.value)
    assert repr(name) in msg
    assert str(tuple(a[name].shape)) in msg and str(tuple(b[name].shape)) in msg


def test_check_compatible_names_missing_and_extra_keys():
    model = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="'bias'.*missing"):
        check_compatible(model, {"weight": torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match="'extra'.*not in the model"):
        check_compatible(model, {**model.state_dict(), "extra": torch.zeros(1)})


def test_trainer_retention_and_average_last_option(tmp_path):
    trainer = tiny_trainer(tmp_path, d_model=16, every=2, keep_last=2, average_last=2)
    result = trainer.fit()
    kept = list_checkpoints(str(tmp_path / "ck"))
    assert steps(kept) == [4, 6]
    assert result.checkpoint == kept[-1]
    assert result.averaged_checkpoint == str(tmp_path / "ck" / "averaged")
    _, averaged = load_checkpoint(result.averaged_checkpoint)
    models = [load_checkpoint(p)[1]["model"] for p in kept]
    for name, tensor in averaged["model"].items():
        expected = (models[0][name].double() + models[1][name].double()) / 2
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=1e-6)
    # the weights after the last step are those of the last checkpoint
    for name, tensor in trainer.strategy.module.state_dict().items():
        assert torch.equal(tensor, models[1][name])


# ---------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_pack(tmp_path_factory.mktemp("ck_pack"), eval_blocks=4)


def stream_trainer(pack, root, n_heads: int = 2, **ckpt) -> Trainer:
    """A trainer on a real BlockStream (its position is checkpointed, so a resumed run can
    match an uninterrupted one exactly, as in tests/actors/train/test_trainer.py)."""
    path, vocab = pack
    seed_everything(0)
    mc = ModelConfig(family="gpt", vocab_size=vocab, d_model=16, n_heads=n_heads, n_layers=1,
                     d_ff=32, max_seq_len=32, dropout=0.0)
    return Trainer(build_model(mc), CausalLM(), BlockStream(path, BLOCK, 4, seed=0),
                   TrainConfig(max_steps=6, warmup_steps=1, device="cpu"),
                   checkpoint=CheckpointConfig(dir=root, keep_last=0, **ckpt) if root else None,
                   model_config=mc)


def damage(path, how: str) -> str:
    """Damage ``path``/rank_00000.pt (or the manifest); return what the error must say."""
    state = path / "rank_00000.pt"
    if how == "truncate":                     # a crash or a full disk while copying
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        return r"rank_00000.pt'? is truncated or damaged: \d+ bytes, the manifest recorded \d+"
    if how == "delete":
        state.unlink()
        return r"rank_00000.pt'? is missing"
    if how == "garbage":                      # same size, unreadable content
        state.write_bytes(b"\0" * state.stat().st_size)
        return r"rank_00000.pt'? cannot be read \(truncated or corrupt, \d+ bytes\): " \
               r"torch.load raised"
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    return r"manifest.json'? is not valid JSON"


@pytest.mark.parametrize("how", ["truncate", "delete", "garbage", "manifest"])
def test_a_damaged_checkpoint_is_named_and_resume_uses_the_previous_one(pack, tmp_path, how):
    reference = stream_trainer(pack, None).fit()             # uninterrupted, no checkpoints
    root = str(tmp_path / "ck")
    stream_trainer(pack, root, every=2).fit(until=4)          # good checkpoints at 2 and 4
    expected = damage(tmp_path / "ck" / "step_00000004", how)
    # loading the damaged one by name: a clear error, and nothing was touched
    fresh = stream_trainer(pack, root, every=2)
    before = {k: v.clone() for k, v in fresh.strategy.module.state_dict().items()}
    with pytest.raises(ck.CorruptCheckpointError, match=expected):
        fresh.restore(f"{root}/step_00000004")
    assert fresh.step == 0
    for k, v in fresh.strategy.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    # resuming skips it for step 2 and continues exactly as the uninterrupted run
    result = fresh.fit()
    assert result.resumed_from == f"{root}/step_00000002"
    resume_rows = [r for r in result.rows if r["split"] == "resume"]
    assert [r["step"] for r in resume_rows] == [2]
    assert len(resume_rows[0]["skipped"]) == 1
    assert re.search(expected, resume_rows[0]["skipped"][0])
    assert sorted(result.losses) == [3, 4, 5, 6]
    for step, loss in result.losses.items():
        assert loss == reference.losses[step], step


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(pack, tmp_path):
    root = str(tmp_path / "ck")
    stream_trainer(pack, root, every=2).fit(until=4)
    for step in (2, 4):
        damage(tmp_path / "ck" / f"step_{step:08d}", "truncate")
    trainer = stream_trainer(pack, root, every=2)
    with pytest.raises(CheckpointError, match="no usable checkpoint under .*step_00000004.*"
                                              "truncated.*step_00000002.*truncated"):
        trainer.fit()
    assert trainer.step == 0


def test_a_manifest_of_another_model_is_an_error_before_any_step(pack, tmp_path):
    """The other model has n_heads 4 instead of 2: every parameter shape agrees, so only the
    manifest's model config can tell (a shape check alone would load it silently)."""
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    stream_trainer(pack, ours, every=2).fit(until=2)
    stream_trainer(pack, theirs, n_heads=4, every=2).fit(until=2)
    shutil.copy(f"{theirs}/step_00000002/manifest.json", f"{ours}/step_00000002/manifest.json")
    trainer = stream_trainer(pack, ours, every=2)
    with pytest.raises(CheckpointError, match=r"ours/step_00000002/manifest.json'? is of another "
                       r"model: model_config.n_heads is 4 in the checkpoint but 2"):
        trainer.fit()                    # not skipped as damage: resuming it would be wrong
    assert trainer.step == 0 and not trainer.metrics.rows


def test_a_manifest_of_another_step_is_named(pack, tmp_path):
    root = str(tmp_path / "ck")
    stream_trainer(pack, root, every=2).fit(until=4)
    shutil.copy(f"{root}/step_00000002/manifest.json", f"{root}/step_00000004/manifest.json")
    with pytest.raises(ck.CorruptCheckpointError, match=r"rank_00000.pt'? holds step 4 but "
                       r".*step_00000004/manifest.json'? says step 2"):
        stream_trainer(pack, root).restore(f"{root}/step_00000004")


def test_a_commit_with_a_missing_rank_file_is_refused(tmp_path):
    """A rank that died during a sharded save leaves its file unwritten: the checkpoint is
    never committed, and ``latest`` still names the previous one."""
    root = str(tmp_path / "ck")
    good = save_checkpoint(root, 1, linear_state(1.0))
    ck.begin_checkpoint(root, 2)
    ck.write_rank_state(root, 2, linear_state(2.0), rank=0)
    with pytest.raises(CheckpointError, match="step 2 .*rank_00001.pt was not written"):
        ck.commit_checkpoint(root, 2, world_size=2)
    assert latest_checkpoint(root) == good and steps(list_checkpoints(root)) == [1]
