"""One adaptation run = one YAML file = ``AdaptConfig``: base, delta, task, prompt, train, ...

    cfg = load_adapt_config("configs/adapt_trec_lora.yaml", ["delta.rank=8"])

Sections: ``base`` (:class:`BaseConfig`: the offline MiniLM or one of our families, optionally
loaded from a pre-training checkpoint), ``delta`` (a method mapping for the delta registry, or
null: full fine-tuning, the reference row of a delta-tuning table; ``load:`` starts from a saved
delta), ``task`` (:class:`TaskConfig`), ``prompt`` (null: a classification head; else
:class:`PromptConfig`), ``train`` / ``checkpoint`` (actors/train/config.py), ``scaling`` /
``run`` (scaling.py), ``strategy`` (the registry), ``seed`` and ``out_dir``. Every unknown key,
wrong type or bad value is one ConfigError naming the key path, before any compute.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from bmray.actors.parallel.registry import StrategySpec, strategy_from_dict
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.scaling import RunConfig, ScalingConfig
from bmray.models.config import ModelConfig
from bmray.models.delta.base import DeltaConfig
from bmray.models.delta.registry import delta_config_from_dict
from bmray.models.typed_config import (ConfigError, apply_overrides, check_choice, check_int,
                                       check_sections, from_dict, load_yaml)

BASE_KINDS = ("minilm", "family")
DATASETS = ("trec", "agnews", "world")
ENCODER_FAMILIES = ("bert",)          # families with ``encode`` (hidden states for a head)


@dataclass(frozen=True)
class BaseConfig:
    """The frozen model: ``minilm`` (the offline all-MiniLM-L6-v2 ``BertModel`` and its
    tokenizer) or ``family`` (``model``: our ModelConfig; ``checkpoint``: a pre-training
    checkpoint to load; ``tokenizer_dir``: its tokenizer, else one is trained on the task's
    texts). ``dropout`` overrides the base's dropout (the MiniLM's hidden and attention)."""

    kind: str = "minilm"
    model: ModelConfig | None = None
    checkpoint: str | None = None
    tokenizer_dir: str | None = None
    dropout: float | None = None

    def __post_init__(self) -> None:
        check_choice("base.kind", self.kind, BASE_KINDS)
        if self.kind == "family":
            if self.model is None:
                raise ConfigError("base.model: required with base.kind 'family' (a ModelConfig)")
            check_choice("base.model.family", self.model.family, ENCODER_FAMILIES)
        elif self.model is not None or self.checkpoint is not None:
            raise ConfigError("base.model / base.checkpoint: only with base.kind 'family' "
                              "(the MiniLM is loaded from its package)")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"base.dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TaskConfig:
    """What to learn and how it is measured.

    ``dataset``: ``trec`` (6 coarse question classes; eval on TREC.test), ``agnews`` (4
    topics; a seeded 80/20 split of the shipped rows), ``world`` (the synthetic world's
    documents labelled by ``world_label``: entity ``type`` or ``region``; eval on its non-train
    split). ``few_shot_k``: k training examples per class (LM-BFF's 16 / 32), null: all.
    ``batch_size`` rows make one optimizer step over all workers. ``eval_limit``: at most this
    many eval examples (a seeded sample), null: all.
    """

    dataset: str = "trec"
    few_shot_k: int | None = None
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    eval_limit: int | None = None
    pooling: str = "cls"
    head_dropout: float = 0.0
    world_label: str = "type"
    world_entities: int = 200

    def __post_init__(self) -> None:
        check_choice("task.dataset", self.dataset, DATASETS)
        if self.few_shot_k is not None:
            check_int("task.few_shot_k", self.few_shot_k, 1)
        check_int("task.max_length", self.max_length, 2)
        check_int("task.batch_size", self.batch_size, 1)
        check_int("task.eval_batch_size", self.eval_batch_size, 1)
        if self.eval_limit is not None:
            check_int("task.eval_limit", self.eval_limit, 1)
        check_choice("task.pooling", self.pooling, ("cls", "mean"))
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"task.head_dropout: must be in [0, 1), got {self.head_dropout!r}")
        check_choice("task.world_label", self.world_label, ("type", "region"))
        check_int("task.world_entities", self.world_entities, 20)


VERBALIZERS = ("manual", "knowledgeable", "soft")


@dataclass(frozen=True)
class PromptConfig:
    """Prompt-learning instead of a head: a template with one ``{mask}`` and a verbalizer
    (``kind``): ``manual`` — each class's label words scored by the masked LM at the mask (PET);
    ``knowledgeable`` — expanded word sets, calibrated on ``calibration_examples`` unlabelled
    training inputs and refined by relevance ≥ ``refine_threshold`` (KPT, Hu et al. 2022; null:
    no refinement); ``soft`` — learned class vectors over the mask's hidden state, initialised
    from the label words' embeddings (WARP, Hambardzumyan et al. 2021). The masked LM stays
    frozen: what trains is the delta, the template's ``{soft}`` tokens (prompt tuning, Lester
    et al. 2021) and a soft verbalizer — a run with none of them is a ConfigError."""

    template: str
    label_words: dict[str, list[str]] | None = None     # default: the dataset's (label_words.py)
    kind: str = "manual"
    calibration_examples: int = 64
    refine_threshold: float | None = None

    def __post_init__(self) -> None:
        check_choice("prompt.kind", self.kind, VERBALIZERS)
        if self.label_words is not None and not self.label_words:
            raise ConfigError("prompt.label_words: at least one class is needed")
        check_int("prompt.calibration_examples", self.calibration_examples, 1)
        if self.refine_threshold is not None and not self.refine_threshold > 0:
            raise ConfigError(f"prompt.refine_threshold: must be > 0 (or null), got "
                              f"{self.refine_threshold!r}")
        if self.kind != "knowledgeable" and self.refine_threshold is not None:
            raise ConfigError("prompt.refine_threshold: only with kind 'knowledgeable'")


@dataclass(frozen=True)
class DeltaSection:
    """The ``delta`` section: ``config`` (the method's typed config, None: full fine-tuning)
    and ``load`` (a saved delta to start from; its base identity is checked)."""

    config: DeltaConfig | None = None
    load: str | None = None
    name: str = "task"


@dataclass
class AdaptConfig:
    """Everything one adaptation run needs; ``load_adapt_config`` builds it from YAML."""

    base: BaseConfig = field(default_factory=BaseConfig)
    delta: DeltaSection = field(default_factory=DeltaSection)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    out_dir: str | None = None

    def __post_init__(self) -> None:
        workers = self.scaling.num_workers
        self.check_strategy(workers)
        replicas = workers // self.strategy.model_parallel_size()
        b = self.task.batch_size
        if b % replicas:
            raise ConfigError(f"task.batch_size: {b} is not divisible by the {replicas} "
                              f"data-parallel replicas")
        if b // replicas < self.train.micro_batches:
            raise ConfigError(f"train.micro_batches: {self.train.micro_batches} but each of the "
                              f"{replicas} replicas gets only {b // replicas} rows per step")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.run.max_failures and not self.checkpoint.every:
            raise ConfigError("run.max_failures: restarts resume from checkpoints; set "
                              "checkpoint.every")
        m = self.base.model
        if m is not None and self.task.max_length > m.max_seq_len:
            raise ConfigError(f"task.max_length: {self.task.max_length} is longer than "
                              f"base.model.max_seq_len {m.max_seq_len}")

    def check_strategy(self, workers: int) -> None:
        """What adaptation can run on: ``single``; data parallelism over the trainable
        parameters (``ddp``, ZeRO stage 1/2); the frozen base sharded by ZeRO-3 (``zero``
        stage 3, ``shard_frozen``); tensor parallelism (``mesh`` with ``tp`` > 1, ``pp`` 1) on
        a base of our family, with LoRA split to match. Each refusal names the key."""
        kind, opts = self.strategy.kind, self.strategy.options
        if kind not in ("auto", "single", "ddp", "zero", "zero3", "mesh"):
            raise ConfigError(f"strategy.kind: adaptation runs single, ddp, zero (stage 1-3) or "
                              f"mesh (tensor parallel), got {kind!r}")
        if kind == "single" and workers > 1:
            raise ConfigError(f"strategy.kind: 'single' runs one worker, but "
                              f"scaling.num_workers is {workers}")
        if getattr(opts, "sharded_checkpoint", False):
            raise ConfigError("strategy.sharded_checkpoint: an adaptation checkpoint holds the "
                              "trainable tensors only (KB-MB); it is written whole by rank 0")
        if kind == "mesh":
            if opts.pp != 1:
                raise ConfigError(f"strategy.pp: adaptation does not split the task model into "
                                  f"pipeline stages (pp must be 1, got {opts.pp})")
            if opts.tp > 1 and self.base.kind != "family":
                raise ConfigError("strategy.tp: tensor parallelism needs a base of our family "
                                  "(base.kind 'family': its tp_plan says how layers split); "
                                  "the MiniLM has none — use ddp or zero stage 3")
            if workers % opts.tp:
                raise ConfigError(f"strategy.tp: {opts.tp} does not divide scaling.num_workers "
                                  f"{workers}")
            if opts.tp > 1 and self.prompt is not None:
                raise ConfigError("strategy.tp: prompt runs train on one worker per replica "
                                  "(ddp or zero); tensor parallelism runs a classification head")


SECTIONS = ("base", "delta", "task", "prompt", "train", "checkpoint", "scaling", "strategy",
            "run", "seed", "out_dir")


def delta_section(raw: Any) -> DeltaSection:
    """``null`` → full fine-tuning; a mapping → the method's config (+ ``load``, ``name``)."""
    if raw is None:
        return DeltaSection()
    if not isinstance(raw, dict):
        raise ConfigError(f"delta: expected a mapping (method, targets, ...) or null, got {raw!r}")
    rest = dict(raw)
    load, name = rest.pop("load", None), rest.pop("name", "task")
    if load is not None and not isinstance(load, str):
        raise ConfigError(f"delta.load: expected a directory path, got {load!r}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"delta.name: a non-empty name without dots, got {name!r}")
    if load is not None and not os.path.isdir(load):
        raise ConfigError(f"delta.load: {load!r} is not a directory (a saved delta)")
    if load is not None and not rest:
        return DeltaSection(None, load, name)
    return DeltaSection(delta_config_from_dict(rest, "delta"), load, name)


def adapt_config_from_dict(raw: dict[str, Any]) -> AdaptConfig:
    """Build and validate an AdaptConfig from a plain mapping (parsed YAML)."""
    check_sections(raw, SECTIONS, "adapt config")
    kw: dict[str, Any] = {}
    ck = raw.get("checkpoint")
    if isinstance(raw.get("out_dir"), str) and (ck is None or isinstance(ck, dict)) \
            and not (ck or {}).get("dir"):
        # checkpoints default to <out_dir>/checkpoints
        raw = {**raw, "checkpoint": {**(ck or {}), "dir": f"{raw['out_dir']}/checkpoints"}}
    types = {"base": BaseConfig, "task": TaskConfig, "train": TrainConfig,
             "checkpoint": CheckpointConfig, "scaling": ScalingConfig, "run": RunConfig}
    for name, cls in types.items():
        if name in raw:
            kw[name] = from_dict(cls, raw[name], name)
    if "delta" in raw:
        kw["delta"] = delta_section(raw["delta"])
    if raw.get("prompt") is not None:
        kw["prompt"] = from_dict(PromptConfig, raw["prompt"], "prompt")
    if "strategy" in raw:
        kw["strategy"] = strategy_from_dict(raw["strategy"])
    if "seed" in raw:
        check_int("seed", raw["seed"])
        kw["seed"] = raw["seed"]
    if raw.get("out_dir") is not None:
        if not isinstance(raw["out_dir"], str):
            raise ConfigError(f"out_dir: expected a path, got {raw['out_dir']!r}")
        kw["out_dir"] = raw["out_dir"]
    return AdaptConfig(**kw)


def load_adapt_config(mapping_or_path: dict[str, Any] | str | os.PathLike,
                      overrides: Sequence[str] = ()) -> AdaptConfig:
    """A YAML path or a parsed mapping, with dotted ``key=value`` overrides applied."""
    raw = (dict(mapping_or_path) if isinstance(mapping_or_path, dict)
           else load_yaml(mapping_or_path))
    return adapt_config_from_dict(apply_overrides(raw, list(overrides)))


def adapt_config_to_dict(cfg: AdaptConfig) -> dict[str, Any]:
    """A JSON-able summary (the checkpoint manifest and the report record it)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "delta":
            value = {"config": value.config.to_dict() if value.config else None,
                     "load": value.load, "name": value.name}
        elif f.name == "strategy":
            value = value.to_dict()
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return out
