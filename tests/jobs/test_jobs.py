"""The job entrypoints: every config in configs/ runs, the pretrain job runs on a Ray worker,
bad configs fail before any worker starts, and `ray job submit` runs the same command."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from bmray.actors.train.qa import qa_config_from_dict
from bmray.actors.train.rank_run import rank_config_from_dict
from bmray.jobs import pretrain
from bmray.jobs import quickstart
from bmray.cluster.launcher import TrainRun
from bmray.models.typed_config import ConfigError, apply_overrides, load_yaml
from tests.conftest import REPO

# pre-training experiments (a ``model`` and a ``data`` section); configs of other jobs (adapt_*,
# qa_*, rank_*, index_*, serve_*) have their own tests
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
                 if {"model", "data"} <= set(load_yaml(p)))


def isolated(tmp_path, steps: int = 4) -> list[str]:
    """Overrides that move every path of a config under tmp_path and shorten the run."""
    return [f"data.corpus={tmp_path}/world/documents.jsonl", f"data.pack_dir={tmp_path}/pack",
            f"train.metrics_path={tmp_path}/metrics.jsonl", f"checkpoint.dir={tmp_path}/ckpt",
            f"train.max_steps={steps}", "train.eval_every=0", "checkpoint.every=0",
            "checkpoint.average_last=0", "data.world.n_entities=30", "run.max_failures=0"]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_trains(ray_session, path, tmp_path):
    """Each shipped config, shrunk, runs the way the job runs it: on its gang and strategy."""
    strategy = load_yaml(path).get("strategy", {})
    stages, tp = strategy.get("pp", 1), strategy.get("tp", 1)    # a layer per stage at least
    shrink = [f"scaling.num_workers={tp * stages}"] if strategy.get("kind") == "mesh" else []
    raw = apply_overrides(load_yaml(path), isolated(tmp_path, steps=3) + shrink
                          + ["model.vocab_size=512", f"model.n_layers={stages}",
                             "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
                             "scaling.cpus_per_worker=1"])
    report = TrainRun(raw).fit()
    assert report["step"] == 3 and report["world_size"] == raw.get("scaling", {}).get(
        "num_workers", 1)
    assert all(v == v and v < 50 for v in report["losses"].values())   # finite
    assert os.path.isdir(report["checkpoint"])


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-3", "model.moe=null", "a.b.c=x"])
    assert raw == {"train": {"lr": 1e-3}, "model": {"moe": None}, "a": {"b": {"c": "x"}}}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_bad_config_fails_before_ray_starts(capsys):
    code = pretrain.main(["--config", CONFIGS[0], "--set", "train.lr=-1"])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err
    code = pretrain.main(["--config", CONFIGS[0], "--set", "train.lrr=1"])
    assert code == 2
    assert "unknown key(s) ['lrr']" in capsys.readouterr().err


def test_pretrain_runs_on_a_ray_worker(ray_session, tmp_path):
    raw = pretrain.load_config(os.path.join(REPO, "configs", "gpt-tiny.yaml"),
                               isolated(tmp_path, steps=6) + ["train.log_every=1"])
    report = pretrain.run(raw, address=None)
    losses = report["losses"]
    assert report["step"] == 6 and sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1]
    # the worker wrote the metrics JSON lines the report summarises
    from bmray.actors.train.metrics import read_metrics
    rows = [r for r in read_metrics(f"{tmp_path}/metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in rows] == pytest.approx([losses[s] for s in range(1, 7)])


def test_quickstart_prints_loss_and_samples(ray_session, tmp_path, capsys):
    config = tmp_path / "quickstart.yaml"
    raw = apply_overrides(load_yaml(quickstart.CONFIG),
                          isolated(tmp_path, steps=3) + ["scaling.cpus_per_worker=1",
                                                         "model.n_layers=1", "model.d_model=32",
                                                         "model.d_ff=64", "model.vocab_size=512"])
    import yaml
    config.write_text(yaml.safe_dump(raw))
    assert quickstart.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "trained to step 3" in out
    assert "greedy completions" in out and out.count("[") >= 3


@pytest.fixture(scope="module")
def job_head():
    """A real head (its own ports, temp dir and process group) shared by the `ray job submit`
    tests; stopped afterwards without touching other Ray clusters."""
    from bmray.cluster.local_head import LocalHead

    with LocalHead(num_cpus=2) as head:
        yield head


def submit_job(head, working_dir: str, job_id: str, entrypoint: list[str]):
    """`ray job submit --working-dir ... -- entrypoint` against ``head``, waiting for the end:
    (the CLI's output, the status query's output)."""
    submit = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
              "--address", head.dashboard_url, "--working-dir", working_dir,
              "--submission-id", job_id, "--", *entrypoint]
    # without --no-wait the CLI tails the job's logs until it ends
    out = subprocess.run(submit, env=head.child_env, capture_output=True, text=True,
                         timeout=300)
    # The status through the SDK, in a process with the head's auth settings (Ray reads
    # RAY_AUTH_MODE once per process, so this test process cannot switch it).
    query = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
             "c = C(sys.argv[1]); print(c.get_job_status(sys.argv[2]).value); "
             "print(c.get_job_logs(sys.argv[2]))")
    status = subprocess.run([sys.executable, "-c", query, head.dashboard_url, job_id],
                            env=head.child_env, capture_output=True, text=True, timeout=60)
    return out, status


TINY_JOB = ["--set", "train.max_steps=5", "--set", "train.eval_every=0",
            "--set", "checkpoint.every=0", "--set", "checkpoint.average_last=0",
            "--set", "data.world.n_entities=30",
            "--set", "data.corpus=runs/w30/documents.jsonl",
            "--set", "data.pack_dir=runs/packs/jobtest"]


def test_ray_job_submit_runs_the_same_command(job_head):
    """`ray job submit -- bmray pretrain ...` on a real head: SUCCEEDED, the job's logs."""
    job_id = f"bmray-test-{os.getpid()}"
    out, status = submit_job(job_head, REPO, job_id,
                             ["bmray", "pretrain", "--config", "configs/gpt-tiny.yaml",
                              *TINY_JOB])
    assert status.returncode == 0, status.stderr
    state, _, logs = status.stdout.partition("\n")
    assert state == "SUCCEEDED", out.stdout[-3000:] + out.stderr[-3000:]
    assert "trained to step 5" in logs
    assert "Ray cluster at" in logs          # it joined the head, not an embedded Ray
    assert "trained to step 5" in out.stdout + out.stderr


SHADOW = ("raise ImportError('the working directory\\'s own {name} package was imported "
          "instead of bmray.{name}')\n")


def test_job_from_a_project_with_its_own_models_and_jobs(job_head, tmp_path):
    """One namespace: a user's project with its own `models/` and `jobs/` packages (which fail
    if imported) submits `bmray pretrain` with `--working-dir` of that project, and it runs."""
    project = tmp_path / "project"
    for name in ("models", "jobs"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(SHADOW.format(name=name))
    shutil.copy(os.path.join(REPO, "configs", "gpt-tiny.yaml"), project / "cfg.yaml")
    job_id = f"bmray-test-namespace-{os.getpid()}"
    out, status = submit_job(job_head, str(project), job_id,
                             ["bmray", "pretrain", "--config", "cfg.yaml", *TINY_JOB,
                              "--set", "train.max_steps=2"])
    assert status.returncode == 0, status.stderr
    state, _, logs = status.stdout.partition("\n")
    assert state == "SUCCEEDED", out.stdout[-3000:] + out.stderr[-3000:]
    assert "trained to step 2" in logs
    # the control: in that job a bare `import models` is the project's own package
    _, status = submit_job(job_head, str(project), f"{job_id}-control",
                           ["python", "-c", "import models"])
    state, _, logs = status.stdout.partition("\n")
    assert state == "FAILED" and "instead of bmray.models" in logs, status.stdout[-3000:]


@pytest.mark.parametrize("name", ["qa_tiny.yaml", "qa_world_minilm.yaml", "qa_covid_minilm.yaml",
                                  "rank_cross_encoder.yaml", "rank_dual_encoder.yaml",
                                  "rank_span_pretrain.yaml"])
def test_shipped_qa_and_rank_configs_parse(name):
    raw = load_yaml(os.path.join(REPO, "configs", name))
    parse = qa_config_from_dict if name.startswith("qa_") else rank_config_from_dict
    assert parse(raw) is not None
