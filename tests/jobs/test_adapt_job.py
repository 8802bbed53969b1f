"""`bmray adapt`: the tiny config end to end on a gang of 2, bad input failing on the driver
before any worker starts, and the same command through `ray job submit` on a real head."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from bmray.actors.train.checkpoints import load_checkpoint
from bmray.jobs import adapt
from bmray.models.typed_config import apply_overrides, load_yaml
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")


@pytest.mark.parametrize("strategy", [[], ["strategy.kind=zero", "strategy.stage=3"]],
                         ids=["ddp", "zero3"])
def test_adapt_job_end_to_end_on_two_workers(ray_session, tmp_path, capsys, strategy):
    report_path = tmp_path / "report.json"
    sets = [x for s in strategy for x in ("--set", s)]
    code = adapt.main(["--config", TINY, "--set", f"out_dir={tmp_path}/run",
                       "--set", "checkpoint.every=3", *sets, "--report", str(report_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "adapted to step 6: eval accuracy" in out and "delta: " in out
    assert "training memory per rank" in out
    # ZeRO-3 shards the frozen base: each of the 2 ranks keeps about half of it
    assert ("frozen base: this rank keeps" in out) == bool(strategy)
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2 and report["step"] == 6
    assert [r["step"] for r in report["evals"]] == [3, 6]
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    assert sorted(os.listdir(report["delta_dir"])) == ["delta.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "run" / "delta" / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["base"]["class"] == "BertForPretraining"
    # the gang's checkpoint: the trainable tensors only, written once (replicated state)
    _, state = load_checkpoint(report["checkpoint"])
    assert state["model"] and all(".deltas." in k or k.startswith("head.")
                                  for k in state["model"])


def write(tmp_path, overrides, raw=None):
    raw = apply_overrides(raw or load_yaml(TINY), [f"out_dir={tmp_path}/bad", *overrides])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


PROMPT = {"template": "{text_a} It is about {mask} .",
          "label_words": {"ABBR": ["abbreviation"], "DESC": ["description"],
                          "ENTY": ["thing"], "HUM": ["person"], "LOC": ["place"],
                          "NUM": ["number"]}}


def minilm_prompt(**prompt):
    """The tiny config on the MiniLM (WordPiece: an unknown word is [UNK]) with a prompt."""
    raw = load_yaml(TINY)
    raw.update(base={"kind": "minilm"}, prompt={**PROMPT, **prompt})
    raw["delta"]["targets"] = ["query", "value"]
    raw["task"]["max_length"] = 40
    return raw


@pytest.mark.parametrize("overrides,raw,match", [
    (["delta.rnak=4"], None, r"delta: unknown key\(s\) \['rnak'\]"),
    (["delta.targets=[nope]"], None, r"targets: 'nope' matches no Linear\S* .* candidates:"),
    (["delta.rank=64"], None, r"delta.rank: 64 exceeds min\(in, out\) = 32"),
    ([], minilm_prompt(template="{text_a} It is about"), r"prompt: .*has no \{mask\}"),
    ([], minilm_prompt(label_words={**PROMPT["label_words"], "HUM": ["\u2603"]}),
     r"prompt: label word '\u2603' is not in the vocabulary"),
    ([], minilm_prompt(label_words={**PROMPT["label_words"], "PLACE": ["place"]}),
     r"prompt.label_words: \['PLACE'\] are not classes of trec"),
], ids=["unknown-key", "target-matches-nothing", "rank-too-large", "template-without-mask",
        "label-word-not-in-vocab", "label-not-a-class"])
def test_bad_input_fails_on_the_driver(tmp_path, capsys, overrides, raw, match):
    code = adapt.main(["--config", write(tmp_path, overrides, raw)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "config error" in err
    assert re.search(match, err), err
    assert not os.path.exists(tmp_path / "bad")          # nothing ran, nothing was written


def test_a_delta_of_another_base_fails_on_the_driver(tmp_path, capsys):
    """``--set delta.load=...`` with a delta saved for a base of other weights."""
    from bmray.actors.train.adapt import run_adapt
    from bmray.actors.train.adapt_config import load_adapt_config

    result = run_adapt(load_adapt_config(TINY, ["scaling.num_workers=1", "train.max_steps=1",
                                               "train.eval_every=0", f"out_dir={tmp_path}/a"]),
                       out_dir=f"{tmp_path}/a")
    code = adapt.main(["--config", TINY, "--set", f"out_dir={tmp_path}/b", "--set", "seed=3",
                       "--set", f"base.tokenizer_dir={tmp_path}/a/tokenizer",
                       "--set", f"delta.load={result.delta_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "the delta was saved for BertForPretraining" in err, err


@pytest.fixture(scope="module")
def job_head():
    from bmray.cluster.local_head import LocalHead

    with LocalHead(num_cpus=2) as head:
        yield head


def test_ray_job_submit_runs_bmray_adapt(job_head):
    """`ray job submit -- bmray adapt ...` on a real head: SUCCEEDED, accuracy in its logs."""
    from tests.jobs.test_jobs import submit_job

    job_id = f"bmray-adapt-test-{os.getpid()}"
    out, status = submit_job(job_head, REPO, job_id,
                             ["bmray", "adapt", "--config", "configs/adapt_tiny.yaml",
                              "--set", f"out_dir=runs/adapt_jobtest_{os.getpid()}"])
    assert status.returncode == 0, status.stderr
    state, _, logs = status.stdout.partition("\n")
    assert state == "SUCCEEDED", out.stdout[-3000:] + out.stderr[-3000:]
    assert "adapted to step 6: eval accuracy" in logs
    assert "Ray cluster at" in logs          # it joined the head, not an embedded Ray


def test_every_adapt_config_builds():
    """Each shipped adapt config parses and builds its task on the driver (what the job checks
    before starting workers)."""
    import glob

    paths = sorted(glob.glob(os.path.join(REPO, "configs", "adapt_*.yaml")))
    assert len(paths) >= 2
    for path in paths:
        raw = adapt.load_config(path, [])
        assert raw["out_dir"]
