"""A compression run: a trained model from disk, a recipe's stages in order, each measured.

    cfg = compress_config_from_dict(load_yaml("configs/compress_tiny.yaml"))
    report = run_compress(cfg)          # out_dir/artifact (the compressed model), report.json

The source is an adaptation run's output directory (the task model: base + delta + head, a
LoRA merged into the base so the recipe sees plain layers; quality = accuracy on the task's
eval split) or a pre-training checkpoint of one of our families with the ``experiment`` YAML
it was trained from (its data: the training stream and the held-out blocks; quality =
perplexity). Training inside a stage — distillation, recovery fine-tuning, QAT — runs on the
one ``Trainer`` (single process, ``train.device``); calibration batches are drawn from the
training data. After each stage: parameters, bytes, CPU latency at each ``measure.batch_sizes``
(median of ``measure.repeats`` forwards after a warm-up) and quality, relative to the teacher.
The result is saved with ``save_compressed`` and loaded back once to check it reproduces the
compressed model's outputs exactly. ``run_compress`` takes the factory of that train function:
``make_train_fn`` (one process) by default, cluster/compress_gang.py's on a gang of
``scaling.num_workers`` under ``strategy`` (single, ddp, ZeRO 1-3; checked by
``check_gang_config`` with the rest of the config). Docs: docs/compression.md, "Recipes and
artifacts".
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.actors.parallel.registry import StrategySpec, strategy_from_dict
from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.adapt import load_base_checkpoint
from bmray.actors.train.builders import make_streams, prepare_data
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.distill import build_distillation
from bmray.actors.train.experiment import experiment_from_dict
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.actors.train.scaling import ScalingConfig
from bmray.models.classifier import SequenceClassifier
from bmray.models.compress.artifact import (architecture_of, load_compressed, model_sizes,
                                            read_manifest, save_compressed)
from bmray.models.compress.distill import DistillConfig
from bmray.models.compress.recipe import (Stage, StageContext, StageRecord, apply_stage,
                                          check_data, check_recipe, parse_recipe)
from bmray.models.config import ModelConfig
from bmray.models.data.task_rows import RowStream, eval_row_batches
from bmray.models.delta.base import base_identity
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.objectives import objective_for
from bmray.models.typed_config import (ConfigError, check_int, check_positive, check_sections,
                                       from_dict, load_yaml)

__all__ = ["CalibrationConfig", "MeasureConfig", "CompressTrainConfig", "CompressConfig",
           "compress_config_from_dict", "Teacher", "load_teacher", "plain_task_model",
           "measure", "open_artifact", "check_against_source", "run_compress", "format_table",
           "source_kind", "make_train_fn", "stage_train_config", "train_summary",
           "check_gang_config", "GANG_STRATEGIES", "TrainFn", "TrainFnFactory"]


@dataclass(frozen=True)
class CalibrationConfig:
    """``batches`` of ``batch_size`` training rows for the stages that calibrate (Wanda,
    gradient importance, MoEfication's routers); 0 batches: no calibration data."""

    batches: int = 8
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_int("calibration.batches", self.batches, minimum=0)
        check_int("calibration.batch_size", self.batch_size, minimum=1)


@dataclass(frozen=True)
class MeasureConfig:
    """CPU latency at each of ``batch_sizes`` (median of ``repeats`` timed forwards after
    three warm-ups, on ``threads`` torch threads — one by default: a thread pool wider than the
    idle cores turns every busy core into a stall, and the figures are compared row to row;
    None: as set); quality over at most ``eval_limit``
    eval rows (None: all) in batches of ``eval_batch_size``."""

    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int = 5
    threads: int | None = 1
    eval_batch_size: int = 64
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise ConfigError("measure.batch_sizes: at least one batch size")
        for i, b in enumerate(self.batch_sizes):
            check_int(f"measure.batch_sizes[{i}]", b, minimum=1)
        check_int("measure.repeats", self.repeats, minimum=1)
        if self.threads is not None:
            check_int("measure.threads", self.threads, minimum=1)
        check_int("measure.eval_batch_size", self.eval_batch_size, minimum=1)
        if self.eval_limit is not None:
            check_int("measure.eval_limit", self.eval_limit, minimum=1)


@dataclass(frozen=True)
class CompressTrainConfig:
    """How a stage's training steps run (the stage gives steps and lr): ``batch_size`` rows
    (a task) per step — the global batch, split over a gang's replicas — in ``micro_batches``
    accumulated pieces (per replica), ``warmup_steps``, ``weight_decay``, ``grad_clip``,
    AdamW's ``eps``, ``device``."""

    batch_size: int = 16
    micro_batches: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps: float = 1e-8
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_int("train.batch_size", self.batch_size, minimum=1)
        check_int("train.micro_batches", self.micro_batches, minimum=1)
        check_int("train.warmup_steps", self.warmup_steps, minimum=0)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("train.eps", self.eps)


@dataclass
class CompressConfig:
    """One compression run (``compress_config_from_dict``)."""

    source: str
    recipe: list[Stage]
    experiment: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    train: CompressTrainConfig = field(default_factory=CompressTrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    seed: int = 0
    out_dir: str = "runs/compress"


SECTIONS = ("source", "experiment", "recipe", "calibration", "measure", "train", "scaling",
            "strategy", "seed", "out_dir")
# what a training stage runs on: the student (or the pruned model) trains in full, so
# strategies that split the model (mesh: tensor / pipeline parallel) or train asynchronously
# (param_server) are out; a DistillationModel's frozen teacher is what ZeRO-3 shards for free
GANG_STRATEGIES = ("auto", "single", "ddp", "zero", "zero3")


def check_gang_config(cfg: "CompressConfig") -> None:
    """The gang a training stage runs on: an allowed ``strategy.kind``, ``single`` only on one
    worker, the global ``train.batch_size`` split evenly over the workers into at least
    ``train.micro_batches`` rows each, and task rows to shard (an adapt source; a pre-training
    source trains in one process). Each refusal a ConfigError naming the key."""
    workers, kind = cfg.scaling.num_workers, cfg.strategy.kind
    if kind not in GANG_STRATEGIES:
        raise ConfigError(f"strategy.kind: a compression stage trains on single, ddp or zero "
                          f"(stage 1-3), got {kind!r}")
    if kind == "single" and workers > 1:
        raise ConfigError(f"strategy.kind: 'single' runs one worker, but scaling.num_workers "
                          f"is {workers}")
    b, micro = cfg.train.batch_size, cfg.train.micro_batches
    if b % workers:
        raise ConfigError(f"train.batch_size: {b} does not split over scaling.num_workers "
                          f"{workers}")
    if b // workers < micro:
        raise ConfigError(f"train.micro_batches: {micro}, but each of the {workers} workers "
                          f"gets {b // workers} rows per step")
    if workers > 1 and source_kind(cfg.source) != "adapt":
        raise ConfigError(f"scaling.num_workers: {workers}, but a gang shards an adapt run's "
                          f"task rows; a pre-training source trains in one process")


def compress_config_from_dict(raw: dict[str, Any]) -> CompressConfig:
    """Typed config from a parsed YAML mapping; every key checked (names the key path), the
    source's kind checked on disk, before any model is built."""
    check_sections(raw, SECTIONS, "compress config")
    for key in ("source", "recipe"):
        if key not in raw:
            raise ConfigError(f"{key}: required")
    source = raw["source"]
    if not isinstance(source, str) or not source:
        raise ConfigError(f"source: expected a path, got {source!r}")
    if not os.path.isdir(source):
        raise ConfigError(f"source: {source!r} is not a directory (an adapt run's out_dir or a "
                          f"pre-training checkpoint)")
    experiment = raw.get("experiment")
    if source_kind(source) == "pretrain":
        if not isinstance(experiment, str):
            raise ConfigError("experiment: a pre-training checkpoint source needs the "
                              "experiment YAML it was trained from (its data)")
    elif experiment is not None:
        raise ConfigError("experiment: only with a pre-training checkpoint source (an adapt "
                          "run carries its own task)")
    kw: dict[str, Any] = {"source": source, "recipe": parse_recipe(raw["recipe"]),
                          "experiment": experiment}
    for name, cls in (("calibration", CalibrationConfig), ("measure", MeasureConfig),
                      ("train", CompressTrainConfig), ("scaling", ScalingConfig)):
        if name in raw:
            kw[name] = from_dict(cls, raw[name], name)
    if "strategy" in raw:
        kw["strategy"] = strategy_from_dict(raw["strategy"])
    check_data(kw["recipe"], has_data=kw.get("calibration", CalibrationConfig()).batches > 0)
    if "seed" in raw:
        check_int("seed", raw["seed"], minimum=0)
        kw["seed"] = raw["seed"]
    if "out_dir" in raw:
        if not isinstance(raw["out_dir"], str):
            raise ConfigError(f"out_dir: expected a path, got {raw['out_dir']!r}")
        kw["out_dir"] = raw["out_dir"]
    cfg = CompressConfig(**kw)
    check_gang_config(cfg)
    return cfg


def source_kind(source: str) -> str:
    """``adapt`` (a directory with ``checkpoints/``) or ``pretrain``."""
    return "adapt" if os.path.isdir(os.path.join(source, "checkpoints")) else "pretrain"


# ---------------------------------------------------------------- the teacher

@dataclass
class Teacher:
    """The model to compress with what feeds and judges it. ``quality`` is ``accuracy``
    (higher is better) or ``perplexity`` (lower is better)."""

    model: nn.Module
    objective: Callable
    train_data: Iterable[Tensor]            # what the Trainer reads (rows or blocks)
    calibration_rows: Callable[[int], list[Tensor]]   # n batches' worth of row blocks
    eval_batches: Callable[[], list[Tensor]]
    sample: Callable[[int], Tensor]          # b rows for a latency measurement
    quality: str
    identity: dict[str, Any]                 # the base the source was trained on
    rebuild: Callable[[], nn.Module]         # the same architecture afresh (to load onto)
    info: dict[str, Any] = field(default_factory=dict)


def plain_task_model(task_model: SequenceClassifier) -> SequenceClassifier:
    """The task model with its delta folded in: a LoRA merged into the base's weights (full
    fine-tuning has none), so the recipe's stages see plain ``nn.Linear`` layers. A delta
    that cannot merge (adapters, prefixes, ...) is a ConfigError."""
    backbone = task_model.backbone
    if isinstance(backbone, DeltaModel):
        for name in list(backbone.deltas):
            try:
                backbone.merge(name)
            except ConfigError as exc:
                raise ConfigError(f"source: {exc}; compression needs a plain model (LoRA or "
                                  f"full fine-tuning)") from None
        merged = {k: v.detach().clone() for k, v in backbone.base.state_dict().items()}
        base = backbone.unwrap()
        base.load_state_dict(merged)
    else:
        base = backbone
    head = task_model.head
    out = SequenceClassifier(base, head.in_features, head.out_features, task_model.pooling)
    out.head.load_state_dict(head.state_dict())
    out.requires_grad_(True)
    return out.eval()


def _adapt_teacher(cfg: CompressConfig) -> Teacher:
    d = build_distillation(cfg.source, DistillConfig())
    teacher = d.model.teacher
    d.model.release()
    model = plain_task_model(teacher)
    rows, erows = d.train_rows, d.eval_rows
    if cfg.measure.eval_limit is not None:
        erows = erows[:cfg.measure.eval_limit]
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(rows), generator=g)

    def calibration_rows(n: int) -> list[Tensor]:
        b = cfg.calibration.batch_size
        idx = order.repeat(math.ceil(n * b / max(len(rows), 1)))[:n * b]
        return [rows[idx[i * b:(i + 1) * b]] for i in range(n)]

    def sample(b: int) -> Tensor:
        return erows[torch.arange(b) % len(erows)]

    return Teacher(model, d.objective, RowStream(rows, cfg.train.batch_size, seed=cfg.seed),
                   calibration_rows, lambda: eval_row_batches(erows, cfg.measure.eval_batch_size),
                   sample, "accuracy", d.teacher_identity,
                   lambda: plain_task_model(_rebuild_adapt(cfg.source)),
                   {"kind": "adapt", "labels": d.labels, "eval_examples": len(erows)})


def _rebuild_adapt(source: str) -> nn.Module:
    d = build_distillation(source, DistillConfig())
    d.model.release()
    return d.model.teacher


def _pretrain_teacher(cfg: CompressConfig) -> Teacher:
    exp = experiment_from_dict(load_yaml(cfg.experiment))
    path = ckpt.resolve_checkpoint(cfg.source)
    _, mc = prepare_data(exp)
    saved = ckpt.read_manifest(path).get("model_config")
    if not isinstance(saved, dict) or "family" not in saved:
        raise ConfigError(f"source: {path!r} is not a pre-training checkpoint of one of our "
                          f"families (its manifest has no model_config.family)")
    mc = from_dict(ModelConfig, saved, "source.model_config")

    def rebuild() -> nn.Module:
        model = build_model(mc)
        load_base_checkpoint(model, mc, path)
        return model.eval()

    model = rebuild()
    stream, eval_fn = make_streams(exp)
    if eval_fn is None:
        raise ConfigError(f"experiment: {cfg.experiment!r} holds out no eval blocks "
                          f"(data.eval_blocks is 0): perplexity needs them")
    blocks = list(eval_fn())
    if cfg.measure.eval_limit is not None:
        blocks = blocks[:cfg.measure.eval_limit]
    calib_stream, _ = make_streams(exp)
    calib_iter = iter(calib_stream)

    def calibration_rows(n: int) -> list[Tensor]:
        return [next(calib_iter) for _ in range(n)]

    flat = torch.cat(blocks)

    def sample(b: int) -> Tensor:
        return flat[torch.arange(b) % len(flat)]

    return Teacher(model, objective_for(mc), stream, calibration_rows, lambda: blocks, sample,
                   "perplexity", base_identity(model), rebuild,
                   {"kind": "pretrain", "family": mc.family, "eval_blocks": len(flat)})


def load_teacher(cfg: CompressConfig) -> Teacher:
    """The source as a :class:`Teacher` (see the module docstring)."""
    seed_everything(cfg.seed)
    if source_kind(cfg.source) == "adapt":
        return _adapt_teacher(cfg)
    return _pretrain_teacher(cfg)


# ---------------------------------------------------------------- measuring

def _batch(teacher: Teacher, blocks: Tensor) -> dict[str, Any]:
    return teacher.objective(blocks, torch.Generator().manual_seed(0))


@torch.no_grad()
def _quality(model: nn.Module, teacher: Teacher) -> dict[str, Any]:
    model.eval()
    if teacher.quality == "accuracy":
        correct = n = 0
        loss = 0.0
        for blocks in teacher.eval_batches():
            batch = _batch(teacher, blocks)
            logits = model(**batch).logits
            labels = batch["labels"]
            loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += labels.numel()
        return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "examples": n}
    losses = [float(model(**_batch(teacher, b)).loss) for b in teacher.eval_batches()]
    mean = sum(losses) / len(losses)
    return {"perplexity": math.exp(mean), "loss": mean, "batches": len(losses)}


@torch.no_grad()
def _latency_ms(model: nn.Module, teacher: Teacher, b: int, repeats: int) -> float:
    batch = _batch(teacher, teacher.sample(b))
    batch = {k: v for k, v in batch.items() if not k.endswith("labels")}
    for _ in range(3):                                              # warm-ups
        model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def measure(model: nn.Module, teacher: Teacher, cfg: MeasureConfig) -> dict[str, Any]:
    """Sizes, CPU latency per batch size and quality of ``model`` (eval mode, no grad)."""
    model = model.eval()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        latency = {str(b): _latency_ms(model, teacher, b, cfg.repeats) for b in cfg.batch_sizes}
    finally:
        torch.set_num_threads(threads)
    return {**model_sizes(model), "latency_ms": latency, **_quality(model, teacher)}


def _relative(row: dict[str, Any], ref: dict[str, Any], quality: str) -> dict[str, Any]:
    q, q0 = row[quality], ref[quality]
    retained = (q / q0 if quality == "accuracy" else q0 / q) if q and q0 else float("nan")
    return {"size_ratio": ref["bytes"] / max(row["bytes"], 1),
            "param_ratio": ref["parameters"] / max(row["parameters"], 1),
            "speedup": {b: ref["latency_ms"][b] / max(t, 1e-9)
                        for b, t in row["latency_ms"].items()},
            "retained": retained}


def format_table(rows: list[dict[str, Any]], quality: str) -> str:
    """The BMCook-style table: one line per stage (the teacher first)."""
    sizes = list(rows[0]["latency_ms"])
    head = (f"{'stage':<18}{'params':>12}{'MB':>9}{'smaller':>9}"
            + "".join(f"{'ms@' + b:>10}{'x@' + b:>8}" for b in sizes)
            + f"{quality:>12}{'kept':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rel = r["relative"]
        lines.append(f"{r['stage']:<18}{r['parameters']:>12,}{r['bytes'] / 2**20:>9.2f}"
                     f"{rel['size_ratio']:>8.2f}x"
                     + "".join(f"{r['latency_ms'][b]:>10.2f}{rel['speedup'][b]:>7.2f}x"
                               for b in sizes)
                     + f"{r[quality]:>12.4f}{100 * rel['retained']:>7.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------- the run

TrainFn = Callable[[nn.Module, int, float], dict[str, Any]]
TrainFnFactory = Callable[["Teacher", CompressConfig], TrainFn]


def stage_train_config(t: CompressTrainConfig, steps: int, lr: float) -> TrainConfig:
    """The Trainer's config of one stage's ``steps`` at ``lr`` (cosine to lr/10)."""
    return TrainConfig(max_steps=steps, lr=lr, min_lr=lr * 0.1,
                       warmup_steps=min(t.warmup_steps, steps), micro_batches=t.micro_batches,
                       weight_decay=t.weight_decay, grad_clip=t.grad_clip, eps=t.eps,
                       device=t.device, echo=False, log_every=max(steps, 1))


def train_summary(steps: int, lr: float, losses: dict[int, float],
                  grad_norms: dict[int, float]) -> dict[str, Any]:
    """What a train function returns (a stage's record keeps it): every step's loss and
    pre-clip gradient norm, and the first and last loss."""
    order = sorted(losses)
    return {"steps": steps, "lr": lr, "first_loss": losses[order[0]] if order else None,
            "last_loss": losses[order[-1]] if order else None,
            "losses": [losses[s] for s in order],
            "grad_norms": [grad_norms[s] for s in sorted(grad_norms)]}


def make_train_fn(teacher: Teacher, cfg: CompressConfig) -> TrainFn:
    """``train(module, steps, lr)`` on the one Trainer, single process, reading the
    teacher's training data (the stages read on from where the last one stopped)."""
    def train(module: nn.Module, steps: int, lr: float) -> dict[str, Any]:
        result = Trainer(module, teacher.objective, teacher.train_data,
                         stage_train_config(cfg.train, steps, lr), seed=cfg.seed).fit()
        module.to("cpu").eval()
        return train_summary(steps, lr, result.losses, result.grad_norms)
    return train


def open_artifact(directory: str | Path) -> nn.Module:
    """A ``bmray compress`` artifact loaded onto its source's architecture, rebuilt from the
    ``source`` its manifest records (the adapt run or checkpoint must still be there)."""
    manifest = read_manifest(directory)
    src = manifest.get("source") or {}
    path = src.get("path")
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ConfigError(f"{directory}: the manifest's source {path!r} is not a directory "
                          f"here; use load_compressed(directory, build_base)")
    cfg = CompressConfig(source=path, recipe=[], experiment=src.get("experiment"))
    return load_compressed(directory, lambda: load_teacher(cfg).model)


def check_against_source(cfg: CompressConfig) -> Teacher:
    """Load the source and check the recipe against it (target names, shapes, calibration
    data), before any stage's compute; returns the teacher."""
    teacher = load_teacher(cfg)
    check_recipe(cfg.recipe, teacher.model, has_data=cfg.calibration.batches > 0)
    return teacher


def run_compress(cfg: CompressConfig, echo: Callable[[str], None] = print,
                 make_train: TrainFnFactory = make_train_fn) -> dict[str, Any]:
    """Load the source, check the recipe against it (before any compute), run the stages
    (training through ``make_train(teacher, cfg)``), measure each, save the artifact and the
    report; returns the report."""
    teacher = check_against_source(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    architecture, identity = architecture_of(teacher.model), base_identity(teacher.model)
    ref = measure(teacher.model, teacher, cfg.measure)
    rows = [{"stage": "teacher", **ref, "relative": _relative(ref, ref, teacher.quality)}]
    calib = None
    if cfg.calibration.batches > 0:
        blocks = teacher.calibration_rows(cfg.calibration.batches)
        calib = lambda: [_batch(teacher, b) for b in blocks]            # noqa: E731
    ctx = StageContext(calibration=calib, train=make_train(teacher, cfg))
    model = copy.deepcopy(teacher.model)
    records: list[StageRecord] = []
    for stage in cfg.recipe:
        t0 = time.perf_counter()
        model, record = apply_stage(model, stage, ctx)
        took = time.perf_counter() - t0
        row = measure(model, teacher, cfg.measure)
        row = {"stage": f"{stage.index}:{stage.kind}", **row,
               "relative": _relative(row, ref, teacher.quality), "seconds": took}
        records.append(StageRecord(stage.to_dict(), record, {k: v for k, v in row.items()
                                                               if k != "stage"}))
        rows.append(row)
        echo(f"[bmray] {row['stage']}: {teacher.quality} {row[teacher.quality]:.4f} "
             f"({100 * row['relative']['retained']:.1f}% kept), "
             f"{row['relative']['size_ratio']:.2f}x smaller, {took:.1f}s")
    final = {k: v for k, v in rows[-1].items() if k != "stage"}
    artifact = save_compressed(model, out / "artifact", records, identity,
                               {**final, "quality": teacher.quality, "teacher": ref},
                               architecture=architecture,
                               source={"kind": teacher.info["kind"], "path": cfg.source,
                                       "experiment": cfg.experiment})
    # the artifact is loaded back once: it must reproduce the compressed model exactly
    loaded = load_compressed(artifact, teacher.rebuild)
    probe = {k: v for k, v in _batch(teacher, teacher.sample(4)).items()
             if not k.endswith("labels")}
    with torch.no_grad():
        a, b = model(**probe).logits, loaded(**probe).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"{artifact}: the reloaded model differs from the compressed one "
                           f"(max |diff| {float((a - b).abs().max()):.3g})")
    report = {"source": cfg.source, "source_info": teacher.info, "quality": teacher.quality,
              "recipe": [s.to_dict() for s in cfg.recipe], "rows": rows,
              "records": [r.to_dict() for r in records], "artifact": str(artifact),
              "artifact_bytes": sum(f.stat().st_size for f in Path(artifact).iterdir()),
              "reload_exact": True, "table": format_table(rows, teacher.quality)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report

