"""`bmray compress`: the tiny recipe end to end on a tiny LoRA run (merged, distilled, pruned,
quantized; a table, report.json and an artifact that loads back exactly), the teacher's
accuracy against the adapt run's own evaluation (the unmerged LoRA on the Trainer's path),
and bad input failing on the driver before any stage runs."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import yaml

from bmray.actors.train.adapt import run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.actors.train.builders import run_experiment
from bmray.actors.train.compress import (compress_config_from_dict, load_teacher,
                                         open_artifact, run_compress)
from bmray.actors.train.experiment import experiment_from_dict
from bmray.jobs import cli, compress
from bmray.models.compress.artifact import (ArtifactMismatch, architecture_of,
                                            load_compressed, read_manifest)
from bmray.models.compress.quant import QuantLinear
from bmray.models.objectives import objective_for
from bmray.models.typed_config import load_yaml
from tests.conftest import REPO

torch.set_num_threads(1)
ADAPT = os.path.join(REPO, "configs", "adapt_tiny.yaml")
TINY = os.path.join(REPO, "configs", "compress_tiny.yaml")


@pytest.fixture(scope="module")
def adapt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt")
    raw = load_yaml(ADAPT)
    raw.update(out_dir=str(out), scaling={"num_workers": 1})
    raw["train"].update(max_steps=4, eval_every=0)
    raw["task"].update(eval_limit=48)
    result = run_adapt(load_adapt_config(raw), out_dir=str(out))
    return str(out), result


def config(tmp_path, source, **changes):
    raw = load_yaml(TINY)
    raw.update(source=source, out_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def teacher_batch(raw):
    t = load_teacher(compress_config_from_dict(raw))
    return t.objective(t.sample(5), None)


def test_compress_job_end_to_end(adapt_run, tmp_path, capsys):
    source, adapted = adapt_run
    path, raw = config(tmp_path, source)
    assert cli.main(["compress", "--config", path, "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "3:quantize" in out and "reloaded exactly" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["rows"]
    assert [r["stage"] for r in rows] == ["teacher", "0:distill", "1:structured", "2:prune",
                                          "3:quantize"]
    # the teacher (LoRA merged) scores what the adapt run measured with the LoRA unmerged,
    # through the Trainer's strategy, on the same eval rows
    assert rows[0]["examples"] == adapted.metrics["examples"] == 48
    assert abs(rows[0]["accuracy"] - adapted.metrics["accuracy"]) <= 1 / 48
    assert rows[0]["loss"] == pytest.approx(adapted.metrics["loss"], rel=1e-4, abs=1e-5)
    for r in rows:
        assert set(r["latency_ms"]) == {"1", "32"} and all(v > 0 for v in r["latency_ms"].values())
        assert 0 <= r["accuracy"] <= 1
    # one of two blocks kept: the parameters drop by exactly one block's worth
    teacher = load_teacher(compress_config_from_dict(raw)).model
    block = sum(p.numel() for p in teacher.backbone.blocks[0].parameters())
    assert rows[0]["parameters"] - rows[1]["parameters"] == block
    rec = report["records"]
    assert rec[0]["record"]["student_layers"] == [1]
    assert rec[0]["record"]["train"]["steps"] == 4
    assert sum(rec[1]["record"]["sizes"]["ffn"].values()) == 64 - 16
    assert rec[2]["record"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    # int8 weights: 3 bytes saved per weight, 4 spent per output row's scale
    shapes = rec[3]["record"]["shapes"].values()
    assert rows[3]["bytes"] - rows[4]["bytes"] == sum(3 * o * i - 4 * o for o, i, _ in shapes)
    assert rows[4]["parameters"] == rows[3]["parameters"]
    # the artifact: loads onto the rebuilt teacher architecture and runs
    manifest = read_manifest(report["artifact"])
    assert manifest["architecture"] == architecture_of(teacher)
    assert [r["kind"] for r in manifest["recipe"]] == ["distill", "structured", "prune",
                                                        "quantize"]
    assert manifest["metrics"]["accuracy"] == rows[-1]["accuracy"]
    loaded = load_compressed(report["artifact"], lambda: teacher)
    assert len(loaded.backbone.blocks) == 1
    assert manifest["source"] == {"kind": "adapt", "path": source, "experiment": None}
    again = open_artifact(report["artifact"])            # the skeleton from the source
    probe = {k: v for k, v in teacher_batch(raw).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(again(**probe).logits, loaded(**probe).logits)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) >= 4
    # onto another architecture: refused, naming both
    other = load_teacher(compress_config_from_dict(raw)).model
    other.backbone.blocks = other.backbone.blocks[:1]
    with pytest.raises(ArtifactMismatch, match="made from SequenceClassifier"):
        load_compressed(report["artifact"], lambda: other)


@pytest.mark.parametrize("changes, match", [
    ({"recipe": [{"kind": "prune", "sparsity": 1.2}]},
     r"recipe\[0\]\.sparsity: must be a number in \[0, 1\)"),
    ({"recipe": [{"kind": "quantize", "bits": 3}]}, r"recipe\[0\]\.bits: 3 is not one of \[4, 8\]"),
    ({"recipe": [{"kind": "prune", "method": "wanda"}], "calibration": {"batches": 0}},
     r"recipe\[0\]: method wanda needs calibration data"),
    ({"recipe": [{"kind": "quantize", "bits": 4, "group_size": 24}]},
     r"recipe\[0\]\.group_size: 24 does not divide in_features 32"),
    ({"recipe": [{"kind": "prune", "method": "n:m", "n": 2, "m": 5}]},
     r"recipe\[0\]\.m: 5 does not divide"),
    ({"recipe": [{"kind": "distill", "student_layers": [5]}]},
     r"recipe\[0\]\.student_layers: 5 is not a layer index"),
    ({"recipe": [{"kind": "mystery"}]}, r"recipe\[0\]\.kind: 'mystery' is not one of"),
    ({"measure": {"batch_sizes": [0]}}, r"measure\.batch_sizes\[0\]: must be >= 1"),
    ({"calibraton": {}}, r"unknown top-level key\(s\) \['calibraton'\]"),
    ({"source": "/nonexistent/run"}, r"source: '/nonexistent/run' is not a directory"),
    ({"experiment": "configs/gpt-tiny.yaml"}, r"experiment: only with a pre-training"),
])
def test_bad_input_fails_on_the_driver(adapt_run, tmp_path, capsys, changes, match):
    source, _ = adapt_run
    path, _ = config(tmp_path, changes.pop("source", source), **changes)
    assert compress.main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "config error" in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()                        # nothing ran


def test_compress_a_pretrained_lm_reports_perplexity(tmp_path):
    raw = load_yaml(os.path.join(REPO, "configs", "gpt-tiny.yaml"))
    raw["data"].update(corpus=str(tmp_path / "world" / "documents.jsonl"),
                       pack_dir=str(tmp_path / "pack"))
    raw["train"].update(max_steps=6, eval_every=0, metrics_path=None, log_every=6)
    raw["train"]["echo"] = False
    raw["checkpoint"] = {"dir": str(tmp_path / "ckpt"), "every": 0, "resume": False}
    exp_path = tmp_path / "gpt.yaml"
    exp_path.write_text(yaml.safe_dump(raw))
    run_experiment(experiment_from_dict(load_yaml(str(exp_path))))
    recipe = [{"kind": "lowrank", "targets": ["up"], "rank": 32},
              {"kind": "share", "groups": [["blocks.0", "blocks.1"]], "recovery_steps": 2,
               "lr": 1.0e-3},
              {"kind": "quantize", "scheme": "int4", "group_size": 32, "skip": ["lm_head"]}]
    cfg = {"source": str(tmp_path / "ckpt"), "experiment": str(exp_path), "recipe": recipe,
           "calibration": {"batches": 0}, "measure": {"batch_sizes": [1, 4], "repeats": 2,
                                                      "eval_limit": 8},
           "train": {"batch_size": 8}, "out_dir": str(tmp_path / "out")}
    report = run_compress(compress_config_from_dict(cfg), echo=lambda s: None)
    rows = report["rows"]
    assert report["quality"] == "perplexity"
    assert [r["stage"] for r in rows] == ["teacher", "0:lowrank", "1:share", "2:quantize"]
    # perplexity = exp(mean loss), the teacher's against the checkpoint's model by hand
    teacher = load_teacher(compress_config_from_dict(cfg))
    objective = objective_for(teacher.model.config)
    with torch.no_grad():
        losses = [float(teacher.model(**objective(b, None)).loss)
                  for b in teacher.eval_batches()]
    assert rows[0]["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert all(r["perplexity"] > 1 for r in rows)
    up = 64 * 256 - 32 * (64 + 256)                    # per block: dense minus rank-32 factors
    assert rows[0]["parameters"] - rows[1]["parameters"] == 2 * up
    block = sum(p.numel() for p in teacher.model.blocks[0].parameters()) - up
    assert rows[1]["parameters"] - rows[2]["parameters"] == block   # one block's set shared
    assert report["records"][1]["record"]["recovery"]["steps"] == 2
    assert report["reload_exact"]
    loaded = load_compressed(report["artifact"], teacher.rebuild)
    shared = {id(p) for p in loaded.blocks[0].parameters()} & \
        {id(p) for p in loaded.blocks[1].parameters()}
    assert shared                                        # the sharing survives the round trip
    # a shared Linear is quantized once: both blocks hold the one QuantLinear
    assert isinstance(loaded.blocks[1].attn.q_proj, QuantLinear)
    assert loaded.blocks[0].attn.q_proj is loaded.blocks[1].attn.q_proj
    # bytes saved: each distinct layer once, fp32 weights → packed int4 + one scale per 32
    quant = {id(m): m for m in loaded.modules() if isinstance(m, QuantLinear)}.values()
    assert rows[2]["bytes"] - rows[3]["bytes"] == sum(
        4 * m.out_features * m.in_features - m.out_features * m.in_features // 2
        - 4 * m.out_features * m.in_features // 32 for m in quant)


@pytest.mark.parametrize("name", ["compress_tiny.yaml", "compress_minilm.yaml"])
def test_shipped_configs_are_valid(adapt_run, name):
    raw = load_yaml(os.path.join(REPO, "configs", name))
    cfg = compress_config_from_dict({**raw, "source": adapt_run[0]})
    assert cfg.recipe[-1].kind == "quantize" and cfg.measure.batch_sizes == (1, 32)
