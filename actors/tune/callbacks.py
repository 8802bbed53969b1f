"""Keep the delta checkpoints of the best N trials of the WHOLE sweep, delete the rest.

Why: Tune's ``CheckpointConfig(num_to_keep=...)`` bounds checkpoints per trial, so a sweep of
hundreds of trials still keeps hundreds of artifacts (users of Tune with transformers fill their
disks this way). Each time a trial finishes, this callback ranks the finished trials by their best
value of the metric and deletes the checkpoint folders (and the body's leftover output folder) of
every trial outside the best ``keep``. A trial ranks by the LAST value of the metric it reported:
that of its final delta (Tune keeps each trial's latest checkpoint), the one the Pareto report
shows. Running trials are ranked when they finish. The ranking reads Tune's own per-trial metric
summary, so it is the same after ``Tuner.restore``.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Any

from ray.tune import Callback

from bmray.actors.tune.trainable import BODY_OUT


def trial_score(trial: Any, metric: str) -> float | None:
    """The trial's last value of ``metric`` (None when it never reported it)."""
    summary = (getattr(trial, "metric_analysis", None) or {}).get(metric)
    return None if not summary else float(summary["last"])


def ranked(trials: list[Any], metric: str, mode: str, finishing: Any = None) -> list[Any]:
    """Finished trials (and ``finishing``, whose status Tune sets after the callbacks), best
    first; trials without the metric last."""
    done = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is finishing]
    sign = -1.0 if mode == "max" else 1.0

    def key(t: Any) -> tuple:
        score = trial_score(t, metric)
        return (score is None, 0.0 if score is None else sign * score, t.trial_id)

    return sorted(done, key=key)


def checkpoint_dirs(trial_path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(trial_path, "checkpoint_*")))


class KeepBestCheckpoints(Callback):
    """Sweep-wide keep-N of delta checkpoints (see the module docstring)."""

    def __init__(self, metric: str, mode: str, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the best trial's delta is exported), got {keep}")
        self.metric, self.mode, self.keep = metric, mode, keep
        self.deleted: list[str] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.prune(trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.prune(trials, trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.prune(trials)

    def prune(self, trials: list, finishing: Any = None) -> None:
        for position, trial in enumerate(ranked(trials, self.metric, self.mode, finishing)):
            shutil.rmtree(os.path.join(trial.path, BODY_OUT), ignore_errors=True)
            if position < self.keep:
                continue
            for folder in checkpoint_dirs(trial.path):
                shutil.rmtree(folder, ignore_errors=True)
                self.deleted.append(folder)
