"""Deltas on a tensor-parallel base: LoRA split to match its column/row-parallel layer.

Two orders, one result (docs/tensor_parallel.md, "LoRA on parallel layers"):

* parallelize, then attach: ``apply_tensor_parallel(base, group)``, then
  ``DeltaModel(base).add(name, LoraConfig(...))``. The column/row layers are
  ``models.delta.lora.ShardedLinear``s, so each LoRA site is drawn full-size (the single
  process's random draws, same seed) and cut to this rank's shard.
* attach, then parallelize: ``parallelize_delta_model(delta_model, group)``. The plan swaps the
  linears under the deltas' hooks; every delta is detached and re-attached to the parallel
  modules, each LoRA cutting its (trained) factors to the new shards.

``make_tensor_parallel(model, group)`` picks the order's target inside a task model (a
classifier over a DeltaModel, or over one of our encoders) for the mesh strategy.

Only LoRA follows a split. Refused before anything changes (ConfigError): another delta method
on a module tensor parallelism replaces or re-heads (a split linear, an attention, the
vocabulary embedding), a merged delta, and LoRA on split layers under sequence parallelism.
Build the optimizer afterwards: cutting replaces the split factors' Parameters.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.tensor.plan import TensorParallelInfo, apply_tensor_parallel
from bmray.models.delta.base import site_name
from bmray.models.delta.lora import LoraDelta
from bmray.models.delta.model import DeltaModel
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.structure import find_blocks, module_at, tp_plan_of
from bmray.models.typed_config import ConfigError

__all__ = ["check_delta_model_for_tensor_parallel", "make_tensor_parallel",
           "parallelize_delta_model", "tensor_parallel_module_names"]


def tensor_parallel_module_names(model: nn.Module) -> set[str]:
    """Dotted names of the modules ``apply_tensor_parallel`` replaces (the plan's linears and
    embedding) or turns into tensor-parallel attentions (local heads). Empty for a model
    without a ``tp_plan`` (which ``apply_tensor_parallel`` refuses)."""
    plan = tp_plan_of(model)
    if plan is None:
        return set()
    names = set(plan.model)
    try:
        blocks = find_blocks(model)
    except ValueError:
        return names
    for block_name, block in blocks:
        for path in plan.blocks:
            if module_at(block, path) is None:
                continue
            names.add(f"{block_name}.{path}")
            parent = path.rpartition(".")[0]
            if isinstance(module_at(block, parent), MultiHeadAttention):
                names.add(f"{block_name}.{parent}")
    return names


def parallelize_delta_model(model: DeltaModel, group: dist.ProcessGroup | None = None,
                            sequence_parallel: bool = False) -> DeltaModel:
    """Make ``model.base`` tensor-parallel over ``group`` and re-home every attached delta on
    the parallel modules (LoRA factors cut to this rank's shard); returns ``model``, with
    ``model.tensor_parallel`` (the base's TensorParallelInfo) for ``TensorParallelLM``. Every
    rank of ``group`` calls it with the same model and deltas."""
    check_delta_model_for_tensor_parallel(model, sequence_parallel)
    attached = [d for d in model.deltas.values() if d.attached]
    for delta in attached:
        delta.detach()
    try:
        apply_tensor_parallel(model.base, group, sequence_parallel)
    except ConfigError:
        for delta in attached:                  # refused before any change: as it was
            delta.attach(model.base)
        raise
    for delta in attached:
        delta.attach(model.base)
    model.tensor_parallel = model.base.tensor_parallel
    return model


def check_delta_model_for_tensor_parallel(model: DeltaModel, sequence_parallel: bool = False
                                          ) -> None:
    """The refusals of ``parallelize_delta_model`` alone (no group, nothing changes): a job's
    driver calls it to fail before any worker starts."""
    split = tensor_parallel_module_names(model.base)
    for name, delta in model.deltas.items():
        if getattr(delta, "merged", False):
            raise ConfigError(f"delta {name!r} is merged into the base; unmerge it before making "
                              f"the base tensor-parallel")
        on_split = [site_name(k) for k in delta.sites if site_name(k) in split]
        if on_split and not isinstance(delta, LoraDelta):
            raise ConfigError(f"delta {name!r} ({delta.config.method}) has sites on modules "
                              f"tensor parallelism splits: {on_split}; only LoRA is split to match")
        if on_split and sequence_parallel:
            raise ConfigError(f"delta {name!r}: LoRA on tensor-parallel layers is not supported "
                              f"with sequence_parallel=True (sites {on_split})")


def make_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                         sequence_parallel: bool = False) -> TensorParallelInfo:
    """Make ``model`` tensor-parallel: itself when its class has a ``tp_plan``; else the first
    DeltaModel inside whose base has one (``parallelize_delta_model``: its deltas follow);
    else the first submodule with a ``tp_plan``. ``model.tensor_parallel`` is set to the
    result, for the loss and the gradient sync. A model with none of them gets
    ``apply_tensor_parallel``'s own error."""
    target = model
    if tp_plan_of(model) is None:
        inner = [m for m in model.modules() if isinstance(m, DeltaModel)
                 and tp_plan_of(m.base) is not None]
        if inner:
            info = parallelize_delta_model(inner[0], group, sequence_parallel).tensor_parallel
            model.tensor_parallel = info
            return info
        target = next((m for m in model.modules() if tp_plan_of(m) is not None), model)
    apply_tensor_parallel(target, group, sequence_parallel)
    model.tensor_parallel = target.tensor_parallel
    return model.tensor_parallel
