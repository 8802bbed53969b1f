"""Ray Tune sweeps end to end with the stand-in trial body (tests/actors/tune/tune_standin.py):
ASHA stops trials early (fewer trial-steps than FIFO on the same space), a gang per trial that
never over-subscribes the cluster, keep-N delta checkpoints across the whole sweep, TensorBoard
event files per trial, the Pareto report, and resume after the driver is SIGKILLed mid-sweep."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.actors.tune import tune_standin as S
from bmray.actors.tune.space import SearchSpace
from bmray.cluster.sweep import SweepConfig, run_sweep, tensorboard_command
from bmray.jobs import sweep as sweep_job
from bmray.models.typed_config import ConfigError
from tests.conftest import REPO, folders_with_tests

SPACE = {"train.lr": {"loguniform": [1e-3, 3.0]},
         "delta": {"choice": [{"method": "lora", "rank": {"choice": [2, 8]}},
                              {"method": "bitfit"}]}}
SMALL = dict(trial_cpus=0.5, cpus_per_worker=0.5, search="random")


def results(sweep_dir):
    """Every trial's reported rows, read from Tune's result.json files (trial name -> rows)."""
    out = {}
    for path in glob.glob(os.path.join(sweep_dir, "trial_*", "result.json")):
        with open(path) as fh:
            out[os.path.basename(os.path.dirname(path))] = [json.loads(l) for l in fh if l.strip()]
    return out


def markers(log_dir):
    rows = []
    for path in glob.glob(os.path.join(log_dir, "*")):
        with open(path) as fh:
            rows.append((os.path.basename(path).rsplit("-", 1)[0], json.load(fh)))
    return rows


def test_asha_stops_trials_early_fifo_does_not(ray_session, tmp_path):
    steps = {}
    for scheduler in ("fifo", "asha"):
        sweep = SweepConfig(name=scheduler, storage_path=str(tmp_path), num_samples=6,
                            scheduler=scheduler, max_t=6, grace_period=1, reduction_factor=2,
                            max_concurrent_trials=2, keep_checkpoints=1, seed=3, **SMALL)
        run_sweep(sweep, {"train": {"steps": 6}}, SearchSpace(SPACE), S.run, S.load_config)
        rows = results(sweep.sweep_dir)
        assert len(rows) == 6
        # trial-steps: the body's steps each trial reached (its evaluations; the final row
        # repeats the last step)
        steps[scheduler] = sum(max(r["step"] for r in trial) for trial in rows.values())
        finals = sum(any(r["final"] == 1 for r in trial) for trial in rows.values())
        if scheduler == "fifo":
            assert steps["fifo"] == 6 * 6 and finals == 6
    assert steps["asha"] < steps["fifo"], steps
    assert finals < 6               # ASHA cut some trials before their final report


def test_gangs_keep_n_tensorboard_and_pareto(ray_session, tmp_path):
    log_dir = tmp_path / "log"
    # 8 logical CPUs, 3 per trial (a driver + a gang of 2): at most 2 trials at once
    sweep = SweepConfig(name="keep", storage_path=str(tmp_path / "runs"), num_samples=5,
                        scheduler="fifo", search="random", seed=1, workers_per_trial=2,
                        trial_cpus=1, cpus_per_worker=1, keep_checkpoints=2)
    adapt = {"train": {"steps": 4}, "task": {"log_dir": str(log_dir), "sleep_s": 0.2,
                                              "checkpoint_evals": True}}
    res = run_sweep(sweep, adapt, SearchSpace(SPACE), S.run, S.load_config)
    rows = results(sweep.sweep_dir)
    assert len(rows) == 5 and len(res.trials) == 5

    # every trial ran its gang of 2 in its own placement group
    assert all(r["gang_placed"] == 2 for trial in rows.values() for r in trial)
    spans = [(m["start"], m["end"]) for _, m in markers(log_dir)]
    assert len(spans) == 5
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most <= 2, spans

    # keep-N across the sweep: the 2 trials with the best final accuracy keep one checkpoint
    # each (their latest: num_to_keep=1 per trial); the rest none
    final = {name: trial[-1]["accuracy"] for name, trial in rows.items()}
    top2 = set(sorted(final, key=lambda n: (-final[n], n))[:2])
    kept = {name: glob.glob(os.path.join(sweep.sweep_dir, name, "checkpoint_*"))
            for name in rows}
    assert {n for n, c in kept.items() if c} == top2
    assert all(len(kept[n]) == 1 for n in top2)
    for n in top2:   # the checkpoint holds the delta artifact only
        assert sorted(os.listdir(kept[n][0])) == ["delta.safetensors", "manifest.json"]
    assert not glob.glob(os.path.join(sweep.sweep_dir, "*", "body_out"))

    # TensorBoard: one event file per trial, holding the accuracy curve of its evaluations
    for name, trial in rows.items():
        events = glob.glob(os.path.join(sweep.sweep_dir, name, "events.out.tfevents.*"))
        assert len(events) == 1, name
        acc = EventAccumulator(events[0])
        acc.Reload()
        curve = [e.value for e in acc.Scalars("ray/tune/accuracy")]
        assert curve == pytest.approx([r["accuracy"] for r in trial], abs=1e-6)
    assert tensorboard_command(sweep) == f"tensorboard --logdir {sweep.sweep_dir}"

    # the Pareto report covers every trial, the best delta is exported
    rep = res.report
    assert os.path.exists(os.path.join(sweep.sweep_dir, "pareto.md"))
    assert os.path.exists(os.path.join(sweep.sweep_dir, "pareto.png"))
    assert len([p for p in rep["front"]]) >= 1
    best_name = min(final, key=lambda n: (-final[n], n))
    assert rep["best"].trial == best_name
    with open(os.path.join(sweep.sweep_dir, "best_delta", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["method"] == dict(rep["best"].params)["delta"]


def sweep_yaml(tmp_path, **sweep):
    log_dir = tmp_path / "log"
    raw = {"adapt": {"train": {"steps": 6}, "task": {"log_dir": str(log_dir), "sleep_s": 0.3}},
           "space": SPACE,
           "sweep": {"name": "resume", "storage_path": str(tmp_path / "runs"),
                     "num_samples": 4, "scheduler": "fifo", "max_concurrent_trials": 1,
                     "trial_body": "tests.actors.tune.tune_standin:run",
                     "config_loader": "tests.actors.tune.tune_standin:load_config",
                     "config_check": "",
                     "keep_checkpoints": 4, **SMALL, **sweep}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), str(log_dir)


def terminated(sweep_dir):
    """Trials the saved experiment state records as finished (what a resume reads)."""
    states = sorted(glob.glob(os.path.join(sweep_dir, "experiment_state-*.json")))
    if not states:
        return set()
    try:
        with open(states[-1]) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return set()
    done = set()
    for entry in data.get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        if state.get("status") == "TERMINATED":
            done.add(state["trial_id"])
    return done


def session_pids(sid):
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def test_resume_after_the_driver_is_killed(ray_session, tmp_path):
    config, log_dir = sweep_yaml(tmp_path)
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1",
               PYTHONPATH=os.pathsep.join(folders_with_tests() + [REPO]))
    env.pop("RAY_ADDRESS", None)
    # the driver and its embedded Ray in a session of their own: SIGKILL to all of it is a
    # crash of the driver's machine, leaving the sweep folder as it was
    proc = subprocess.Popen([sys.executable, "-m", "bmray.jobs.sweep", "--config", config],
                            env=env, cwd=str(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sweep_dir = str(tmp_path / "runs" / "resume")
    try:
        deadline = time.time() + 240
        while len(terminated(sweep_dir)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        before = terminated(sweep_dir)
        assert len(before) >= 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(100):                  # what the session left (Ray's own processes)
            left = session_pids(proc.pid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
    assert len(before) < 4
    starts_before = markers(log_dir)

    assert sweep_job.main(["--config", config, "--resume"]) == 0
    rows = results(sweep_dir)
    assert len(rows) == 4
    assert all(trial[-1]["final"] == 1 for trial in rows.values())
    starts = [name for name, _ in markers(log_dir)]
    for trial_id in before:   # a finished trial was not rerun: its body started once
        assert starts.count(f"trial_{trial_id}") == 1, (trial_id, starts)
    assert len(starts) > len(starts_before)     # the unfinished ones ran after the resume
    assert os.path.exists(os.path.join(sweep_dir, "pareto.md"))


def test_job_refuses_a_bad_space_before_ray(tmp_path, capsys):
    config, _ = sweep_yaml(tmp_path)
    raw = yaml.safe_load(open(config))
    raw["space"]["train.lrr"] = {"loguniform": [1e-3, 1e-1]}
    open(config, "w").write(yaml.safe_dump(raw))
    assert sweep_job.main(["--config", config]) == 2
    assert "space.train.lrr" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("sweep, message", [
    ({"schedulr": "asha"}, "sweep: unknown key(s) ['schedulr']"),
    ({"scheduler": "hyperband"}, "sweep.scheduler"),
    ({"keep_checkpoints": 0}, "sweep.keep_checkpoints"),
    ({"scheduler": "asha", "grace_period": 5, "max_t": 2}, "sweep.grace_period"),
    ({"trial_body": "tests.actors.tune.tune_standin:nope"}, "sweep.trial_body: cannot import"),
])
def test_bad_sweep_section(tmp_path, capsys, sweep, message):
    config, _ = sweep_yaml(tmp_path, **sweep)
    assert sweep_job.main(["--config", config]) == 2
    assert message in capsys.readouterr().err


def test_resume_of_nothing_is_a_config_error(ray_session, tmp_path):
    config, _ = sweep_yaml(tmp_path)
    with pytest.raises(ConfigError, match="nothing to resume"):
        sweep_job.run(*sweep_job.load_sweep(config, []), resume=True)
