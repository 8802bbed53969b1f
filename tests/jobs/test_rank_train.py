"""`bmray rank-train`: config errors name the key, tiny runs end to end, artifacts reload."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from bmray.actors.train.rank_run import first_stage, rank_config_from_dict
from bmray.jobs import rank_train
from bmray.models.delta.base import base_identity
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.contrastive import DualEncoder
from bmray.models.retrieval.cross_encoder import CrossEncoder
from bmray.models.retrieval.rank_artifact import RankerArtifactError, load_ranker
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)

TINY_BERT = {"family": "bert", "vocab_size": 400, "d_model": 32, "n_heads": 2, "n_layers": 1,
             "d_ff": 64, "max_seq_len": 96, "dropout": 0.0}


def config(tmp_path, job, over=None):
    raw = {"kind": job, "out_dir": str(tmp_path / job), "batch": 8,
           "base": {"kind": "bert", "model": dict(TINY_BERT)},
           "data": {"collection": "world", "n_entities": 30, "eval": ["world-eval"]},
           "negatives": {"first_stage": "base", "depth": 20, "per_query": 1},
           "train": {"max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "device": "cpu",
                     "echo": False}}
    for key, value in (over or {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{job}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


@pytest.mark.parametrize("key,value,match", [
    ("negatives.colour", 1, r"config.negatives: unknown key\(s\) \['colour'\]"),
    ("kind", "listwise", "kind"),
    ("negatives.first_stage", "bm26", "negatives.first_stage"),
    ("data.eval", ["trec"], r"data.eval\[0\]"),
    ("base.model.family", "gpt", "base.model.family"),
    ("cross_encoder.pooling", "max", "cross_encoder.pooling"),
    ("train.lr", -1, "train.lr"),
])
def test_bad_config_names_the_key(tmp_path, capsys, key, value, match):
    path, raw = config(tmp_path, "cross_encoder", {key: value})
    with pytest.raises(ConfigError, match=match):
        rank_config_from_dict(yaml.safe_load(path.read_text()))
    assert rank_train.main(["--config", str(path)]) == 2
    assert "config error" in capsys.readouterr().err


def test_contradictions_are_refused(tmp_path):
    for kind, key, value, match in [
            ("cross_encoder", "negatives.first_stage", "none", "needs a first stage"),
            ("span_pretrain", "negatives.refresh_every", 5, "only a dual_encoder"),
            ("cross_encoder", "base.init", "x", "base.init")]:
        _, raw = config(tmp_path, kind, {key: value})
        with pytest.raises(ConfigError, match=match):
            rank_config_from_dict(raw)


def test_pretrain_then_fine_tune_with_refresh_and_reload(tmp_path, capsys):
    span_path, _ = config(tmp_path, "span_pretrain", {"negatives.first_stage": "none"})
    assert rank_train.main(["--config", str(span_path)]) == 0
    span_art = tmp_path / "span_pretrain" / "artifact"
    path, _ = config(tmp_path, "dual_encoder", {"base.init": str(span_art),
                                                 "negatives.refresh_every": 2})
    assert rank_train.main(["--config", str(path), "--report", str(tmp_path / "r.json")]) == 0
    assert "world-eval after" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 4 and report["negative_index_builds"] == 2
    # the fine-tuning started from the pre-trained encoder: its base identity is that encoder's
    manifest = json.loads((tmp_path / "dual_encoder" / "artifact" / "manifest.json").read_text())
    pre = load_ranker(span_art)
    assert manifest["base"]["identity"]["weights_sha256"] == \
        base_identity(pre.encoder)["weights_sha256"]
    model = load_ranker(tmp_path / "dual_encoder" / "artifact")
    assert isinstance(model, DualEncoder)
    texts = ["Where is Krokeirai?", "a page about a river"]
    a = model.text_encoder().encode(texts)
    assert a.shape == (2, 32) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    # reloading twice gives the same vectors, and they differ from the pre-trained encoder's
    assert np.allclose(a, load_ranker(tmp_path / "dual_encoder" / "artifact")
                       .text_encoder().encode(texts), atol=1e-6)
    assert not np.allclose(a, pre.text_encoder().encode(texts), atol=1e-4)


def test_cross_encoder_run_and_corrupt_artifacts(tmp_path):
    path, raw = config(tmp_path, "cross_encoder", {"negatives.per_query": 3})
    report = rank_train.run(rank_train.load_config(str(path), []))
    art = tmp_path / "cross_encoder" / "artifact"
    model = load_ranker(art)
    assert isinstance(model, CrossEncoder) and report["steps"] == 4
    assert np.isfinite(model.score(["q"], ["a passage"])).all()
    (art / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RankerArtifactError, match="model.safetensors"):
        load_ranker(art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format"] = "bmray-compressed/1"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RankerArtifactError, match="format"):
        load_ranker(art)
    with pytest.raises(RankerArtifactError, match="no ranker manifest"):
        load_ranker(tmp_path / "nowhere")


def test_bm25_first_stage_mines_from_our_bm25(tmp_path):
    _, raw = config(tmp_path, "cross_encoder", {"negatives.first_stage": "bm25"})
    cfg = rank_config_from_dict(raw)
    docs = {"a": "the river runs to the sea", "b": "a city of bridges", "c": "river boats"}
    stage = first_stage(cfg, None, None, docs)
    assert isinstance(stage, BM25Index)
    assert [d for d, _ in stage.search(["river"], 3)[0]] == ["c", "a"]   # shorter document first
