"""Apply a family's tensor-parallel plan to a plain model, in place, from outside.

``type(model).tp_plan`` (models/structure.py) names which modules are split and how; this
module swaps each for its parallel layer (actors.parallel.tensor.layers), slicing *this rank's*
part out of the full weights, so a TP model starts from exactly the single-process weights:

* block entries (every block of ``block_lists``): ``"column"`` -> ``ColumnParallelLinear``,
  ``"row"`` -> ``RowParallelLinear``; an attention whose q/k/v are column layers becomes a
  ``TensorParallelAttention`` (one f for the three). A block costs two all-reduces forward
  and two backward (Shoeybi et al. 2019, fig. 3).
* model entries (GPT): ``"vocab"`` -> ``VocabParallelEmbedding``, ``"column"`` -> the output
  layer, its logits left as a vocabulary shard (tied to the local embedding shard when the
  model ties them) for ``actors.parallel.tensor.loss``. BERT, ELECTRA and T5 keep embeddings
  and heads replicated, so their own ``forward`` and loss work unchanged.
* ``sequence_parallel=True`` (GPT only; Korthikanti et al. 2022, sec. 4.2.2): activations
  between the TP regions are split along the sequence; the replicated parameters used on
  sequence shards (LayerNorms, row-parallel biases) need ``sync_sequence_parallel_grads``
  after backward.

Refusals (ConfigError) happen before anything changes: heads that do not divide by ``tp``, MoE
feed-forwards, a model without ``block_lists`` / ``tp_plan``. Formulas and the RNG scheme:
docs/tensor_parallel.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.comm import collectives as C
from bmray.actors.parallel.tensor.layers import (ColumnParallelLinear, RowParallelLinear,
                                                 SequenceParallelDropout,
                                                 TensorParallelAttention, VocabParallelEmbedding)
from bmray.actors.parallel.tensor.ops import GroupRef, group_rank, group_size
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.layers.blocks import TransformerBlock
from bmray.models.layers.moe import MoEFeedForward
from bmray.models.structure import TensorParallelPlan, find_blocks, module_at, tp_plan_of
from bmray.models.typed_config import ConfigError

__all__ = ["TensorParallelInfo", "apply_tensor_parallel", "sync_sequence_parallel_grads",
           "tensor_parallel_info"]

_FAMILIES = "tensor parallelism supports the GPT, BERT, ELECTRA and T5 families"


@dataclass
class TensorParallelInfo:
    """What ``apply_tensor_parallel`` leaves on the model (``model.tensor_parallel``) for the
    loss, the gradient sync and checkpoints."""

    group_ref: GroupRef
    tp_size: int
    tp_rank: int
    sequence_parallel: bool
    vocab_parallel: bool                       # True for GPT: logits are a vocabulary shard
    vocab_size: int = 0
    vocab_start: int = 0
    vocab_end: int = 0
    label_smoothing: float = 0.0
    sequence_parallel_params: tuple[str, ...] = ()   # grads to all-reduce over the TP group

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.group_ref.group


def _is_gpt_like(model: nn.Module) -> bool:
    """embed.tok -> blocks -> ln_f -> lm_head over the vocabulary (models.families.gpt.GPT's
    layout)."""
    embed = getattr(model, "embed", None)
    tok = getattr(embed, "tok", None)
    head = getattr(model, "lm_head", None)
    return (isinstance(tok, nn.Embedding) and isinstance(head, nn.Linear)
            and isinstance(getattr(model, "ln_f", None), nn.LayerNorm)
            and isinstance(getattr(embed, "drop", None), nn.Dropout)
            and head.out_features == tok.num_embeddings)


def _blocks(model: nn.Module) -> list[tuple[str, TransformerBlock]]:
    try:
        blocks = find_blocks(model)
    except ValueError as exc:
        raise ConfigError(f"{exc}; {_FAMILIES}") from exc
    for name, block in blocks:
        if not isinstance(block, TransformerBlock):
            raise ConfigError(f"{name}: expected models.layers.blocks.TransformerBlock, got "
                              f"{type(block).__name__}; {_FAMILIES}")
    return blocks


def _plan(model: nn.Module) -> TensorParallelPlan:
    plan = tp_plan_of(model)
    if plan is None:
        raise ConfigError(f"{type(model).__name__} declares no tp_plan "
                          f"(models.structure.TensorParallelPlan); {_FAMILIES}")
    return plan


def _check_attention(name: str, attn: MultiHeadAttention, plan: TensorParallelPlan,
                     attn_name: str, tp: int) -> None:
    if type(attn) is not MultiHeadAttention:
        raise ConfigError(f"{name}.{attn_name}: expected models.layers.attention."
                          f"MultiHeadAttention, got {type(attn).__name__}")
    want = {f"{attn_name}.{p}": "column" for p in ("q_proj", "k_proj", "v_proj")}
    want[f"{attn_name}.out_proj"] = "row"
    if any(plan.blocks.get(path) != style for path, style in want.items()):
        raise ConfigError(f"{name}.{attn_name}: the tp_plan must split q/k/v_proj by columns "
                          f"and out_proj by rows, got {dict(plan.blocks)}")
    heads = attn.q_proj.out_features // attn.d_head
    if heads % tp:
        raise ConfigError(f"{name}.{attn_name}: {heads} attention heads cannot be split "
                          f"over {tp} tensor-parallel ranks (n_heads % tp != 0)")


def _check(model: nn.Module, tp: int, sequence_parallel: bool) -> TensorParallelPlan:
    """Every reason to refuse, before anything is changed (and before any communication)."""
    if hasattr(model, "tensor_parallel"):
        raise ConfigError(f"{type(model).__name__}: tensor parallelism is already applied")
    blocks = _blocks(model)
    plan = _plan(model)
    for name, block in blocks:
        if isinstance(block.ffn, MoEFeedForward):
            raise ConfigError(f"{name}.ffn: a mixture-of-experts feed-forward is not supported "
                              f"with tensor parallelism (model.moe must be null)")
        for attn_name in ("attn", "cross_attn"):
            attn = getattr(block, attn_name)
            if attn is not None:
                _check_attention(name, attn, plan, attn_name, tp)
    gpt = plan.vocab_parallel
    if gpt and not _is_gpt_like(model):
        raise ConfigError(f"{type(model).__name__}: its tp_plan splits the vocabulary, which "
                          f"needs the GPT layout (embed.tok, embed.drop, blocks, ln_f, lm_head)")
    if sequence_parallel:
        if not gpt:
            raise ConfigError(f"{type(model).__name__}: sequence parallelism is supported for "
                              f"the GPT family only (embed, blocks, ln_f, lm_head)")
    if gpt and model.embed.tok.num_embeddings < tp:
        raise ConfigError(f"a vocabulary of {model.embed.tok.num_embeddings} cannot be split "
                          f"over {tp} ranks")
    return plan


def _parallelize_block(block: TransformerBlock, plan: TensorParallelPlan,
                       group: dist.ProcessGroup | None, sp: bool) -> list[str]:
    """Swap the block's planned layers in place; returns its parameters used on sequence
    shards."""
    rows = []
    for path, style in plan.blocks.items():
        linear = module_at(block, path)
        if linear is None:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = module_at(block, parent_path)
        if style == "row":
            new = RowParallelLinear.from_linear(linear, group, sequence_parallel=sp)
            rows.append(path)
        elif isinstance(parent, MultiHeadAttention):     # f applied once, by the attention
            new = ColumnParallelLinear.from_linear(linear, group, input_is_parallel_ready=True)
        else:
            new = ColumnParallelLinear.from_linear(linear, group, sequence_parallel=sp)
        setattr(parent, leaf, new)
    for attn in (block.attn, block.cross_attn):
        if attn is None:
            continue
        attn.__class__ = TensorParallelAttention
        attn._tp, attn.tp_sequence_parallel = GroupRef(group), sp
    if not sp:
        return []
    block.drop = SequenceParallelDropout(block.drop.p, group)
    names = [f"{ln}.{p}" for ln in ("ln_1", "ln_2") for p, _ in getattr(block, ln).named_parameters()]
    names += [f"{lin}.bias" for lin in rows if block.get_submodule(lin).bias is not None]
    return names


def _parallelize_vocab(model: nn.Module, plan: TensorParallelPlan,
                       group: dist.ProcessGroup | None, sp: bool) -> VocabParallelEmbedding:
    """The embedding split over the vocabulary; the output layer(s) over their columns, tied
    to the local embedding shard where the model ties them."""
    vocab_path = next(path for path, style in plan.model.items() if style == "vocab")
    emb = model.get_submodule(vocab_path)
    parent_path, _, leaf = vocab_path.rpartition(".")
    local = VocabParallelEmbedding.from_embedding(emb, group)
    setattr(model.get_submodule(parent_path), leaf, local)
    for path, style in plan.model.items():
        if style != "column":
            continue
        linear = model.get_submodule(path)
        head = ColumnParallelLinear.from_linear(linear, group, gather_output=False,
                                                sequence_parallel=sp)
        if linear.weight is emb.weight:
            head.weight = local.weight
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, head)
    return local


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                          sequence_parallel: bool = False) -> nn.Module:
    """Make ``model`` tensor-parallel over ``group`` in place (its ``tp_plan``; see the module
    docstring); returns it, with ``model.tensor_parallel`` (TensorParallelInfo).

    Every rank of ``group`` must call it on the same full model (same weights): each keeps its
    own slices. Refusals (ConfigError) happen before anything changes.
    """
    tp, rank = group_size(group), group_rank(group)
    plan = _check(model, tp, sequence_parallel)
    gpt = plan.vocab_parallel
    sp_params: list[str] = []
    for name, block in _blocks(model):
        sp_params += [f"{name}.{p}"
                      for p in _parallelize_block(block, plan, group, sequence_parallel)]
    info = TensorParallelInfo(GroupRef(group), tp, rank, sequence_parallel, gpt,
                              label_smoothing=float(getattr(getattr(model, "config", None),
                                                            "label_smoothing", 0.0)))
    if gpt:
        local = _parallelize_vocab(model, plan, group, sequence_parallel)
        info.vocab_size = local.num_embeddings
        info.vocab_start, info.vocab_end = local.vocab_start, local.vocab_end
        if sequence_parallel:
            model.embed.drop = SequenceParallelDropout(model.embed.drop.p, group, scatter_input=True)
            sp_params += [f"ln_f.{p}" for p, _ in model.ln_f.named_parameters()]
    for name in sp_params:
        model.get_parameter(name).sequence_parallel = True
    info.sequence_parallel_params = tuple(sp_params)
    model.tensor_parallel = info
    return model


def tensor_parallel_info(model_or_info: nn.Module | TensorParallelInfo) -> TensorParallelInfo:
    """The TensorParallelInfo of a TP model (or of a pipeline stage that carries it)."""
    if isinstance(model_or_info, TensorParallelInfo):
        return model_or_info
    info = getattr(model_or_info, "tensor_parallel", None)
    if not isinstance(info, TensorParallelInfo):
        raise ConfigError(f"{type(model_or_info).__name__}: apply_tensor_parallel has not been "
                          f"applied to this model")
    return info


def sync_sequence_parallel_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) over the TP group the gradients of the replicated parameters that run
    on sequence shards (LayerNorms, row-parallel biases; ``model.tensor_parallel.
    sequence_parallel_params``), in one flat collective. A no-op without sequence parallelism."""
    info = tensor_parallel_info(model)
    if not info.sequence_parallel or group_size(group) == 1:
        return
    grads = [g for g in (model.get_parameter(n).grad for n in info.sequence_parallel_params)
             if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    C.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
