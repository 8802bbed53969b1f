"""Workers and parameter-server shards killed mid-run: a clear report, and with max_failures > 0
restarts from the latest checkpoint whose every step — after each restart, not only the last —
has the loss and pre-clip gradient norm of an uninterrupted single-process run of the same
config (the independent reference; tolerances and eps from tests/equivalence.py).

The strategies: DDP and the parameter server (one failure), ZeRO-2 (configs/gpt-zero.yaml),
ZeRO-3 with parameters and optimizer offloaded and sharded checkpoints, and the
dp x tp x pp = 2 x 2 x 2 mesh (configs/gpt-3d.yaml), each with two failures in one run: the
first kill hits the last rank once the first checkpoint exists, the second hits rank 0 of the
restarted gang once that gang has written a checkpoint of its own, so the third attempt resumes
from a checkpoint written by a restarted run. Each attempt's rows are told apart in the metrics
file by the ``resume`` row the trainer logs when it restores.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

import pytest
import ray
import torch

from bmray.cluster.launcher import RunFailed, TrainRun
from bmray.models.typed_config import apply_overrides, load_yaml
from tests.conftest import REPO
from tests.equivalence import EPS, LOSS_TOL

torch.set_num_threads(1)
STEPS, EVERY = 12, 3
# Pre-clip gradient norms: looser than tests/equivalence.py's 1e-5. At step 1 (uniform softmax)
# the LM head's gradient is a sum with heavy cancellation, so another summation order moves the
# global norm by ~1e-5 relative on this model (1.3e-5 seen, DDP on 2 ranks vs one process).
# A resume that lost anything (data position, optimizer moments, schedule) or a wrong gradient
# scale moves it by far more (see the module docstring).
NORM_TOL = dict(rtol=1e-3, atol=1e-6)


def experiment(tmp, name: str, *extra: str, config: str = "gpt-tiny.yaml") -> dict:
    """``configs/<config>`` with the test's paths and sizes (fp32: compared with fp32)."""
    return apply_overrides(load_yaml(os.path.join(REPO, "configs", config)), [
        f"data.corpus={tmp}/world/documents.jsonl", f"data.pack_dir={tmp}/pack",
        "data.world.n_entities=30", f"train.max_steps={STEPS}", "train.eval_every=0",
        "train.echo=false", "train.log_every=1", f"train.eps={EPS}",
        f"train.metrics_path={tmp}/{name}.metrics.jsonl", f"checkpoint.dir={tmp}/{name}",
        f"checkpoint.every={EVERY}", "checkpoint.keep_last=0", "checkpoint.average_last=0",
        *extra])


def reference(raw: dict) -> Any:
    """The same experiment uninterrupted in this process, single-process: TrainResult."""
    from bmray.actors.train.builders import run_experiment
    from bmray.actors.train.experiment import experiment_from_dict

    raw = {**raw, "strategy": {"kind": "single"}, "scaling": {"num_workers": 1}, "run": {},
           "checkpoint": {"dir": None, "every": 0, "keep_last": 0, "average_last": 0}}
    raw["train"] = {**raw["train"], "metrics_path": None}
    return run_experiment(experiment_from_dict(raw))


def attempts(metrics_path: str) -> list[list[dict]]:
    """The metrics rows of each attempt: a restart's rows begin with its ``resume`` row."""
    out: list[list[dict]] = [[]]
    if not os.path.exists(metrics_path):
        return out
    with open(metrics_path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:           # a line being written
                break
            if row["split"] == "resume":
                out.append([])
            out[-1].append(row)
    return out


def train_steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if r["split"] == "train"]


# A kill: (victim of the current attempt's run, attempt rows -> True when it is time).
Kill = tuple[Callable[[TrainRun], Any], Callable[[list[dict]], bool]]


def after_own_checkpoint(rows: list[dict]) -> bool:
    """True once this attempt has committed a checkpoint of its own (a step past the next
    multiple of EVERY after the one it resumed from has been logged)."""
    start = rows[0]["step"] if rows and rows[0]["split"] == "resume" else 0
    return any(s > (start // EVERY + 1) * EVERY for s in train_steps(rows))


def last_rank(run: TrainRun):
    return run.group.workers[-1]


def rank0(run: TrainRun):
    return run.group.workers[0]


def first_shard(run: TrainRun):
    return run.shards[0]


def run_with_kills(run: TrainRun, metrics_path: str, kills: list[Kill]) -> dict | BaseException:
    """``run.fit()`` in a thread; kill ``k`` hits attempt ``k + 1`` when its trigger says so.
    Returns the report or the exception."""
    out: dict = {}

    def target():
        try:
            out["report"] = run.fit()
        except BaseException as exc:          # noqa: BLE001  (handed to the test)
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    for k, (victim, due) in enumerate(kills, 1):
        deadline = time.monotonic() + 240
        while True:
            assert thread.is_alive(), f"run ended before kill {k}: {out}"
            assert time.monotonic() < deadline, f"kill {k} never became due"
            rows = attempts(metrics_path)
            if len(rows) == k and run.attempt == k and run.group is not None and due(rows[-1]):
                ray.kill(victim(run))
                break
            time.sleep(0.02)
        while run.attempt == k and thread.is_alive():     # wait for the restart to begin
            time.sleep(0.02)
    thread.join(300)
    assert not thread.is_alive()
    return out.get("report", out.get("error"))


def check_restarts(report: dict | BaseException, metrics_path: str, ref: Any, failures: int):
    """Every attempt's every step against the reference; the restarts resumed from
    checkpoints, the last from one written by a restarted gang; repeated steps agree."""
    assert isinstance(report, dict), report
    assert report["attempts"] == failures + 1 and len(report["failures"]) == failures
    assert all("train worker rank" in f for f in report["failures"]), report["failures"]
    assert report["step"] == STEPS
    per_attempt = attempts(metrics_path)
    assert len(per_attempt) == failures + 1
    resumed = [0]
    seen: dict[int, float] = {}
    for i, rows in enumerate(per_attempt):
        steps = train_steps(rows)
        if i:
            assert rows[0]["split"] == "resume" and rows[0]["step"] % EVERY == 0
            resumed.append(rows[0]["step"])
            assert rows[0]["step"] >= EVERY
        assert steps and steps == list(range(resumed[-1] + 1, steps[-1] + 1)), (i, steps)
        train = {r["step"]: r for r in rows if r["split"] == "train"}
        for key, ref_values, tol in (("loss", ref.losses, LOSS_TOL),
                                     ("grad_norm", ref.grad_norms, NORM_TOL)):
            torch.testing.assert_close(
                torch.tensor([train[s][key] for s in steps], dtype=torch.float64),
                torch.tensor([ref_values[s] for s in steps], dtype=torch.float64), **tol,
                msg=lambda m, k=key: f"attempt {i + 1}, steps {steps}, {k}: {m}")
        for s in steps:             # a step run again after a restart: the same loss, exactly
            if s in seen:
                assert train[s]["loss"] == pytest.approx(seen[s], rel=1e-6, abs=1e-7), s
            seen[s] = train[s]["loss"]
    assert train_steps(per_attempt[-1])[-1] == STEPS
    if failures >= 2:
        assert resumed[-1] > resumed[-2], resumed     # the restarted gang's own checkpoint
    assert report["resumed_from"].endswith(f"step_{resumed[-1]:08d}")
    assert report["losses"][STEPS] == pytest.approx(ref.losses[STEPS], rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])


@pytest.fixture(scope="module")
def tmp(ray_session, tmp_path_factory):
    return tmp_path_factory.mktemp("ft")


_REFERENCES: dict[str, Any] = {}


def reference_for(raw: dict, key: str) -> Any:
    """One single-process reference per model/data config, shared by the module's tests."""
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(raw)
    return _REFERENCES[key]


CASES = {
    # name: (config, overrides, kills)
    "ddp": ("gpt-tiny.yaml", ("scaling.num_workers=2",), [(last_rank, after_own_checkpoint)]),
    "param_server": ("gpt-tiny.yaml", ("scaling.num_workers=2", "strategy.kind=param_server",
                                       "strategy.num_shards=2"),
                     [(first_shard, after_own_checkpoint)]),
    "zero2": ("gpt-zero.yaml", ("strategy.param_dtype=fp32",),
              [(last_rank, after_own_checkpoint), (rank0, after_own_checkpoint)]),
    "zero3_offload_sharded": ("gpt-zero.yaml", (
        "strategy.param_dtype=fp32", "strategy.stage=3", "strategy.offload_params=true",
        "strategy.offload_optimizer=cpu", "strategy.sharded_checkpoint=true"),
        [(last_rank, after_own_checkpoint), (rank0, after_own_checkpoint)]),
    "mesh_dp2_tp2_pp2": ("gpt-3d.yaml", ("strategy.param_dtype=fp32",),
                         [(last_rank, after_own_checkpoint), (rank0, after_own_checkpoint)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_workers_restart_and_every_step_matches_the_reference(tmp, case):
    config, extra, kills = CASES[case]
    raw = experiment(tmp, case, *extra, f"run.max_failures={len(kills)}", config=config)
    ref = reference_for(raw, config)
    if case == "zero3_offload_sharded":
        assert raw["strategy"]["sharded_checkpoint"] and raw["strategy"]["offload_params"]
    report = run_with_kills(TrainRun(raw), f"{tmp}/{case}.metrics.jsonl", kills)
    check_restarts(report, f"{tmp}/{case}.metrics.jsonl", ref, len(kills))
    if case == "zero3_offload_sharded":           # every rank wrote its own shard file
        with open(f"{report['checkpoint']}/manifest.json") as fh:
            manifest = json.load(fh)
        assert manifest["sharded_state"] and len(manifest["files"]) == 2


def test_killed_worker_without_restarts_gives_a_clear_report(tmp):
    run = TrainRun(experiment(tmp, "fatal", "scaling.num_workers=2"))
    error = run_with_kills(run, f"{tmp}/fatal.metrics.jsonl", [(last_rank, after_own_checkpoint)])
    assert isinstance(error, RunFailed), error
    assert "training failed after 1 attempt" in str(error)
    assert "train worker rank" in str(error)
    assert run.group is None                 # the gang was torn down


def test_a_checkpoint_of_another_model_ends_the_run_without_restarts(tmp):
    """Resuming checkpoints of the 4-head model with 2 heads (every shape agrees): a
    CheckpointError on every rank before any step, and no restart is spent on it."""
    from bmray.actors.train.builders import run_experiment
    from bmray.actors.train.experiment import experiment_from_dict

    theirs = experiment(tmp, "other_model", "train.max_steps=3", "train.metrics_path=null")
    run_experiment(experiment_from_dict(theirs))          # one process: step_00000003
    raw = experiment(tmp, "other_model", "scaling.num_workers=2", "model.n_heads=2",
                     "run.max_failures=2", "checkpoint.resume=true")
    error = None
    try:
        TrainRun(raw).fit()
    except RunFailed as exc:
        error = exc
    assert error is not None and len(error.failures) == 1, error
    assert "other_model/step_00000003/manifest.json' is of another model: " \
           "model_config.n_heads is 4 in the checkpoint but 2" in str(error)
    assert attempts(f"{tmp}/other_model.metrics.jsonl") == [[]]       # no step ran
