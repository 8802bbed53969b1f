"""Pipeline schedules, the bubble formula and stage balancing, pure Python (no torch, no
communication).

A pipeline of ``p`` stages runs ``m`` micro-batches per optimizer step. Each stage executes a
list of actions ``("F", i)`` (forward of micro-batch ``i``) and ``("B", i)`` (its backward) in
order; the engine (:mod:`bmray.actors.parallel.pipeline.engine`) executes exactly these lists,
so what is tested here is what runs.

* **GPipe** (Huang et al. 2019): all ``m`` forwards, then all ``m`` backwards.
* **1F1B** (PipeDream-Flush; Narayanan et al. 2021): stage ``s`` runs ``min(p - s - 1, m)``
  warm-up forwards, then alternates one forward / one backward, then drains the backwards; it
  holds at most ``min(p - s, m)`` micro-batches of activations instead of ``m``.

Both have the bubble ``(p - 1) / (m + p - 1)`` (:func:`bubble_fraction`, the one formula the
engine's measurements and the planner's cost model use); :func:`simulate` reproduces it exactly
with unit-time actions. :func:`partition_balanced` is the one min-max stage partitioner (the
engine's layer balancing and the planner's stage bounds). Derivations and papers:
docs/pipeline_parallel.md.
"""
from __future__ import annotations

from typing import Sequence

from bmray.models.typed_config import ConfigError

Action = tuple[str, int]          # ("F" | "B", micro-batch index)

SCHEDULES = ("1f1b", "gpipe")


def bubble_fraction(p: int, m: int) -> float:
    """(p - 1) / (m + p - 1): the idle fraction of each stage of a GPipe or 1F1B pipeline."""
    _check_pm(p, m)
    return (p - 1) / (m + p - 1)


def _check_pm(p: int, m: int, stage: int | None = None) -> None:
    for name, v in (("stages", p), ("micro-batches", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"pipeline: number of {name} must be an integer >= 1, got {v!r}")
    if stage is not None and not (isinstance(stage, int) and 0 <= stage < p):
        raise ConfigError(f"pipeline: stage {stage!r} is outside 0..{p - 1}")


def gpipe_schedule(m: int, p: int, stage: int) -> list[Action]:
    """GPipe: F0 .. F(m-1), then B0 .. B(m-1) (the same on every stage)."""
    _check_pm(p, m, stage)
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b_schedule(m: int, p: int, stage: int) -> list[Action]:
    """1F1B (PipeDream-Flush): ``w = min(p - stage - 1, m)`` warm-up forwards, then
    ``m - w`` pairs (F(w + k), B(k)), then the last ``w`` backwards. In flight at most w + 1."""
    _check_pm(p, m, stage)
    warmup = min(p - stage - 1, m)
    actions: list[Action] = [("F", i) for i in range(warmup)]
    for k in range(m - warmup):
        actions += [("F", warmup + k), ("B", k)]
    actions += [("B", i) for i in range(m - warmup, m)]
    return actions


def schedule_for(name: str, m: int, p: int, stage: int) -> list[Action]:
    """The action list of ``stage`` under schedule ``name`` ("1f1b" | "gpipe")."""
    if name == "gpipe":
        return gpipe_schedule(m, p, stage)
    if name == "1f1b":
        return one_f_one_b_schedule(m, p, stage)
    raise ConfigError(f"pipeline.schedule: {name!r} is not one of {list(SCHEDULES)}")


def peak_inflight(actions: Sequence[Action]) -> int:
    """Most micro-batches forwarded but not yet backwarded at any point of ``actions``."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(schedule: str, m: int, p: int, t_f: float = 1.0, t_b: float = 1.0
             ) -> dict[str, object]:
    """Execute every stage's action list with forward time ``t_f``, backward ``t_b`` and free
    communication: F(i) on stage s starts when stage s is free and F(i) on s-1 ended; B(i) when
    stage s is free and B(i) on s+1 ended. Returns the makespan, per-stage busy time and idle
    fraction. Raises RuntimeError if the lists deadlock (an action waits on one never run)."""
    lists = [schedule_for(schedule, m, p, s) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}       # (kind, micro, stage) -> end time
    clock = [0.0] * p
    pos = [0] * p
    busy = [0.0] * p
    remaining = sum(len(a) for a in lists)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(lists[s]):
                kind, i = lists[s][pos[s]]
                dep = (("F", i, s - 1) if s > 0 else None) if kind == "F" else \
                      (("B", i, s + 1) if s < p - 1 else ("F", i, s))
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done[dep] if dep is not None else 0.0)
                dt = t_f if kind == "F" else t_b
                clock[s] = start + dt
                busy[s] += dt
                done[(kind, i, s)] = clock[s]
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: deadlock at positions {pos}")
    makespan = max(clock)
    return {"makespan": makespan, "busy": busy,
            "idle_fraction": [1.0 - b / makespan for b in busy]}


TIES = ("long_first", "nested")


def partition_balanced(costs: Sequence[float], n_stages: int, first_extra: float = 0.0,
                       last_extra: float = 0.0, ties: str = "long_first"
                       ) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` layer ranges, one non-empty range per stage, minimising the
    largest stage cost (exact dynamic programme over prefix sums, O(n² p)).

    ``first_extra`` / ``last_extra``: a cost the first / last stage carries besides its layers
    (the embedding, the head); it is the same as adding it to the first / last layer's cost.
    ``ties`` picks among optimal partitions, deterministically (every rank computes the same):

    * ``"long_first"``: the earlier stages as long as possible (walking back from the end, each
      stage the shortest that keeps the optimum);
    * ``"nested"``: the last stage as long as possible, then the stages before it partitioned
      the same way for their own optimum (the planner's stage bounds).
    """
    n = len(costs)
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ConfigError(f"pipeline.stages: must be an integer >= 1, got {n_stages!r}")
    if n < n_stages:
        raise ConfigError(f"pipeline: {n} layer(s) cannot fill {n_stages} stages "
                          f"(each stage needs at least one layer)")
    if any(c < 0 for c in costs):
        raise ConfigError(f"pipeline: layer costs must be >= 0, got {list(costs)}")
    if ties not in TIES:
        raise ConfigError(f"pipeline: ties {ties!r} is not one of {list(TIES)}")
    costs = [float(c) for c in costs]
    costs[0] += first_extra
    costs[-1] += last_extra
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest max-stage-cost covering layers [0, j) with k stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n - (n_stages - k) + 1):
            best[k][j] = min(max(best[k - 1][i], prefix[j] - prefix[i]) for i in range(k - 1, j))
    ranges: list[tuple[int, int]] = []
    hi, target = n, best[n_stages][n]
    for k in range(n_stages, 0, -1):
        if ties == "long_first":    # the shortest stage k that keeps the overall optimum
            starts = range(hi - 1, k - 2, -1)
        else:                       # the longest stage k that keeps [0, hi)'s own optimum
            starts, target = range(k - 1, hi), best[k][hi]
        for i in starts:
            if max(best[k - 1][i], prefix[hi] - prefix[i]) <= target:
                ranges.append((i, hi))
                hi = i
                break
    ranges.reverse()
    return ranges
