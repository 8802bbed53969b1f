"""The parallelism planner: which (dp, tp, pp, ZeRO stage, offload, micro-batches, activation
checkpointing) fits the GPUs and is fastest — among the layouts our strategies run.

    work = load_workload("configs/gpt-tiny.yaml")       # experiment YAML, model YAML or BUILTIN
    spec = model_spec(work.model)                       # built on ``meta``: exact counts
    result = plan(spec, 8, memory_bytes("80GB"), work, Hardware.for_kind("h100"))
    print(report(result, spec, work, gpus=8, gpu_memory=..., headroom=0.1, top=5))

Every layout with ``dp·tp·pp = gpus`` is costed with cluster/cost_model.py (model states,
activations, transient buffers, the pipeline bubble, a step time); a layout fits when its fullest
stage's device bytes are at most ``gpu_memory × (1 − headroom)``. Fitting layouts are ranked by
step time, then fewer micro-batches, then device memory. :func:`unsupported` says why no strategy
of ours runs a layout; :func:`pretrain_overrides` gives the ``bmray pretrain --set`` flags that
run one. The formulas, the search and its rules: docs/planner.md. The command line: jobs/plan.py.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from bmray.actors.train.experiment import experiment_from_dict
from bmray.cluster.calibration import calibration
from bmray.cluster.cost_model import (DTYPE_BYTES, Hardware, ModelSpec, StepTime,
                                      bubble_fraction, head_transient_bytes, human_bytes,
                                      human_seconds, model_state_bytes, partition,
                                      recomputed_block_bytes, stage_activation_bytes, step_time,
                                      step_transient_bytes, transient_bytes)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml

# Built-in model shapes (GPT-2: Radford et al. 2019; GPT-3: Brown et al. 2020, table 2.1).
BUILTIN: dict[str, dict[str, Any]] = {
    "gpt2": dict(d_model=768, n_heads=12, n_layers=12, max_seq_len=1024),
    "gpt2-medium": dict(d_model=1024, n_heads=16, n_layers=24, max_seq_len=1024),
    "gpt2-large": dict(d_model=1280, n_heads=20, n_layers=36, max_seq_len=1024),
    "gpt2-xl": dict(d_model=1600, n_heads=25, n_layers=48, max_seq_len=1024),
    "gpt3-6.7b": dict(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048),
    "gpt3-13b": dict(d_model=5120, n_heads=40, n_layers=40, max_seq_len=2048),
    "gpt3-175b": dict(d_model=12288, n_heads=96, n_layers=96, max_seq_len=2048),
}
OFFLOADS = (("none", False), ("cpu", False), ("cpu", True))   # (offload_optimizer, params)


def builtin_config(name: str) -> ModelConfig:
    shape = BUILTIN[name]
    return ModelConfig(family="gpt", vocab_size=50257, d_ff=4 * shape["d_model"], dropout=0.0,
                       **shape)


@dataclass(frozen=True)
class Workload:
    """The model and what one optimizer step trains on it."""

    model: ModelConfig
    seq_len: int                # tokens per sequence
    global_batch: int           # sequences per optimizer step, over all replicas
    param_dtype: str            # bf16 | fp16 | fp32 (the compute copy; fp32 master always)
    source: str
    block_len: int | None = None        # the experiment's data.block_len (None: no experiment)
    overrides: tuple[str, ...] = ()     # the experiment's --set flags, repeated for pretrain

    @property
    def is_experiment(self) -> bool:
        return self.block_len is not None

    @property
    def needed_block_len(self) -> int:
        """``data.block_len`` giving ``seq_len`` tokens (a GPT's last token is only a target)."""
        return self.seq_len + (1 if self.model.family == "gpt" else 0)


def load_workload(model: str, overrides: Sequence[str] = (), seq_len: int | None = None,
                  global_batch: int | None = None, param_dtype: str | None = None,
                  gpus: int = 1) -> Workload:
    """The model config and step shape from ``--model`` and the flags (flags win).

    Defaults: an experiment's sequence length (``data.block_len − 1`` for GPT), global batch
    and ZeRO ``param_dtype``; otherwise ``model.max_seq_len``, 8 sequences per GPU and bf16.
    """
    exp_batch = exp_seq = exp_dtype = exp_block = None
    if model in BUILTIN or not _is_experiment(model):
        stray = [o for o in overrides if not o.startswith("model.")]
        if stray:
            raise ConfigError(f"--set {stray[0]}: only model.* keys apply to a model without "
                              f"an experiment")
    if model in BUILTIN:
        raw_model = dataclasses.asdict(builtin_config(model))
        cfg = from_dict(ModelConfig, apply_overrides({"model": raw_model}, overrides)["model"],
                        "model")
    else:
        raw = load_yaml(model)
        if "model" in raw:                          # an experiment: validate it all
            exp = experiment_from_dict(apply_overrides(raw, overrides))
            cfg = exp.model
            exp_batch = exp.data.global_batch_size
            exp_block = exp.data.block_len
            exp_seq = exp_block - (1 if cfg.family == "gpt" else 0)
            exp_dtype = getattr(exp.strategy.options, "param_dtype", None)
        else:                                       # a bare model section
            cfg = from_dict(ModelConfig, apply_overrides({"model": raw}, overrides)["model"],
                            "model")
    seq = seq_len or exp_seq or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise ConfigError(f"--seq-len: {seq} is longer than model.max_seq_len "
                          f"{cfg.max_seq_len}")
    dtype = param_dtype or exp_dtype or "bf16"
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--param-dtype: {dtype!r} is not one of {list(DTYPE_BYTES)}")
    return Workload(model=cfg, seq_len=seq, global_batch=global_batch or exp_batch or 8 * gpus,
                    param_dtype=dtype, source=model, block_len=exp_block,
                    overrides=tuple(overrides) if exp_block is not None else ())


def _is_experiment(path: str) -> bool:
    return "model" in load_yaml(path)


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """Exact trainable-parameter counts and block shapes, from the model built on ``meta``."""
    with torch.device("meta"):
        model = build_model(cfg)
    return ModelSpec.from_module(model, family=cfg.family, dropout=cfg.dropout)


# ------------------------------------------------------------------ candidates
@dataclass
class Candidate:
    """One layout and its predicted cost (per GPU: the fullest pipeline stage's rank)."""

    dp: int
    tp: int
    pp: int
    zero: int
    offload_optimizer: str          # none | cpu
    offload_params: bool
    micro_batches: int
    micro_batch: int                # sequences per micro-batch per replica
    checkpointing: bool
    stages: list[dict[str, Any]]    # per stage: blocks, params per rank, bytes by kind
    bubble: float
    time: StepTime
    device: float = 0.0             # device bytes per GPU (max over stages)
    host: float = 0.0               # host bytes per GPU (max over stages)
    fits: bool = False
    schedule: str = "1f1b"          # pipeline schedule costed (matters with pp > 1)
    sequence_parallel: bool = False     # Megatron sequence parallelism (only with tp > 1)
    unsupported: str = ""           # why no strategy of ours runs it ("" when one does)

    def __post_init__(self) -> None:
        self.device = max(s["device"] for s in self.stages)
        self.host = max(s["host"] for s in self.stages)

    @property
    def worst(self) -> dict[str, Any]:
        return max(self.stages, key=lambda s: s["device"])

    @property
    def runnable(self) -> bool:
        return not self.unsupported

    @property
    def strategy_kind(self) -> str:
        """The ``strategy.kind`` that runs it (``zero`` covers stage 3, i.e. ``zero3``)."""
        return "zero" if self.tp == self.pp == 1 else "mesh"

    def describe(self) -> str:
        off = "none" if self.offload_optimizer == "none" else \
            ("optimizer+params" if self.offload_params else "optimizer")
        extra = ""
        if self.pp > 1:
            extra += f" ({self.schedule})"
        if self.sequence_parallel:
            extra += ", sequence parallel"
        return (f"dp={self.dp} tp={self.tp} pp={self.pp}{extra}, ZeRO stage {self.zero}, "
                f"offload {off}, {self.micro_batches} micro-batch(es) of {self.micro_batch}, "
                f"activation checkpointing {'on' if self.checkpointing else 'off'}")

    def to_dict(self) -> dict[str, Any]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "zero_stage": self.zero,
                "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params, "micro_batches": self.micro_batches,
                "micro_batch_size": self.micro_batch,
                "activation_checkpointing": self.checkpointing,
                "device_bytes_per_gpu": int(self.device), "host_bytes_per_gpu": int(self.host),
                "bubble": self.bubble, "fits": self.fits, "schedule": self.schedule,
                "sequence_parallel": self.sequence_parallel, "runnable": self.runnable,
                "unsupported": self.unsupported or None,
                "strategy_kind": self.strategy_kind if self.runnable else None,
                "step_time_s": dataclasses.asdict(self.time), "stages": self.stages}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def unsupported(spec: ModelSpec, *, tp: int, pp: int, zero: int, seq_len: int,
                sequence_parallel: bool = False) -> str:
    """Why no strategy of ours runs this layout, or ``""`` when one does (docs/planner.md).

    The rules are the strategies' own refusals, stated before costing: ZeRO-3
    (actors/parallel/zero/stage3.py) shards whole parameters over a data-parallel world and is
    not part of the mesh; the mesh (actors/parallel/mesh.py) refuses ZeRO-2 with a pipeline and
    with sequence parallelism; the pipeline (actors/parallel/pipeline/) cuts GPT without MoE
    only; under the mesh a
    tensor-parallel model computes its loss from vocabulary-parallel logits (GPT only), and
    sequence parallelism splits the sequence evenly over the tp ranks."""
    if tp == pp == 1:
        return ""
    if zero == 3:
        return ("ZeRO-3 runs data-parallel only (strategy kind zero, stage 3); the mesh "
                "strategy takes zero_stage 0-2")
    if spec.family != "gpt":
        return (f"tensor and pipeline parallelism run the GPT family only "
                f"(model.family is {spec.family or 'unknown'!r})")
    if any(layer.moe for layer in spec.layers):
        return "tensor and pipeline parallelism do not run MoE blocks (model.moe must be null)"
    if zero == 2 and pp > 1:
        return "ZeRO-2 with a pipeline (pp > 1): the mesh strategy takes zero_stage 0 or 1"
    if sequence_parallel and tp > 1:
        if zero == 2:
            return "sequence parallelism composes with zero_stage 0 or 1"
        if seq_len % tp:
            return (f"sequence parallelism splits the {seq_len}-token sequence evenly over "
                    f"tp={tp} ranks")
    return ""


def candidates(spec: ModelSpec, gpus: int, work: Workload, hw: Hardware, *,
               sequence_parallel: bool = False, attention: str = "fused",
               schedule: str = "1f1b", gpu: bool = True,
               include_unsupported: bool = False) -> Iterator[Candidate]:
    """Every layout of ``gpus`` GPUs for ``spec`` (docs/planner.md), costed; those no
    strategy of ours runs only with ``include_unsupported`` (their ``unsupported`` says why)."""
    heads = [layer.n_heads for layer in spec.layers]
    e = DTYPE_BYTES[work.param_dtype]
    for tp in _divisors(gpus):
        if tp > hw.gpus_per_node or any(h % tp for h in heads):
            continue
        if tp > 1 and any(layer.moe for layer in spec.layers):
            continue                    # MoE takes expert, not tensor, parallelism
        for pp in _divisors(gpus // tp):
            if pp > spec.n_layers:
                continue
            dp = gpus // (tp * pp)
            if work.global_batch % dp:
                continue
            bounds = partition(spec, pp)
            psis = [spec.stage_params(lo, hi, pp, i) for i, (lo, hi) in enumerate(bounds)]
            for m in _divisors(work.global_batch // dp):
                mbs = work.global_batch // (dp * m)
                for ckpt in (False, True):
                    acts = [stage_activation_bytes(
                        spec, lo, hi, i, pp, seq=work.seq_len, micro_batch=mbs,
                        micro_batches=m, act_bytes=e, tp=tp, sequence_parallel=sequence_parallel,
                        recompute=ckpt, attention=attention, schedule=schedule)
                        for i, (lo, hi) in enumerate(bounds)]
                    # the last stage's logits and loss gradients: one micro-batch at a time;
                    # with checkpointing they are freed before any block is recomputed, so
                    # only what exceeds the recomputation term (counted in acts) is added
                    head = head_transient_bytes(spec, work.seq_len, mbs, e, tp=tp,
                                                logits_kept=pp == 1)
                    if ckpt:
                        lo, hi = bounds[-1]
                        head = max(0.0, head - recomputed_block_bytes(
                            spec, lo, hi, seq=work.seq_len, micro_batch=mbs, act_bytes=e,
                            tp=tp, sequence_parallel=sequence_parallel, attention=attention))
                    for zero in (0, 1, 2, 3):
                        for off_opt, off_params in OFFLOADS:
                            if off_params and zero != 3:
                                continue
                            if dp == 1 and not (zero == 0 or (zero == 3 and off_params)):
                                continue
                            why = unsupported(spec, tp=tp, pp=pp, zero=zero, seq_len=work.seq_len,
                                              sequence_parallel=sequence_parallel)
                            if why and not include_unsupported:
                                continue
                            stages = []
                            for i, (lo, hi) in enumerate(bounds):
                                psi = psis[i].per_rank(tp)
                                ms = model_state_bytes(psi, zero, dp, work.param_dtype,
                                                       off_opt == "cpu", off_params, gpu)
                                blocks = spec.layers[lo:hi]
                                trans = transient_bytes(zero, psis[i], blocks, tp,
                                                        work.param_dtype)
                                head_i = head if i == pp - 1 else 0.0
                                step = step_transient_bytes(
                                    spec, psis[i], blocks, zero, dp, tp, work.param_dtype,
                                    offload_optimizer=off_opt == "cpu")
                                stages.append({
                                    "blocks": [lo, hi], "params_per_rank": psi,
                                    "param": ms.param, "grad": ms.grad,
                                    "optimizer": ms.optimizer, "activations": acts[i],
                                    "transient": trans, "head_transient": head_i,
                                    "step_transient": step,
                                    "param_device": 0.0 if off_params else ms.param,
                                    "optimizer_device": 0.0 if off_opt == "cpu"
                                    else ms.optimizer,
                                    "device": ms.device + max(acts[i] + trans + head_i, step),
                                    "host": ms.host})
                            time = step_time(spec, bounds, dp=dp, tp=tp, stage=zero,
                                             offload_optimizer=off_opt == "cpu",
                                             offload_params=off_params, micro_batches=m,
                                             micro_batch=mbs, seq=work.seq_len,
                                             recompute=ckpt, param_dtype=work.param_dtype,
                                             hw=hw)
                            yield Candidate(dp, tp, pp, zero, off_opt, off_params, m, mbs, ckpt,
                                            stages, bubble_fraction(pp, m), time,
                                            schedule=schedule,
                                            sequence_parallel=sequence_parallel and tp > 1,
                                            unsupported=why)


@dataclass
class Plan:
    """The ranked fitting candidates (best first) and what was tried."""

    fitting: list[Candidate]        # runnable ones (and, if asked for, unsupported ones marked)
    enumerated: int
    smallest: Candidate | None      # the runnable one of least device memory ("nothing fits")
    usable: float                   # device bytes a layout may use
    hardware: Hardware = dataclasses.field(default_factory=Hardware)   # what step times assume
    suggestion: str = ""

    @property
    def best(self) -> Candidate | None:
        """The recommendation: the fastest fitting layout a strategy of ours runs."""
        return next((c for c in self.fitting if c.runnable), None)


def plan(spec: ModelSpec, gpus: int, gpu_memory: int, work: Workload, hw: Hardware, *,
         headroom: float = 0.1, host_memory: int | None = None, **options: Any) -> Plan:
    """Enumerate, keep what fits ``gpu_memory × (1 − headroom)`` (and ``host_memory`` per
    node, when given), rank by estimated step time, then fewer micro-batches, then memory."""
    usable = gpu_memory * (1.0 - headroom)
    per_node = min(gpus, hw.gpus_per_node)
    fitting, smallest, n = [], None, 0
    for c in candidates(spec, gpus, work, hw, **options):
        n += 1
        c.fits = c.device <= usable and (host_memory is None or c.host * per_node <= host_memory)
        if c.fits:
            fitting.append(c)
        if c.runnable and (smallest is None or c.device < smallest.device):
            smallest = c
    if fitting:
        fastest = min(c.time.total for c in fitting)
        fitting.sort(key=lambda c: (round(c.time.total / fastest, 6), c.micro_batches, c.device))
    return Plan(fitting, n, smallest, usable, hw)


def what_would_fit(spec: ModelSpec, gpus: int, gpu_memory: int, work: Workload, hw: Hardware,
                   *, headroom: float, host_memory: int | None, max_factor: int = 1024,
                   **options: Any) -> str:
    """A hint for a plan where nothing fits: the smallest GPU count (doubling) that fits."""
    options = {**options, "include_unsupported": False}
    g = gpus * 2
    while g <= gpus * max_factor:
        found = plan(spec, g, gpu_memory, work, hw, headroom=headroom, host_memory=host_memory,
                     **options)
        if found.best is not None:
            return f"--gpus {g} fits ({found.best.describe()})"
        g *= 2
    return (f"no GPU count up to {gpus * max_factor} fits with global batch "
            f"{work.global_batch}: use larger GPUs, a shorter --seq-len or a smaller model")


# ------------------------------------------------------------------ report
def _row(rank: int, c: Candidate) -> str:
    w = c.worst
    off = {("none", False): "-", ("cpu", False): "opt", ("cpu", True): "opt+par"}[
        (c.offload_optimizer, c.offload_params)]
    cells = [f"{rank}{'' if c.runnable else '!'}", str(c.dp), str(c.tp), str(c.pp), str(c.zero),
             off, str(c.micro_batches), str(c.micro_batch), "on" if c.checkpointing else "off",
             human_bytes(c.device), human_bytes(w["param_device"]),
             human_bytes(w["grad"]), human_bytes(w["optimizer_device"]),
             human_bytes(w["activations"]), human_bytes(c.host), f"{c.bubble:.1%}",
             human_seconds(c.time.total)]
    return " ".join(f"{x:>{n}}" for x, n in zip(cells, WIDTHS))


HEADER = ["#", "dp", "tp", "pp", "zero", "offload", "m", "mbs", "ckpt", "device/GPU", "params",
          "grads", "optim", "activ", "host/GPU", "bubble", "step"]   # device parts per GPU
WIDTHS = [3, 3, 3, 3, 4, 7, 4, 4, 4, 11, 10, 10, 10, 10, 10, 6, 9]


def pretrain_overrides(c: Candidate, work: Workload, use_gpu: bool = True) -> list[str] | None:
    """The ``KEY=VALUE`` overrides (``bmray pretrain --set ...``) that run layout
    ``c`` of ``work``; None for a layout no strategy of ours runs.

    In order: the experiment's own ``--set`` flags the plan was made with (``strategy.*`` ones
    dropped: the strategy is replaced), the gang (``scaling``), the step's shape (``data``:
    global batch, and the block length when ``--seq-len`` changed it), ``strategy=null`` —
    which empties the section, so no key of the experiment's old strategy kind survives into
    the new kind's typed config (``bmray pretrain`` applies overrides key by key with
    :func:`models.typed_config.apply_overrides`, and a ``null`` section is rebuilt by the keys
    that follow) — then the strategy: ``zero`` (stage 0-3) for ``tp = pp = 1``, else ``mesh``
    with ``dp = num_workers / (tp·pp)``; and the training loop's ``micro_batches`` (the
    pipeline's ``m``) and activation checkpointing. Options left out take the strategy's
    defaults (bucket sizes, ``balance: params`` as :func:`cluster.cost_model.partition`)."""
    if not c.runnable:
        return None
    sets = [o for o in work.overrides if o.partition("=")[0].split(".")[0] != "strategy"]
    sets += [f"scaling.num_workers={c.dp * c.tp * c.pp}", f"scaling.use_gpu={'true' if use_gpu else 'false'}",
             f"data.global_batch_size={work.global_batch}"]
    if work.needed_block_len != work.block_len:
        sets.append(f"data.block_len={work.needed_block_len}")
    sets.append("strategy=null")
    if c.strategy_kind == "zero":
        sets += ["strategy.kind=zero", f"strategy.stage={c.zero}"]
    else:
        sets += ["strategy.kind=mesh", f"strategy.tp={c.tp}", f"strategy.pp={c.pp}",
                 f"strategy.zero_stage={c.zero}"]
        if c.pp > 1:
            sets.append(f"strategy.schedule={c.schedule}")
        if c.sequence_parallel:
            sets.append("strategy.sequence_parallel=true")
    sets.append(f"strategy.param_dtype={work.param_dtype}")
    if c.offload_optimizer != "none":
        sets.append(f"strategy.offload_optimizer={c.offload_optimizer}")
    if c.offload_params:
        sets.append("strategy.offload_params=true")
    sets += [f"train.micro_batches={c.micro_batches}",
             f"train.activation_checkpointing.enabled={'true' if c.checkpointing else 'false'}"]
    return sets


def pretrain_flags(c: Candidate, work: Workload, use_gpu: bool = True) -> str:
    """:func:`pretrain_overrides` as shell-quoted ``--set`` flags, or why there are none."""
    sets = pretrain_overrides(c, work, use_gpu)
    if sets is None:
        return f"not run by our strategies: {c.unsupported}"
    return " ".join(f"--set {shlex.quote(x)}" for x in sets)


def _peak_terms(w: dict[str, Any]) -> str:
    """What the stage's device peak adds to its model states: forward/backward or the step."""
    if w["step_transient"] > w["activations"] + w["transient"] + w["head_transient"]:
        return f"optimizer step's fp32 gradient copy {human_bytes(w['step_transient'])}"
    return (f"activations {human_bytes(w['activations'])} + head logits/loss "
            f"{human_bytes(w['head_transient'])} + buffers {human_bytes(w['transient'])}")


def report(result: Plan, spec: ModelSpec, work: Workload, *, gpus: int, gpu_memory: int,
           headroom: float, top: int) -> str:
    """The plan as text: the recommendation (or why nothing fits), the top layouts, their
    ``bmray pretrain`` flags."""
    psi, hw = spec.total.total, result.hardware
    gpu = hw.kind != "cpu"
    lines = [f"model: {work.source} ({spec.family}, {psi / 1e6:,.2f}M trainable parameters, "
             f"{spec.n_layers} blocks), {work.param_dtype} parameters with fp32 AdamW master",
             f"run: {gpus} GPU(s), {result.hardware.gpus_per_node} per node, "
             f"{human_bytes(gpu_memory)} each ({human_bytes(result.usable)} usable at "
             f"{headroom:.0%} headroom); "
             f"global batch {work.global_batch} x {work.seq_len} tokens",
             f"step times: device kind {hw.kind}, MFU {hw.mfu:.3f}"
             + (" (calibrated: " + calibration(hw.kind).source + ")"
                if hw.mfu == calibration(hw.kind).values.get("mfu") else " (given)")]
    best = result.best
    if best is None:
        s = result.smallest
        lines.append(f"nothing fits: {result.enumerated} layouts tried; the smallest needs "
                     f"{human_bytes(s.device)} per GPU ({s.describe()})" if s else
                     "nothing fits: no layout of these GPUs is possible (check --gpus, "
                     "--global-batch and the head count)")
        if result.fitting:          # --include-unsupported: what would, with more strategies
            c = result.fitting[0]
            lines.append(f"fits only with layouts no strategy of ours runs, fastest: "
                         f"{c.describe()} ({c.unsupported})")
        if result.suggestion:
            lines.append(f"what would fit: {result.suggestion}")
        return "\n".join(lines)
    w = best.worst
    config = shlex.quote(work.source) if work.is_experiment else "<an experiment of this model>"
    lines += [
        f"recommended: {best.describe()} (strategy {best.strategy_kind})",
        f"  device memory per GPU: {human_bytes(best.device)} = params "
        f"{human_bytes(w['param_device'])} + grads {human_bytes(w['grad'])} + optimizer "
        f"{human_bytes(w['optimizer_device'])} + "
        + _peak_terms(w)
        + (f" (fullest of {best.pp} stages: blocks {w['blocks'][0]}-{w['blocks'][1] - 1})"
           if best.pp > 1 else ""),
        f"  host memory per GPU: {human_bytes(best.host)}"
        + (" (offloaded optimizer state" + (" and parameters)" if best.offload_params else ")")
           if best.host else ""),
        f"  pipeline bubble: {best.bubble:.1%}; estimated step time "
        f"{human_seconds(best.time.total)} (" + ", ".join(
            f"{k} {human_seconds(getattr(best.time, k))}"
            for k in ("compute", "tp", "pp", "dp", "offload") if getattr(best.time, k) > 0)
        + ")",
        f"  run it: bmray pretrain --config {config} {pretrain_flags(best, work, gpu)}"]
    shown = result.fitting[:top]
    skipped = sum(not c.runnable for c in result.fitting)
    lines += ["", f"top {len(shown)} of {len(result.fitting)} fitting layouts"
              + (f", {skipped} of them not runnable (marked !)" if skipped else "")
              + f" ({result.enumerated} tried):",
              " ".join(f"{h:>{n}}" for h, n in zip(HEADER, WIDTHS))]
    lines += [_row(i + 1, c) for i, c in enumerate(shown)]
    lines += ["", "bmray pretrain flags of each layout:"]
    lines += [f"{i + 1:>3} {pretrain_flags(c, work, gpu)}" for i, c in enumerate(shown)]
    return "\n".join(lines)


def report_json(result: Plan, spec: ModelSpec, work: Workload, *, gpus: int, gpu_memory: int,
                top: int) -> dict[str, Any]:
    """The plan as one JSON-ready object (``bmray plan --json``)."""
    hw = result.hardware

    def listed(c: Candidate | None) -> dict[str, Any] | None:
        return None if c is None else \
            {**c.to_dict(), "pretrain_overrides": pretrain_overrides(c, work, hw.kind != "cpu")}

    return {"model": {"source": work.source, "family": spec.family,
                      "trainable_params": spec.total.total, "blocks": spec.n_layers,
                      "seq_len": work.seq_len, "global_batch": work.global_batch,
                      "param_dtype": work.param_dtype},
            "gpus": gpus, "gpu_memory_bytes": gpu_memory,
            "hardware": dataclasses.asdict(hw),
            "calibration": {"kind": hw.kind, "source": calibration(hw.kind).source},
            "usable_bytes_per_gpu": int(result.usable), "enumerated": result.enumerated,
            "fitting": len(result.fitting),
            "recommendation": listed(result.best),
            "candidates": [listed(c) for c in result.fitting[:top]],
            "smallest": listed(result.smallest),
            "suggestion": result.suggestion or None}
