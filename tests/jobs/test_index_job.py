"""`bmray index` and `bmray evaluate` end to end on Medline; bad configs fail before any work."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bmray.jobs import cli
from bmray.jobs.index import IndexJobConfig, load_config, read_records
from bmray.models.retrieval.artifact import load_index
from bmray.models.typed_config import ConfigError, from_dict
from tests.conftest import REPO

torch.set_num_threads(1)
MEDLINE = os.path.join(REPO, "configs", "index_medline_bm25.yaml")


def test_index_then_evaluate(ray_session, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["index", "--config", MEDLINE, "--set", f"output={one}",
                     "--set", "index.shards=1"]) == 0
    assert cli.main(["index", "--config", MEDLINE, "--set", f"output={two}",
                     "--set", "index.shards=2"]) == 0      # on 2 actors, saved as one index
    assert "on 2 shard actors" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--index", str(one), "--index", str(two), "--collection",
                     "medline", "--metrics", "ndcg@10", "p@5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "medline: 30 judged queries" in table and "ndcg@10" in table and "p@5" in table
    rows = json.loads(out.read_text())["metrics"]
    assert rows["one"] == rows["two"] and 0.3 < rows["one"]["ndcg@10"] < 1
    # evaluated against a collection the index was not built from: a clear error, exit 2
    assert cli.main(["evaluate", "--index", str(one), "--collection", "cisi"]) == 2
    assert "built from another corpus than cisi" in capsys.readouterr().err
    assert cli.main(["evaluate", "--index", str(one), "--collection", "medline",
                     "--metrics", "ndcg"]) == 2


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "solar panels on roofs"}\n'
                    '{"id": 7, "text": "wind turbines at sea"}\n')
    assert cli.main(["index", "--config", MEDLINE, "--set", "collection=jsonl",
                     "--set", f"path={path}", "--set", f"output={tmp_path / 'ix'}",
                     "--set", "index.shards=1"]) == 0
    index = load_index(tmp_path / "ix", read_records(str(path), "jsonl"))
    assert index.search(["turbine"], 5)[0][0][0] == "7"
    table = pa.table({"id": ["p", "q"], "text": ["tidal power", "geothermal heat"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    assert read_records(str(tmp_path / "docs.parquet"), "parquet") == \
        {"p": "tidal power", "q": "geothermal heat"}
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="docs.jsonl:2: expected a JSON object with id and text"):
        read_records(str(path), "jsonl")


@pytest.mark.parametrize("override,key", [
    ("index.k2=1", "config.index: unknown key"),
    ("index.kind=splade", "config.index.kind"),
    ("index.b=2", "index.b"),
    ("index.shards=0", "index.shards"),
    ("index.analyzer.stemmer=lancaster", "config.index.analyzer.stemmer"),
    ("collection=trec", "config.collection"),
    ("collection=jsonl", "path: collection jsonl needs a path"),
    ("outptu=x", "config: unknown key"),
    ("index.kind=dense", "index.shards: sharding is for bm25"),
    ("index.encoder=bert-base", "index.encoder"),
    ("index.faiss.kind=pq", "kind"),
    ("index.workers=-1", "index.workers"),
])
def test_bad_config_names_key(override, key, capsys):
    with pytest.raises(ConfigError, match=key):
        load_config(MEDLINE, [override])
    assert cli.main(["index", "--config", MEDLINE, "--set", override]) == 2
    assert "config error" in capsys.readouterr().err


def test_shipped_configs_parse():
    for name in ("index_cisi_bm25.yaml", "index_medline_bm25.yaml", "index_medline_dense.yaml"):
        with open(os.path.join(REPO, "configs", name)) as f:
            from_dict(IndexJobConfig, yaml.safe_load(f), "config")


def test_dense_index_of_a_jsonl_corpus(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    docs = {"a": "solar panels on roofs", "b": "wind turbines at sea", "c": "the cat sat on a mat"}
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()))
    out = tmp_path / "dense"
    assert cli.main(["index", "--config", MEDLINE, "--set", "collection=jsonl",
                     "--set", f"path={path}", "--set", f"output={out}", "--set", "index.kind=dense",
                     "--set", "index.shards=1", "--set", "index.faiss.kind=flat"]) == 0
    assert "dense flat index of jsonl: 3 vectors of dimension 384" in capsys.readouterr().out
    index = load_index(out, docs)                   # the MiniLM named in the manifest is rebuilt
    assert index.search(["offshore wind power"], 3)[0][0][0] == "b"
    with pytest.raises(ValueError, match="built from another corpus"):
        load_index(out, {**docs, "d": "one more"})
