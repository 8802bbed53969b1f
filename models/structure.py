"""Where a model's parts are, as data the parallel strategies and the planner read.

* ``block_lists`` (a class attribute of every family): dotted paths of the ``nn.ModuleList``s
  holding the per-layer blocks, in execution order. :func:`find_blocks` resolves them; pipeline
  stages, ZeRO-3 units, activation checkpointing and the cost model all number blocks this way.
* ``tp_plan`` (a class attribute, a :class:`TensorParallelPlan`): which ``nn.Linear`` is
  column- or row-parallel and which ``nn.Embedding`` is vocabulary-parallel (Megatron-LM's
  split, docs/tensor_parallel.md). Tensor parallelism swaps exactly these modules and the cost
  model counts exactly their parameters as split (:func:`tensor_parallel_parameters`).

Plain PyTorch: no Ray, nothing from the strategies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Literal, Mapping, Sequence

from torch import nn

__all__ = ["BLOCK_STYLES", "MODEL_STYLES", "SPLIT_PARAMETERS", "TensorParallelPlan", "TPStyle",
           "find_blocks", "module_at", "planned_modules", "tensor_parallel_parameters",
           "tp_plan_of"]

TPStyle = Literal["column", "row", "vocab"]
BLOCK_STYLES = ("column", "row")            # inside a block: Megatron's MLP / attention split
MODEL_STYLES = ("vocab", "column")          # outside: input embedding, output layer
# the parameters of a module of each style that tensor parallelism splits (a row-parallel
# layer's bias is added once after the reduction, so it stays whole)
SPLIT_PARAMETERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"column": ("weight", "bias"), "row": ("weight",), "vocab": ("weight",)})


def _frozen(entries: Mapping[str, str], allowed: tuple[str, ...], where: str
            ) -> Mapping[str, str]:
    out = dict(entries)
    for path, style in out.items():
        if not isinstance(path, str) or not path or path.startswith(".") or path.endswith("."):
            raise ValueError(f"tp_plan.{where}: {path!r} is not a dotted module path")
        if style not in allowed:
            raise ValueError(f"tp_plan.{where}[{path!r}]: style must be one of {allowed}, "
                             f"got {style!r}")
    return MappingProxyType(out)


@dataclass(frozen=True)
class TensorParallelPlan:
    """A family's tensor-parallel layout.

    ``blocks``: module path inside every block of ``block_lists`` -> ``"column"`` | ``"row"``
    (a path whose module a block lacks, e.g. a T5 encoder block's ``cross_attn``, is skipped
    there). ``model``: module path from the model's root -> ``"vocab"`` (the input embedding)
    | ``"column"`` (the output layer, its logits a vocabulary shard); empty when embeddings and
    heads stay replicated.
    """

    blocks: Mapping[str, str]
    model: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _frozen(self.blocks, BLOCK_STYLES, "blocks"))
        object.__setattr__(self, "model", _frozen(self.model, MODEL_STYLES, "model"))
        vocab = [p for p, s in self.model.items() if s == "vocab"]
        if self.model and len(vocab) != 1:
            raise ValueError(f"tp_plan.model: a vocabulary-parallel plan names exactly one "
                             f"vocabulary-parallel embedding, got {vocab}")

    @property
    def vocab_parallel(self) -> bool:
        """Whether the embedding and output layer are split over the vocabulary."""
        return bool(self.model)


def find_blocks(model: nn.Module, block_lists: Sequence[str] | None = None
                ) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every block, numbered over the block lists in order.

    ``block_lists``: dotted paths of the ModuleLists; ``None`` takes ``model.block_lists`` (the
    family's class attribute, or an instance's own: a wrapper such as a delta-tuned model
    prefixes its base's). A model without one (a ``transformers`` model) passes them. A
    ValueError names what is missing."""
    paths = block_lists if block_lists is not None else getattr(model, "block_lists", None)
    if not paths:
        raise ValueError(f"{type(model).__name__} has no `block_lists` attribute; pass "
                         f"block_lists=[...] naming its nn.ModuleList(s) of transformer blocks")
    out = []
    for path in paths:
        try:
            container = model.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"{path!r} is not a submodule of {type(model).__name__}") from exc
        out.extend((f"{path}.{i}", block) for i, block in enumerate(container))
    return out


def tp_plan_of(model: nn.Module) -> TensorParallelPlan | None:
    """``type(model).tp_plan``, or None for a model that declares none."""
    plan = getattr(type(model), "tp_plan", None)
    if plan is not None and not isinstance(plan, TensorParallelPlan):
        raise TypeError(f"{type(model).__name__}.tp_plan: expected a TensorParallelPlan, got "
                        f"{type(plan).__name__}")
    return plan


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` under ``root`` (``""``: root itself); None where a step is
    absent or None (a T5 encoder block's ``cross_attn``, an MoE block's ``ffn.up``)."""
    mod: nn.Module | None = root
    for part in path.split(".") if path else ():
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def planned_modules(model: nn.Module, plan: TensorParallelPlan,
                    block_lists: Sequence[str] | None = None
                    ) -> Iterator[tuple[str, str, nn.Module]]:
    """(qualified name, style, module) of every module ``plan`` splits that ``model`` has:
    the block entries in every block, then (for a vocabulary-parallel plan) the model's."""
    for block_name, block in find_blocks(model, block_lists):
        for path, style in plan.blocks.items():
            mod = module_at(block, path)
            if mod is not None:
                yield f"{block_name}.{path}", style, mod
    for path, style in plan.model.items():
        mod = module_at(model, path)
        if mod is not None:
            yield path, style, mod


def tensor_parallel_parameters(model: nn.Module, block_lists: Sequence[str] | None = None
                               ) -> set[str]:
    """Qualified names of the parameters tensor parallelism splits (``SPLIT_PARAMETERS`` of
    each module of the model's ``tp_plan``); empty for a model without a plan."""
    plan = tp_plan_of(model)
    if plan is None:
        return set()
    names = set()
    for name, style, mod in planned_modules(model, plan, block_lists):
        for p_name in SPLIT_PARAMETERS[style]:
            if getattr(mod, p_name, None) is not None:
                names.add(f"{name}.{p_name}")
    return names
