"""``run_adapt`` on a gang, called like ``run_adapt``: the body of a sweep's trial.

    result = run_adapt_gang(cfg, out_dir="...", on_eval=report)   # AdaptResult of rank 0

``run_adapt`` trains in the process that calls it, as one rank of a gang only when
torch.distributed is initialised there. A Tune trial is a driver with its gang's bundles
reserved beside it (actors/tune/trainable.py): this starts ``scaling.num_workers`` gang workers
in those bundles (or in a placement group of its own outside a trial), runs ``run_adapt`` on
every rank, and relays rank 0's evaluation rows through a queue actor so that ``on_eval`` runs
here, in the caller's process (where ``tune.report`` must be called), while the gang trains.
One worker and no gang needed: ``run_adapt`` in this process.
"""
from __future__ import annotations

import ray
from ray.util.queue import Empty, Queue
from typing import Any, Callable

from bmray.actors.runtime.adapt_rank import adapt_rank_relay
from bmray.actors.train.adapt import AdaptResult, run_adapt
from bmray.actors.train.adapt_config import AdaptConfig
from bmray.cluster.gang import WorkerGroup


def trial_bundles(num_workers: int) -> tuple[Any, list[int]] | None:
    """(the current placement group, the bundle indices after the caller's own bundle 0)
    when this process runs inside one with at least ``num_workers`` more bundles, else None."""
    pg = ray.util.get_current_placement_group()
    if pg is None or len(pg.bundle_specs) < num_workers + 1:
        return None
    return pg, list(range(1, num_workers + 1))


def run_adapt_gang(cfg: AdaptConfig, *, out_dir: str,
                   on_eval: Callable[[dict], None] | None = None,
                   in_process: bool | None = None) -> AdaptResult:
    """Adapt on a gang of ``cfg.scaling.num_workers`` (see the module docstring).
    ``in_process``: None = only when the config asks for one worker."""
    if in_process if in_process is not None else cfg.scaling.num_workers == 1:
        return run_adapt(cfg, out_dir=out_dir, on_eval=on_eval)
    queue = Queue(actor_options={"num_cpus": 0}) if on_eval is not None else None

    def relay() -> None:
        while queue is not None:
            try:
                row = queue.get_nowait()
            except Empty:
                return
            on_eval(row)

    group = WorkerGroup(cfg.scaling, placement=trial_bundles(cfg.scaling.num_workers))
    try:
        group.start()
        refs = group.execute_async(adapt_rank_relay, cfg, out_dir, queue)
        results = group.get(refs, on_wait=relay)
        relay()
        return results[0]
    finally:
        group.shutdown()
        if queue is not None:
            queue.shutdown()
