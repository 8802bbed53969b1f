"""A compression recipe: an ordered list of stages, each one technique with its typed config.

    recipe = parse_recipe([{"kind": "distill", "student_layers": [0, 2, 4], "steps": 200},
                           {"kind": "structured", "heads": 0.25, "neurons": 0.25},
                           {"kind": "quantize", "scheme": "int8"}])
    for stage in recipe:
        model, record = apply_stage(model, stage, ctx)

``STAGES`` maps a kind to a :class:`StageKind`: the technique's own frozen config, the stage's
options (recovery steps, ...), ``apply`` (does the work, returns the new model and a JSON
*record* of what changed structurally) and ``replay`` (repeats that structural change on a
freshly built model from the record alone, without data: what ``load_compressed`` runs before
loading the weights). Adding a technique is one :func:`register` call. Training (distillation,
recovery fine-tuning, QAT) goes through ``StageContext.train`` — the caller's trainer (the one
Trainer in actors/train/compress.py) — so this module stays plain PyTorch.
A stage mapping's keys are split between the config and the options; an unknown kind or key,
or a bad value, is a ConfigError naming ``recipe[i].key``. docs/compression.md, "Recipes and
artifacts".
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from bmray.models.compress.capture import blocks_of, check_layers
from bmray.models.compress.distill import DistillConfig, DistillationModel, student_from_teacher
from bmray.models.compress.lowrank import LowRankConfig, LowRankLinear, lowrank
from bmray.models.compress.moefy import (BertStyleIntermediate, MoefyConfig, moefy,
                                         train_routers)
from bmray.models.compress.prune import (PruneConfig, prune, prune_targets, remove_masks,
                                         sparsity_report)
from bmray.models.compress.qat import convert_qat, prepare_qat
from bmray.models.compress.quant import (SUPPORTED_BITS, QuantConfig, QuantLinear, plan_targets,
                                         quantize_model, replace_module)
from bmray.models.compress.quant_embedding import (EmbeddingQuantConfig, QuantEmbedding,
                                                   embedding_targets, quantize_embeddings)
from bmray.models.compress.sharing import SharingConfig, share_layers
from bmray.models.compress.structured import (default_loss, head_importance, kept_sizes, lowest,
                                              neuron_importance, neuron_weight_importance,
                                              prune_ffn, prune_heads, shrink_to)
from bmray.models.delta.base import match_modules
from bmray.models.layers.moe import FeedForward
from bmray.models.typed_config import ConfigError, check_choice, check_int, from_dict, to_dict

__all__ = ["StageContext", "StageKind", "Stage", "StageRecord", "STAGES", "register",
           "parse_recipe", "recipe_to_list", "apply_stage", "replay_stage", "check_data",
           "check_recipe",
           "StructuredConfig", "RecoveryOptions", "DistillOptions", "QuantOptions",
           "MoefyOptions", "NoOptions"]

Record = dict[str, Any]


@dataclass
class StageContext:
    """What a stage may use besides the model. ``calibration()``: fresh batches (None: no
    data); ``train(module, steps, lr)``: trains ``module`` (its ``forward(**batch)`` returns a
    loss) for ``steps`` optimizer steps and returns a summary; ``loss_fn(model, batch)``: the
    loss that importance scores differentiate."""

    calibration: Callable[[], Iterable[Any]] | None = None
    train: Callable[[nn.Module, int, float], dict[str, Any]] | None = None
    loss_fn: Callable[[nn.Module, Any], Any] = default_loss

    def batches(self, where: str) -> Iterable[Any]:
        if self.calibration is None:
            raise ConfigError(f"{where}: needs calibration data and there is none")
        return self.calibration()

    def fit(self, module: nn.Module, steps: int, lr: float, where: str) -> dict[str, Any]:
        if steps <= 0:
            return {}
        if self.train is None:
            raise ConfigError(f"{where}: {steps} training steps asked, but no trainer given")
        return self.train(module, steps, lr) or {}


# ---------------------------------------------------------------- stage options

@dataclass(frozen=True)
class NoOptions:
    """A stage with nothing beyond its technique's config."""


@dataclass(frozen=True)
class RecoveryOptions:
    """``recovery_steps`` of fine-tuning after the change (pruning masks held), at ``lr``."""

    recovery_steps: int = 0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        check_int("recovery_steps", self.recovery_steps, minimum=0)
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr!r}")


@dataclass(frozen=True)
class DistillOptions:
    """The student keeps ``student_layers`` of the current model's blocks (None: every other
    one) and trains ``steps`` steps at ``lr`` against it (the frozen teacher)."""

    student_layers: tuple[int, ...] | None = None
    steps: int = 100
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_int("steps", self.steps, minimum=1)
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr!r}")


@dataclass(frozen=True)
class QuantOptions:
    """``bits`` (4 or 8) may stand for the scheme (4: int4, 8: int8); ``qat_steps`` > 0 trains
    with fake quantization first (qat.py) at ``lr``, then converts."""

    bits: int | None = None
    qat_steps: int = 0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_choice("bits", self.bits, SUPPORTED_BITS)
        check_int("qat_steps", self.qat_steps, minimum=0)


@dataclass(frozen=True)
class MoefyOptions:
    """The routers train ``router_steps`` steps at ``router_lr`` on calibration tokens."""

    router_steps: int = 300
    router_lr: float = 1e-3

    def __post_init__(self) -> None:
        check_int("router_steps", self.router_steps, minimum=1)


IMPORTANCE = ("gradient", "weight")


@dataclass(frozen=True)
class StructuredConfig:
    """Remove the ``heads`` fraction of attention heads and the ``neurons`` fraction of FFN
    neurons with the lowest importance (structured.py): ``gradient`` (Michel et al., needs
    calibration data) or, for neurons, ``weight`` (data-free); over all layers at once or
    ``per_layer``."""

    heads: float = 0.0
    neurons: float = 0.0
    importance: str = "gradient"
    per_layer: bool = False

    def __post_init__(self) -> None:
        for key in ("heads", "neurons"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"{key}: must be a number in [0, 1), got {v!r}")
        check_choice("importance", self.importance, IMPORTANCE)
        if self.importance == "weight" and self.heads > 0:
            raise ConfigError("importance: 'weight' scores FFN neurons only; heads need "
                              "'gradient'")
        if self.heads == 0 and self.neurons == 0:
            raise ConfigError("heads / neurons: both are 0, the stage would remove nothing")


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class StageKind:
    """One technique as a recipe stage (see the module docstring). ``needs_data(config,
    options)``: why it needs calibration data (``"method wanda"``), or None;
    ``prepare(raw_config, options)``: the config mapping completed from the options (e.g.
    quantize's ``bits`` → ``scheme``); ``check(model, config, options)``: cheap
    checks against the model it will run on (names, shapes); ``structural``: whether it
    changes module shapes or names (later stages are then checked when they run).
    Training (distillation, recovery, QAT) uses ``StageContext.train``, not calibration."""

    name: str
    config: type
    options: type
    apply: Callable[[nn.Module, Any, Any, StageContext, str], tuple[nn.Module, Record]]
    replay: Callable[[nn.Module, Record], nn.Module]
    needs_data: Callable[[Any, Any], str | None] = lambda c, o: None
    prepare: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    check: Callable[[nn.Module, Any, Any], None] | None = None
    structural: bool = True


STAGES: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    """Add a technique to :data:`STAGES` (its config's and options' keys must not overlap)."""
    clash = ({f.name for f in dataclasses.fields(kind.config)}
             & {f.name for f in dataclasses.fields(kind.options)}) | (
        {"kind"} & {f.name for f in dataclasses.fields(kind.config)})
    if clash:
        raise ValueError(f"stage {kind.name!r}: config and options share keys {sorted(clash)}")
    STAGES[kind.name] = kind
    return kind


@dataclass(frozen=True)
class Stage:
    """One parsed stage: ``index`` in the recipe, ``kind``, typed ``config`` and ``options``."""

    index: int
    kind: str
    config: Any
    options: Any

    @property
    def where(self) -> str:
        return f"recipe[{self.index}]"

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        for part in (self.config, self.options):
            out.update({k: v for k, v in to_dict(part).items()})
        return out


@dataclass
class StageRecord:
    """What one applied stage did: its ``stage`` (as a mapping), the structural ``record``
    ``replay`` needs, and ``metrics`` measured after it (filled by the caller)."""

    stage: dict[str, Any]
    record: Record
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.stage["kind"]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "record": self.record, "metrics": self.metrics}


_PREFIXES = ("prune.", "distill.", "moefy.", "lowrank.", "sharing.", "structured.", "quantize.")


def _located(exc: ConfigError, where: str) -> ConfigError:
    """``prune.sparsity: ...`` / ``scheme: ...`` → ``recipe[i].sparsity: ...``."""
    msg = str(exc)
    for p in _PREFIXES:
        if msg.startswith(p):
            msg = msg[len(p):]
            break
    if msg.startswith("config."):
        msg = msg[len("config."):]
    return ConfigError(f"{where}.{msg}")


def _parse_stage(i: int, raw: Any) -> Stage:
    where = f"recipe[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', got {raw!r}")
    if "kind" not in raw:
        raise ConfigError(f"{where}.kind: missing; one of {sorted(STAGES)}")
    name = raw["kind"]
    if name not in STAGES:
        raise ConfigError(f"{where}.kind: {name!r} is not one of {sorted(STAGES)}")
    kind = STAGES[name]
    cfg_keys = {f.name for f in dataclasses.fields(kind.config) if f.init}
    opt_keys = {f.name for f in dataclasses.fields(kind.options) if f.init}
    rest = {k: v for k, v in raw.items() if k != "kind"}
    unknown = sorted(set(rest) - cfg_keys - opt_keys)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key for a {name} stage; valid keys "
                          f"are {sorted(cfg_keys | opt_keys)}")
    try:
        options = from_dict(kind.options, {k: v for k, v in rest.items() if k in opt_keys},
                            "config")
        cfg_raw = {k: v for k, v in rest.items() if k in cfg_keys}
        if kind.prepare is not None:
            cfg_raw = kind.prepare(cfg_raw, options)
        config = from_dict(kind.config, cfg_raw, "config")
    except ConfigError as exc:
        raise _located(exc, where) from None
    return Stage(i, name, config, options)


def parse_recipe(raw: Any) -> list[Stage]:
    """Typed stages from a list of mappings (parsed YAML); a stage that must come last
    (``quantize``: later techniques work on ``nn.Linear``; only ``quantize_embeddings``, which
    touches no Linear, may follow it) is checked here."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"recipe: expected a non-empty list of stages, got {raw!r}")
    stages = [_parse_stage(i, r) for i, r in enumerate(raw)]
    for s in stages[:-1]:
        if s.kind == "quantize" and any(t.kind != "quantize_embeddings"
                                        for t in stages[s.index + 1:]):
            raise ConfigError(f"{s.where}.kind: 'quantize' must be the last stage (the stages "
                              f"after it work on float nn.Linear layers)")
    return stages


def recipe_to_list(stages: list[Stage]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in stages]


def check_data(stages: list[Stage], has_data: bool) -> None:
    """Every stage that needs calibration data has some (no model needed)."""
    for s in stages:
        why = STAGES[s.kind].needs_data(s.config, s.options)
        if why and not has_data:
            raise ConfigError(f"{s.where}: {why} needs calibration data, and there is none "
                              f"(calibration.batches is 0)")


def check_recipe(stages: list[Stage], model: nn.Module, has_data: bool) -> None:
    """Before any compute: :func:`check_data`, and each stage up to the first one that
    changes the model's structure is checked against ``model`` (target names, shapes: e.g.
    int4's group size must divide each layer)."""
    check_data(stages, has_data)
    for s in stages:
        kind = STAGES[s.kind]
        if kind.check is not None:
            try:
                kind.check(model, s.config, s.options)
            except ConfigError as exc:
                raise _located(exc, s.where) from None
        if kind.structural:
            break


def apply_stage(model: nn.Module, stage: Stage, ctx: StageContext) -> tuple[nn.Module, Record]:
    """Run one stage on ``model``; returns the (possibly new) model and the stage's record.
    A ConfigError raised by the technique is re-raised naming ``recipe[i]``."""
    try:
        return STAGES[stage.kind].apply(model, stage.config, stage.options, ctx, stage.where)
    except ConfigError as exc:
        if str(exc).startswith("recipe["):
            raise
        raise _located(exc, stage.where) from None


def replay_stage(model: nn.Module, kind: str, record: Record) -> nn.Module:
    """Repeat the structural change of a recorded stage on a fresh model (no data)."""
    if kind not in STAGES:
        raise ConfigError(f"record kind {kind!r} is not one of {sorted(STAGES)}")
    return STAGES[kind].replay(model, record)


def _exact(names: Iterable[str]) -> tuple[str, ...]:
    return tuple("re:" + re.escape(n) for n in names)


# ---------------------------------------------------------------- distill

def _distill(model, cfg: DistillConfig, opts: DistillOptions, ctx: StageContext, where: str):
    layers = (list(opts.student_layers) if opts.student_layers is not None
              else list(range(0, len(blocks_of(model)), 2)))
    student = student_from_teacher(model, layers)
    model.requires_grad_(False)
    dm = DistillationModel(student, model.eval(), cfg)
    summary = ctx.fit(dm, opts.steps, opts.lr, where)
    student = dm.release().eval()
    return student, {"student_layers": layers, "train": summary}


def _check_distill(model, cfg: DistillConfig, opts: DistillOptions):
    if opts.student_layers is not None:
        check_layers(opts.student_layers, len(blocks_of(model)), "student_layers")


def _replay_distill(model, record):
    return student_from_teacher(model, record["student_layers"]).eval()


# ---------------------------------------------------------------- prune (masks, baked in)

def _check_prune(model, cfg: PruneConfig, opts):
    names = prune_targets(model, cfg)
    if cfg.is_nm:
        modules = dict(model.named_modules())
        for n in names:
            if modules[n].in_features % cfg.m:
                raise ConfigError(f"m: {cfg.m} does not divide {n}'s in_features "
                                  f"({modules[n].in_features})")


def _prune(model, cfg: PruneConfig, opts: RecoveryOptions, ctx: StageContext, where: str):
    calib = ctx.batches(f"{where} (method {cfg.method})") if cfg.method == "wanda" else None
    masks = prune(model, cfg, calib)
    summary = ctx.fit(model, opts.recovery_steps, opts.lr, where)
    remove_masks(model)
    report = sparsity_report(model, masks)
    return model.eval(), {"method": cfg.method, "sparsity": report["total"]["sparsity"],
                          "layers": {n: r["sparsity"] for n, r in report["layers"].items()},
                          "recovery": summary}


# ---------------------------------------------------------------- structured

def _structured(model, cfg: StructuredConfig, opts: RecoveryOptions, ctx: StageContext,
                where: str):
    removed = {"heads": 0, "neurons": 0}
    if cfg.heads > 0:
        scores = head_importance(model, ctx.batches(where), ctx.loss_fn)
        plan = lowest(scores, cfg.heads, per_layer=cfg.per_layer)
        prune_heads(model, plan)
        removed["heads"] = sum(map(len, plan.values()))
    if cfg.neurons > 0:
        scores = (neuron_weight_importance(model) if cfg.importance == "weight" else
                  neuron_importance(model, ctx.batches(where), ctx.loss_fn))
        plan = lowest(scores, cfg.neurons, per_layer=cfg.per_layer)
        prune_ffn(model, plan)
        removed["neurons"] = sum(map(len, plan.values()))
    summary = ctx.fit(model, opts.recovery_steps, opts.lr, where)
    return model.eval(), {"sizes": kept_sizes(model), "removed": removed, "recovery": summary}


def _replay_structured(model, record):
    shrink_to(model, record["sizes"])
    return model.eval()


# ---------------------------------------------------------------- quantize

def _check_quant(model, cfg: QuantConfig, opts):
    plan_targets(model, cfg)


def _tied_key(lin: nn.Module) -> tuple[int, int]:
    """Linears holding the same weight and bias Parameters (weight sharing) are one layer."""
    return id(lin.weight), id(lin.bias)


def _unify_tied(model: nn.Module, names: Iterable[str]) -> None:
    """Make Linears that share their Parameters one module, so that quantizing it once
    keeps the sharing (a QuantLinear's codes are buffers, not the shared Parameters)."""
    first: dict[tuple[int, int], nn.Module] = {}
    for name in names:
        lin = model.get_submodule(name)
        held = first.setdefault(_tied_key(lin), lin)
        if held is not lin:
            replace_module(model, name, held)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names reaching one module object, for each module reached under several names."""
    groups: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name and isinstance(m, nn.Linear):
            groups.setdefault(id(m), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _follow_first(model: nn.Module, groups: list[list[str]]) -> None:
    """Point every name of a group at the module its first name holds now (the QAT swaps
    replace a module under its first name only)."""
    for group in groups:
        held = model.get_submodule(group[0])
        for name in group[1:]:
            replace_module(model, name, held)


def _prepare_quant(raw: dict[str, Any], opts: QuantOptions) -> dict[str, Any]:
    """``bits`` stands for a scheme (4: int4, 8: int8) unless one is given; they must agree."""
    if opts.bits is None:
        return raw
    scheme = raw.get("scheme", {4: "int4", 8: "int8"}[opts.bits])
    if QuantConfig(scheme=scheme).bits != opts.bits:
        raise ConfigError(f"bits: {opts.bits} does not match scheme {scheme!r}")
    return {**raw, "scheme": scheme}


def _quantize(model, cfg: QuantConfig, opts: QuantOptions, ctx: StageContext, where: str):
    _unify_tied(model, plan_targets(model, cfg))
    if opts.qat_steps > 0:
        groups = _alias_groups(model)
        names = prepare_qat(model, cfg)
        _follow_first(model, groups)
        summary = ctx.fit(model, opts.qat_steps, opts.lr, where)
        convert_qat(model)
        _follow_first(model, groups)
        layers = list(names)
    else:
        summary = {}
        layers = list(quantize_model(model, cfg).layers)
    modules = dict(model.named_modules(remove_duplicate=False))
    return model.eval(), {"scheme": cfg.scheme, "group_size": cfg.group_size, "layers": layers,
                          "shapes": {n: [modules[n].out_features, modules[n].in_features,
                                         modules[n].bias is not None] for n in layers},
                          "qat": summary}


def _replay_quantize(model, record):
    modules = dict(model.named_modules(remove_duplicate=False))
    built: dict[tuple[int, int], QuantLinear] = {}
    for name in record["layers"]:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"quantize record: {name!r} is not an nn.Linear of this model")
        built[_tied_key(lin)] = QuantLinear(lin.in_features, lin.out_features,
                                            lin.bias is not None, record["scheme"],
                                            record["group_size"]).to(lin.weight.device)
    for name, m in modules.items():
        if name and isinstance(m, nn.Linear) and _tied_key(m) in built:
            replace_module(model, name, built[_tied_key(m)])
    return model.eval()


# ---------------------------------------------------------------- int8 embeddings

def _quantize_embeddings(model, cfg: EmbeddingQuantConfig, opts: NoOptions, ctx: StageContext,
                         where: str):
    names = quantize_embeddings(model, cfg.targets, cfg.skip)
    modules = dict(model.named_modules())
    return model.eval(), {"layers": {n: [modules[n].num_embeddings, modules[n].embedding_dim,
                                         modules[n].padding_idx] for n in names}}


def _replay_quantize_embeddings(model, record):
    modules = dict(model.named_modules())
    for name, (num, dim, padding_idx) in record["layers"].items():
        emb = modules.get(name)
        if not isinstance(emb, nn.Embedding) or tuple(emb.weight.shape) != (num, dim):
            raise ConfigError(f"quantize_embeddings record: {name!r} is not a {num} x {dim} "
                              f"nn.Embedding of this model")
        replace_module(model, name, QuantEmbedding(num, dim, padding_idx).to(emb.weight.device))
    return model.eval()


# ---------------------------------------------------------------- moefy

def _moefy_sites(model, cfg: MoefyConfig) -> list[str]:
    return match_modules(model, cfg.targets, (FeedForward, BertStyleIntermediate))


def _moefy(model, cfg: MoefyConfig, opts: MoefyOptions, ctx: StageContext, where: str):
    targets = _moefy_sites(model, cfg)
    batches = ctx.batches(where)
    result = moefy(model, cfg)
    recall = train_routers(model, batches, steps=opts.router_steps, lr=opts.router_lr,
                           seed=cfg.seed)
    return model.eval(), {"targets": targets, "sites": list(result.sites),
                          "config": {**dataclasses.asdict(cfg), "targets": list(cfg.targets)},
                          "compute_fraction": result.compute_fraction, "recall": recall}


def _replay_moefy(model, record):
    cfg = MoefyConfig(**{**record["config"], "targets": _exact(record["targets"]),
                         "kmeans_iters": 0})
    moefy(model, cfg)
    return model.eval()


# ---------------------------------------------------------------- low rank

def _lowrank(model, cfg: LowRankConfig, opts: RecoveryOptions, ctx: StageContext, where: str):
    result = lowrank(model, cfg)
    summary = ctx.fit(model, opts.recovery_steps, opts.lr, where)
    return model.eval(), {"ranks": result.ranks, "skipped": result.skipped,
                          "params_before": result.params_before,
                          "params_after": result.params_after, "recovery": summary}


def _replay_lowrank(model, record):
    for name, rank in record["ranks"].items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"lowrank record: {name!r} is not an nn.Linear of this model")
        new = LowRankLinear(lin.in_features, lin.out_features, rank, lin.bias is not None)
        replace_module(model, name, new.to(device=lin.weight.device, dtype=lin.weight.dtype))
    return model.eval()


# ---------------------------------------------------------------- sharing

def _share(model, cfg: SharingConfig, opts: RecoveryOptions, ctx: StageContext, where: str):
    result = share_layers(model, cfg)
    summary = ctx.fit(model, opts.recovery_steps, opts.lr, where)
    return model.eval(), {"groups": [list(g) for g in cfg.groups], "aliases": result.aliases,
                          "params_before": result.params_before,
                          "params_after": result.params_after, "recovery": summary}


def _replay_share(model, record):
    share_layers(model, SharingConfig(groups=tuple(tuple(g) for g in record["groups"]),
                                      init="first"))
    return model.eval()


register(StageKind("distill", DistillConfig, DistillOptions, _distill, _replay_distill,
                   check=_check_distill))
register(StageKind("prune", PruneConfig, RecoveryOptions, _prune, lambda m, r: m.eval(),
                   needs_data=lambda c, o: f"method {c.method}" if c.method == "wanda" else None,
                   check=_check_prune, structural=False))
register(StageKind("structured", StructuredConfig, RecoveryOptions, _structured,
                   _replay_structured,
                   needs_data=lambda c, o: ("importance 'gradient'" if c.importance == "gradient"
                                            else None)))
register(StageKind("quantize", QuantConfig, QuantOptions, _quantize, _replay_quantize,
                   prepare=_prepare_quant, check=_check_quant))
register(StageKind("quantize_embeddings", EmbeddingQuantConfig, NoOptions, _quantize_embeddings,
                   _replay_quantize_embeddings,
                   check=lambda m, c, o: embedding_targets(m, c), structural=False))
register(StageKind("moefy", MoefyConfig, MoefyOptions, _moefy, _replay_moefy,
                   needs_data=lambda c, o: "a moefy stage (its routers)",
                   check=lambda m, c, o: _moefy_sites(m, c)))
register(StageKind("lowrank", LowRankConfig, RecoveryOptions, _lowrank, _replay_lowrank,
                   check=lambda m, c, o: match_modules(m, c.targets, (nn.Linear,))))
register(StageKind("share", SharingConfig, RecoveryOptions, _share, _replay_share))
