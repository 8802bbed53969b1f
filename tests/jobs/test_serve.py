"""``bmray serve``: the config is checked whole before Ray starts (dry run: nothing starts)."""
from __future__ import annotations

from pathlib import Path

from bmray.jobs.cli import JOBS
from bmray.jobs.serve import cpus_needed, load_config, main
from bmray.models.retrieval.artifact import save_index
from bmray.models.retrieval.bm25 import BM25Index

REPO = Path(__file__).resolve().parents[2]
LOCAL = str(REPO / "configs/serve_local.yaml")


def test_registered():
    assert JOBS["serve"][0] == "bmray.jobs.serve"


def test_dry_run_validates_and_starts_nothing(tmp_path, capsys):
    index = BM25Index.build(["a", "b"], ["apple banana", "banana cherry"])
    save_index(index, tmp_path / "ix")
    assert main(["--config", LOCAL, "--set", f"indexes.medline={tmp_path / 'ix'}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "config ok" in out and "http://127.0.0.1:8000" in out and "['medline']" in out
    cfg = load_config(LOCAL, [f"indexes.medline={tmp_path / 'ix'}"])
    assert cpus_needed(cfg) == 2        # 0.1 ingress + 2 x 0.5 search + 0.75 embed, rounded up


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    assert main(["--config", LOCAL, "--set", "search.max_queued_requests=-1", "--dry-run"]) == 2
    assert "config.search.max_queued_requests" in capsys.readouterr().err
    assert main(["--config", LOCAL, "--set", f"indexes.medline={tmp_path / 'none'}",
                 "--dry-run"]) == 2
    assert "indexes.medline" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
