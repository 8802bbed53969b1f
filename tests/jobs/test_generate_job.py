"""`bmray generate`: a tiny pre-training run (in-process) then sampling from its checkpoint;
bad flags, a missing checkpoint or tokenizer, and another family's checkpoint fail clearly."""
from __future__ import annotations

import json

import pytest
import torch

from bmray.actors.train import checkpoints as ckpt
from bmray.jobs import cli, generate
from tests.conftest import tiny_gpt_experiment

torch.set_num_threads(1)

POEM = ("Shall I compare thee to a summer’s day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer’s lease hath all too short a "
        "date;\n\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    return tiny_gpt_experiment(tmp_path_factory.mktemp("gen"), POEM * 30)[1]


def test_generate_streams_samples_and_matches_the_batched_run(trained, tmp_path, capsys):
    assert "generate" in cli.JOBS
    out_json = tmp_path / "s.json"
    argv = ["--config", trained, "--prompt", "Shall I", "--prompt", "Rough", "--strategy",
            "greedy", "--max-new-tokens", "12", "--json", str(out_json)]
    assert generate.main(argv) == 0
    printed = capsys.readouterr().out
    streamed = json.loads(out_json.read_text(encoding="utf-8"))
    assert [s["prompt"] for s in streamed] == ["Shall I", "Rough"]
    for s in streamed:
        assert f"{s['prompt']}{s['sample']}" in printed
    assert generate.main(argv + ["--no-stream"]) == 0
    assert json.loads(out_json.read_text(encoding="utf-8")) == streamed
    capsys.readouterr()
    assert generate.main(["--config", trained, "--prompt", "O", "--strategy", "sample",
                          "--document-start", "--top-p", "0.9", "--temperature", "0.8",
                          "--stop", "\\n", "--max-new-tokens", "20", "--json", str(out_json)]) == 0
    assert "\n" not in json.loads(out_json.read_text(encoding="utf-8"))[0]["sample"]


@pytest.mark.parametrize("flags, key", [
    (["--strategy", "topk"], "generation.strategy"),
    (["--top-p", "0"], "generation.top_p"),
    (["--num-beams", "3"], "generation.num_beams"),
])
def test_bad_flags_exit_2_naming_the_key(trained, capsys, flags, key):
    assert generate.main(["--config", trained, "--prompt", "x", *flags]) == 2
    assert key in capsys.readouterr().err


def test_missing_files_and_other_families_exit_1(trained, tmp_path, capsys):
    assert generate.main(["--config", trained, "--prompt", "x", "--checkpoint",
                          str(tmp_path / "nothing")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert generate.main(["--config", trained, "--prompt", "x", "--set",
                          f"data.tokenizer_dir={tmp_path / 'no-tok'}"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    bert = str(tmp_path / "bert")
    ckpt.save_checkpoint(bert, 1, {"model": {}}, manifest={"model_config": {
        "family": "bert", "vocab_size": 300}})
    assert generate.main(["--config", trained, "--prompt", "x", "--checkpoint", bert]) == 1
    assert "'bert'" in capsys.readouterr().err
