"""What every rank of a compression gang runs: one training stage on its data shard.

    outs = group.execute(train_stage_rank, pack_module(module), objective, RowSlice(...),
                         train_cfg, spec, seed)     # cluster/compress_gang.py
    load_trained(module, outs[0]["state"])

A stage's module (a DistillationModel with the previous model as its frozen teacher, or a
pruned model being recovered) travels as a pickle, except what does not pickle:
torch's parametrizations (pruning's masks, ``weight = original ⊙ mask``) refuse to be
serialised other than through ``state_dict``. ``pack_module`` therefore ships a copy with its
parametrizations taken off (the plain ``original`` left in place), the parametrization
modules themselves, and the module's full state dict; ``unpack_module`` registers them again
on the copy and loads that state strictly, so the rank trains the same names and values the
driver holds. Each rank builds its strategy from the registry, reads its shard of the task
rows (``strategy.data_shard``) from the driver's stream position, trains on the one Trainer,
and every rank calls ``Trainer.full_model_state`` (a collective where ZeRO-3 shards); rank 0
returns the trainable tensors and the names of any frozen tensor that changed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bmray.actors.parallel.registry import StrategySpec, build_strategy
from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer
from bmray.models.data.task_rows import RowStream

__all__ = ["ShippedModule", "RowSlice", "pack_module", "unpack_module", "trainable_names",
           "load_trained", "train_stage_rank"]


@dataclass
class ShippedModule:
    """A module in a form that pickles: ``module`` without parametrizations, what they were
    (``(module path, tensor name, [parametrization modules])``), and, when there were any,
    the full ``state`` to load once they are back."""

    module: nn.Module
    parametrizations: list[tuple[str, str, list[nn.Module]]]
    state: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class RowSlice:
    """The driver's training stream as a rank rebuilds it: all ``rows``, the global
    ``batch_size``, the shuffle ``seed`` and the position ``pos`` the stage starts at."""

    rows: Tensor
    batch_size: int
    seed: int
    pos: int

    def stream(self, shard: int, shards: int) -> RowStream:
        s = RowStream(self.rows, self.batch_size, shard, shards, seed=self.seed)
        s.load_state_dict({"pos": self.pos})
        return s


def pack_module(module: nn.Module) -> ShippedModule:
    """``module`` ready for ``ray.put`` (see the module docstring); ``module`` is untouched.
    The copy's parametrizations are taken off by hand: torch's ``remove_parametrizations``
    deletes the tensor's property from the parametrized class, which the copy shares with
    ``module``."""
    sites = [n for n, m in module.named_modules() if parametrize.is_parametrized(m)]
    if not sites:
        return ShippedModule(module, [])
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    shipped = copy.deepcopy(module)
    found = []
    for path in sites:
        m = shipped.get_submodule(path)
        originals = {}
        for tensor, chain in m.parametrizations.items():
            if not hasattr(chain, "original"):
                raise TypeError(f"{path}.{tensor}: a parametrization whose right_inverse "
                                f"splits the tensor cannot be shipped")
            found.append((path, tensor, list(chain)))
            originals[tensor] = chain.original
        del m._modules["parametrizations"]
        m.__class__ = type(m).__bases__[0]           # the class before parametrization
        for tensor, original in originals.items():
            if isinstance(original, nn.Parameter):
                m.register_parameter(tensor, original)
            else:
                m.register_buffer(tensor, original)
    return ShippedModule(shipped, found, state)


def unpack_module(shipped: ShippedModule) -> nn.Module:
    """The module ``pack_module`` shipped, parametrizations registered again and its state
    loaded (strict: the same names, shapes and values as the driver's)."""
    module = shipped.module
    for path, tensor, chain in shipped.parametrizations:
        m = module.get_submodule(path)
        requires_grad = getattr(m, tensor).requires_grad
        for p in chain:
            parametrize.register_parametrization(m, tensor, p)
        m.parametrizations[tensor].original.requires_grad_(requires_grad)
    if shipped.parametrizations:
        module.load_state_dict(shipped.state, strict=True)
    return module


def trainable_names(module: nn.Module) -> set[str]:
    """State-dict names of the parameters that train (each tied parameter once)."""
    return {n for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy the trained tensors into ``module``'s parameters: exactly its trainable names
    (strict), shapes checked; the frozen ones are not touched."""
    params = dict(module.named_parameters())
    want = trainable_names(module)
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise RuntimeError(f"trained tensors do not match the module's trainable parameters: "
                           f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name in want:
        p, t = params[name], state[name]
        if p.shape != t.shape:
            raise RuntimeError(f"{name}: trained tensor of shape {tuple(t.shape)} for a "
                               f"parameter of shape {tuple(p.shape)}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))


def train_stage_rank(shipped: ShippedModule, objective: Callable, data: RowSlice,
                     cfg: TrainConfig, spec: StrategySpec, seed: int) -> dict[str, Any]:
    """Train this rank's copy of the module for ``cfg.max_steps`` steps under ``spec`` on its
    data shard; every rank returns the per-step losses and gradient norms, rank 0 also the
    trained tensors (``state``) and ``frozen_changed``: frozen tensors that differ from what
    was shipped (none, unless a strategy wrote to a frozen teacher)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    module = unpack_module(shipped)
    trains = trainable_names(module)
    live = {p.data_ptr() for p in module.parameters() if p.requires_grad}
    # every tensor that must not change: frozen parameters and buffers (a state-dict alias of
    # a trained parameter, e.g. a tied output layer, is the trained one)
    before = ({k: v.detach().cpu().clone() for k, v in module.state_dict().items()
               if v.data_ptr() not in live} if rank == 0 else {})
    strategy = build_strategy(spec.resolved(world), cfg.device)
    shard, shards = strategy.data_shard(rank, world)
    trainer = Trainer(module, objective, data.stream(shard, shards), cfg, strategy=strategy,
                      seed=seed)
    result = trainer.fit()
    full = trainer.full_model_state()            # every rank: a collective under ZeRO-3
    out: dict[str, Any] = {"rank": rank, "losses": result.losses,
                           "grad_norms": result.grad_norms, "state": None,
                           "frozen_changed": None}
    if rank == 0:
        out["state"] = {k: full[k].detach().cpu().clone() for k in trains}
        out["frozen_changed"] = sorted(
            k for k, v in before.items()
            # a strategy that keeps parameters in another dtype (ZeRO's param_dtype) is
            # compared in that dtype
            if k not in full or not torch.equal(full[k].detach().cpu(), v.to(full[k].dtype)))
    return out
