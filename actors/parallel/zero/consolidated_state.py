"""The consolidated checkpoint format of the sharded strategies: SingleProcess's.

ZeRO-1/2, ZeRO-3 and the mesh write (and read) a full fp32 model state dict plus torch
AdamW's optimizer state dict, so a checkpoint of any stage or world size loads into any other
and into a single process. These helpers build and take apart that format.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bmray.actors.parallel.zero.loss_scaler import DynamicLossScaler


def with_current_lr(optim: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optim`` (an optimizer state dict) with ``optimizer``'s current lr fields, in place."""
    lr_group = optimizer.param_groups[0]
    for g in optim["param_groups"]:
        for key in ("lr", "initial_lr"):
            if key in lr_group:
                g[key] = lr_group[key]
    return optim


def optimizer_template(template: torch.optim.Optimizer,
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """SingleProcess's optimizer state dict without state, carrying the current lr."""
    return with_current_lr(template.state_dict(), optimizer)


def consolidated_optimizer(template: torch.optim.Optimizer, optimizer: torch.optim.Optimizer,
                           template_params: list[nn.Parameter],
                           per_param: dict[int, dict[str, torch.Tensor]],
                           step: torch.Tensor) -> dict[str, Any]:
    """torch AdamW's state dict from full per-parameter moments ``per_param[id(p)]["m"/"v"]``."""
    optim = optimizer_template(template, optimizer)
    optim["state"] = {i: {"step": step.detach().float().cpu().clone(),
                          "exp_avg": per_param[id(p)]["m"],
                          "exp_avg_sq": per_param[id(p)]["v"]}
                      for i, p in enumerate(template_params)}
    return optim


def non_sharded_model(module: nn.Module, sharded_names: set[str]) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers (fp32 copies): a model state without the shards."""
    return {k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
            for k, v in module.state_dict(keep_vars=True).items() if k not in sharded_names}


def param_states(optim: dict[str, Any] | None,
                 template_params: list[nn.Parameter]) -> dict[int, dict[str, Any]]:
    """id(param) → its AdamW state in a loaded optimizer state dict (int or str keys)."""
    if optim is None:
        return {}
    return {id(p): optim["state"].get(i, optim["state"].get(str(i), {}))
            for i, p in enumerate(template_params)}


def load_lr_and_scaler(optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler | None,
                       state: dict[str, Any]) -> None:
    """The scheduler's lr fields and the loss-scaler state of a loaded checkpoint."""
    optim = state.get("optimizer")
    if optim is not None:
        loaded = optim["param_groups"][0]
        for g in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in loaded:
                    g[key] = loaded[key]
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
