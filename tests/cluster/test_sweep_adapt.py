"""`bmray sweep` with the real trial body (run_adapt) end to end, on configs/sweep_tiny.yaml: the
evaluation rows reach Tune (ASHA's rungs), the checkpoints hold the delta (and head or prompt)
only, keep-N across the sweep, a TensorBoard event file per trial (and `tensorboard --logdir`
serving it), the Pareto costs against formulas written out here, best_delta loading onto the
base and reproducing the best trial's accuracy; a gang of 2 per trial inside the trial's own
placement group; a bad space refused before any trial."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import ray
import safetensors.torch
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bmray.actors.train.adapt import build_task
from bmray.actors.train.adapt_config import DeltaSection, adapt_config_from_dict
from bmray.actors.tune.trainable import TrialSpec
from bmray.cluster.sweep import DEFAULT_BODY, trial_spec
from bmray.jobs import sweep as sweep_job
from bmray.models.config import ModelConfig
from bmray.models.delta.io import load_delta
from bmray.models.families.registry import build_model
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "sweep_tiny.yaml")
BMRAY = os.path.join(os.path.dirname(sys.executable), "bmray")
ARTIFACT_FILES = {"delta.safetensors", "manifest.json", "head.safetensors", "head.json",
                  "prompt.json", "soft.safetensors"}
N_LABELS, D = 6, 32                  # TREC coarse classes; the tiny BERT's width


def results(sweep_dir):
    """Every trial's reported rows, from Tune's result.json (trial folder name -> rows)."""
    out = {}
    for path in glob.glob(os.path.join(sweep_dir, "trial_*", "result.json")):
        with open(path) as fh:
            out[os.path.basename(os.path.dirname(path))] = [json.loads(l) for l in fh if l.strip()]
    return out


def base_params():
    """The tiny BERT's parameter count, counted on a model built here from the config's numbers."""
    raw = yaml.safe_load(open(TINY))["adapt"]["base"]["model"]
    return sum(p.numel() for p in build_model(ModelConfig(**raw)).parameters())


def expected_trainable(params):
    """LoRA (Hu et al. 2021): r·(in + out) per adapted Linear; q_proj and v_proj of 2 layers
    (32 → 32); plus the head Linear(32, 6) when there is no prompt. None: not written out."""
    head = 0 if params["prompt"] is not None else D * N_LABELS + N_LABELS
    if params["delta"] == "lora":
        return 2 * 2 * params["delta[lora].rank"] * (D + D) + head
    return None


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """`bmray sweep --config configs/sweep_tiny.yaml` as a user runs it (its own embedded Ray)."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([BMRAY, "sweep", "--config", TINY, "--set",
                           f"sweep.storage_path={tmp}/runs", "--report", f"{tmp}/trials.json"],
                          cwd=str(tmp), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(tmp / "runs" / "tiny"), proc.stdout, json.load(open(tmp / "trials.json"))


def test_sweep_end_to_end(tiny_sweep):
    sweep_dir, stdout, trials = tiny_sweep
    rows = results(sweep_dir)
    assert len(rows) == len(trials) == 4
    finished = {}
    for name, trial in rows.items():
        evals = [r for r in trial if r["final"] == 0]
        # every evaluation of run_adapt reached Tune, one iteration each (ASHA's time unit)
        assert [r["step"] for r in evals] in ([3], [3, 6]), (name, trial)
        assert [r["training_iteration"] for r in trial] == list(range(1, len(trial) + 1))
        if trial[-1]["final"] == 1:
            finished[name] = trial[-1]
            assert [r["step"] for r in evals] == [3, 6]
            assert trial[-1]["accuracy"] == evals[-1]["accuracy"]
    assert 1 <= len(finished) <= 4

    # the Pareto costs of every finished trial, against formulas written out here
    frozen = base_params()
    for name, final in finished.items():
        params = final["config"]
        trainable, total = final["trainable_params"], final["total_params"]
        assert total - trainable == frozen, name
        if expected_trainable(params) is not None:
            assert trainable == expected_trainable(params), (name, params)
        assert final["trainable_pct"] == pytest.approx(100.0 * trainable / total)
        # training memory: fp32 weights of the whole model + a gradient and AdamW's two fp32
        # moments of the trainable ones (+ a few step counters) + the activations kept for
        # backward (measured by run_adapt; tests/actors/train/test_adapt_memory.py checks them)
        act = final["activation_bytes"]
        assert act > 0
        assert 4 * total + 12 * trainable + act <= final["peak_memory_bytes"] <= \
            4 * total + 16 * trainable + act + 4096
        assert 0 < final["latency_ms"] < 10_000
    table = open(os.path.join(sweep_dir, "pareto.md")).read()
    for name, final in finished.items():
        line = next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[1]) == pytest.approx(final["accuracy"], abs=1e-4)
        assert float(cells[2]) == pytest.approx(final["trainable_pct"], abs=1e-3)
        assert float(cells[3]) == pytest.approx(final["peak_memory_bytes"] / 2**20, abs=0.06)
    assert os.path.getsize(os.path.join(sweep_dir, "pareto.png")) > 1000
    assert f"tensorboard --logdir {sweep_dir}" in stdout

    # keep-N across the sweep (2): the trials with the best last accuracy keep their latest
    # checkpoint, the others none; a checkpoint is the delta + head/prompt, nothing of the base
    last = {name: trial[-1]["accuracy"] for name, trial in rows.items()}
    top = set(sorted(last, key=lambda n: (-last[n], n))[:2])
    kept = {n: glob.glob(os.path.join(sweep_dir, n, "checkpoint_*")) for n in rows}
    assert {n for n, c in kept.items() if c} == top
    for n in top:
        assert len(kept[n]) == 1
        files = set(os.listdir(kept[n][0]))
        assert {"delta.safetensors", "manifest.json"} <= files <= ARTIFACT_FILES
        size = sum(os.path.getsize(os.path.join(kept[n][0], f)) for f in files)
        assert size < 4 * frozen / 5, (n, size)      # far below the base's fp32 weights
    assert not glob.glob(os.path.join(sweep_dir, "*", "body_out"))

    # TensorBoard: one event file per trial, with the accuracy curve Tune recorded
    for name, trial in rows.items():
        events = glob.glob(os.path.join(sweep_dir, name, "events.out.tfevents.*"))
        assert len(events) == 1, name
        acc = EventAccumulator(events[0])
        acc.Reload()
        curve = [e.value for e in acc.Scalars("ray/tune/accuracy")]
        assert curve == pytest.approx([r["accuracy"] for r in trial], abs=1e-6)


def test_best_delta_loads_onto_the_base_and_reproduces_the_accuracy(tiny_sweep, tmp_path):
    sweep_dir, stdout, _ = tiny_sweep
    rows = results(sweep_dir)
    best_name = re.search(r"best trial (trial_\w+)", stdout).group(1)
    best = rows[best_name][-1]
    assert best["final"] == 1
    best_dir = os.path.join(sweep_dir, "best_delta")
    ckpt = glob.glob(os.path.join(sweep_dir, best_name, "checkpoint_*"))[0]
    assert sorted(os.listdir(best_dir)) == sorted(os.listdir(ckpt))

    # the best trial's own config, rebuilt from its sampled parameters
    _, adapt, space = sweep_job.load_sweep(TINY, [])
    mapping = TrialSpec(adapt=adapt, space=space, body=None, load_config=None,
                        workers_per_trial=0).trial_mapping(best["config"])
    cfg = adapt_config_from_dict(mapping)
    task = build_task(cfg, str(tmp_path / "tok"))
    delta = load_delta(best_dir, base=task.base)          # the base identity is checked
    assert delta.config.method == best["config"]["delta"]

    # that delta (and the head or prompt beside it) on a fresh task reproduces the accuracy
    cfg = dataclasses.replace(cfg, delta=DeltaSection(config=None, load=best_dir, name="task"))
    task = build_task(cfg, str(tmp_path / "tok"))
    model = task.model.eval()
    if cfg.prompt is None:
        model.head.load_state_dict(safetensors.torch.load_file(
            os.path.join(best_dir, "head.safetensors")))
    elif os.path.exists(os.path.join(best_dir, "soft.safetensors")):
        model.prompt.soft.load_state_dict(safetensors.torch.load_file(
            os.path.join(best_dir, "soft.safetensors")))
    with torch.no_grad():
        batch = task.objective(task.eval_rows, None)
        logits = model(**batch).logits
    accuracy = float((logits.argmax(-1) == batch["labels"]).float().mean())
    assert accuracy == pytest.approx(best["accuracy"], abs=1.5 / len(task.eval_rows))


def test_tensorboard_serves_the_trials(tiny_sweep):
    """`tensorboard --logdir <storage>/<name>` (the command the sweep prints) serves each
    trial's accuracy curve over its HTTP API; stopped by its own pid."""
    sweep_dir, _, _ = tiny_sweep
    rows = results(sweep_dir)
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", sweep_dir,
                             "--port", "0", "--host", "127.0.0.1", "--load_fast", "false"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "tensorboard exited"
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url, "tensorboard printed no address"
        name = sorted(rows)[0]
        query = f"{url}/data/plugin/scalars/scalars?run={name}&tag=ray/tune/accuracy"
        points = []
        while len(points) < len(rows[name]) and time.time() < deadline:
            try:
                points = json.load(urllib.request.urlopen(query, timeout=10))
            except OSError:            # 400 until the run is loaded
                time.sleep(0.5)
        assert [p[2] for p in points] == pytest.approx([r["accuracy"] for r in rows[name]])
        runs = json.load(urllib.request.urlopen(f"{url}/data/runs", timeout=10))
        assert set(rows) <= set(runs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_gang_of_two_per_trial_in_the_trials_own_placement_group(ray_session, tmp_path):
    before = set(ray.util.placement_group_table())
    code = sweep_job.main(["--config", TINY, "--set", f"sweep.storage_path={tmp_path}",
                           "--set", "sweep.name=gang", "--set", "sweep.workers_per_trial=2",
                           "--set", "sweep.num_samples=2", "--set", "sweep.scheduler=fifo"])
    assert code == 0
    rows = results(str(tmp_path / "gang"))
    assert len(rows) == 2
    for trial in rows.values():     # rank 0's evaluations were relayed to the trial, then Tune
        assert [r["step"] for r in trial] == [3, 6, 6] and trial[-1]["final"] == 1
    # every placement group of the sweep is a trial's (driver + 2 workers): none for a gang
    new = {k: v for k, v in ray.util.placement_group_table().items() if k not in before}
    assert 1 <= len(new) <= 2
    assert all(len(v["bundles"]) == 3 for v in new.values()), new


def test_unknown_key_in_the_space_before_any_trial(tmp_path, capsys):
    raw = yaml.safe_load(open(TINY))
    lora = raw["space"]["delta"]["choice"][0]
    lora["rnak"] = lora.pop("rank")
    raw["sweep"]["storage_path"] = str(tmp_path / "runs")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert sweep_job.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "space.delta[lora]" in err and "unknown key(s) ['rnak']" in err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("option,change,match", [
    (1, {"targets": ["*.ffn.dwn"]}, r"space.delta\[adapter\].*'\*.ffn.dwn' matches no"),
    (0, {"rank": {"choice": [2, 40]}}, r"space.delta\[lora\].rank.*rank: 40 exceeds"),
])
def test_a_space_option_whose_model_cannot_be_built_fails_before_any_trial(
        tmp_path, capsys, option, change, match):
    """The driver builds every probe's task: an option's target pattern that matches no
    module, or a rank larger than its layers, is refused before Ray starts."""
    raw = yaml.safe_load(open(TINY))
    raw["space"]["delta"]["choice"][option].update(change)
    raw["sweep"]["storage_path"] = str(tmp_path / "runs")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert sweep_job.main(["--config", str(path)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "runs")


def test_in_process_trials_need_one_worker(tmp_path, capsys):
    assert sweep_job.main(["--config", TINY, "--set", "adapt.scaling.num_workers=2",
                           "--set", f"sweep.storage_path={tmp_path}/runs"]) == 2
    assert "sweep.workers_per_trial: 0 runs each trial in its own process" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name", ["sweep_tiny.yaml", "sweep_trec.yaml"])
def test_the_shipped_sweep_configs_validate(name):
    """Every key and option of the shipped spaces builds an adapt config (no Ray, no model)."""
    sweep, adapt, space = sweep_job.load_sweep(os.path.join(REPO, "configs", name), [])
    body = sweep_job.resolve(sweep.trial_body, "trial_body")
    loader = sweep_job.resolve(sweep.config_loader, "config_loader")
    check = sweep_job.resolve(sweep.config_check, "config_check")
    trial_spec(sweep, adapt, space, body, loader, check)
    assert sweep.trial_body == DEFAULT_BODY and sweep.scheduler == "asha"
