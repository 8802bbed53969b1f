"""A compression recipe's training stages on a gang equal the single-process train function.

The tiny recipe's distill stage (configs/compress_tiny.yaml on a tiny LoRA run) trained by 2
workers under data parallelism, ZeRO-2 and ZeRO-3 (the frozen teacher sharded), against
``make_train_fn`` (the one Trainer in one process) on the same rows: per-step losses, per-step
pre-clip gradient norms and the final student weights within tests/equivalence.py's
tolerances (AdamW eps 1e-3); the teacher bit-identical afterwards. A magnitude-pruned model's
recovery fine-tune on the gang (its masks are torch parametrizations, which do not pickle)
equals one process and keeps every pruned weight at zero; so does a shared-layers recovery
(its tied parameters stay tied). ``bmray compress`` end to end with
``scaling.num_workers=2`` under ZeRO-3, and a strategy or gang it cannot run refused before
any compute.
"""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import yaml

from bmray.actors.train.adapt import run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.actors.train.compress import compress_config_from_dict, load_teacher, make_train_fn
from bmray.cluster.compress_gang import CompressGang
from bmray.jobs import cli, compress
from bmray.models.compress.prune import WeightMask
from bmray.models.compress.recipe import StageContext, apply_stage
from bmray.models.typed_config import ConfigError, apply_overrides, load_yaml
from tests.conftest import REPO
from tests.equivalence import EPS, assert_same_run

torch.set_num_threads(1)
ADAPT = os.path.join(REPO, "configs", "adapt_tiny.yaml")
TINY = os.path.join(REPO, "configs", "compress_tiny.yaml")
WORKERS = 2
# the hidden and attention terms are means over a batch's real tokens: a replica's mean over
# its rows, weighted by its row count, is one process's with one micro-batch per replica (and
# not its mean over the whole batch's tokens: rows differ in length). Weighted up: on the tiny
# model these terms are ~1e-5 and would hide in the tolerances.
LAYERS = [{"kind": "distill", "student_layers": [0], "steps": 4, "lr": 3e-3, "task_weight": 0.5,
           "kd_weight": 0.5, "hidden_weight": 1e4, "attention_weight": 1e5}]
PRUNE = [{"kind": "prune", "method": "magnitude", "sparsity": 0.5, "recovery_steps": 3,
          "lr": 1e-2}]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny LoRA run the recipe compresses (single process)."""
    out = tmp_path_factory.mktemp("adapt")
    raw = load_yaml(ADAPT)
    raw.update(out_dir=str(out), scaling={"num_workers": 1})
    raw["train"].update(max_steps=4, eval_every=0)
    raw["task"].update(eval_limit=32)
    run_adapt(load_adapt_config(raw), out_dir=str(out))
    return str(out)


def raw_config(source, out_dir, *overrides, recipe=None):
    raw = load_yaml(TINY)
    raw.update(source=source, out_dir=str(out_dir))
    if recipe is not None:
        raw["recipe"] = recipe
    return apply_overrides(raw, [f"train.eps={EPS}", "train.grad_clip=0.5", *overrides])


def run_stage(cfg, factory):
    """The recipe's first stage on the source's teacher with ``factory``'s train function;
    the model as the train function saw it (masks, DistillationModel), the stage's training
    summary, its output's state and the stage's input state before training."""
    teacher = load_teacher(cfg)
    model = copy.deepcopy(teacher.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inner = factory(teacher, cfg)
    seen = {}

    def train(module, steps, lr):
        seen["module"] = module
        seen["masks"] = {n: m.parametrizations.weight[0].mask.clone()
                         for n, m in module.named_modules()
                         if hasattr(m, "parametrizations")
                         and isinstance(m.parametrizations.weight[0], WeightMask)}
        return inner(module, steps, lr)

    out, record = apply_stage(model, cfg.recipe[0], StageContext(train=train))
    summary = record.get("train") or record.get("recovery")
    return {"summary": summary, "module": seen["module"], "masks": seen["masks"],
            "state": {k: v.clone() for k, v in out.state_dict().items()}, "before": before,
            "losses": dict(enumerate(summary["losses"], 1)),
            "grad_norms": dict(enumerate(summary["grad_norms"], 1))}


def as_run(out):
    return {"losses": out["losses"], "grad_norms": out["grad_norms"], "weights": out["state"]}


_REF: dict = {}


def reference(source, tmp_path_factory, key, *overrides, recipe=None):
    if key not in _REF:
        cfg = compress_config_from_dict(raw_config(source, tmp_path_factory.mktemp("ref"),
                                                   *overrides, recipe=recipe))
        _REF[key] = run_stage(cfg, make_train_fn)
    return _REF[key]


@pytest.mark.parametrize("strategy", [["strategy.kind=ddp"],
                                      ["strategy.kind=zero", "strategy.stage=2"],
                                      ["strategy.kind=zero", "strategy.stage=3"]],
                         ids=["ddp", "zero2", "zero3"])
def test_distill_stage_on_a_gang_equals_one_process(source, gangs, tmp_path_factory,
                                                    strategy):
    ref = reference(source, tmp_path_factory, "distill")
    steps = range(1, ref["summary"]["steps"] + 1)
    assert min(ref["grad_norms"].values()) > 0.5                  # clipping acts
    cfg = compress_config_from_dict(raw_config(
        source, tmp_path_factory.mktemp("gang"), f"scaling.num_workers={WORKERS}", *strategy))
    gang = CompressGang(cfg, group=gangs(WORKERS))
    out = run_stage(cfg, gang.make_train_fn)
    assert out["summary"]["workers"] == WORKERS
    assert out["summary"]["strategy"] == {"ddp": "ddp", "2": "zero", "3": "zero3"}[
        strategy[-1].split("=")[-1]]
    assert_same_run(as_run(out), ref["losses"], ref["grad_norms"], ref["state"], steps,
                    what=strategy[-1])
    # the student really trained; the teacher (the stage's input) is bit-identical
    assert not torch.allclose(out["state"]["head.weight"], out["before"]["head.weight"])
    teacher = out["module"].teacher.state_dict()
    assert teacher.keys() == out["before"].keys()
    assert all(torch.equal(teacher[k], v) for k, v in out["before"].items())


def test_token_mean_terms_average_per_replica(source, gangs, tmp_path_factory):
    ref = reference(source, tmp_path_factory, "layers", f"train.micro_batches={WORKERS}",
                    recipe=LAYERS)
    cfg = compress_config_from_dict(raw_config(
        source, tmp_path_factory.mktemp("layers"), f"scaling.num_workers={WORKERS}",
        "strategy.kind=ddp", recipe=LAYERS))
    out = run_stage(cfg, CompressGang(cfg, group=gangs(WORKERS)).make_train_fn)
    assert_same_run(as_run(out), ref["losses"], ref["grad_norms"], ref["state"], range(1, 5),
                    what="hidden + attention")


def test_pruned_recovery_on_a_gang_keeps_its_masks(source, gangs, tmp_path_factory):
    ref = reference(source, tmp_path_factory, "prune", recipe=PRUNE)
    cfg = compress_config_from_dict(raw_config(
        source, tmp_path_factory.mktemp("prune"), f"scaling.num_workers={WORKERS}",
        "strategy.kind=ddp", recipe=PRUNE))
    out = run_stage(cfg, CompressGang(cfg, group=gangs(WORKERS)).make_train_fn)
    assert_same_run(as_run(out), ref["losses"], ref["grad_norms"], ref["state"],
                    range(1, 4), what="prune recovery")
    assert out["masks"] and out["masks"].keys() == ref["masks"].keys()
    for name, mask in out["masks"].items():
        assert torch.equal(mask, ref["masks"][name])
        w, w0 = out["state"][f"{name}.weight"], out["before"][f"{name}.weight"]
        assert 0.45 < float((~mask).float().mean()) < 0.55
        assert torch.all(w[~mask] == 0), name                      # zeros stay zero
        assert not torch.allclose(w[mask], w0[mask]), name         # the rest trained


SHARE = [{"kind": "share", "groups": [["backbone.blocks.0", "backbone.blocks.1"]],
          "recovery_steps": 3, "lr": 1e-2}]


def test_shared_layers_recover_on_a_gang_as_in_one_process(source, gangs, tmp_path_factory):
    """Tied parameters (one block's weights under two names) cross the transport tied: two
    copies would each get a part of the gradient, and the run would differ."""
    ref = reference(source, tmp_path_factory, "share", recipe=SHARE)
    cfg = compress_config_from_dict(raw_config(
        source, tmp_path_factory.mktemp("share"), f"scaling.num_workers={WORKERS}",
        "strategy.kind=ddp", recipe=SHARE))
    out = run_stage(cfg, CompressGang(cfg, group=gangs(WORKERS)).make_train_fn)
    assert_same_run(as_run(out), ref["losses"], ref["grad_norms"], ref["state"], range(1, 4),
                    what="share")


def test_bmray_compress_on_a_zero3_gang(source, ray_session, tmp_path, capsys):
    raw = load_yaml(TINY)
    raw.update(source=source, out_dir=str(tmp_path / "out"))
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["compress", "--config", str(path), "--set", "scaling.num_workers=2",
                     "--set", "strategy.kind=zero", "--set", "strategy.stage=3"]) == 0
    out = capsys.readouterr().out
    assert "2 worker(s), strategy zero3" in out and "reloaded exactly" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rec = report["records"]
    assert [r["stage"]["kind"] for r in rec] == ["distill", "structured", "prune", "quantize"]
    for trained in (rec[0]["record"]["train"], rec[2]["record"]["recovery"]):
        assert trained["workers"] == 2 and trained["strategy"] == "zero3"
        assert all(torch.isfinite(torch.tensor(trained["losses"])))
    assert rec[2]["record"]["sparsity"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("overrides, match", [
    (["scaling.num_workers=2", "strategy.kind=mesh", "strategy.tp=2"],
     r"strategy\.kind: a compression stage trains on single, ddp or zero"),
    (["scaling.num_workers=2", "strategy.kind=param_server"], r"strategy\.kind: .*param_server"),
    (["scaling.num_workers=2", "strategy.kind=single"], r"strategy\.kind: 'single' runs one"),
    (["scaling.num_workers=3"], r"train\.batch_size: 8 does not split over scaling\.num_workers"),
    (["scaling.num_workers=2", "train.micro_batches=8"], r"train\.micro_batches: 8, but each"),
    (["strategy.kind=zero", "strategy.stage=4"], r"strategy\.stage"),
    (["scaling.num_workrs=2"], r"scaling: unknown key\(s\) \['num_workrs'\]"),
])
def test_a_gang_it_cannot_run_fails_before_any_compute(source, tmp_path, capsys, overrides,
                                                       match):
    raw = load_yaml(TINY)
    raw.update(source=source, out_dir=str(tmp_path / "out"))
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["--config", str(path)]
    for o in overrides:
        args += ["--set", o]
    assert compress.main(args) == 2
    err = capsys.readouterr().err
    assert "config error" in err and re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_a_pretraining_source_trains_in_one_process(tmp_path):
    raw = {"source": str(tmp_path), "experiment": "configs/gpt-tiny.yaml",
           "recipe": [{"kind": "lowrank", "targets": ["up"], "rank": 4}],
           "scaling": {"num_workers": 2}}
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: 2, but a gang shards an "
                                          r"adapt run's task rows"):
        compress_config_from_dict(raw)
    compress_config_from_dict({**raw, "scaling": {"num_workers": 1}})
