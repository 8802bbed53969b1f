"""A lost node: the gang is placed across two worker nodes of a local multi-node Ray
(``ray.cluster_utils.Cluster``: a head without CPUs + two nodes of 2 CPUs), one node is removed
mid-run (its processes killed, as a crashed machine), and with ``scaling.min_workers`` the run
restarts on the remaining capacity — 2 workers instead of 4 — from its latest checkpoint.

References, both independent of the elastic restart: (1) a fresh 2-worker run that resumes a
copy of the same checkpoint (what "a run resumed at that size" does), which the elastic run must
equal step for step; (2) the uninterrupted single-process run of the same config, which every
step of both attempts must match (losses and pre-clip gradient norms, tolerances as in
tests/cluster/test_fault_tolerance.py): the data stream and checkpoints are world-size independent.

The cluster runs in a subprocess with its own RAY_TMPDIR: the test session's embedded Ray
(conftest's ``ray_session``) stays untouched, and so does any other Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from bmray.models.typed_config import ConfigError
from tests.conftest import REPO, folders_with_tests

# Long enough that the run is still going when Ray declares the removed node dead (about a
# second after the removal with FAST_NODE_DEATH; 12 steps of this model take ~1.5 s, so a
# shorter run could finish on the dead node's still-running workers before that).
STEPS, EVERY = 40, 3
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                   "health_check_timeout_ms": 200, "health_check_failure_threshold": 3}


# ---------------------------------------------------------------- config surface (no Ray)

def test_min_workers_is_validated_and_sizes_respect_the_strategy(tmp_path):
    from bmray.cluster.gang import ScalingConfig
    from bmray.cluster.launcher import TrainRun
    from tests.cluster.test_fault_tolerance import experiment

    with pytest.raises(ConfigError, match="scaling.min_workers: 5 is more than "
                                          "scaling.num_workers \\(4\\)"):
        ScalingConfig(num_workers=4, min_workers=5)
    with pytest.raises(ConfigError, match="scaling.min_workers"):
        ScalingConfig(num_workers=4, min_workers=0)
    assert ScalingConfig(num_workers=4).min_workers is None            # fixed size by default
    # DDP, global batch 8: 3 workers cannot split it
    ddp = TrainRun(experiment(tmp_path, "x", "scaling.num_workers=4", "scaling.min_workers=1"))
    assert ddp.sizes() == [4, 2, 1]
    # a tp2 x pp2 mesh: multiples of 4 only
    mesh = TrainRun(experiment(tmp_path, "y", "scaling.min_workers=2", config="gpt-3d.yaml"))
    assert mesh.sizes() == [8, 4]


# ---------------------------------------------------------------- the lost node

def scenario(tmp: str) -> dict:
    """Run in the subprocess: cluster, elastic run, node loss, references; returns facts."""
    import ray
    from ray.cluster_utils import Cluster

    from bmray.cluster.launcher import TrainRun
    from tests.cluster.test_fault_tolerance import attempts, experiment, reference

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    nodes = [cluster.add_node(wait=False, num_cpus=2, object_store_memory=80 * 2**20)
             for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.connect()
    try:
        raw = experiment(tmp, "elastic", f"train.max_steps={STEPS}",
                         "scaling.num_workers=4", "scaling.min_workers=2",
                         "run.max_failures=1")
        metrics = f"{tmp}/elastic.metrics.jsonl"
        run = TrainRun(raw)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(report=run.fit()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while not any(s > EVERY for s in _steps(attempts(metrics)[0])):
            assert thread.is_alive() and time.monotonic() < deadline, "attempt 1 did not train"
            time.sleep(0.02)
        placed = list(run.group.node_ids)
        lost = next(n for n in nodes if n.node_id == placed[0])     # rank 0's node
        cluster.remove_node(lost, allow_graceful=False)
        thread.join(300)
        assert "report" in out, "the elastic run did not finish"
        report = out["report"]
        # reference 1: a fresh 2-worker run resuming a copy of the checkpoint the elastic
        # run resumed from
        resumed = report["resumed_from"]
        copy_root = f"{tmp}/resumed_at_2"
        shutil.copytree(resumed, f"{copy_root}/{os.path.basename(resumed)}")
        fresh = TrainRun(experiment(tmp, "resumed_at_2", f"train.max_steps={STEPS}",
                                    "scaling.num_workers=2",
                                    "checkpoint.resume=true")).fit()
        # reference 2: uninterrupted, single process
        single = reference(raw)
        return {"placed": placed, "lost": lost.node_id,
                "workers": [n.node_id for n in nodes], "report": report,
                "elastic": attempts(metrics), "fresh": attempts(f"{tmp}/resumed_at_2.metrics.jsonl"),
                "fresh_report": fresh,
                "single": {"losses": single.losses, "grad_norms": single.grad_norms}}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if r["split"] == "train"]


def test_a_lost_node_shrinks_the_gang_and_the_run_continues(tmp_path):
    from tests.cluster.test_fault_tolerance import LOSS_TOL, NORM_TOL

    ray_tmp = tempfile.mkdtemp(prefix="bmray-ln-", dir="/tmp")    # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([REPO, *folders_with_tests(),
                                          os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.cluster.test_lost_node", str(tmp_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    facts = json.loads((tmp_path / "lost_node.json").read_text())
    report = facts["report"]

    # the gang was spread over both worker nodes, 2 ranks each; one node was lost
    assert sorted(facts["placed"]) == sorted(facts["workers"] * 2)
    assert report["attempts"] == 2 and "train worker rank" in report["failures"][0]
    # elastic restart: 2 workers (the remaining node's capacity), not a wait for 4
    assert report["world_sizes"] == [4, 2] and report["world_size"] == 2
    first, second = facts["elastic"]
    resume = second[0]
    assert resume["split"] == "resume" and resume["step"] % EVERY == 0 and resume["step"] >= EVERY
    assert report["resumed_from"].endswith(f"step_{resume['step']:08d}")
    assert _steps(second) == list(range(resume["step"] + 1, STEPS + 1))

    # (1) exactly the losses of a 2-worker run resumed from the same checkpoint
    fresh = {r["step"]: r for r in facts["fresh"][-1] if r["split"] == "train"}
    assert sorted(fresh) == _steps(second)
    for r in second[1:]:
        if r["split"] == "train":
            assert r["loss"] == pytest.approx(fresh[r["step"]]["loss"], rel=1e-6, abs=1e-7)
            assert r["grad_norm"] == pytest.approx(fresh[r["step"]]["grad_norm"], rel=1e-6)
    # (2) every step of both attempts: the uninterrupted single-process run
    single = {k: {int(s): v for s, v in d.items()} for k, d in facts["single"].items()}
    for rows in (first, second):
        steps = _steps(rows)
        for key, ref, tol in (("loss", single["losses"], LOSS_TOL),
                              ("grad_norm", single["grad_norms"], NORM_TOL)):
            torch.testing.assert_close(
                torch.tensor([r[key] for r in rows if r["split"] == "train"], dtype=torch.float64),
                torch.tensor([ref[s] for s in steps], dtype=torch.float64), **tol,
                msg=lambda m, k=key: f"steps {steps}, {k}: {m}")


if __name__ == "__main__":
    out_dir = sys.argv[1]
    result = scenario(out_dir)
    with open(os.path.join(out_dir, "lost_node.json"), "w") as fh:
        json.dump(result, fh, default=str)
