"""Activation checkpointing (Chen et al. 2016), one transformer block at a time, applied to a
plain model from outside.

A checkpointed block keeps only its input during the forward pass and recomputes its
activations when backward reaches it: activation memory falls from L blocks' activations to L
block inputs plus one block's activations, for one extra forward per block.

Each selected block's class is swapped for a ``Checkpointed<Block>`` subclass whose
``forward`` runs the original under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
(as FSDP2's ``fully_shard`` swaps classes), so parameter names and state-dict keys do not
change. Gradients are bit-identical (same autograd graph; the RNG state is stashed and
restored, so dropout draws the same masks). Not applied outside training, under no_grad and
with ``use_cache=True``.

Which blocks: those of ``model.block_lists`` (``models.structure.find_blocks``),
numbered over the lists in order (a T5 with 2 + 2 layers: ``blocks=[0, 2]`` is the first
encoder and the first decoder block); a model without ``block_lists`` passes them.

Cost, correctness and the paper: docs/activation_checkpointing.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bmray.models.structure import find_blocks
from bmray.models.typed_config import ConfigError

__all__ = ["ActivationCheckpointConfig", "CheckpointedBlock", "apply_activation_checkpointing",
           "checkpointed_blocks", "remove_activation_checkpointing"]

CONFIG_KEY = "train.activation_checkpointing"


@dataclass
class ActivationCheckpointConfig:
    """``train.activation_checkpointing``: on or off, and for which blocks.

    ``blocks``: global block indices over the model's ``block_lists`` (see the module
    docstring); ``None`` means every block.
    """

    enabled: bool = False
    blocks: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{CONFIG_KEY}.enabled: expected true or false, got {self.enabled!r}")
        if self.blocks is not None:
            _check_indices(f"{CONFIG_KEY}.blocks", self.blocks)


def _check_indices(path: str, blocks: Any) -> None:
    if not isinstance(blocks, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of block indices or null (all), got {blocks!r}")
    for i, b in enumerate(blocks):
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ConfigError(f"{path}[{i}]: expected a block index >= 0, got {b!r}")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{path}: duplicate block indices in {list(blocks)}")


class CheckpointedBlock:
    """Mixin put in front of a block's own class: ``forward`` recomputes in backward.

    ``super().forward`` is the block's original forward; the recomputation calls it again
    (not ``__call__``), so the block's own forward hooks fire once per step while those of
    its submodules fire once more in backward.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()) or kwargs.get("use_cache", False):
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)

    def __reduce_ex__(self, protocol: int) -> Any:
        # The swapped class is made at run time and cannot be pickled by name: pickle (Ray,
        # torch.save of a whole module) and deepcopy rebuild it from the plain class instead.
        return (_rebuild_checkpointed, (_plain_class(type(self)),), self.__dict__)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """``Checkpointed<cls>``: one per block class, made once (as fully_shard's FSDP<cls>)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedBlock, cls),
                             {"_ac_plain_class": cls})
    return _CLASSES[cls]


def _plain_class(cls: type) -> type:
    return cls._ac_plain_class


def _rebuild_checkpointed(plain: type) -> nn.Module:
    obj = plain.__new__(plain)
    obj.__class__ = _checkpointed_class(plain)
    return obj


def apply_activation_checkpointing(model: nn.Module, blocks: str | Sequence[int] | None = "all",
                                   block_lists: Sequence[str] | None = None) -> list[str]:
    """Checkpoint the selected blocks of ``model`` in place; return their qualified names.

    ``blocks``: ``"all"`` or ``None`` for every block, else a list of global block indices
    (``[]`` wraps nothing). Applying twice is harmless (already wrapped blocks stay wrapped).
    """
    every = find_blocks(model, block_lists)
    if blocks is None or blocks == "all":
        chosen = range(len(every))
    else:
        _check_indices(f"{CONFIG_KEY}.blocks", blocks)
        bad = [b for b in blocks if b >= len(every)]
        if bad:
            raise ConfigError(f"{CONFIG_KEY}.blocks: {bad} out of range; "
                              f"{type(model).__name__} has {len(every)} blocks (0..{len(every) - 1})")
        chosen = sorted(blocks)
    names = []
    for i in chosen:
        name, block = every[i]
        if not isinstance(block, CheckpointedBlock):
            block.__class__ = _checkpointed_class(type(block))
        names.append(name)
    return names


def remove_activation_checkpointing(model: nn.Module) -> list[str]:
    """Undo :func:`apply_activation_checkpointing` everywhere in ``model``; return the names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, CheckpointedBlock):
            module.__class__ = _plain_class(type(module))
            names.append(name)
    return names


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that run checkpointed."""
    return [name for name, m in model.named_modules() if isinstance(m, CheckpointedBlock)]
