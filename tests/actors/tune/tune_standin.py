"""A stand-in trial body with the adapt body's contract (run_adapt / load_adapt_config / AdaptResult):
a tiny torch MLP trained with SGD on a fixed synthetic 2-class task, so accuracy depends on the
learning rate and the "delta" size. Used by the sweep tests only; runs in milliseconds.

Side channels for the tests: ``task.log_dir`` gets one file per body start (``<trial>-<uuid>``,
holding start/end times), ``task.sleep_s`` slows each step, and with ``scaling.num_workers > 1``
the body runs one Ray task per worker in its trial's gang bundles and reports how many ran there.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from safetensors.torch import save_file

from bmray.actors.tune.trainable import gang_bundles
from bmray.models.typed_config import ConfigError, from_dict


@dataclass(frozen=True)
class Delta:
    method: str = "lora"
    rank: int = 4
    bottleneck: int = 8

    def __post_init__(self):
        if self.method not in ("lora", "adapter", "bitfit"):
            raise ConfigError(f"config.delta.method: {self.method!r} is not one of "
                              f"['lora', 'adapter', 'bitfit']")


@dataclass(frozen=True)
class Train:
    lr: float = 0.1
    steps: int = 8
    eval_every: int = 1


@dataclass(frozen=True)
class Task:
    log_dir: str = ""
    sleep_s: float = 0.0
    checkpoint_evals: bool = False     # save the delta at every eval and hand it to on_eval


@dataclass(frozen=True)
class Scaling:
    num_workers: int = 1
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class StandinConfig:
    delta: Delta = field(default_factory=Delta)
    train: Train = field(default_factory=Train)
    task: Task = field(default_factory=Task)
    scaling: Scaling = field(default_factory=Scaling)
    seed: int = 0


@dataclass
class StandinResult:
    metrics: dict
    trainable_params: int
    total_params: int
    peak_memory_bytes: int
    latency_ms: float
    delta_dir: str


def load_config(mapping: dict) -> StandinConfig:
    return from_dict(StandinConfig, mapping)


def hidden_size(delta: Delta) -> int:
    return {"lora": delta.rank, "adapter": delta.bottleneck, "bitfit": 1}[delta.method]


@ray.remote
def gang_task() -> str:
    pg = ray.util.get_current_placement_group()
    return "" if pg is None else pg.id.hex()


def save_delta(model: torch.nn.Module, cfg: StandinConfig, out_dir: str) -> str:
    delta_dir = os.path.join(out_dir, "delta")
    os.makedirs(delta_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(delta_dir, "delta.safetensors"))
    with open(os.path.join(delta_dir, "manifest.json"), "w") as fh:
        json.dump({"method": cfg.delta.method, "lr": cfg.train.lr}, fh)
    return delta_dir


def run(cfg: StandinConfig, *, out_dir: str, on_eval: Callable[[dict], None] | None = None
        ) -> StandinResult:
    torch.set_num_threads(1)
    trial = os.path.basename(os.path.dirname(out_dir.rstrip("/")))
    marker = None
    if cfg.task.log_dir:
        os.makedirs(cfg.task.log_dir, exist_ok=True)
        marker = os.path.join(cfg.task.log_dir, f"{trial}-{uuid.uuid4().hex[:8]}")
        with open(marker, "w") as fh:
            json.dump({"start": time.time()}, fh)
    placed = 0
    pg, bundles = gang_bundles()
    if cfg.scaling.num_workers > 1 and pg is not None:
        ids = ray.get([gang_task.options(
            num_cpus=cfg.scaling.cpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=b)).remote() for b in bundles])
        placed = sum(i == pg.id.hex() for i in ids)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] + x[:, 2]) > 0).long()
    torch.manual_seed(cfg.seed)
    hidden = hidden_size(cfg.delta)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, 2))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    loss = torch.tensor(0.0)
    for step in range(1, cfg.train.steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cfg.task.sleep_s:
            time.sleep(cfg.task.sleep_s)
        if on_eval is not None and step % cfg.train.eval_every == 0:
            with torch.no_grad():
                acc = (model(x).argmax(-1) == y).float().mean().item()
            values = {"step": step, "accuracy": acc, "loss": loss.item(), "gang_placed": placed}
            if cfg.task.checkpoint_evals:
                values["delta_dir"] = save_delta(model, cfg, out_dir)
            on_eval(values)
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    delta_dir = save_delta(model, cfg, out_dir)
    if marker:
        with open(marker) as fh:
            times = json.load(fh)
        with open(marker, "w") as fh:
            json.dump({**times, "end": time.time()}, fh)
    n = sum(p.numel() for p in model.parameters())
    return StandinResult(metrics={"accuracy": acc, "loss": loss.item()},
                         trainable_params=n, total_params=1000,
                         peak_memory_bytes=4 * n * 4, latency_ms=0.01 * hidden,
                         delta_dir=delta_dir)
