"""Run a Ray Tune sweep over adaptation: Tuner, ASHA or FIFO, Optuna or random search, a gang per
trial, keep-N delta checkpoints across the sweep, TensorBoard files, resume, the Pareto report.

    result = run_sweep(SweepConfig(num_samples=16), adapt=raw, space=SearchSpace(raw_space),
                       body=run_adapt, load_config=load_adapt_config)

Search: both modes draw through one define-by-run function (space.py) in Ray's OptunaSearch:
``optuna`` with Optuna's TPE sampler, ``random`` with its RandomSampler (same space, same
conditionals). ASHA's time unit is Tune's ``training_iteration`` (one per evaluation); a trial's
last report (its costs and delta) is one more iteration, so the scheduler gets ``max_t + 1`` and
never cuts a trial that evaluated ``max_t`` times before its final report.
Resume (``resume=True``): ``Tuner.restore(<storage>/<name>, resume_unfinished=True)`` reruns only
trials that had not finished; finished ones keep their results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import optuna
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.logger.tensorboardx import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from bmray.actors.tune.callbacks import KeepBestCheckpoints
from bmray.actors.tune.report import COSTS, TrialPoint, write_report
from bmray.actors.tune.space import SearchSpace
from bmray.actors.tune.trainable import FINAL, TrialSpec, make_trainable
from bmray.models.typed_config import ConfigError, check_choice, check_int, check_positive

DEFAULT_BODY = "bmray.cluster.adapt_trial:adapt_trial"   # run_adapt, on the trial's gang
DEFAULT_LOADER = "bmray.actors.train.adapt_config:adapt_config_from_dict"
DEFAULT_CHECK = "bmray.actors.train.adapt:check_adapt_mapping"   # builds the task: models too


@dataclass(frozen=True)
class SweepConfig:
    """The ``sweep:`` section (Ray Tune's names where it has them)."""

    name: str = "sweep"
    storage_path: str = "runs/sweeps"      # the sweep lives in <storage_path>/<name>
    num_samples: int = 8
    metric: str = "accuracy"
    mode: str = "max"
    search: str = "optuna"                 # optuna (TPE) | random
    seed: int = 0
    scheduler: str = "asha"                # asha | fifo
    grace_period: int = 1                  # ASHA: evaluations before a trial can be stopped
    reduction_factor: int = 2              # ASHA: keep the top 1/rf at each rung
    max_t: int = 10                        # ASHA: the most evaluations a trial makes
    max_concurrent_trials: int = 0         # 0: as many as the cluster holds
    workers_per_trial: int = 1             # the gang of each trial (0: none, the body alone)
    cpus_per_worker: float = 1.0
    trial_cpus: float = 1.0                # the trial driver's bundle
    keep_checkpoints: int = 3              # delta checkpoints kept across the WHOLE sweep
    restart_errored: bool = False          # on resume, rerun trials that had failed
    trial_body: str = DEFAULT_BODY         # module:function, resolved by the job
    config_loader: str = DEFAULT_LOADER
    config_check: str = DEFAULT_CHECK      # run on the driver for every probe ("": the loader)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"sweep.name: a folder name, got {self.name!r}")
        check_int("sweep.num_samples", self.num_samples, minimum=1)
        check_choice("sweep.mode", self.mode, ("max", "min"))
        check_choice("sweep.search", self.search, ("optuna", "random"))
        check_choice("sweep.scheduler", self.scheduler, ("asha", "fifo"))
        check_int("sweep.grace_period", self.grace_period, minimum=1)
        check_int("sweep.reduction_factor", self.reduction_factor, minimum=2)
        check_int("sweep.max_t", self.max_t, minimum=1)
        if self.scheduler == "asha" and self.grace_period > self.max_t:
            raise ConfigError(f"sweep.grace_period: {self.grace_period} is more than sweep.max_t "
                              f"({self.max_t})")
        check_int("sweep.max_concurrent_trials", self.max_concurrent_trials, minimum=0)
        check_int("sweep.workers_per_trial", self.workers_per_trial, minimum=0)
        check_positive("sweep.cpus_per_worker", self.cpus_per_worker, allow_zero=True)
        check_positive("sweep.trial_cpus", self.trial_cpus, allow_zero=True)
        check_int("sweep.keep_checkpoints", self.keep_checkpoints, minimum=1)
        for key in ("trial_body", "config_loader", "config_check"):
            if key == "config_check" and not self.config_check:
                continue
            if ":" not in getattr(self, key):
                raise ConfigError(f"sweep.{key}: expected module:function, "
                                  f"got {getattr(self, key)!r}")

    @property
    def sweep_dir(self) -> str:
        return os.path.join(os.path.abspath(os.path.expanduser(self.storage_path)), self.name)

    def scheduler_obj(self) -> Any:
        if self.scheduler == "fifo":
            return FIFOScheduler()
        return ASHAScheduler(time_attr="training_iteration", max_t=self.max_t + 1,
                             grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor)

    def searcher(self, space: SearchSpace) -> OptunaSearch:
        sampler = (optuna.samplers.TPESampler(seed=self.seed) if self.search == "optuna"
                   else optuna.samplers.RandomSampler(seed=self.seed))
        return OptunaSearch(space=space.define_by_run, metric=self.metric, mode=self.mode,
                            sampler=sampler)


@dataclass
class SweepResult:
    """What a finished sweep left: its folder, every trial's final result, the report."""

    sweep_dir: str
    trials: list[dict[str, Any]]
    report: dict[str, Any]


def trial_spec(sweep: SweepConfig, adapt: Mapping[str, Any], space: SearchSpace,
               body: Callable[..., Any], load_config: Callable[[dict], Any],
               check: Callable[[dict], Any] | None = None) -> TrialSpec:
    """Validate the adapt config and the space now (before any trial), and bind the trial.
    ``check`` (default: ``load_config``) runs on the base config and on every probe of the
    space — the adapt job's builds each probe's task, so a target pattern matching nothing or
    a template without a mask in one option fails here, not in a trial."""
    spec = TrialSpec(adapt=dict(adapt), space=space, body=body, load_config=load_config,
                     workers_per_trial=sweep.workers_per_trial,
                     cpus_per_worker=sweep.cpus_per_worker, trial_cpus=sweep.trial_cpus)
    base = spec.base_mapping()
    try:
        cfg = load_config(base)
    except ConfigError as exc:
        raise ConfigError(f"adapt: {exc}") from None
    workers = getattr(getattr(cfg, "scaling", None), "num_workers", 1)
    if sweep.workers_per_trial == 0 and workers != 1:
        raise ConfigError(f"sweep.workers_per_trial: 0 runs each trial in its own process, but "
                          f"adapt scaling.num_workers is {workers} (set it to 1, or give "
                          f"workers_per_trial)")
    if check is not None:
        try:
            check(base)
        except ConfigError as exc:
            raise ConfigError(f"adapt: {exc}") from None
    space.validate(base, check or load_config)
    return spec


def build_tuner(sweep: SweepConfig, spec: TrialSpec, resume: bool = False) -> Tuner:
    """A new Tuner, or with ``resume`` the one saved in the sweep's folder."""
    trainable = make_trainable(spec)
    if resume:
        if not Tuner.can_restore(sweep.sweep_dir):
            raise ConfigError(f"sweep: nothing to resume in {sweep.sweep_dir}")
        return Tuner.restore(sweep.sweep_dir, trainable=trainable, resume_unfinished=True,
                             restart_errored=sweep.restart_errored)
    keep = KeepBestCheckpoints(sweep.metric, sweep.mode, sweep.keep_checkpoints)
    run_config = RunConfig(
        name=sweep.name, storage_path=os.path.dirname(sweep.sweep_dir),
        checkpoint_config=CheckpointConfig(num_to_keep=1),      # per trial: its latest delta
        failure_config=FailureConfig(max_failures=0),
        callbacks=[keep, JsonLoggerCallback(), CSVLoggerCallback(), TBXLoggerCallback()],
        verbose=0)
    tune_config = TuneConfig(metric=sweep.metric, mode=sweep.mode,
                             search_alg=sweep.searcher(spec.space),
                             scheduler=sweep.scheduler_obj(), num_samples=sweep.num_samples,
                             max_concurrent_trials=sweep.max_concurrent_trials or None,
                             reuse_actors=True,     # a trial's process imports torch once
                             trial_dirname_creator=trial_dirname)
    return Tuner(trainable, tune_config=tune_config, run_config=run_config)


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Tune's default spells every sampled value into the name)."""
    return f"trial_{trial.trial_id}"


def run_sweep(sweep: SweepConfig, adapt: Mapping[str, Any], space: SearchSpace,
              body: Callable[..., Any], load_config: Callable[[dict], Any],
              resume: bool = False) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray; write the Pareto report."""
    spec = trial_spec(sweep, adapt, space, body, load_config)
    os.makedirs(os.path.dirname(sweep.sweep_dir), exist_ok=True)
    grid = build_tuner(sweep, spec, resume=resume).fit()
    trials, points, skipped = [], [], []
    for res in grid:
        metrics = dict(res.metrics or {})
        path = getattr(res, "path", None)
        name = os.path.basename(path) if path else metrics.get("trial_id", "?")
        ckpt = res.checkpoint.path if res.checkpoint is not None else None
        trials.append({"trial": name, "metrics": metrics, "checkpoint": ckpt,
                       "error": None if res.error is None else str(res.error)})
        if metrics.get(FINAL) == 1 and all(c in metrics for c in COSTS):
            params = tuple(sorted((k, v) for k, v in (res.config or {}).items()))
            points.append(TrialPoint(trial=name, accuracy=float(metrics[sweep.metric]),
                                     trainable_pct=float(metrics["trainable_pct"]),
                                     peak_memory_bytes=float(metrics["peak_memory_bytes"]),
                                     latency_ms=float(metrics["latency_ms"]), params=params,
                                     checkpoint=ckpt))
        else:
            skipped.append(name)
    report = write_report(points, sweep.sweep_dir, metric=sweep.metric, skipped=skipped)
    return SweepResult(sweep_dir=sweep.sweep_dir, trials=trials, report=report)


def tensorboard_command(sweep: SweepConfig) -> str:
    """The command that shows every trial's curves (Tune writes one event file per trial)."""
    return f"tensorboard --logdir {sweep.sweep_dir}"


__all__ = ["SweepConfig", "SweepResult", "run_sweep", "build_tuner", "trial_spec",
           "tensorboard_command", "DEFAULT_BODY", "DEFAULT_LOADER"]
