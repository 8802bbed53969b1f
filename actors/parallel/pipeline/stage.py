"""Building one pipeline stage of a GPT: which blocks, the embedding and the head live on it.

:func:`split_stage` cuts ``model.blocks`` into contiguous ranges, balanced by parameter count or
measured time (:func:`layer_costs`, then :func:`bmray.actors.parallel.pipeline.schedule.
partition_balanced`), and returns the :class:`PipelineStage` of one rank. The first stage also
holds ``embed``, the last ``ln_f``, ``lm_head`` and the loss; with one stage it holds everything.
Balancing counts the embedding as an extra cost on layer 0 and the head (+ the loss, when timed)
on the last layer, since that is the stage they land on.

Submodules keep their canonical names (blocks live in an ``nn.ModuleDict`` keyed by the original
index), so the union of the stages' state dicts is the plain model's. Submodules are taken by
reference (each rank builds the model and keeps its stage), except a tied output matrix: with
more than one stage the last stage gets its own copy of ``lm_head.weight``
(:func:`tied_parameters` names the copies; the engine sums their gradients).

Only GPT is supported (no MoE blocks, no KV caches); ConfigError names what is. The design
(cut, tied embeddings, balancing) is in docs/pipeline_parallel.md.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bmray.models.config import ModelConfig
from bmray.models.layers.blocks import positions_for
from bmray.models.layers.losses import lm_loss_and_metrics
from bmray.models.typed_config import ConfigError, check_choice

from bmray.actors.parallel.pipeline.schedule import partition_balanced

__all__ = ["BALANCE", "LossFn", "PipelineStage", "default_loss", "layer_costs", "split_stage",
           "tied_parameters"]


BALANCE = ("params", "time")
SUPPORTED_FAMILIES = ("gpt",)
LossFn = Callable[[Tensor, Tensor, ModelConfig], Any]


def default_loss(logits: Tensor, labels: Tensor, config: ModelConfig) -> tuple[Tensor, dict]:
    """GPT's own loss: token cross-entropy with the config's label smoothing, and its metrics."""
    return lm_loss_and_metrics(logits, labels, None, config.label_smoothing)


def _gpt_config(model: nn.Module) -> ModelConfig:
    """The model's config if it is a family the pipeline can cut; else a ConfigError."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "family", None) if isinstance(cfg, ModelConfig) else type(model).__name__
    if family not in SUPPORTED_FAMILIES or not all(hasattr(model, a) for a in
                                                   ("embed", "blocks", "ln_f", "lm_head")):
        raise ConfigError(f"pipeline: cannot cut a {family!r} model into stages; supported "
                          f"families: {list(SUPPORTED_FAMILIES)} (models/families/gpt.py)")
    if cfg.moe is not None:
        raise ConfigError("pipeline: model.moe is not supported (the MoE load-balancing loss "
                          "of every stage would have to reach the last stage)")
    return cfg


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_costs(model: nn.Module, by: str = "params", sample: dict[str, Tensor] | None = None,
                loss_fn: LossFn | None = None, repeats: int = 3) -> list[float]:
    """Cost of each pipeline layer (``model.blocks[i]``) for balancing.

    ``by="params"``: parameter count. ``by="time"``: measured forward + backward seconds on
    ``sample`` (a micro-batch dict with ``input_ids`` and ``labels``), the median of ``repeats``
    after one warm-up. Either way the embedding's cost is added to layer 0 and the head's
    (``ln_f`` + ``lm_head``, + the loss when timed) to the last layer: they run on those layers'
    stages. (A tied output matrix counts on both ends: each end stage holds a copy.)
    Timing leaves the parameters' ``.grad`` as it found them.
    """
    cfg = _gpt_config(model)
    check_choice("pipeline.balance", by, BALANCE)
    blocks = list(model.blocks)
    if by == "params":
        costs = [float(_numel(b)) for b in blocks]
        costs[0] += _numel(model.embed)
        costs[-1] += _numel(model.ln_f) + _numel(model.lm_head)
        return costs
    if sample is None or "input_ids" not in sample or "labels" not in sample:
        raise ConfigError("pipeline.balance: 'time' needs a sample micro-batch with input_ids "
                          "and labels")
    loss_fn = loss_fn or default_loss
    ids, labels, mask = sample["input_ids"], sample["labels"], sample.get("attention_mask")
    pieces: list[Callable[[Tensor | None], Tensor]] = [
        lambda _: model.embed(ids, positions_for(ids, 0, mask))]
    pieces += [lambda x, b=b: b(x, key_padding_mask=mask)[0] for b in blocks]
    pieces.append(lambda x: _as_loss(loss_fn(model.lm_head(model.ln_f(x)), labels, cfg))[0])
    saved = {p: p.grad for p in model.parameters()}
    samples: list[list[float]] = [[] for _ in pieces]
    for r in range(repeats + 1):
        inputs, outputs, seconds = [], [], []
        for k, fn in enumerate(pieces):
            x = None if k == 0 else outputs[-1].detach().requires_grad_()
            t0 = time.perf_counter()
            outputs.append(fn(x))
            seconds.append(time.perf_counter() - t0)
            inputs.append(x)
        for k in range(len(pieces) - 1, -1, -1):
            grad = None if k == len(pieces) - 1 else inputs[k + 1].grad
            t0 = time.perf_counter()
            torch.autograd.backward(outputs[k], grad)
            seconds[k] += time.perf_counter() - t0
        if r:                                   # the first pass is a warm-up
            for k, s in enumerate(seconds):
                samples[k].append(s)
    for p, g in saved.items():
        p.grad = g
    t = [statistics.median(s) for s in samples]
    costs = t[1:-1]
    costs[0] += t[0]
    costs[-1] += t[-1]
    return costs


def _as_loss(out: Any) -> tuple[Tensor, dict]:
    """A loss function may return ``loss`` or ``(loss, metrics)``."""
    if isinstance(out, tuple):
        return out[0], dict(out[1] or {})
    return out, {}


class PipelineStage(nn.Module):
    """The layers ``[lo, hi)`` of a GPT, plus the embedding on the first stage and the head and
    loss on the last. ``forward(hidden, batch)``: the first stage ignores ``hidden`` and embeds
    ``batch["input_ids"]``; a non-last stage returns the hidden states ``[b, T, d_model]``; the
    last returns ``(loss, metrics)``."""

    def __init__(self, config: ModelConfig, stage: int, n_stages: int, layer_range: tuple[int, int],
                 blocks: dict[str, nn.Module], embed: nn.Module | None = None,
                 ln_f: nn.Module | None = None, lm_head: nn.Module | None = None,
                 loss_fn: LossFn | None = None, tied: bool = False):
        super().__init__()
        self.config = config
        self.stage, self.n_stages, self.layer_range = stage, n_stages, layer_range
        self.tied = tied                        # embed.tok.weight and lm_head.weight are one
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict(blocks)
        if ln_f is not None:
            self.ln_f = ln_f
            self.lm_head = lm_head
        # a plain attribute, not a submodule: a loss module must not add state-dict keys
        object.__setattr__(self, "loss_fn", loss_fn or default_loss)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def forward(self, hidden: Tensor | None, batch: dict[str, Any]) -> Any:
        mask = batch.get("attention_mask")
        if self.is_first:
            ids = batch["input_ids"]
            hidden = self.embed(ids, positions_for(ids, 0, mask))
        for block in self.blocks.values():
            hidden, _, _ = block(hidden, key_padding_mask=mask)
        if not self.is_last:
            return hidden
        logits = self.lm_head(self.ln_f(hidden))
        return _as_loss(self.loss_fn(logits, batch["labels"], self.config))


def _check_ranges(ranges: Sequence[tuple[int, int]], n_layers: int, n_stages: int) -> None:
    ranges = [tuple(r) for r in ranges]
    ok = len(ranges) == n_stages and ranges[0][0] == 0 and ranges[-1][1] == n_layers and all(
        lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not ok:
        raise ConfigError(f"pipeline.ranges: {ranges} must be {n_stages} non-empty contiguous "
                          f"[lo, hi) ranges covering layers 0..{n_layers}")


def split_stage(model: nn.Module, stage: int, n_stages: int,
                ranges: Sequence[tuple[int, int]] | None = None, balance: str = "params",
                loss_fn: LossFn | None = None, sample: dict[str, Tensor] | None = None,
                group: Any = None) -> PipelineStage:
    """Stage ``stage`` of ``n_stages`` of a GPT (see the module docstring).

    ``ranges`` fixes the layer ranges; else they are balanced by ``balance`` ("params" or
    "time"). Timed costs differ between ranks, and every rank must cut the same ranges: when
    torch.distributed is initialised, the costs measured on rank 0 of ``group`` (None: WORLD)
    are broadcast over it, so every rank of ``group`` must call this.
    """
    cfg = _gpt_config(model)
    n_layers = len(model.blocks)
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ConfigError(f"pipeline.stages: must be an integer >= 1, got {n_stages!r}")
    if not isinstance(stage, int) or not 0 <= stage < n_stages:
        raise ConfigError(f"pipeline: stage {stage!r} is outside 0..{n_stages - 1}")
    if n_layers < n_stages:
        raise ConfigError(f"pipeline: {n_layers} layer(s) cannot fill {n_stages} stages "
                          f"(each stage needs at least one layer)")
    if ranges is None:
        check_choice("pipeline.balance", balance, BALANCE)
        costs = layer_costs(model, balance, sample, loss_fn)
        if balance == "time" and dist.is_available() and dist.is_initialized():
            shared = torch.tensor(costs, dtype=torch.float64)
            dist.broadcast(shared, src=dist.get_global_rank(group, 0) if group else 0,
                           group=group)
            costs = shared.tolist()
        ranges = partition_balanced(costs, n_stages)
    _check_ranges(ranges, n_layers, n_stages)
    lo, hi = ranges[stage]
    first, last = stage == 0, stage == n_stages - 1
    tied = model.lm_head.weight is model.embed.tok.weight
    lm_head = model.lm_head
    if last and tied and n_stages > 1:
        lm_head = _untied(model.lm_head, "weight")
    return PipelineStage(cfg, stage, n_stages, (lo, hi),
                         {str(i): model.blocks[i] for i in range(lo, hi)},
                         embed=model.embed if first else None,
                         ln_f=model.ln_f if last else None, lm_head=lm_head if last else None,
                         loss_fn=loss_fn, tied=tied)


def _untied(module: nn.Module, name: str) -> nn.Module:
    """A shallow copy of ``module`` whose parameter ``name`` is a copy (python attributes such
    as ``tp_dim`` kept); the original module and its parameter are untouched. Shallow, not
    ``deepcopy``: a tensor-parallel layer may hold a process group, which cannot be copied."""
    clone = nn.Module.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._parameters = dict(module._parameters)
    old = module._parameters[name]
    new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    clone._parameters[name] = new
    return clone


def tied_parameters(stage_module: PipelineStage) -> list[nn.Parameter]:
    """The parameters of this stage that are copies of one tied weight on another stage (the
    first stage's ``embed.tok.weight``, the last's ``lm_head.weight``); [] where nothing is
    tied across stages (one stage keeps the tie itself)."""
    if not stage_module.tied or stage_module.n_stages == 1:
        return []
    if stage_module.is_first:
        return [stage_module.embed.tok.weight]
    if stage_module.is_last:
        return [stage_module.lm_head.weight]
    return []
