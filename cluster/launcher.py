"""Run one experiment on a gang of workers, restarting it from its checkpoint when a worker dies.

The driver's whole job (DESIGN.md: "the driver starts, watches and collects"): start the
parameter-server shards if the strategy needs them, start the gang, run ``train_rank`` on every
rank, and wait. If a worker or a shard dies (``ray.kill``, a lost node, an exception), the
failure is reported with the rank that caused it; with ``run.max_failures > 0`` the whole gang
(and the shards) is torn down and started afresh, and every rank resumes from the newest
checkpoint in ``checkpoint.dir`` — the training loop's resume is exact, so the restarted run
ends with the same loss as one that never failed (Ray Train's ``FailureConfig(max_failures)``
semantics, with our own checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.strategies import strategy_from_dict
from cluster.gang import ScalingConfig, WorkerFailure, WorkerGroup
from models.typed_config import check_positive


@dataclass
class RunConfig:
    """Failure handling of a run (Ray Train's names)."""

    max_failures: int = 0        # gang restarts allowed; each resumes from the latest checkpoint

    def __post_init__(self) -> None:
        check_positive("run.max_failures", self.max_failures, allow_zero=True)


class RunFailed(RuntimeError):
    """The run failed more often than ``run.max_failures`` allows; ``failures`` lists why."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__(f"training failed after {len(failures)} attempt(s); last: "
                         f"{failures[-1]}")


class TrainRun:
    """``TrainRun(raw_experiment).fit()`` → rank 0's report (plus ``attempts``/``failures``).

    ``group`` and ``shards`` are the live gang and shard actors of the current attempt (tests
    kill them to exercise fault tolerance).
    """

    def __init__(self, raw_experiment: dict[str, Any], samples: list[str] | None = None):
        from jobs.experiment import experiment_from_dict

        self.raw = raw_experiment
        self.exp = experiment_from_dict(raw_experiment)      # validates before anything starts
        self.samples = samples
        self.scaling: ScalingConfig = self.exp.scaling
        self.run_cfg: RunConfig = self.exp.run
        self.spec = strategy_from_dict(raw_experiment.get("strategy")).resolved(
            self.scaling.num_workers)
        self.group: WorkerGroup | None = None
        self.shards: list = []
        self.failures: list[str] = []

    def fit(self) -> dict[str, Any]:
        from actors.train_rank import train_rank

        attempt = 0
        while True:
            attempt += 1
            resume = None if attempt == 1 else True       # a restart always resumes
            try:
                self._start()
                refs = self.group.execute_async(train_rank, self.raw, self.shards,
                                                samples=self.samples, resume=resume)
                # A dead shard surfaces as a RayActorError in the workers' next pull/push.
                reports = self.group.get(refs)
                report = dict(reports[0])
                report.update(attempts=attempt, failures=list(self.failures),
                              world_size=self.scaling.num_workers)
                return report
            except WorkerFailure as exc:
                self.failures.append(str(exc))
                print(f"[bmray] attempt {attempt} failed: {exc}", flush=True)
                if attempt > self.run_cfg.max_failures:
                    raise RunFailed(self.failures) from exc
                print(f"[bmray] restarting the gang from the latest checkpoint "
                      f"({attempt}/{self.run_cfg.max_failures} restarts)", flush=True)
            finally:
                self._stop()

    # ------------------------------------------------------------------ internals
    def _start(self) -> None:
        if self.spec.kind == "param_server":
            from actors.param_server import start_shards

            self.shards = start_shards(self.spec.options, self.exp.train,
                                       self.scaling.num_workers)
        self.group = WorkerGroup(self.scaling).start()

    def _stop(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self.shards:
            from actors.param_server import stop_shards

            stop_shards(self.shards)
            self.shards = []

