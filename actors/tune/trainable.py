"""The function trainable of a sweep: one trial = the adapt config + the trial's sample, run by
the trial body, reported to Tune at every evaluation.

Why a report per evaluation: ASHA (Li et al. 2020) decides at each rung from intermediate results
(``step``, ``accuracy``, ``loss``). The last report adds the costs the Pareto report needs
(``trainable_pct``, ``peak_memory_bytes``, ``latency_ms``) and a checkpoint holding only the delta
artifact (KB-MB), never the frozen base.

Why a placement group per trial: a trial is a driver plus a gang of ``workers_per_trial`` workers;
``tune.with_resources(..., PlacementGroupFactory([driver] + [worker] * N))`` reserves them all
before the trial starts, so Tune runs only as many trials at once as the cluster holds. A body that
starts workers places them in the trial's bundles: ``gang_bundles()``.

The trial body is injected: ``body(cfg, out_dir=..., on_eval=...)`` returning an object with
``metrics`` (with the sweep's metric), ``trainable_params``, ``total_params``,
``peak_memory_bytes``, ``latency_ms`` and ``delta_dir``; ``load_config(mapping)`` builds ``cfg``.
``on_eval`` reports to Tune, so the body calls it in the trial's own process (rank 0's results
come back to it), never from a gang worker.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import ray
from ray import tune
from ray.tune import Checkpoint
from ray.tune.execution.placement_groups import PlacementGroupFactory

from bmray.actors.tune.space import SearchSpace, merge

FINAL = "final"          # result key: 1 on the trial's last report (the one with the costs)
BODY_OUT = "body_out"    # the body's own output folder inside the trial dir (deleted at the end)


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs (pickled once, shipped to every trial)."""

    adapt: Mapping[str, Any]                       # the base adapt config (a plain mapping)
    space: SearchSpace
    body: Callable[..., Any]
    load_config: Callable[[dict[str, Any]], Any]
    workers_per_trial: int = 1                     # 0: the body runs in the trial driver alone
    cpus_per_worker: float = 1.0
    trial_cpus: float = 1.0                        # the trial driver's own bundle

    def resources(self) -> PlacementGroupFactory:
        """Bundle 0: the trial driver; bundles 1..N: its gang."""
        return PlacementGroupFactory([{"CPU": self.trial_cpus}] +
                                     [{"CPU": self.cpus_per_worker}] * self.workers_per_trial,
                                     strategy="PACK")

    def base_mapping(self) -> dict[str, Any]:
        """The adapt mapping every trial starts from: the gang's size is the sweep's."""
        if not self.workers_per_trial:
            return dict(self.adapt)
        return merge(self.adapt, {"scaling": {"num_workers": self.workers_per_trial,
                                              "cpus_per_worker": self.cpus_per_worker}})

    def trial_mapping(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The adapt mapping of the trial with flat ``params`` (Tune's config)."""
        return merge(self.base_mapping(), self.space.resolve(params))


def make_trainable(spec: TrialSpec) -> Any:
    """The trainable Tune runs: ``run_trial`` bound to ``spec`` with its resources declared."""
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), spec.resources())


def gang_bundles() -> tuple[Any, list[int]]:
    """Inside a trial: (its placement group, the bundle indices of its gang); (None, []) outside.
    Place worker ``i`` with ``PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=
    bundles[i])``."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return None, []
    return pg, list(range(1, len(pg.bundle_specs)))


def scalar_metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of an eval dict (Tune's results hold scalars; paths and lists stay out)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (not isinstance(v, float) or math.isfinite(v) or k == "loss")}


def cost_metrics(result: Any) -> dict[str, float]:
    """The Pareto costs of a finished body's result."""
    total = float(result.total_params)
    return {"trainable_params": float(result.trainable_params), "total_params": total,
            "trainable_pct": 100.0 * float(result.trainable_params) / total if total else 0.0,
            "peak_memory_bytes": float(result.peak_memory_bytes),
            # the part of the peak that is activations kept for backward (0: not measured)
            "activation_bytes": float(getattr(result, "activation_bytes", 0)),
            "latency_ms": float(result.latency_ms)}


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """One trial (Tune's function trainable): merge, build, run the body, report."""
    cfg = spec.load_config(spec.trial_mapping(config))
    trial_dir = tune.get_context().get_trial_dir()
    out_dir = os.path.join(trial_dir, BODY_OUT)
    os.makedirs(out_dir, exist_ok=True)
    last: dict[str, Any] = {}

    def on_eval(values: dict[str, Any]) -> None:
        metrics = scalar_metrics(values)
        metrics[FINAL] = 0
        last.update(metrics)
        delta_dir = values.get("delta_dir")
        tune.report(metrics, checkpoint=_delta_checkpoint(delta_dir) if delta_dir else None)

    try:
        result = spec.body(cfg, out_dir=out_dir, on_eval=on_eval)
        final = {**last, **scalar_metrics(result.metrics), **cost_metrics(result), FINAL: 1}
        tune.report(final, checkpoint=_delta_checkpoint(result.delta_dir))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _delta_checkpoint(delta_dir: str) -> Checkpoint:
    """A Tune checkpoint of the delta artifact's folder only (Tune copies it into the trial's
    storage during the report, before the body writes on)."""
    if not os.path.isdir(delta_dir):
        raise FileNotFoundError(f"the trial body's delta_dir {delta_dir!r} is not a folder")
    return Checkpoint.from_directory(delta_dir)
