"""Megatron-style tensor parallelism, applied to a plain model from outside.

Tensor parallelism (TP) splits every weight matrix of a transformer block across the ``tp``
ranks of a process group, so each rank stores and multiplies ``1/tp`` of it (Shoeybi et al.
2019, "Megatron-LM", sec. 3). The model file does not change: ``apply_tensor_parallel`` swaps
the ``nn.Linear`` / ``nn.Embedding`` modules of a model built from ``models.blocks`` for the
parallel ones below, slicing *this rank's* part out of the existing full weights, so a TP model
starts from exactly the single-process model's weights.

The four operators (Megatron fig. 3; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", fig. 5 and sec. 4.2.2), autograd Functions named
after the papers' operators, each the adjoint (conjugate) of its partner::

    CopyToTensorParallel          "f"       forward identity          backward all-reduce
    ReduceFromTensorParallel      "g"       forward all-reduce        backward identity
    GatherFromSequenceParallel    "g-bar"   forward all-gather (seq)  backward reduce-scatter
    ReduceScatterToSequenceParallel "g-bar*" forward reduce-scatter   backward all-gather (seq)
    ScatterToSequenceParallel               forward split (seq)       backward all-gather (seq)
    GatherFromTensorParallel                forward all-gather (last) backward split (last)

The layers:

* ``ColumnParallelLinear`` (``Y = X A`` with ``A = [A_1 .. A_tp]`` split by output columns,
  Megatron eq. 3): input through f (or, with sequence parallelism, the sequence all-gather),
  output stays split (``gather_output=False``) for the row-parallel layer that follows.
  ``weight`` [out/tp, in] and ``bias`` [out/tp] carry ``tp_dim = 0``.
* ``RowParallelLinear`` (``A`` split by input rows, Megatron eq. 4): input already split, the
  partial products are summed by g (or reduce-scattered along the sequence), and the
  replicated bias is added once, *after* the reduction (adding it per rank would count it
  ``tp`` times). ``weight`` [out, in/tp] carries ``tp_dim = 1``; ``bias`` has none.
* ``VocabParallelEmbedding`` (Megatron sec. 3, "input embedding"): rows ``[vocab_start,
  vocab_end)`` of the table; ids outside are looked up as row 0 and zeroed, then g sums the
  ranks' outputs (exactly one rank contributes a non-zero row per token).
* ``vocab_parallel_cross_entropy`` (Megatron sec. 3, "output embedding"): the loss from the
  local vocabulary shard of the logits, all-reducing only per-token scalars ([N] max, then one
  [3N+1] sum of exp-sum, target logit and logit-sum), never the [N, V] logits. Backward is
  local: ``softmax - (1-eps) onehot - eps/V``.

Where they go in a ``TransformerBlock`` (Megatron fig. 3)::

    attn:  x -f-> q_proj, k_proj, v_proj (column, by heads) -> attention on local heads
             -> out_proj (row) -g->
    ffn:   x -f-> up (column) -> GELU -> down (row) -g->

One f for the three projections of an attention (``TensorParallelAttention`` applies it to the
attention's input, and q/k/v are column layers with ``input_is_parallel_ready=True``), so a block
costs two all-reduces forward and two backward, as in the paper. ``MultiHeadAttention`` reads its
head count from ``q_proj``'s output width at run time, so a column-sharded ``q_proj`` simply has
``n_heads/tp`` heads; heads are never split, hence ``n_heads % tp == 0`` (ConfigError otherwise).
FFN widths and the vocabulary may split unevenly (``torch.tensor_split`` semantics: the first
``n % tp`` ranks get one more row).

Families: GPT gets everything — blocks, ``embed.tok`` -> ``VocabParallelEmbedding``,
``lm_head`` -> column-parallel without gather (tied to the local embedding shard when the model
ties them: the same ``Parameter``), and the loss from the local logits via
``TensorParallelLM`` / ``tensor_parallel_loss``. BERT, ELECTRA and T5 get their
``TransformerBlock``s parallelised (T5's cross-attention included: the encoder output goes
through f) while embeddings and heads stay replicated, so their own ``forward`` and loss work
unchanged; a block whose heads do not divide (ELECTRA's 1-head generator at tp=2) is a
ConfigError naming it. MoE feed-forwards are refused (shard experts with expert parallelism).

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2), ``sequence_parallel=True``, GPT
only: between the TP regions the activations ([B, T, D], sequence dim 1) are split along the
sequence instead of replicated, so LayerNorm and dropout run on ``T/tp`` tokens and their
activations take ``1/tp`` of the memory. f before a column layer becomes the sequence all-gather
(backward reduce-scatter), g after a row layer becomes a reduce-scatter (backward all-gather):
the same bytes on the wire as the all-reduce they replace. The embedding output is split just
before ``embed.drop``; ``lm_head`` all-gathers ``ln_f``'s output. ``T % tp == 0`` is required
(a ValueError says so), so SP is for training/scoring, not token-by-token generation.

Gradients with SP — which must be all-reduced over the TP group: every replicated parameter
used on a sequence shard sees only its shard's tokens, so its gradient is a partial sum. That is
the LayerNorms inside the blocks (``ln_1``, ``ln_2``), ``ln_f``, and the row-parallel biases
(``attn.out_proj.bias``, ``ffn.down.bias``: added after the reduce-scatter). Call
``sync_sequence_parallel_grads(model, group)`` after backward (before clipping / the optimizer
and independent of the data-parallel reduction); the names are in
``model.tensor_parallel.sequence_parallel_params`` (and those parameters carry
``sequence_parallel = True``). Without SP no TP gradient sync is needed: every replicated
parameter lives where activations and their gradients are replicated (f's all-reduce makes
the input gradients whole), so all TP ranks compute identical gradients for it.

Dropout and RNG: ranks of a TP group must draw *identical* masks for replicated activations
(embedding and residual dropout without SP; otherwise the replicas of the residual stream drift
apart) and *different* masks for what is split (attention dropout on local heads; every dropout
under SP, which acts on different tokens). The first comes from seeding the default generator
identically on the TP ranks of a replica (the training loop's seed depends on the data-parallel
rank only) and running the same random ops on all of them. The second from
``tensor_parallel_rng(group)``: it draws one seed from the *default* CPU generator (identical on
the TP ranks, so their streams stay in step), mixes in the TP rank, and runs the block's dropout
under that seed inside ``torch.random.fork_rng``, restoring the outer state afterwards. Unlike
Megatron's persistent CUDA-RNG tracker there is no extra state: the fork seed is a function of
the default generator, which activation checkpointing already stashes and restores, so a
recomputed block draws the same masks, and a resumed run needs no extra RNG in its checkpoint.
The equality tests run with dropout 0 (masks cannot match a single process's anyway).

Checkpoints: the state-dict keys of a TP model are the plain model's; a sharded entry holds
this rank's ``tensor_split`` chunk along ``tensor_parallel_dims(model)[key]``.
``gather_tensor_parallel_state`` concatenates the chunks (uneven ones too) into full tensors,
``shard_tensor_parallel_state`` cuts a full state for this rank (for ``load_state_dict``).

A group of one rank (or ``group=None`` without an initialised torch.distributed) is the
single-process path: every collective is skipped.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.actors.comm import collectives as C
from bmray.models.layers.attention import KVCache, MultiHeadAttention
from bmray.models.layers.blocks import TransformerBlock
from bmray.models.layers.losses import IGNORE_INDEX, metrics_enabled
from bmray.models.layers.moe import MoEFeedForward
from bmray.models.outputs import ModelOutput
from bmray.models.typed_config import ConfigError

__all__ = [
    "ColumnParallelLinear", "CopyToTensorParallel", "GatherFromSequenceParallel",
    "GatherFromTensorParallel", "ReduceFromTensorParallel", "ReduceScatterToSequenceParallel",
    "RowParallelLinear", "ScatterToSequenceParallel", "SequenceParallelDropout",
    "TensorParallelAttention", "TensorParallelInfo", "TensorParallelLM", "VocabParallelEmbedding",
    "apply_tensor_parallel", "gather_tensor_parallel_state", "shard_tensor_parallel_state",
    "split_sizes", "sync_sequence_parallel_grads", "tensor_parallel_dims", "tensor_parallel_loss",
    "tensor_parallel_rng", "vocab_parallel_accuracy", "vocab_parallel_cross_entropy",
]

SEQ_DIM = 1      # our activations are [B, T, D] (Megatron's are [T, B, D], sequence dim 0)


# ------------------------------------------------------------------------------- groups
def _size(group: dist.ProcessGroup | None) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class _GroupRef:
    """Holds a ProcessGroup on a module. A ProcessGroup cannot be pickled or deep-copied; a
    deep copy of a TP model (same process) shares the group, which is what it means."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __deepcopy__(self, memo: dict) -> "_GroupRef":
        return self

    def __reduce__(self):
        raise TypeError("a tensor-parallel module holds a torch.distributed process group and "
                        "cannot be pickled; save its state_dict instead")


def split_sizes(n: int, parts: int) -> list[int]:
    """Chunk sizes of ``torch.tensor_split(range(n), parts)``: the first ``n % parts`` get one more."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def _chunk(t: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's ``tensor_split`` chunk of ``t`` along ``dim`` (a view)."""
    return torch.tensor_split(t, _size(group), dim=dim)[_rank(group)]


def _all_gather_along(x: Tensor, dim: int, sizes: list[int],
                      group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; rank r's chunk has ``sizes[r]`` there
    (uneven allowed: chunks are zero-padded to the largest on the wire, then trimmed)."""
    world = len(sizes)
    if world == 1:
        return x
    width = max(sizes)
    x = x.contiguous()
    if x.size(dim) != width:
        pad = list(x.shape)
        pad[dim] = width - x.size(dim)
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def _check_seq(x: Tensor, world: int, what: str) -> None:
    if x.size(SEQ_DIM) % world:
        raise ValueError(f"{what}: sequence parallelism splits the sequence (dim {SEQ_DIM}) "
                         f"evenly over {world} ranks, but its length {x.size(SEQ_DIM)} is not "
                         f"divisible by {world}")


def _seq_all_gather(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Equal sequence chunks of all ranks, concatenated along SEQ_DIM."""
    world = _size(group)
    if world == 1:
        return x
    full = C.all_gather(x.movedim(SEQ_DIM, 0).contiguous(), numel=x.size(SEQ_DIM) * world,
                        group=group)
    return full.movedim(0, SEQ_DIM)


def _seq_reduce_scatter(x: Tensor, group: dist.ProcessGroup | None, what: str) -> Tensor:
    """Sum over ranks, keep this rank's equal chunk along SEQ_DIM."""
    world = _size(group)
    if world == 1:
        return x
    _check_seq(x, world, what)
    return C.reduce_scatter(x.movedim(SEQ_DIM, 0).contiguous(), group=group).movedim(0, SEQ_DIM)


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum over ranks into a new tensor (the input may be saved for someone's backward)."""
    if _size(group) == 1:
        return x
    return C.all_reduce(x.clone(memory_format=torch.contiguous_format), group=group)


# ---------------------------------------------------------------------------- operators
class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce backward. Put before a column-parallel layer:
    each rank's partial input gradient (from its columns) is summed into the full one."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward. After a row-parallel layer (sums
    the partial products) and the vocab-parallel embedding; f's conjugate."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class GatherFromSequenceParallel(torch.autograd.Function):
    """Korthikanti et al.'s g-bar: all-gather the sequence shards forward (the input a column
    layer needs whole), reduce-scatter backward (sum the ranks' partial input gradients and keep
    this rank's tokens). Replaces f under sequence parallelism."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return _seq_all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_reduce_scatter(grad, ctx.group, "GatherFromSequenceParallel backward"), None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """The conjugate of the above: reduce-scatter along the sequence forward (sum a row layer's
    partial outputs, keep this rank's tokens), all-gather backward. Replaces g under SP."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return _seq_reduce_scatter(x, group, "ReduceScatterToSequenceParallel")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_all_gather(grad, ctx.group), None


class ScatterToSequenceParallel(torch.autograd.Function):
    """Enter the sequence-parallel region from a replicated activation: keep this rank's
    sequence chunk forward, all-gather the chunks' gradients backward (each rank's gradient is
    whole for its own tokens only, so concatenation — not a sum — restores the full one)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        world = _size(group)
        if world == 1:
            return x
        _check_seq(x, world, "ScatterToSequenceParallel")
        return _chunk(x, SEQ_DIM, group).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_all_gather(grad, ctx.group), None


class GatherFromTensorParallel(torch.autograd.Function):
    """All-gather a column layer's split output along the last dim forward (chunks of
    ``sizes``, uneven allowed), keep this rank's chunk of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, sizes: list[int]) -> Tensor:
        ctx.group = group
        return _all_gather_along(x, x.dim() - 1, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _chunk(grad, grad.dim() - 1, ctx.group).contiguous(), None, None


# ------------------------------------------------------------------------------- layers
def _param(full: Tensor, dim: int | None, group: dist.ProcessGroup | None,
           requires_grad: bool) -> nn.Parameter:
    """This rank's chunk of ``full`` (all of it for ``dim=None``) as a new Parameter."""
    data = full.detach() if dim is None else _chunk(full.detach(), dim, group)
    p = nn.Parameter(data.clone(), requires_grad=requires_grad)
    if dim is not None:
        p.tp_dim = dim
    return p


class _TensorParallelModule(nn.Module):
    """What a sharded layer declares: ``tp_dims`` (parameter name -> split dim). Read by
    ``tensor_parallel_dims`` (a deep copy of a Parameter drops python attributes like
    ``tp_dim``; the module's class keeps them)."""

    tp_dims: dict[str, int] = {}

    def __init__(self, group: dist.ProcessGroup | None):
        super().__init__()
        self._tp = _GroupRef(group)
        self.tp_size, self.tp_rank = _size(group), _rank(group)

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._tp.group


class ColumnParallelLinear(_TensorParallelModule):
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
        tp = _size(group)
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.size(0)}, tp {self.tp_rank}/{self.tp_size}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TensorParallelModule):
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
        tp = _size(group)
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.size(1)}, tp "
                f"{self.tp_rank}/{self.tp_size}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TensorParallelModule):
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
        tp = _size(group)
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
    restores, so a recomputation draws the same masks. See the module docstring.
    """
    base = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    seed = (base + 0x9E3779B97F4A7C15 * (_rank(group) + 1)) % (2 ** 63)
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

    _tp: _GroupRef
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
        self._tp = _GroupRef(group)

    def forward(self, x: Tensor) -> Tensor:
        if self.scatter_input:
            x = ScatterToSequenceParallel.apply(x, self._tp.group)
        if not self.training or self.p == 0:
            return x
        with tensor_parallel_rng(self._tp.group, x.device):
            return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, scatter_input={self.scatter_input}"


# ------------------------------------------------------------------------ vocab-parallel loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from logits [N, V_local] (rows = counted tokens), labels [N] (global ids).

    With ``s = x - max`` (max over the whole vocabulary), ``Z = sum_j exp(s_j)`` over all ranks:
    ``loss = log Z - (1-eps) s_y - eps/V sum_j s_j`` (= models.losses.cross_entropy's
    ``(1-eps)(-log p_y) + eps mean_j(-log p_j)``), whose gradient is
    ``p_j - (1-eps)[j = y] - eps/V``: local to the shard, no communication backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None,
                vocab_start: int, eps: float) -> Tensor:
        x = logits.float()
        n, v_local = x.shape
        top = x.max(dim=-1).values
        if _size(group) > 1:
            C.all_reduce(top, op="max", group=group)
        shifted = x - top[:, None]
        exp = shifted.exp()
        local = labels - vocab_start
        mine = (local >= 0) & (local < v_local)
        local = local.masked_fill(~mine, 0)
        target = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(~mine, 0.0)
        stats = torch.cat([exp.sum(-1), target, shifted.sum(-1), x.new_full((1,), v_local)])
        if _size(group) > 1:
            C.all_reduce(stats, group=group)
        sum_exp, target, sum_shifted, vocab = stats[:n], stats[n:2 * n], stats[2 * n:3 * n], stats[-1]
        log_z = sum_exp.log()
        loss = log_z - target
        if eps > 0:
            loss = (1.0 - eps) * loss + eps * (log_z - sum_shifted / vocab)
        exp.div_(sum_exp[:, None])                       # softmax of this shard's columns
        ctx.save_for_backward(exp, local, mine)
        ctx.eps, ctx.vocab, ctx.dtype = eps, float(vocab), logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, local, mine = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.size(0), device=g.device)
        g[rows, local] -= (1.0 - ctx.eps) * mine.to(g.dtype)
        if ctx.eps > 0:
            g -= ctx.eps / ctx.vocab
        g *= grad[:, None]
        return g.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits: Tensor, labels: Tensor,
                                 group: dist.ProcessGroup | None, vocab_start: int,
                                 ignore_index: int = IGNORE_INDEX,
                                 label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy over the non-ignored labels from this rank's vocabulary shard
    ``local_logits`` [..., V_local] (global ids ``vocab_start ..``); equals
    ``models.losses.cross_entropy`` on the full logits, value and gradient. Zero (with a zero
    gradient) if no label counts. Every rank of ``group`` must call it with the same labels.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    logits = local_logits.reshape(-1, local_logits.size(-1))
    labels = labels.reshape(-1)
    if labels.numel() != logits.size(0):
        raise ValueError(f"vocab_parallel_cross_entropy: {labels.numel()} labels for "
                         f"{logits.size(0)} rows of logits")
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = _VocabParallelCrossEntropy.apply(logits[valid], labels[valid], group, vocab_start,
                                            float(label_smoothing))
    return loss.mean()


@torch.no_grad()
def vocab_parallel_accuracy(local_logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None,
                            vocab_start: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``models.losses.accuracy`` from a vocabulary shard: the global argmax is the smallest id
    holding the global max (torch's argmax returns the first), from two [N] all-reduces. A 0-d
    float64 tensor on the logits' device (no host sync)."""
    logits = local_logits.reshape(-1, local_logits.size(-1)).float()
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    top, arg = logits.max(dim=-1)
    best = top.clone()
    if _size(group) > 1:
        C.all_reduce(best, op="max", group=group)
    cand = torch.where(top == best, arg + vocab_start, torch.full_like(arg, torch.iinfo(arg.dtype).max))
    if _size(group) > 1:
        C.all_reduce(cand, op="min", group=group)
    return ((cand == labels) & valid).sum().double() / valid.sum().clamp(min=1)


# ---------------------------------------------------------------------------- the model
@dataclass
class TensorParallelInfo:
    """What ``apply_tensor_parallel`` leaves on the model (``model.tensor_parallel``) for the
    loss, the gradient sync and checkpoints."""

    group_ref: _GroupRef
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


def _blocks(model: nn.Module) -> list[tuple[str, TransformerBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TransformerBlock)]


def _is_gpt_like(model: nn.Module) -> bool:
    """embed.tok -> blocks -> ln_f -> lm_head over the vocabulary (models.gpt.GPT's layout)."""
    embed = getattr(model, "embed", None)
    tok = getattr(embed, "tok", None)
    head = getattr(model, "lm_head", None)
    return (isinstance(tok, nn.Embedding) and isinstance(head, nn.Linear)
            and isinstance(getattr(model, "ln_f", None), nn.LayerNorm)
            and isinstance(getattr(embed, "drop", None), nn.Dropout)
            and head.out_features == tok.num_embeddings)


def _check(model: nn.Module, tp: int, sequence_parallel: bool) -> bool:
    """Every reason to refuse, before anything is changed (and before any communication)."""
    if hasattr(model, "tensor_parallel"):
        raise ConfigError(f"{type(model).__name__}: tensor parallelism is already applied")
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__}: no models.blocks.TransformerBlock found; "
                          f"tensor parallelism supports the GPT, BERT, ELECTRA and T5 families")
    for name, block in blocks:
        if isinstance(block.ffn, MoEFeedForward):
            raise ConfigError(f"{name}.ffn: a mixture-of-experts feed-forward is not supported "
                              f"with tensor parallelism (model.moe must be null)")
        for attn_name in ("attn", "cross_attn"):
            attn = getattr(block, attn_name)
            if attn is None:
                continue
            if type(attn) is not MultiHeadAttention:
                raise ConfigError(f"{name}.{attn_name}: expected models.attention."
                                  f"MultiHeadAttention, got {type(attn).__name__}")
            heads = attn.q_proj.out_features // attn.d_head
            if heads % tp:
                raise ConfigError(f"{name}.{attn_name}: {heads} attention heads cannot be split "
                                  f"over {tp} tensor-parallel ranks (n_heads % tp != 0)")
    gpt = _is_gpt_like(model)
    if sequence_parallel:
        if not gpt:
            raise ConfigError(f"{type(model).__name__}: sequence parallelism is supported for "
                              f"the GPT family only (embed, blocks, ln_f, lm_head)")
    if gpt and model.embed.tok.num_embeddings < tp:
        raise ConfigError(f"a vocabulary of {model.embed.tok.num_embeddings} cannot be split "
                          f"over {tp} ranks")
    return gpt


def _parallelize_block(block: TransformerBlock, group: dist.ProcessGroup | None,
                       sp: bool) -> list[str]:
    """Swap the block's layers in place; returns its parameters used on sequence shards."""
    for attn in (block.attn, block.cross_attn):
        if attn is None:
            continue
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear.from_linear(
                getattr(attn, name), group, input_is_parallel_ready=True))
        attn.out_proj = RowParallelLinear.from_linear(attn.out_proj, group, sequence_parallel=sp)
        attn.__class__ = TensorParallelAttention
        attn._tp, attn.tp_sequence_parallel = _GroupRef(group), sp
    block.ffn.up = ColumnParallelLinear.from_linear(block.ffn.up, group, sequence_parallel=sp)
    block.ffn.down = RowParallelLinear.from_linear(block.ffn.down, group, sequence_parallel=sp)
    if not sp:
        return []
    block.drop = SequenceParallelDropout(block.drop.p, group)
    names = [f"{ln}.{p}" for ln in ("ln_1", "ln_2") for p, _ in getattr(block, ln).named_parameters()]
    names += [f"{lin}.bias" for lin in ("attn.out_proj", "ffn.down")
              if block.get_submodule(lin).bias is not None]
    return names


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                          sequence_parallel: bool = False) -> nn.Module:
    """Make ``model`` tensor-parallel over ``group`` in place (see the module docstring for
    what changes per family); returns it, with ``model.tensor_parallel`` (TensorParallelInfo).

    Every rank of ``group`` must call it on the same full model (same weights): each keeps its
    own slices. Refusals (ConfigError) happen before anything changes.
    """
    tp, rank = _size(group), _rank(group)
    gpt = _check(model, tp, sequence_parallel)
    sp_params: list[str] = []
    for name, block in _blocks(model):
        sp_params += [f"{name}.{p}" for p in _parallelize_block(block, group, sequence_parallel)]
    info = TensorParallelInfo(_GroupRef(group), tp, rank, sequence_parallel, gpt,
                              label_smoothing=float(getattr(getattr(model, "config", None),
                                                            "label_smoothing", 0.0)))
    if gpt:
        tied = model.lm_head.weight is model.embed.tok.weight
        model.embed.tok = VocabParallelEmbedding.from_embedding(model.embed.tok, group)
        head = ColumnParallelLinear.from_linear(model.lm_head, group, gather_output=False,
                                                sequence_parallel=sequence_parallel)
        if tied:
            head.weight = model.embed.tok.weight
        model.lm_head = head
        info.vocab_size = model.embed.tok.num_embeddings
        info.vocab_start, info.vocab_end = model.embed.tok.vocab_start, model.embed.tok.vocab_end
        if sequence_parallel:
            model.embed.drop = SequenceParallelDropout(model.embed.drop.p, group, scatter_input=True)
            sp_params += [f"ln_f.{p}" for p, _ in model.ln_f.named_parameters()]
    for name in sp_params:
        model.get_parameter(name).sequence_parallel = True
    info.sequence_parallel_params = tuple(sp_params)
    model.tensor_parallel = info
    return model


def _info(model_or_info: nn.Module | TensorParallelInfo) -> TensorParallelInfo:
    if isinstance(model_or_info, TensorParallelInfo):
        return model_or_info
    info = getattr(model_or_info, "tensor_parallel", None)
    if not isinstance(info, TensorParallelInfo):
        raise ConfigError(f"{type(model_or_info).__name__}: apply_tensor_parallel has not been "
                          f"applied to this model")
    return info


def tensor_parallel_loss(local_logits: Tensor, labels: Tensor,
                         model: nn.Module | TensorParallelInfo,
                         aux_loss: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``models.losses.lm_loss_and_metrics`` for a vocabulary-parallel model: (loss, metrics)
    from this rank's logit shard. ``model`` is the TP model (or a pipeline stage that carries
    its ``tensor_parallel`` info, or the info itself); label smoothing is the model config's.
    Metrics: lm_loss, lm_acc (+ aux_loss). A collective: all TP ranks call it."""
    info = _info(model)
    if not info.vocab_parallel:
        raise ConfigError("tensor_parallel_loss needs a vocabulary-parallel model (GPT family); "
                          "other families compute their loss in their own forward")
    lm_loss = vocab_parallel_cross_entropy(local_logits, labels, info.group, info.vocab_start,
                                           label_smoothing=info.label_smoothing)
    loss = lm_loss if aux_loss is None else lm_loss + aux_loss
    metrics = {"lm_loss": lm_loss.detach()}
    if metrics_enabled():           # the same on every TP rank (the loop's step decides)
        metrics["lm_acc"] = vocab_parallel_accuracy(local_logits, labels, info.group,
                                                    info.vocab_start)
    if aux_loss is not None:
        metrics["aux_loss"] = aux_loss.detach()
    return loss, metrics


class TensorParallelLM(nn.Module):
    """Runs a vocabulary-parallel model without labels and computes the loss from its local
    logit shard, never gathering the [B, T, V] logits. ``.module`` is the TP model (canonical
    state-dict keys); forward(**batch) -> ModelOutput(loss, logits = local shard, metrics)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        info = _info(model)
        if not info.vocab_parallel:
            raise ConfigError(f"TensorParallelLM: {type(model).__name__} is not vocabulary-"
                              f"parallel (GPT family only); call the model directly")
        if _size(group) != info.tp_size:
            raise ConfigError(f"TensorParallelLM: group has {_size(group)} ranks but the model "
                              f"was made tensor-parallel over {info.tp_size}")
        self.module = model

    def forward(self, labels: Tensor | None = None, **batch: Any) -> ModelOutput:
        out = self.module(**batch)
        if labels is None:
            return out
        loss, metrics = tensor_parallel_loss(out.logits, labels, self.module, out.aux_loss)
        return ModelOutput(logits=out.logits, loss=loss, aux_loss=out.aux_loss,
                           past_key_values=out.past_key_values, metrics=metrics)


def sync_sequence_parallel_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) over the TP group the gradients of the replicated parameters that run
    on sequence shards (LayerNorms, row-parallel biases; ``model.tensor_parallel.
    sequence_parallel_params``), in one flat collective. A no-op without sequence parallelism."""
    info = _info(model)
    if not info.sequence_parallel or _size(group) == 1:
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


# --------------------------------------------------------------------------- checkpoints
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
    if _size(group) == 1 or not keys:
        return dict(state)
    local = torch.tensor([state[k].size(dims[k]) for k in keys], dtype=torch.int64,
                         device=state[keys[0]].device)
    sizes = C.all_gather(local[None], numel=_size(group), group=group).tolist()   # [world, K]
    out = dict(state)
    for i, k in enumerate(keys):
        out[k] = _all_gather_along(state[k].detach(), dims[k], [row[i] for row in sizes], group)
    return out


def shard_tensor_parallel_state(full_state: dict[str, Tensor], model: nn.Module,
                                group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """This rank's slices of a full (single-process) state, to ``load_state_dict`` into the TP
    model. No communication."""
    dims = tensor_parallel_dims(model)
    out = {}
    for k, v in full_state.items():
        out[k] = _chunk(v, dims[k], group).clone() if k in dims else v
    return out
