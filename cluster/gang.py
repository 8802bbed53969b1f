"""Start, run and stop a gang of N train workers (Ray actors) with a torch.distributed group.

    with WorkerGroup(ScalingConfig(num_workers=4)) as group:
        losses = group.execute(train_fn, config)      # train_fn runs on every rank

Why a placement group: all N workers must exist before any of them can rendezvous (gang
scheduling), so the N bundles are reserved atomically (PACK: as few nodes as possible, which
keeps collectives on fast local links; SPREAD: one per node where possible, for fault isolation).
Why our own actors and not Ray Train's TorchTrainer: see actors/runtime/gang_worker.py.
``ScalingConfig`` lives in actors/train/scaling.py (an experiment section) and is re-exported here.

Backend: NCCL when the workers have GPUs, gloo otherwise (`backend="auto"`).

Elastic size: ``min_workers`` (default: ``num_workers``, a fixed size) lets a restart run on
fewer workers when capacity was lost (cluster/launcher.py picks the size, ``workers_that_fit``
says how many bundles the live nodes can hold).
"""
from __future__ import annotations

from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bmray.actors.runtime.gang_worker import GangWorker
from bmray.actors.runtime.worker_context import WorkerContext, worker_context
from bmray.actors.train.scaling import PLACEMENT_STRATEGIES, ScalingConfig

__all__ = ["ScalingConfig", "PLACEMENT_STRATEGIES", "WorkerGroup", "WorkerFailure",
           "PlacementTimeout", "WorkerContext", "worker_context", "workers_that_fit"]


class WorkerFailure(RuntimeError):
    """A gang worker died or its function raised; names the rank and the cause."""

    def __init__(self, rank: int, cause: BaseException):
        self.rank, self.cause = rank, cause
        kind = "died" if isinstance(cause, RayActorError) else "failed"
        super().__init__(f"train worker rank {rank} {kind}: {type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}")


class PlacementTimeout(RuntimeError):
    """The gang's placement group was not placed in time (the cluster lacks the capacity)."""


def workers_that_fit(scaling: ScalingConfig) -> int:
    """How many of ``scaling``'s workers the live nodes can hold (by their total resources:
    called when no gang of ours runs, so what we used is free), at most ``num_workers``.
    A node that died is no longer alive in ``ray.nodes()``, so its capacity is gone."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = [int(have.get(k, 0) // v) for k, v in scaling.bundle.items() if v > 0]
        total += min(fits) if fits else scaling.num_workers
    return min(total, scaling.num_workers)


class WorkerGroup:
    """A gang of ``num_workers`` GangWorker actors in one placement group, one process group."""

    def __init__(self, scaling: ScalingConfig, env: dict[str, str] | None = None,
                 placement: tuple[Any, list[int]] | None = None):
        # ``placement``: (a placement group someone else reserved, the bundle index of each
        # rank), e.g. a Tune trial's own bundles; the gang then places no group of its own
        self.scaling = scaling
        self.env = env or {}
        self.workers: list[Any] = []
        self.node_ids: list[str] = []        # the Ray node of each rank
        self._pg = None
        self._placement = placement

    # ------------------------------------------------------------------ lifecycle
    def start(self, placement_timeout_s: float | None = None) -> "WorkerGroup":
        """Place, start and connect the gang. Raises PlacementTimeout when the placement group
        is not placed within ``placement_timeout_s`` (default ``scaling.start_timeout_s``)."""
        s = self.scaling
        bundle = s.bundle
        wait_s = s.start_timeout_s if placement_timeout_s is None else placement_timeout_s
        if self._placement is not None:
            pg, bundles = self._placement
            if len(bundles) != s.num_workers:
                raise ValueError(f"placement: {len(bundles)} bundles for {s.num_workers} workers")
        else:
            self._pg = pg = placement_group([dict(bundle) for _ in range(s.num_workers)],
                                            strategy=s.placement_strategy)
            bundles = list(range(s.num_workers))
        try:
            ray.get(pg.ready(), timeout=wait_s)
        except GetTimeoutError:
            self.shutdown()
            raise PlacementTimeout(
                f"could not place {s.num_workers} workers x {bundle} "
                f"({s.placement_strategy}) within {wait_s:.0f} s; the cluster has "
                f"{ray.cluster_resources()}") from None
        threads = max(1, int(s.cpus_per_worker))
        self.workers = [
            GangWorker.options(
                num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=bundles[i]),
            ).remote(threads, self.env)
            for i in range(s.num_workers)]
        try:
            addresses = ray.get([w.address.remote() for w in self.workers],
                                timeout=s.start_timeout_s)
            master, port, _ = addresses[0]
            self.node_ids = [node for _, _, node in addresses]
            local_ranks = _local_ranks(self.node_ids)
            ray.get([w.setup.remote(rank, s.num_workers, local_ranks[rank], master, port,
                                    s.resolved_backend, s.collective_timeout_s)
                     for rank, w in enumerate(self.workers)], timeout=s.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        """Kill the workers and release their resources (safe to call twice)."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:   # already dead
                pass
        self.workers = []
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None

    def __enter__(self) -> "WorkerGroup":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ running code
    def execute_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
        """Start ``fn(*args, **kwargs)`` on every rank; returns one ObjectRef per rank."""
        if not self.workers:
            raise RuntimeError("the worker group is not started")
        return [w.execute.remote(fn, *args, **kwargs) for w in self.workers]

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn`` on every rank and return the results in rank order. If a worker dies or
        raises, raise WorkerFailure naming the first rank that did (in completion order)."""
        return self.get(self.execute_async(fn, *args, **kwargs))

    def execute_rank(self, rank: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.get([self.workers[rank].execute.remote(fn, *args, **kwargs)])[0]

    @staticmethod
    def get(refs: list, on_wait: Callable[[], None] | None = None,
            poll_s: float = 0.2) -> list[Any]:
        """ray.get in rank order, but report the first failure as soon as it happens: a dead
        rank leaves its peers blocked in a collective, so waiting in rank order could hang.
        ``on_wait`` is called every ``poll_s`` seconds while waiting (and once at the end)."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1,
                                     timeout=poll_s if on_wait is not None else None)
            if on_wait is not None:
                on_wait()
            if not done:
                continue
            try:
                ray.get(done[0])
            except Exception as exc:            # RayActorError, RayTaskError
                raise WorkerFailure(refs.index(done[0]), exc) from exc
        return ray.get(refs)


def _local_ranks(nodes: list[str]) -> list[int]:
    seen: dict[str, int] = {}
    out = []
    for node in nodes:
        out.append(seen.get(node, 0))
        seen[node] = out[-1] + 1
    return out
