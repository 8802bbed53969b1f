"""Megatron-LM's parallel layers (Shoeybi et al. 2019, sec. 3; docs/tensor_parallel.md).

* ``ColumnParallelLinear`` (``Y = X A``, ``A`` split by output columns, eq. 3): input through f
  (or the sequence all-gather), output left split for the row layer after it. ``weight``
  [out/tp, in] and ``bias`` [out/tp] split along dim 0.
* ``RowParallelLinear`` (``A`` split by input rows, eq. 4): partial products summed by g (or
  reduce-scattered along the sequence); the replicated bias added once, after the reduction.
  ``weight`` [out, in/tp] split along dim 1.
* ``VocabParallelEmbedding``: rows ``[vocab_start, vocab_end)``; ids outside are looked up as
  row 0 and zeroed, then g sums the ranks' outputs.
* ``TensorParallelAttention``: one f for q/k/v (column layers with
  ``input_is_parallel_ready=True``); heads are never split, so ``n_heads % tp == 0``.
* ``SequenceParallelDropout`` and ``tensor_parallel_rng``: a random stream per TP rank for what
  is split (local heads, sequence shards), seeded from one draw of the default generator, so
  activation checkpointing's recomputation draws the same masks.

Each layer's class declares ``tp_dims`` (parameter -> split dim), read by
``actors.parallel.tensor.state``. The column and row layers are ``models.delta.lora.
ShardedLinear``s (``weight_shard``, ``low_rank``), so a LoRA beside one is split to match.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.actors.parallel.tensor.ops import (CopyToTensorParallel, GatherFromSequenceParallel,
                                              GatherFromTensorParallel, GroupRef,
                                              ReduceFromTensorParallel,
                                              ReduceScatterToSequenceParallel,
                                              ScatterToSequenceParallel, group_rank, group_size,
                                              rank_chunk, split_sizes)
from bmray.models.delta.lora import WeightShard
from bmray.models.layers.attention import KVCache, MultiHeadAttention
from bmray.models.typed_config import ConfigError

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SequenceParallelDropout",
           "TensorParallelAttention", "TensorParallelModule", "VocabParallelEmbedding",
           "tensor_parallel_rng"]


def _param(full: Tensor, dim: int | None, group: dist.ProcessGroup | None,
           requires_grad: bool) -> nn.Parameter:
    """This rank's chunk of ``full`` (all of it for ``dim=None``) as a new Parameter."""
    data = full.detach() if dim is None else rank_chunk(full.detach(), dim, group)
    p = nn.Parameter(data.clone(), requires_grad=requires_grad)
    if dim is not None:
        p.tp_dim = dim
    return p


class TensorParallelModule(nn.Module):
    """What a sharded layer declares: ``tp_dims`` (parameter name -> split dim). Read by
    ``tensor_parallel_dims`` (a deep copy of a Parameter drops python attributes like
    ``tp_dim``; the module's class keeps them)."""

    tp_dims: dict[str, int] = {}

    def __init__(self, group: dist.ProcessGroup | None):
        super().__init__()
        self._tp = GroupRef(group)
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._tp.group


class ColumnParallelLinear(TensorParallelModule):
    """``y = x A_r^T + b_r`` with this rank's output features (Megatron eq. 3).

    Input: replicated, through f (``sequence_parallel=False``) or a sequence shard, all-gathered
    (``sequence_parallel=True``); ``input_is_parallel_ready=True`` skips both because the caller
    applied the operator once for several layers reading the same input (q/k/v).
    Output: this rank's features, or all of them with ``gather_output=True``.
    """

    tp_dims = {"weight": 0, "bias": 0}

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, out_features: int,
                 group: dist.ProcessGroup | None, gather_output: bool = False,
                 sequence_parallel: bool = False, input_is_parallel_ready: bool = False):
        super().__init__(group)
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.size(1), out_features
        self.out_sizes = split_sizes(out_features, self.tp_size)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_is_parallel_ready = input_is_parallel_ready

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: dist.ProcessGroup | None,
                    gather_output: bool = False, sequence_parallel: bool = False,
                    input_is_parallel_ready: bool = False) -> "ColumnParallelLinear":
        """This rank's rows of ``linear.weight`` [out, in] (and of its bias)."""
        tp = group_size(group)
        if linear.out_features < tp:
            raise ConfigError(f"ColumnParallelLinear: {linear.out_features} output features "
                              f"cannot be split over {tp} ranks")
        w = _param(linear.weight, 0, group, linear.weight.requires_grad)
        b = None if linear.bias is None else _param(linear.bias, 0, group, linear.bias.requires_grad)
        return cls(w, b, linear.out_features, group, gather_output, sequence_parallel,
                   input_is_parallel_ready)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel_ready:
            op = GatherFromSequenceParallel if self.sequence_parallel else CopyToTensorParallel
            x = op.apply(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = GatherFromTensorParallel.apply(y, self.group, self.out_sizes)
        return y

    def weight_shard(self) -> WeightShard:
        """This rank's rows of W (LoRA: B is split by rows, A stays whole)."""
        if self.gather_output or (self.sequence_parallel and not self.input_is_parallel_ready):
            raise ConfigError(f"LoRA on a ColumnParallelLinear needs a replicated input and a "
                              f"split output (gather_output={self.gather_output}, "
                              f"sequence_parallel={self.sequence_parallel})")
        return WeightShard(0, sum(self.out_sizes[:self.tp_rank]), self.out_sizes[self.tp_rank])

    def low_rank(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        """``dropout(x) Aᵀ`` [.., r] with A's gradient summed over the group (each rank's B
        shard back-propagates only its output features into it). Dropout on the replicated x
        draws from the outer stream: the same mask on every rank. Input already through f
        (``input_is_parallel_ready``: that f sums x's partial gradient): f on A, an [r, in]
        all-reduce backward. Else f on the code: one [.., r] all-reduce backward, which makes
        the gradients of x and A whole at once."""
        x = dropout(x)
        if self.input_is_parallel_ready:
            return x @ CopyToTensorParallel.apply(A, self.group).t()
        return CopyToTensorParallel.apply(x @ A.t(), self.group)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.size(0)}, tp {self.tp_rank}/{self.tp_size}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(TensorParallelModule):
    """``y = sum_r x_r A_r^T + b`` (Megatron eq. 4): the input is already split by features
    (a column layer's output); partial products are all-reduced (g) or, with
    ``sequence_parallel``, reduce-scattered along the sequence; the replicated bias is added
    once after the reduction."""

    tp_dims = {"weight": 1}

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, in_features: int,
                 group: dist.ProcessGroup | None, sequence_parallel: bool = False):
        super().__init__(group)
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = in_features, weight.size(0)
        self.sequence_parallel = sequence_parallel
        if bias is not None and sequence_parallel:
            bias.sequence_parallel = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: dist.ProcessGroup | None,
                    sequence_parallel: bool = False) -> "RowParallelLinear":
        """This rank's columns of ``linear.weight`` [out, in]; the bias whole."""
        tp = group_size(group)
        if linear.in_features < tp:
            raise ConfigError(f"RowParallelLinear: {linear.in_features} input features cannot "
                              f"be split over {tp} ranks")
        w = _param(linear.weight, 1, group, linear.weight.requires_grad)
        b = None if linear.bias is None else _param(linear.bias, None, group,
                                                    linear.bias.requires_grad)
        return cls(w, b, linear.in_features, group, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        op = ReduceScatterToSequenceParallel if self.sequence_parallel else ReduceFromTensorParallel
        y = op.apply(y, self.group)
        return y if self.bias is None else y + self.bias

    def weight_shard(self) -> WeightShard:
        """This rank's columns of W (LoRA: A is split by columns, B stays whole)."""
        if self.sequence_parallel:
            raise ConfigError("LoRA on a RowParallelLinear under sequence parallelism is not "
                              "supported (its output, and so B's gradient, is a sequence shard)")
        sizes = split_sizes(self.in_features, self.tp_size)
        return WeightShard(1, sum(sizes[:self.tp_rank]), sizes[self.tp_rank])

    def low_rank(self, x: Tensor, A: Tensor, dropout: nn.Module) -> Tensor:
        """``sum_r dropout(x_r) A_rᵀ``: the partial codes all-reduced by g *before* B (an
        [.., r] tensor, not the [.., out] one). Then B's input and gradient are whole on every
        rank, so B needs no gradient sync; summing after B, inside the layer's own all-reduce,
        would save that collective but leave B's gradient a partial sum. Dropout on this
        rank's features draws from ``tensor_parallel_rng`` (its own mask per rank)."""
        active = dropout.training and getattr(dropout, "p", 0.0) > 0
        with tensor_parallel_rng(self.group, x.device) if active else contextlib.nullcontext():
            x = dropout(x)
        return ReduceFromTensorParallel.apply(x @ A.t(), self.group)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.size(1)}, tp "
                f"{self.tp_rank}/{self.tp_size}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(TensorParallelModule):
    """Rows ``[vocab_start, vocab_end)`` of the embedding table (``tensor_split`` chunks).
    Ids outside are looked up as local row 0 and zeroed; g then sums the ranks' outputs, in
    which exactly one rank holds each token's row."""

    tp_dims = {"weight": 0}

    def __init__(self, weight: nn.Parameter, num_embeddings: int, group: dist.ProcessGroup | None):
        super().__init__(group)
        self.weight = weight
        self.num_embeddings, self.embedding_dim = num_embeddings, weight.size(1)
        sizes = split_sizes(num_embeddings, self.tp_size)
        self.vocab_start = sum(sizes[:self.tp_rank])
        self.vocab_end = self.vocab_start + sizes[self.tp_rank]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group: dist.ProcessGroup | None
                       ) -> "VocabParallelEmbedding":
        tp = group_size(group)
        if emb.num_embeddings < tp:
            raise ConfigError(f"VocabParallelEmbedding: a vocabulary of {emb.num_embeddings} "
                              f"cannot be split over {tp} ranks")
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
            raise ConfigError("VocabParallelEmbedding: padding_idx, max_norm and sparse "
                              "embeddings are not supported")
        return cls(_param(emb.weight, 0, group, emb.weight.requires_grad), emb.num_embeddings, group)

    def forward(self, ids: Tensor) -> Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return ReduceFromTensorParallel.apply(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
                f"{self.vocab_end}) (tp {self.tp_rank}/{self.tp_size})")


@contextlib.contextmanager
def tensor_parallel_rng(group: dist.ProcessGroup | None, device: torch.device | None = None
                        ) -> Iterator[None]:
    """Run the body with a random stream of its own per TP rank (for dropout on split heads or
    sequence shards); restores the outer state afterwards.

    The seed is one draw from the default CPU generator (the same on every TP rank of a
    replica, so their outer streams stay in step) mixed with the TP rank. It is therefore a
    function of the default generator's state — which activation checkpointing saves and
    restores, so a recomputation draws the same masks (docs/tensor_parallel.md).
    """
    base = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    seed = (base + 0x9E3779B97F4A7C15 * (group_rank(group) + 1)) % (2 ** 63)
    cuda = device is not None and device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class TensorParallelAttention(MultiHeadAttention):
    """``MultiHeadAttention`` whose q/k/v are column layers fed by one f (or one sequence
    all-gather) on its input and its context, and whose attention dropout (on this rank's
    heads) draws from ``tensor_parallel_rng``. Installed by swapping the instance's class, so
    parameter names do not change (as activation checkpointing swaps block classes)."""

    _tp: GroupRef
    tp_sequence_parallel: bool

    def forward(self, x: Tensor, context: Tensor | None = None,
                key_padding_mask: Tensor | None = None, past_kv: KVCache | None = None,
                use_cache: bool = False) -> tuple[Tensor, KVCache | None]:
        group = self._tp.group
        op = GatherFromSequenceParallel if self.tp_sequence_parallel else CopyToTensorParallel
        x = op.apply(x, group)
        if context is not None:
            context = CopyToTensorParallel.apply(context, group)
        rng = (tensor_parallel_rng(group, x.device) if self.training and self.dropout > 0
               else contextlib.nullcontext())
        with rng:
            return super().forward(x, context=context, key_padding_mask=key_padding_mask,
                                   past_kv=past_kv, use_cache=use_cache)


class SequenceParallelDropout(nn.Module):
    """Dropout on a sequence shard, under ``tensor_parallel_rng`` (each rank drops its own
    tokens). With ``scatter_input`` it first takes this rank's chunk of a replicated input
    (the entry to the sequence-parallel region, before ``embed.drop``)."""

    def __init__(self, p: float, group: dist.ProcessGroup | None, scatter_input: bool = False):
        super().__init__()
        self.p, self.scatter_input = p, scatter_input
        self._tp = GroupRef(group)

    def forward(self, x: Tensor) -> Tensor:
        if self.scatter_input:
            x = ScatterToSequenceParallel.apply(x, self._tp.group)
        if not self.training or self.p == 0:
            return x
        with tensor_parallel_rng(self._tp.group, x.device):
            return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, scatter_input={self.scatter_input}"
