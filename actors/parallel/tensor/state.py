"""Tensor-parallel checkpoints: a TP model's state-dict keys are the plain model's; a split
entry holds this rank's ``tensor_split`` chunk along ``tensor_parallel_dims(model)[key]``.
``gather_tensor_parallel_state`` concatenates the chunks (uneven ones too) into full tensors,
``shard_tensor_parallel_state`` cuts a full state for this rank (for ``load_state_dict``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bmray.actors.comm import collectives as C
from bmray.actors.parallel.tensor.ops import all_gather_along, group_size, rank_chunk

__all__ = ["gather_tensor_parallel_state", "shard_tensor_parallel_state", "tensor_parallel_dims"]


def tensor_parallel_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name (tied names included) -> the dim it is split along; replicated
    parameters are absent."""
    dims: dict[str, int] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            dim = getattr(mod, "tp_dims", {}).get(p_name, getattr(p, "tp_dim", None))
            if dim is not None:
                dims[prefix + p_name] = dim
    return dims


def gather_tensor_parallel_state(state: dict[str, Tensor], model: nn.Module,
                                 group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """Full tensors from every rank's shards (canonical keys; uneven chunks fine). ``state``
    is keyed like ``model``'s parameters (a state dict, gradients, optimizer moments);
    entries that are not sharded pass through. A collective: every TP rank calls it with the
    same keys, and every rank gets the full state."""
    dims = tensor_parallel_dims(model)
    keys = [k for k in state if k in dims]
    if group_size(group) == 1 or not keys:
        return dict(state)
    local = torch.tensor([state[k].size(dims[k]) for k in keys], dtype=torch.int64,
                         device=state[keys[0]].device)
    sizes = C.all_gather(local[None], numel=group_size(group), group=group).tolist()   # [world, K]
    out = dict(state)
    for i, k in enumerate(keys):
        out[k] = all_gather_along(state[k].detach(), dims[k], [row[i] for row in sizes], group)
    return out


def shard_tensor_parallel_state(full_state: dict[str, Tensor], model: nn.Module,
                                group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """This rank's slices of a full (single-process) state, to ``load_state_dict`` into the TP
    model. No communication."""
    dims = tensor_parallel_dims(model)
    out = {}
    for k, v in full_state.items():
        out[k] = rank_chunk(v, dims[k], group).clone() if k in dims else v
    return out
