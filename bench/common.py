"""What the benchmarks share: the real data path, the run order, the statistics (rotating
rounds, a bootstrap interval over rounds), an embedded Ray, and the RSS sampler."""
from __future__ import annotations

import ctypes
import gc
import os
import random
import statistics
import threading
from typing import Any, Sequence

BOOTSTRAP_RESAMPLES = 2000
INTERVAL = 0.9


def world_pack(root: str, block_len: int, vocab: int, n_entities: int = 300) -> str:
    """Synthetic-world corpus → BPE tokenizer → packed Parquet blocks under ``root``/pack."""
    from bmray.models.data import CorpusReader, pack_corpus
    from bmray.models.tokenizer import train_bpe
    from bmray.models.world import WorldConfig, write_world

    write_world(WorldConfig(seed=0, n_entities=n_entities), f"{root}/world",
                parts=("documents",))
    reader = CorpusReader(f"{root}/world/documents.jsonl")
    tok = train_bpe(reader, vocab_size=vocab, family="gpt")
    pack_corpus(reader, tok, block_len, f"{root}/pack")
    return f"{root}/pack"


# ---------------------------------------------------------------- run order and statistics

def balanced_order(names: list[str], repeats: int) -> list[str]:
    """Run order for ``repeats`` interleaved repeats of each of ``names``: round r is the
    list rotated by r (A B, B A, ... for two; A B C, B C A, C A B, ... for three). On a shared
    machine the position in a round (right after another run's teardown, or first after a
    pause) has a cost of its own; over len(names) rounds every side takes every position."""
    if not names or len(set(names)) != len(names):
        raise ValueError(f"balanced_order: names must be distinct and non-empty, got {names!r}")
    if repeats < 1:
        raise ValueError(f"balanced_order: repeats must be >= 1, got {repeats}")
    order: list[str] = []
    for r in range(repeats):
        k = r % len(names)
        order.extend(names[k:] + names[:k])
    return order


def _check_rounds(name: str, rounds: Sequence[Sequence[float]]) -> None:
    if not rounds or any(len(r) == 0 for r in rounds):
        raise ValueError(f"{name}: every round needs at least one sample, got "
                         f"{[len(r) for r in rounds]} samples per round")


def pooled_median(rounds: Sequence[Sequence[float]]) -> float:
    """Median of every sample of every round (the figure a row reports)."""
    _check_rounds("pooled_median", rounds)
    return statistics.median(s for r in rounds for s in r)


def bootstrap_ratio(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]],
                    interval: float = INTERVAL, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of pooled_median(num) / pooled_median(den), resampling whole rounds
    (round r of both sides together: the machine's drift within a round hits both), i.e. what
    a rerun could plausibly give. ``num[r]`` and ``den[r]``: the samples (step times, or one
    throughput per run) of each side in round r."""
    _check_rounds("bootstrap_ratio", num)
    _check_rounds("bootstrap_ratio", den)
    if len(num) != len(den):
        raise ValueError(f"bootstrap_ratio: both sides need the same rounds, got {len(num)} "
                         f"and {len(den)}")
    if not 0 < interval < 1:
        raise ValueError(f"bootstrap_ratio: interval must be in (0, 1), got {interval}")
    rng = random.Random(seed)
    n = len(num)
    ratios = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(s for i in pick for s in num[i])
                      / statistics.median(s for i in pick for s in den[i]))
    ratios.sort()
    tail = (1 - interval) / 2
    return ratios[int(tail * resamples)], ratios[min(resamples - 1, int((1 - tail) * resamples))]


def ratio_with_interval(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]]
                        ) -> dict[str, Any]:
    """{"ratio": pooled_median(num) / pooled_median(den), "interval": its bootstrap
    interval, "rounds": n}: one comparison as a JSON-ready record."""
    low, high = bootstrap_ratio(num, den)
    return {"ratio": pooled_median(num) / pooled_median(den), "interval": [low, high],
            "rounds": len(num), "interval_level": INTERVAL,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES}


def gang_steps(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Step times of a gang from each rank's step times: step i takes as long as its slowest
    rank (the ranks meet in the step's collectives, so the gang moves at that pace)."""
    if not per_rank:
        raise ValueError("gang_steps: no ranks")
    lengths = {len(r) for r in per_rank}
    if len(lengths) != 1:
        raise ValueError(f"gang_steps: ranks timed different step counts {sorted(lengths)}")
    return [max(steps) for steps in zip(*per_rank)]


# ---------------------------------------------------------------- processes and memory

def connect_ray(num_cpus: int) -> None:
    """An embedded Ray of our own (never another user's cluster on this machine)."""
    import ray

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Collect garbage and return freed heap to the OS, so the next RSS baseline is honest
    (runs in one process do not hide in each other's freed pages)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Samples this process's RSS on a thread; ``peak`` is the largest seen."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.peak = every_s, rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


# ---------------------------------------------------------------- command line

def parse_args(ap: Any, quick: dict[str, Any]) -> Any:
    """``ap.parse_args()`` with a ``--quick`` flag: a smoke run whose settings are ``quick``
    (flags given explicitly still win), so a full run and a quick one are each one command."""
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + " ".join(f"--{k.replace('_', '-')} "
                                                 f"{' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                 for k, v in quick.items()))
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(**quick)
        args = ap.parse_args()
    return args
