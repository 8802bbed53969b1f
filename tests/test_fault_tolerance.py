"""A worker or parameter-server shard killed mid-run: a clear report, and with max_failures > 0
a restart from the latest checkpoint that ends with the loss of an uninterrupted run."""
from __future__ import annotations

import os
import threading
import time

import pytest
import ray

from cluster.launcher import RunFailed, TrainRun
from models.typed_config import apply_overrides, load_yaml
from tests.conftest import REPO

STEPS = 40


def experiment(tmp_path, name: str, *extra: str) -> dict:
    return apply_overrides(load_yaml(os.path.join(REPO, "configs", "gpt-tiny.yaml")), [
        f"data.corpus={tmp_path}/world/documents.jsonl", f"data.pack_dir={tmp_path}/pack",
        "data.world.n_entities=30", f"train.max_steps={STEPS}", "train.eval_every=0",
        "train.echo=false", "train.metrics_path=null", f"checkpoint.dir={tmp_path}/{name}",
        "checkpoint.every=5", "checkpoint.keep_last=0", "checkpoint.average_last=0",
        "scaling.num_workers=2", *extra])


def run_and_kill(run: TrainRun, ckpt_dir: str, victim) -> dict | BaseException:
    """Run ``run.fit()`` in a thread; once the step-10 checkpoint exists, ``ray.kill`` the
    actor ``victim(run)`` returns. Returns the report or the exception."""
    out: dict = {}

    def target():
        try:
            out["report"] = run.fit()
        except BaseException as exc:          # noqa: BLE001  (handed to the test)
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    marker = os.path.join(ckpt_dir, "step_00000010", "manifest.json")
    deadline = time.monotonic() + 180
    while not os.path.exists(marker):
        assert thread.is_alive(), f"run ended before the kill: {out}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ray.kill(victim(run))
    thread.join(240)
    assert not thread.is_alive()
    return out.get("report", out.get("error"))


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    return tmp, TrainRun(experiment(tmp, "clean")).fit()


def test_killed_worker_restarts_from_checkpoint_and_matches(uninterrupted):
    tmp, clean = uninterrupted
    run = TrainRun(experiment(tmp, "killed", "run.max_failures=1"))
    report = run_and_kill(run, f"{tmp}/killed", lambda r: r.group.workers[1])
    assert isinstance(report, dict), report
    assert report["attempts"] == 2
    assert "rank" in report["failures"][0] and "died" in report["failures"][0]
    assert report["resumed_from"] and "step_000000" in report["resumed_from"]
    assert report["step"] == STEPS
    # exact resume: the last loss equals the uninterrupted run's (fp32, same reduction order)
    assert report["losses"][STEPS] == pytest.approx(clean["losses"][STEPS], rel=1e-6, abs=1e-7)


def test_killed_worker_without_restarts_gives_a_clear_report(uninterrupted):
    tmp, _ = uninterrupted
    run = TrainRun(experiment(tmp, "fatal"))
    error = run_and_kill(run, f"{tmp}/fatal", lambda r: r.group.workers[1])
    assert isinstance(error, RunFailed), error
    assert "training failed after 1 attempt" in str(error)
    assert "train worker rank" in str(error)
    assert run.group is None                 # the gang was torn down


def test_killed_parameter_server_shard_restarts_and_matches(ray_session, tmp_path):
    ps = ("strategy.kind=param_server", "strategy.num_shards=2")
    clean = TrainRun(experiment(tmp_path, "ps-clean", *ps)).fit()
    run = TrainRun(experiment(tmp_path, "ps-killed", *ps, "run.max_failures=1"))
    report = run_and_kill(run, f"{tmp_path}/ps-killed", lambda r: r.shards[0])
    assert isinstance(report, dict), report
    assert report["attempts"] == 2 and report["step"] == STEPS
    assert report["losses"][STEPS] == pytest.approx(clean["losses"][STEPS], rel=1e-6, abs=1e-7)
