"""A gang worker killed mid-adaptation: with ``run.max_failures`` the gang restarts from the
latest delta-only checkpoint (trainable tensors + optimizer state; the frozen base is rebuilt
from its source) and every step of every attempt has the loss of an uninterrupted
single-process run (tolerances and eps: tests/equivalence.py)."""
from __future__ import annotations

import os

import torch

from bmray.actors.runtime.adapt_rank import adapt_rank
from bmray.actors.train.adapt import run_adapt
from bmray.actors.train.adapt_config import adapt_config_from_dict, load_adapt_config
from bmray.actors.train.checkpoints import load_checkpoint
from bmray.cluster.launcher import TrainRun
from bmray.models.typed_config import apply_overrides, load_yaml
from tests.cluster.test_fault_tolerance import attempts, last_rank, run_with_kills, train_steps
from tests.conftest import REPO
from tests.equivalence import EPS, LOSS_TOL

torch.set_num_threads(1)
STEPS, EVERY = 30, 3     # the kill lands after the first checkpoint, long before the end
# (with 9 steps the run sometimes finished, final checkpoint included, before the kill did)


def test_a_killed_worker_resumes_from_the_delta_checkpoint(ray_session, tmp_path):
    overrides = [f"train.max_steps={STEPS}", "train.eval_every=0", "train.log_every=1",
                 f"train.eps={EPS}", "train.warmup_steps=0", f"checkpoint.every={EVERY}",
                 "checkpoint.keep_last=0"]
    ref_dir = tmp_path / "ref"
    ref = run_adapt(load_adapt_config(os.path.join(REPO, "configs", "adapt_tiny.yaml"),
                                      ["scaling.num_workers=1", f"out_dir={ref_dir}",
                                       *overrides]), out_dir=str(ref_dir))
    raw = apply_overrides(load_yaml(os.path.join(REPO, "configs", "adapt_tiny.yaml")),
                          [*overrides, f"out_dir={tmp_path}/gang", "run.max_failures=1",
                           f"base.tokenizer_dir={ref_dir}/tokenizer"])
    run = TrainRun(raw, parse=adapt_config_from_dict, rank_fn=adapt_rank)
    metrics = f"{tmp_path}/gang/metrics.jsonl"

    def due(rows):                      # the first checkpoint is committed
        return any(s > EVERY for s in train_steps(rows))

    report = run_with_kills(run, metrics, [(last_rank, due)])
    assert isinstance(report, dict), report
    assert report["attempts"] == 2 and report["step"] == STEPS
    per_attempt = attempts(metrics)
    assert len(per_attempt) == 2 and per_attempt[1][0]["split"] == "resume"
    resumed = per_attempt[1][0]["step"]
    assert resumed >= EVERY and resumed % EVERY == 0
    for rows in per_attempt:
        train = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
        steps = sorted(train)
        torch.testing.assert_close(torch.tensor([train[s] for s in steps], dtype=torch.float64),
                                   torch.tensor([ref.losses[s] for s in steps],
                                                dtype=torch.float64), **LOSS_TOL)
    assert train_steps(per_attempt[1])[-1] == STEPS
    _, state = load_checkpoint(report["checkpoint"])
    assert all(".deltas." in k or k.startswith("head.") for k in state["model"])
