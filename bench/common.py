"""What the benchmarks share: the real data path, the model and optimizer every side of a
comparison builds alike, the run order, the statistics (rotating rounds, a bootstrap interval
over rounds), an embedded Ray, the RSS sampler around a measured run, and the result file."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import random
import statistics
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

import torch

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import seed_everything
from bmray.actors.train.lr_schedule import warmup_cosine
from bmray.models import ModelConfig, build_model
from bmray.models.data import BlockStream, CorpusReader, pack_corpus
from bmray.models.tokenizer import train_bpe
from bmray.models.world import WorldConfig, write_world

BOOTSTRAP_RESAMPLES = 2000
INTERVAL = 0.9
MB = 2 ** 20


def world_pack(root: str, block_len: int, vocab: int, n_entities: int = 300) -> str:
    """Synthetic-world corpus → BPE tokenizer → packed Parquet blocks under ``root``/pack."""
    write_world(WorldConfig(seed=0, n_entities=n_entities), f"{root}/world",
                parts=("documents",))
    reader = CorpusReader(f"{root}/world/documents.jsonl")
    tok = train_bpe(reader, vocab_size=vocab, family="gpt")
    pack_corpus(reader, tok, block_len, f"{root}/pack")
    return f"{root}/pack"


def rank_batches(pack: str, block_len: int, global_batch: int, n: int) -> list[torch.Tensor]:
    """This rank's slice of the first ``n`` global batches of ``pack``, in order, held in
    memory (so Parquet reads are not timed). Inside a gang worker (torch.distributed up)."""
    import torch.distributed as dist

    stream = BlockStream(pack, block_len, global_batch, dist.get_rank(), dist.get_world_size(),
                         shuffle=False)
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------- model and optimizer

def gpt_config(vocab: int, d_model: int, layers: int, seq: int,
               heads: int | None = None) -> ModelConfig:
    """The benchmarks' GPT: d_ff 4·d_model, no dropout, ``heads`` (default one per 64 wide)."""
    return ModelConfig(family="gpt", vocab_size=vocab, d_model=d_model,
                       n_heads=max(1, d_model // 64) if heads is None else heads,
                       n_layers=layers, d_ff=4 * d_model, max_seq_len=seq, dropout=0.0)


def fresh_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """``model_cfg`` built from seed 0: every side of a comparison starts from these weights."""
    seed_everything(0)
    return build_model(model_cfg)


def cpu_train_config(max_steps: int, **options: Any) -> TrainConfig:
    """The benchmarks' training options (lr 3e-4, 2 warmup steps, CPU, quiet) and ``options``."""
    return TrainConfig(max_steps=max_steps, lr=3e-4, warmup_steps=2, device="cpu", echo=False,
                       **options)


def with_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """``cfg`` with ``max_steps`` set to ``steps``."""
    return TrainConfig(**{**cfg.__dict__, "max_steps": steps})


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups as bmray builds them: decay on matrices only."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def fused_adamw(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """torch's fused AdamW over ``decay_groups``, with ``cfg``'s hyper-parameters."""
    return torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def warmup_cosine_lr(opt: torch.optim.Optimizer, cfg: TrainConfig
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg``'s warmup + cosine schedule as a torch scheduler on ``opt``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
        s, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_decay_steps) / cfg.lr)


def nbytes(tensors: Iterable[Any]) -> int:
    """Bytes of the tensors among ``tensors`` (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        if torch.is_tensor(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


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


def environment(**versions: str) -> dict[str, Any]:
    """What a result JSON records about the run's software and machine (torch's version,
    threads, CPUs, architecture) plus the peers' ``versions``."""
    return {"torch": torch.__version__, **versions, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine()}


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


class StepTimer:
    """Times the steps of a gang's run from step ``warmup`` on: ``start(i)`` before step i (the
    ranks meet first when the timing begins, so they start it together), ``stop(i)`` after it;
    ``steps`` holds the seconds of each timed step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self._t0 = warmup, [], 0.0

    def start(self, i: int) -> None:
        if i == self.warmup:
            import torch.distributed as dist

            dist.barrier()
        self._t0 = time.perf_counter()

    def stop(self, i: int) -> None:
        if i >= self.warmup:
            self.steps.append(time.perf_counter() - self._t0)


def deepspeed_gang_env() -> Any:
    """Inside a gang worker: set the launcher variables DeepSpeed reads (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_*) from the existing gang and import deepspeed, so every side of a
    benchmark starts from the same RSS baseline; returns the worker context."""
    from bmray.actors.runtime.worker_context import worker_context

    ctx = worker_context()
    os.environ.update(RANK=str(ctx.rank), WORLD_SIZE=str(ctx.world_size),
                      LOCAL_RANK=str(ctx.local_rank),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    import deepspeed  # noqa: F401
    return ctx


def deepspeed_engine(model_cfg: ModelConfig, cfg: TrainConfig, conf: dict[str, Any]) -> Any:
    """DeepSpeed's engine (config ``conf``, logging quiet) over ``fresh_model(model_cfg)``
    with ``decay_groups`` and ``cfg``'s schedule, in training mode."""
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    model = fresh_model(model_cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=decay_groups(model.parameters(), cfg.weight_decay),
        config=conf, lr_scheduler=lambda opt: warmup_cosine_lr(opt, cfg),
        dist_init_required=False)
    engine.train()
    return engine


def destroy_engine(engine: Any) -> None:
    """``engine.destroy()`` where this DeepSpeed has it."""
    try:
        engine.destroy()
    except Exception:       # noqa: BLE001 - older engines have no destroy()
        pass


def measured_run(fn: Callable[[], Any], sample_ms: float,
                 error_chars: int | None = None) -> dict[str, Any]:
    """``fn()`` on this gang rank between memory readings: freed heap returned and the ranks
    met first, then {"baseline_rss", "result", "peak_rss", "peak_delta"} (peak RSS sampled
    every ``sample_ms`` above the baseline), or {"baseline_rss", "error", "traceback"} when
    ``fn`` raises (the message cut to ``error_chars``)."""
    import torch.distributed as dist

    trim()
    dist.barrier()
    base = rss()
    out: dict[str, Any] = {"baseline_rss": base}
    try:
        with PeakRSS(sample_ms / 1000) as peak:
            out["result"] = fn()
        out.update(peak_rss=peak.peak, peak_delta=peak.peak - base)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        msg = str(exc) if error_chars is None else str(exc).strip()[:error_chars]
        out["error"] = f"{type(exc).__name__}: {msg}"
        out["traceback"] = traceback.format_exc()[-3000:]
    trim()
    return out


# ---------------------------------------------------------------- runs of a gang

def gang_summary(runs: Sequence[Sequence[dict]], rank_figures: Callable[[list[dict]], dict]
                 ) -> dict[str, Any]:
    """One side's numbers from ``runs`` (per round, every rank's ``measured_run`` result with
    its ``steps_s`` and ``model_state``): the gang's step times per round and their pooled
    median, each rank's memory over the rounds (peak RSS above the baseline: median over
    rounds; model state: the last round's) with ``rank_figures(its results)`` beside it, and
    the largest rank's memory; or the first failed rank's {"error", "traceback"}."""
    errors = [r for rep in runs for r in rep if "error" in r]
    if errors:
        return {"error": errors[0]["error"], "traceback": errors[0]["traceback"]}
    gang = [gang_steps([r["steps_s"] for r in sorted(rep, key=lambda r: r["rank"])])
            for rep in runs]
    per_rank = {}
    for k in sorted({r["rank"] for rep in runs for r in rep}):
        rs = [r for rep in runs for r in rep if r["rank"] == k]
        per_rank[k] = {**rank_figures(rs),
                       "peak_delta_mb": statistics.median(r["peak_delta"] for r in rs) / MB,
                       "peak_delta_mb_per_round": [r["peak_delta"] / MB for r in rs],
                       "baseline_rss_mb": statistics.median(r["baseline_rss"] for r in rs) / MB,
                       "model_state": rs[-1]["model_state"],
                       "model_state_mb": rs[-1]["model_state"]["model_state_bytes"] / MB}
    step = pooled_median(gang)
    return {"median_step_s": step, "median_ms": step * 1e3, "gang_steps_s": gang,
            "peak_delta_mb": max(v["peak_delta_mb"] for v in per_rank.values()),
            "model_state_mb": max(v["model_state_mb"] for v in per_rank.values()),
            "per_rank": per_rank}


# ---------------------------------------------------------------- command line and results

def add_timing_args(ap: Any, steps: int, warmup_steps: int, repeats: int,
                    repeats_help: str | None = None,
                    steps_help: str | None = "timed steps per run",
                    warmup_help: str = "untimed steps before each run") -> None:
    """``--steps``, ``--warmup-steps`` and ``--repeats`` (the rounds) with these defaults."""
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--warmup-steps", type=int, default=warmup_steps, help=warmup_help)
    ap.add_argument("--repeats", type=int, default=repeats, help=repeats_help)


def add_model_args(ap: Any, d_model: int, layers: int, vocab: int | None = None) -> None:
    """``--d-model``, ``--layers`` and (given a default) ``--vocab`` of the GPT."""
    ap.add_argument("--d-model", type=int, default=d_model)
    ap.add_argument("--layers", type=int, default=layers)
    if vocab is not None:
        ap.add_argument("--vocab", type=int, default=vocab)


def result_path(script: str, name: str) -> str:
    """``name`` in the results folder beside ``script`` (a bench's ``__file__``)."""
    return os.path.join(os.path.dirname(script), "results", name)


def write_json(path: str, record: Any, indent: int = 2, default: Any = None) -> None:
    """``record`` as JSON at ``path``, its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=indent, default=default)


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
