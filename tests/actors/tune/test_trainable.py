"""The trial's pieces that need no Ray: its bundles, its adapt mapping, what it reports."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import tune_standin as S
from bmray.actors.tune.space import SearchSpace
from bmray.actors.tune.trainable import TrialSpec, cost_metrics, scalar_metrics

SPACE = SearchSpace({"train.lr": {"uniform": [0.1, 0.2]},
                     "delta": {"choice": [{"method": "adapter", "bottleneck": {"int": [2, 4]}},
                                          {"method": "bitfit"}]}})


def spec(workers):
    return TrialSpec(adapt={"train": {"steps": 3, "lr": 9.0}, "delta": {"rank": 7}},
                     space=SPACE, body=S.run, load_config=S.load_config,
                     workers_per_trial=workers, cpus_per_worker=2.0, trial_cpus=0.5)


def test_bundles_are_the_driver_then_one_per_worker():
    assert spec(3).resources().bundles == [{"CPU": 0.5}, {"CPU": 2.0}, {"CPU": 2.0},
                                           {"CPU": 2.0}]
    assert spec(0).resources().bundles == [{"CPU": 0.5}]


def test_trial_mapping_merges_sample_and_gang_size():
    params = {"train.lr": 0.15, "delta": "adapter", "delta[adapter].bottleneck": 3}
    mapping = spec(2).trial_mapping(params)
    assert mapping == {"train": {"steps": 3, "lr": 0.15},
                       "delta": {"method": "adapter", "bottleneck": 3},
                       "scaling": {"num_workers": 2, "cpus_per_worker": 2.0}}
    assert "scaling" not in spec(0).trial_mapping(params)
    cfg = S.load_config(mapping)
    assert (cfg.train.lr, cfg.delta.bottleneck, cfg.scaling.num_workers) == (0.15, 3, 2)


def test_reported_metrics():
    assert scalar_metrics({"step": 3, "accuracy": 0.5, "loss": float("nan"), "ok": True,
                           "delta_dir": "/x", "acc_list": [1], "bad": float("inf")}) == \
        pytest.approx({"step": 3, "accuracy": 0.5, "loss": float("nan")}, nan_ok=True)
    result = SimpleNamespace(trainable_params=25, total_params=1000, peak_memory_bytes=2**20,
                             latency_ms=1.5)
    assert cost_metrics(result) == {"trainable_params": 25.0, "total_params": 1000.0,
                                    "trainable_pct": 2.5, "peak_memory_bytes": 2.0**20,
                                    "activation_bytes": 0.0, "latency_ms": 1.5}
    result.activation_bytes = 4096
    assert cost_metrics(result)["activation_bytes"] == 4096.0
