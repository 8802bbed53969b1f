"""Experiment YAML -> typed configs: each kind of mistake is one ConfigError naming the key
or path; a good file builds the dataclasses and (end to end) a short run."""
from __future__ import annotations


import pytest
import torch
import yaml

from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.builders import build_trainer, run_experiment
from bmray.actors.train.experiment import DataConfig, ExperimentConfig, load_experiment
from bmray.models.config import ModelConfig
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)


def base(tmp_path) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: the {['red', 'blue', 'green'][i % 3]} cat "
                                  f"sat on mat {i % 5} and said {i * 7 % 11}." for i in range(120)))
    return {
        "seed": 3,
        "model": {"family": "gpt", "vocab_size": 300, "d_model": 32, "n_heads": 2,
                  "n_layers": 1, "d_ff": 64, "max_seq_len": 32, "dropout": 0.0},
        "data": {"corpus": str(corpus), "pack_dir": str(tmp_path / "pack"), "block_len": 17,
                 "global_batch_size": 4, "eval_blocks": 8, "row_group_size": 16},
        "train": {"max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "device": "cpu"},
        "checkpoint": {"dir": str(tmp_path / "ck"), "every": 2, "keep_last": 2},
    }


def write(tmp_path, raw: dict) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_good_file_builds_the_typed_configs(tmp_path):
    exp = load_experiment(write(tmp_path, base(tmp_path)))
    assert isinstance(exp, ExperimentConfig) and exp.seed == 3
    assert isinstance(exp.model, ModelConfig) and exp.model.d_model == 32
    assert isinstance(exp.data, DataConfig) and exp.data.corpus.source.endswith("corpus.txt")
    assert exp.data.tokenizer.family == "gpt" and exp.data.tokenizer.vocab_size == 300
    assert isinstance(exp.train, TrainConfig) and exp.train.lr == 1e-3
    assert isinstance(exp.checkpoint, CheckpointConfig) and exp.checkpoint.keep_last == 2


def mutate(tmp_path, section, key, value):
    raw = base(tmp_path)
    raw[section][key] = value
    return write(tmp_path, raw)


@pytest.mark.parametrize("section,key,value,needle", [
    ("train", "lrr", 1e-3, r"train: unknown key\(s\) \['lrr'\]"),
    ("model", "widht", 3, r"model: unknown key\(s\) \['widht'\]"),
    ("data", "batch", 3, r"data: unknown key\(s\) \['batch'\]"),
    ("checkpoint", "every_n", 3, r"checkpoint: unknown key\(s\) \['every_n'\]"),
    ("train", "lr", -0.1, r"train\.lr: must be > 0"),
    ("train", "lr", "fast", r"train\.lr: expected a number"),
    ("train", "micro_batches", 0, r"train\.micro_batches"),
    ("train", "device", "tpu", r"train\.device"),
    ("model", "family", "llama", r"model\.family: 'llama' is not one of"),
    ("model", "n_heads", 3, r"model\.n_heads"),
    ("data", "block_len", 64, r"data\.block_len: 64 .* model\.max_seq_len 32"),
    ("checkpoint", "keep_last", -1, r"checkpoint\.keep_last"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, section, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_experiment(mutate(tmp_path, section, key, value))


def test_unknown_top_level_section(tmp_path):
    raw = base(tmp_path)
    raw["optimizer"] = {"lr": 1}
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['optimizer'\]"):
        load_experiment(write(tmp_path, raw))


def test_missing_corpus_names_the_key_and_the_path(tmp_path):
    missing = str(tmp_path / "no_such_corpus.jsonl")
    with pytest.raises(ConfigError, match=r"data\.corpus\.source: .*no_such_corpus\.jsonl"):
        load_experiment(mutate(tmp_path, "data", "corpus", missing))
    with pytest.raises(ConfigError, match=r"data\.corpus\.source: .*no_such_corpus\.jsonl"):
        load_experiment(mutate(tmp_path, "data", "corpus", {"source": missing, "format": "jsonl"}))


def test_missing_file_section_and_inconsistent_settings(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*nope.yaml"):
        load_experiment(str(tmp_path / "nope.yaml"))
    raw = base(tmp_path)
    del raw["data"]
    with pytest.raises(ConfigError, match="data: missing section"):
        load_experiment(write(tmp_path, raw))
    raw = base(tmp_path)
    raw["data"]["tokenizer"] = {"family": "bert", "vocab_size": 300}
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.family: 'bert' but model\.family"):
        load_experiment(write(tmp_path, raw))
    raw = base(tmp_path)
    raw["checkpoint"] = {"average_last": 2}
    with pytest.raises(ConfigError, match=r"checkpoint\.dir: required"):
        load_experiment(write(tmp_path, raw))


def test_end_to_end_run_and_resume(tmp_path):
    """Tokenizer -> pack -> GPT -> 3 steps with checkpoints; a second run resumes at the end."""
    exp = load_experiment(write(tmp_path, base(tmp_path)))
    result = run_experiment(exp)
    assert result.step == 3 and sorted(result.losses) == [1, 2, 3]
    assert result.eval is not None and result.eval["perplexity"] > 1
    assert result.checkpoint.endswith("step_00000003")
    assert (tmp_path / "pack" / "tokenizer" / "tokenizer.json").is_file()
    again = build_trainer(load_experiment(write(tmp_path, base(tmp_path)))).fit()
    assert again.resumed_from.endswith("step_00000003") and again.losses == {}
