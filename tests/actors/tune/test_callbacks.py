"""Keep-N across the sweep, on fake trials (the real sweep is in tests/cluster/test_sweep.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from bmray.actors.tune.callbacks import KeepBestCheckpoints, checkpoint_dirs, ranked


@dataclass
class FakeTrial:
    trial_id: str
    path: str
    status: str = "TERMINATED"
    metric_analysis: dict = field(default_factory=dict)


def make(tmp_path, name, best, status="TERMINATED", checkpoints=1):
    path = tmp_path / name
    for i in range(checkpoints):
        (path / f"checkpoint_{i:06d}").mkdir(parents=True)
        (path / f"checkpoint_{i:06d}" / "delta.safetensors").write_bytes(b"x")
    (path / "body_out").mkdir(parents=True)
    analysis = {} if best is None else {"accuracy": {"max": 1.0, "min": 0.0, "last": best}}
    return FakeTrial(name, str(path), status, analysis)


def test_keeps_the_best_n_of_the_whole_sweep(tmp_path):
    trials = [make(tmp_path, "t1", 0.5), make(tmp_path, "t2", 0.9), make(tmp_path, "t3", 0.7),
              make(tmp_path, "t4", None), make(tmp_path, "t5", 0.99, status="RUNNING"),
              make(tmp_path, "t6", 0.8, status="ERROR", checkpoints=2)]
    assert [t.trial_id for t in ranked(trials, "accuracy", "max")] == ["t2", "t6", "t3", "t1",
                                                                         "t4"]
    keep = KeepBestCheckpoints("accuracy", "max", keep=2)
    keep.on_trial_complete(0, trials, trials[0])
    left = {t.trial_id for t in trials if checkpoint_dirs(t.path)}
    assert left == {"t2", "t6", "t5"}           # the best 2 finished ones + the running one
    assert len(checkpoint_dirs(trials[5].path)) == 2
    # the body's leftovers go for every finished trial, the running one keeps its own
    assert [os.path.exists(os.path.join(t.path, "body_out")) for t in trials] == \
        [False, False, False, False, True, False]
    # a better trial finishing later pushes the worst kept one out
    trials[4].status = "TERMINATED"
    keep.on_trial_complete(1, trials, trials[4])
    assert {t.trial_id for t in trials if checkpoint_dirs(t.path)} == {"t5", "t2"}


def test_mode_min_ranks_low_first_by_the_last_value(tmp_path):
    trials = [make(tmp_path, "a", 0.5), make(tmp_path, "b", 0.9)]
    assert [t.trial_id for t in ranked(trials, "accuracy", "min")] == ["a", "b"]


def test_keep_at_least_one():
    with pytest.raises(ValueError):
        KeepBestCheckpoints("accuracy", "max", keep=0)


def test_the_finishing_trial_counts_before_tune_marks_it_terminated(tmp_path):
    trials = [make(tmp_path, "a", 0.5), make(tmp_path, "b", 0.9, status="RUNNING")]
    KeepBestCheckpoints("accuracy", "max", keep=1).on_trial_complete(0, trials, trials[1])
    assert [bool(checkpoint_dirs(t.path)) for t in trials] == [False, True]
