"""The QA reader's training run, artifact and job: a tiny BERT of ours on a 30-entity world."""
import json

import pytest
import torch

from bmray.actors.train.qa import load_reader, qa_config_from_dict, run_qa
from bmray.jobs import qa as qa_job
from bmray.models.qa.reader import read
from bmray.models.typed_config import ConfigError, load_yaml

torch.set_num_threads(1)
TINY = "configs/qa_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    raw = load_yaml(TINY)
    raw["train"]["max_steps"] = 30
    return run_qa(qa_config_from_dict(raw), out_dir=str(out)), out


def test_training_learns_and_the_report_is_complete(tiny_run):
    report, out = tiny_run
    assert report["steps"] == 30
    assert report["final_loss"] < 0.8 * report["first_loss"]
    e = report["eval"]
    assert e["has_ans_total"] > 0 and e["no_ans_total"] > 0
    assert e["total"] == e["has_ans_total"] + e["no_ans_total"]
    assert json.loads((out / "report.json").read_text())["eval"] == e


def test_artifact_reloads_to_the_same_predictions(tiny_run):
    report, out = tiny_run
    reader, tok, manifest = load_reader(out / "reader")
    assert manifest["kind"] == "qa_reader" and manifest["threshold"] == report["threshold"]
    assert manifest["base"]["weights_sha256"]
    q = ["Which city is the capital of Krokeirai?"] * 2
    c = ["Krokeirai is a country whose capital is Trothebo.", "Nothing here at all."]
    again = read(reader, tok, q, c, max_length=96, doc_stride=24, max_answer_tokens=12)
    reader2, tok2, _ = load_reader(out / "reader")
    assert again == read(reader2, tok2, q, c, max_length=96, doc_stride=24, max_answer_tokens=12)
    (out / "reader" / "manifest.json").write_text(json.dumps({**manifest, "kind": "delta"}))
    with pytest.raises(ValueError, match="artifact kind 'delta'"):
        load_reader(out / "reader")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_reader(out / "nowhere")


@pytest.mark.parametrize("override, message", [
    ({"reader": {"max_lenght": 64}}, r"config.reader: unknown key\(s\) \['max_lenght'\]"),
    ({"data": {"dataset": "squad"}}, r"data.dataset: 'squad' is not one of"),
    ({"reader": {"max_length": 128}}, r"reader.max_length: 128 exceeds base.model.max_seq_len 96"),
    ({"reader": {"doc_stride": 60}}, r"reader.doc_stride: 60 must be below half"),
    ({"retriever": {}}, r"unknown top-level key\(s\) \['retriever'\]"),
])
def test_bad_config_names_the_key(override, message):
    raw = load_yaml(TINY)
    for section, values in override.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        qa_config_from_dict(raw)


def test_job_exit_codes(tmp_path, capsys):
    assert qa_job.main(["--config", TINY, "--set", "reader.max_lenght=3"]) == 2
    assert "reader: unknown key" in capsys.readouterr().err
    assert qa_job.main(["--config", TINY, "--set", f"out_dir={tmp_path}",
                        "--set", "train.max_steps=2"]) == 0
    assert (tmp_path / "reader" / "model.safetensors").is_file()
    assert "eval EM" in capsys.readouterr().out


def test_a_minilm_reader_from_another_base_is_refused(tmp_path):
    manifest = {"kind": "qa_reader", "base_kind": "minilm", "tokenizer": "all-MiniLM-L6-v2",
                "base": {"class": "BertModel", "weights_sha256": "0" * 64},
                "reader": {"max_length": 128, "doc_stride": 32}, "threshold": 0.0}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="trained from base 000000000000, but the installed"):
        load_reader(tmp_path)
