"""Run one experiment on a gang of workers, restarting it from its checkpoint when a worker dies.

    report = TrainRun(raw_experiment).fit()      # rank 0's report, attempts, failures

The driver starts, watches and collects: it starts the parameter-server shards if the strategy
needs them, starts the gang, runs ``train_rank`` on every rank, and waits. A dead worker or shard
is reported with its rank; with ``run.max_failures > 0`` the gang (and the shards) is started
afresh and every rank resumes from the newest good checkpoint — exactly, so the restarted run
continues with the losses of one that never failed (Ray Train's ``FailureConfig`` semantics).
With ``scaling.min_workers`` a restart runs on the most workers the live nodes hold (elastic).
A ConfigError or CheckpointError ends the run at once: no restart would fix it.
``RunConfig`` and ``ScalingConfig`` live in actors/train/scaling.py and are re-exported here.
Fault tolerance in full: docs/checkpoints.md.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any, Callable

from bmray.actors.parallel.registry import strategy_from_dict
from bmray.actors.runtime.train_rank import train_rank
from bmray.actors.train.checkpoints import CheckpointError
from bmray.actors.train.experiment import experiment_from_dict
from bmray.actors.train.scaling import RunConfig, ScalingConfig
from bmray.cluster.gang import PlacementTimeout, WorkerFailure, WorkerGroup, workers_that_fit
from bmray.cluster.param_server import start_shards, stop_shards
from bmray.models.typed_config import ConfigError

# An elastic start gives a placement this long before it looks at the capacity again (a node
# that just died may still count as alive for a moment).
ELASTIC_PLACEMENT_PROBE_S = 10.0


class RunFailed(RuntimeError):
    """The run failed more often than ``run.max_failures`` allows (or in a way no restart can
    fix); ``failures`` lists why."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__(f"training failed after {len(failures)} attempt(s); last: "
                         f"{failures[-1]}")


class TrainRun:
    """``TrainRun(raw_experiment).fit()`` → rank 0's report (plus ``attempts``, ``failures``,
    ``world_sizes``: the gang size of each attempt).

    ``group``, ``shards`` and ``attempt`` are the live gang, shard actors and attempt number
    (from 1) of the current attempt (tests kill them to exercise fault tolerance).
    """

    def __init__(self, raw_experiment: dict[str, Any], samples: list[str] | None = None, *,
                 parse: Callable[[dict[str, Any]], Any] = experiment_from_dict,
                 rank_fn: Callable[..., dict[str, Any]] = train_rank):
        # ``parse`` validates the raw config (anything with scaling / run / train sections);
        # ``rank_fn(raw, shards, samples=, resume=)`` is what every rank runs (adaptation
        # passes its own: jobs/adapt.py)
        self.raw = raw_experiment
        self.parse, self.rank_fn = parse, rank_fn
        self.exp = parse(raw_experiment)                     # validates before anything starts
        self.samples = samples
        self.scaling: ScalingConfig = self.exp.scaling
        self.run_cfg: RunConfig = self.exp.run
        self.spec = strategy_from_dict(raw_experiment.get("strategy")).resolved(
            self.scaling.num_workers)
        self.group: WorkerGroup | None = None
        self.shards: list = []
        self.failures: list[str] = []
        self.world_sizes: list[int] = []
        self.attempt = 0

    def fit(self) -> dict[str, Any]:
        self.attempt = 0
        while True:
            self.attempt += 1
            resume = None if self.attempt == 1 else True       # a restart always resumes
            try:
                raw = self._start()
                refs = self.group.execute_async(self.rank_fn, raw, self.shards,
                                                samples=self.samples, resume=resume)
                # A dead shard surfaces as a RayActorError in the workers' next pull/push.
                reports = self.group.get(refs)
                report = dict(reports[0])
                report.update(attempts=self.attempt, failures=list(self.failures),
                              world_size=self.world_sizes[-1],
                              world_sizes=list(self.world_sizes))
                return report
            except WorkerFailure as exc:
                self.failures.append(str(exc))
                print(f"[bmray] attempt {self.attempt} failed: {exc}", flush=True)
                if isinstance(exc.cause, (ConfigError, CheckpointError)):
                    raise RunFailed(self.failures) from exc        # a restart would fail alike
                if self.attempt > self.run_cfg.max_failures:
                    raise RunFailed(self.failures) from exc
                print(f"[bmray] restarting the gang from the latest checkpoint "
                      f"({self.attempt}/{self.run_cfg.max_failures} restarts)", flush=True)
            finally:
                self._stop()

    # ------------------------------------------------------------------ internals
    def _start(self) -> dict[str, Any]:
        """Start the shards and the gang of this attempt; return the experiment as this
        attempt runs it (``scaling.num_workers`` = the gang's size)."""
        if self.scaling.min_workers is None:
            n, self.group = self.scaling.num_workers, WorkerGroup(self.scaling).start()
        else:
            n, self.group = self._start_elastic()
        self.world_sizes.append(n)
        raw = copy.deepcopy(self.raw)
        raw.setdefault("scaling", {})["num_workers"] = n
        spec = strategy_from_dict(raw.get("strategy")).resolved(n)
        if spec.kind == "param_server":
            self.shards = start_shards(spec.options, self.exp.train, n)
        return raw

    def _start_elastic(self) -> tuple[int, WorkerGroup]:
        """The gang at the largest size the live nodes hold (``sizes``), waiting up to
        ``scaling.start_timeout_s`` for at least ``min_workers`` to fit."""
        s = self.scaling
        deadline = time.monotonic() + s.start_timeout_s
        while True:
            fit = workers_that_fit(s)
            n = next((k for k in self.sizes() if k <= fit), None)
            left = deadline - time.monotonic()
            if n is not None:
                group = WorkerGroup(replace(s, num_workers=n))
                try:
                    return n, group.start(min(ELASTIC_PLACEMENT_PROBE_S, max(left, 1.0)))
                except PlacementTimeout:
                    pass                              # capacity changed meanwhile: look again
            if time.monotonic() >= deadline:
                raise PlacementTimeout(
                    f"elastic start: the live nodes hold {fit} worker(s) of {s.bundle}, "
                    f"scaling.min_workers is {s.min_workers} (sizes this run accepts: "
                    f"{self.sizes()}); waited {s.start_timeout_s:.0f} s")
            time.sleep(1.0)

    def sizes(self) -> list[int]:
        """Gang sizes this experiment accepts, largest first, from num_workers down to
        min_workers: those its validation passes (tp x pp divides it, the global batch
        splits over the data-parallel replicas)."""
        s = self.scaling
        out = []
        for n in range(s.num_workers, (s.min_workers or s.num_workers) - 1, -1):
            raw = copy.deepcopy(self.raw)
            raw.setdefault("scaling", {})["num_workers"] = n
            try:
                self.parse(raw)
            except ConfigError:
                continue
            out.append(n)
        return out

    def _stop(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self.shards:
            stop_shards(self.shards)
            self.shards = []
