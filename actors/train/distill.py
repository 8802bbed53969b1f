"""A distillation run's model, from a trained teacher on disk: ``build_distillation``.

    d = build_distillation("runs/adapt_trec_lora", DistillConfig(), student_layers=[0, 2, 4])
    Trainer(d.model, d.objective, RowStream(d.train_rows, 16), train_cfg).fit()

The teacher is either an adaptation run's output directory (actors/train/adapt.py: its last
checkpoint's manifest holds the adapt config and the base's identity; the task model — base,
delta, head — is rebuilt from the config and its trained tensors loaded from that checkpoint)
or a pre-training checkpoint of one of our families (its manifest's ``model_config``). The
student keeps ``student_layers`` of the teacher's base (DistilBERT's init; fine-tuned in a
full fine-tuning run, else as it was: a delta's hooks are not copied) and its head, and
trains in full; the teacher is frozen. What comes back is a
:class:`DistillationModel` the one Trainer trains under any strategy, its objective, and for a
task the adapt run's tokenised rows. Docs: docs/compression.md.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.adapt import (build_base, build_task, load_base_checkpoint,
                                      load_examples)
from bmray.actors.train.adapt_config import adapt_config_from_dict
from bmray.actors.train.loop import seed_everything
from bmray.models.classifier import SequenceClassifier
from bmray.models.compress.distill import (DistillConfig, DistillationModel,
                                           student_from_teacher)
from bmray.models.config import ModelConfig
from bmray.models.delta.base import base_identity
from bmray.models.families.registry import build_model
from bmray.models.objectives import objective_for
from bmray.models.typed_config import ConfigError, from_dict

__all__ = ["Distillation", "build_distillation", "adapt_config_of"]

# sections of an adapt run's config that say what the task model is (not how it trained)
TASK_SECTIONS = ("base", "delta", "task", "prompt", "seed")


@dataclass
class Distillation:
    """What ``build_distillation`` returns: the model to train and what feeds it."""

    model: DistillationModel
    objective: Callable
    teacher: str                        # "adapt" | "pretrain"
    teacher_identity: dict[str, Any]    # class + config + weights hash (of the base for adapt)
    manifest: dict[str, Any]            # for the Trainer's ``model_config`` (checkpoints)
    train_rows: Tensor | None = None    # adapt teachers: the task's tokenised rows
    eval_rows: Tensor | None = None
    labels: list[str] | None = None


def adapt_config_of(manifest: dict[str, Any]):
    """The AdaptConfig of a checkpoint's manifest (its ``model_config.adapt``), as a
    one-process config: only the sections that define the task model are kept."""
    raw = dict((manifest.get("model_config") or {}).get("adapt") or {})
    delta = raw.get("delta")
    if isinstance(delta, dict) and "config" in delta:      # adapt_config_to_dict's shape
        if delta["config"] is None:
            delta = None if delta.get("load") is None else {"load": delta["load"],
                                                            "name": delta["name"]}
        else:
            delta = {**delta["config"], "name": delta.get("name", "task")}
    raw["delta"] = delta
    return adapt_config_from_dict({k: raw[k] for k in TASK_SECTIONS if k in raw})


def _adapt_teacher(out_dir: Path, cfg: DistillConfig, layers: Sequence[int] | None
                   ) -> Distillation:
    path = ckpt.resolve_checkpoint(str(out_dir / "checkpoints"))
    manifest, state = ckpt.load_checkpoint(path)
    acfg = adapt_config_of(manifest)
    if acfg.prompt is not None:
        raise ConfigError(f"teacher: {str(out_dir)!r} is a prompt run; distillation needs a "
                          f"classification-head task model")
    tok_dir = str(out_dir / "tokenizer")
    task = build_task(acfg, tok_dir)
    saved = (manifest.get("model_config") or {}).get("base")
    if saved is not None and saved != task.identity:
        raise ckpt.CheckpointError(
            f"teacher: {path!r} was trained on another base ({saved.get('class')}, weights "
            f"sha256 {str(saved.get('weights_sha256'))[:12]}) than the one its config builds "
            f"({task.identity['class']}, {task.identity['weights_sha256'][:12]})")
    teacher = task.model
    trained = state["model"]
    # a delta run's checkpoint holds the trainable tensors only (the base is rebuilt above)
    must = {n for n, p in teacher.named_parameters() if p.requires_grad}
    ckpt.check_compatible({k: tuple(v.shape) for k, v in teacher.state_dict().items()
                           if k in trained or k in must}, trained,
                          source=f"teacher checkpoint {path!r}")
    teacher.load_state_dict({**teacher.state_dict(), **trained})
    # the student: the chosen layers of the base the teacher reads — its own, fine-tuned, in
    # a full fine-tuning run; with a delta, a fresh copy of the base (a delta's hooks are not
    # copied) — and the teacher's trained head
    if task.deltas is None:
        encoder = teacher.encoder
    else:
        seed_everything(acfg.seed)
        encoder = build_base(acfg, load_examples(acfg)[0], tok_dir).model
        if base_identity(encoder) != task.identity:
            raise ckpt.CheckpointError("teacher: the base could not be rebuilt identically "
                                       "for the student (its weights differ)")
    head: nn.Linear = teacher.head
    student = SequenceClassifier(student_from_teacher(encoder, layers), head.in_features,
                                 head.out_features, teacher.pooling, acfg.task.head_dropout)
    student.head.load_state_dict(copy.deepcopy(head.state_dict()))
    model = DistillationModel(student, teacher, cfg)
    return Distillation(model, task.objective, "adapt", task.identity,
                        _manifest("adapt", task.identity, cfg, layers, str(out_dir)),
                        task.train_rows, task.eval_rows, task.labels)


def _pretrain_teacher(path: str, cfg: DistillConfig, layers: Sequence[int] | None
                      ) -> Distillation:
    path = ckpt.resolve_checkpoint(path)
    mc_raw = ckpt.read_manifest(path).get("model_config")
    if not isinstance(mc_raw, dict) or "family" not in mc_raw:
        raise ConfigError(f"teacher: {path!r} is neither an adapt run's directory nor a "
                          f"pre-training checkpoint of one of our families (its manifest has "
                          f"no model_config.family)")
    mc = from_dict(ModelConfig, mc_raw, "teacher.model_config")
    teacher = build_model(mc)
    load_base_checkpoint(teacher, mc, path)
    identity = base_identity(teacher)
    student = student_from_teacher(teacher, layers)
    model = DistillationModel(student, teacher, cfg)
    return Distillation(model, objective_for(mc), "pretrain", identity,
                        _manifest("pretrain", identity, cfg, layers, path))


def _manifest(kind: str, identity: dict[str, Any], cfg: DistillConfig,
              layers: Sequence[int] | None, source: str) -> dict[str, Any]:
    return {"teacher": {"kind": kind, "source": source, "identity": identity},
            "student_layers": None if layers is None else list(layers),
            "distill": dataclasses.asdict(cfg)}


def build_distillation(teacher: str, cfg: DistillConfig,
                       student_layers: Sequence[int] | None = None) -> Distillation:
    """Teacher from ``teacher`` (an adapt run's output directory, or a pre-training checkpoint
    directory or root), the student from its ``student_layers`` (default every other layer),
    wired into a DistillationModel with ``cfg``. Bad input (no such run, a prompt run, layers
    out of range, a layer map that does not fit) raises here, before any compute."""
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg: expected a DistillConfig, got {type(cfg).__name__}")
    root = Path(teacher)
    if "://" not in teacher and not root.exists():
        raise ConfigError(f"teacher: {teacher!r} does not exist")
    if (root / "checkpoints").is_dir():
        return _adapt_teacher(root, cfg, student_layers)
    return _pretrain_teacher(teacher, cfg, student_layers)
