"""``run_adapt_gang``: a gang started from a caller (a sweep trial's body) hands the caller
rank 0's evaluation rows while it trains, places itself in the caller's placement group when
it runs in one, and returns the run's result, equal to one process's."""
from __future__ import annotations

import os

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bmray.actors.train.adapt import run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.cluster.adapt_gang import run_adapt_gang, trial_bundles
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")


def cfg(out_dir, workers, *extra):
    return load_adapt_config(TINY, [f"scaling.num_workers={workers}", f"out_dir={out_dir}",
                                    *extra])


def test_the_caller_gets_the_evals_and_the_result(ray_session, tmp_path):
    ref = run_adapt(cfg(tmp_path / "one", 1), out_dir=str(tmp_path / "one"))
    rows = []
    result = run_adapt_gang(cfg(tmp_path / "gang", 2,
                                f"base.tokenizer_dir={tmp_path}/one/tokenizer"),
                            out_dir=str(tmp_path / "gang"), on_eval=rows.append)
    assert [r["step"] for r in rows] == [3, 6]
    assert result.metrics == rows[-1]
    assert result.metrics["accuracy"] == pytest.approx(ref.metrics["accuracy"])
    assert result.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-5)
    assert result.trainable_params == ref.trainable_params
    assert os.path.isdir(result.delta_dir)


@ray.remote(num_cpus=0)
def _trial(out_dir):
    """A stand-in for a Tune trial: runs in bundle 0 of a 3-bundle group."""
    rows = []
    placed = trial_bundles(2)
    result = run_adapt_gang(cfg(out_dir, 2, "train.max_steps=2", "train.eval_every=1"),
                            out_dir=out_dir, on_eval=rows.append)
    return [r["step"] for r in rows], result.step, placed is not None


def test_the_gang_goes_into_the_trials_bundles(ray_session, tmp_path):
    pg = placement_group([{"CPU": 1}] * 3, strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        steps, step, placed = ray.get(_trial.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0,
                placement_group_capture_child_tasks=True)).remote(str(tmp_path)), timeout=300)
    finally:
        remove_placement_group(pg)
    assert placed and steps == [1, 2] and step == 2
