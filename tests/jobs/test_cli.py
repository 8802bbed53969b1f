"""The one command: `bmray <job>` dispatches to each job, `--help` names it `bmray <job>`, an
unknown job exits 2 listing the jobs, and the installed console script runs a job end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bmray.jobs import cli
from tests.conftest import REPO


@pytest.mark.parametrize("job", sorted(cli.JOBS))
def test_help_of_every_job(job, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([job, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bmray {job} ")
    assert "--help" in out


def test_usage_lists_the_jobs(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bmray <job>")
    assert all(job in out for job in cli.JOBS)


def test_unknown_job_exits_2_with_the_list(capsys):
    assert cli.main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert "unknown job 'pretrian'" in err
    assert all(job in err for job in cli.JOBS)


def console_script() -> str:
    """The `bmray` console script installed next to this interpreter."""
    found = shutil.which("bmray", path=os.path.dirname(sys.executable))
    assert found, f"no bmray console script in {os.path.dirname(sys.executable)}"
    return found


def test_console_script_runs_plan():
    out = subprocess.run([console_script(), "plan", "--model", "configs/gpt-tiny.yaml",
                          "--gpus", "2", "--gpu-memory", "80GB", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["gpus"] == 2 and result["recommendation"] is not None


def test_console_script_reports_bad_arguments():
    out = subprocess.run([console_script(), "plan", "--model", "configs/gpt-tiny.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "usage: bmray plan" in out.stderr


def test_python_m_runs_the_same_entry():
    out = subprocess.run([sys.executable, "-m", "bmray.jobs.plan", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: bmray plan ")
    out = subprocess.run([sys.executable, "-m", "bmray.jobs.cli", "plan", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: bmray plan ")
