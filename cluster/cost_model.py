"""What a parallel layout of a transformer costs per GPU: model-state memory (ZeRO), activation
memory, the pipeline bubble and an estimated step time. The formulas the planner
(``bmray plan``, cluster/planner.py) ranks layouts with, kept apart from its search so each can
be read and tested against its paper. docs/planner.md ("The cost model") writes them out.

A layout is ``dp × tp × pp`` GPUs, a ZeRO stage over the dp group, optimizer / parameter
offload, ``m`` micro-batches per step and activation checkpointing on or off. All sizes are
bytes *per GPU*; a pipeline stage's numbers are those of one of its ranks.

* Parameters (:class:`ModelSpec`): counted exactly from the model built on the ``meta`` device;
  tensor parallelism splits what the family's ``tp_plan`` names (models/structure.py), the same
  table :mod:`bmray.actors.parallel.tensor` applies (Shoeybi et al. 2019).
* Model states: ZeRO's 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N in bf16 (Rajbhandari et al. 2020),
  what the strategies' ``memory_report`` counts; offload moves the 12Ψ/N to host memory.
* Activations: Korthikanti et al. 2022 eq. 1–4 per block, plus the head's transients
  (logits and the loss's fp32 gradients) and checkpointing (Chen et al. 2016).
* Pipeline: the bubble ``(p−1)/(m+p−1)`` and the stage partition come from
  :mod:`bmray.actors.parallel.pipeline.schedule` (Narayanan et al. 2021).
* Step time: FLOPs / (peak · mfu) plus ring collectives with a latency term, PCIe and CPU Adam
  for offload; ``mfu`` and the host rate are fitted per device kind (cluster/calibration.py).
  It only *ranks* layouts: per-step overheads are not modelled.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

# bubble_fraction: re-exported, the planner reads the pipeline's one formula from here
from bmray.actors.parallel.pipeline.schedule import (bubble_fraction,  # noqa: F401
                                                     partition_balanced)
from bmray.cluster.calibration import calibration
from bmray.models.structure import find_blocks, tensor_parallel_parameters, tp_plan_of

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 12             # fp32 master + exp_avg + exp_avg_sq per parameter (ZeRO's K)
STAGING_BYTES = 4           # offload from a GPU: fp32 gradient copy on the host in the step
ATTENTION = ("fused", "eager")
SCHEDULES = ("1f1b", "gpipe")

# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Params:
    """A trainable-parameter count split by what tensor parallelism does to it."""

    sharded: int = 0            # split over the tp ranks
    replicated: int = 0         # held whole by every tp rank

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_rank(self, tp: int) -> int:
        """What one of ``tp`` ranks holds (uneven splits: the larger chunk)."""
        return self.replicated + -(-self.sharded // tp)

    def __add__(self, other: "Params") -> "Params":
        return Params(self.sharded + other.sharded, self.replicated + other.replicated)


@dataclass(frozen=True)
class LayerShape:
    """One transformer block as the activation and FLOP formulas see it."""

    d_model: int
    n_heads: int
    d_ff: int
    params: Params
    matmul_params: int              # Linear weights a token goes through (MoE: top_k experts)
    cross_attention: bool = False   # T5 decoder: a second attention over the encoder output
    ffn_tokens: float = 1.0         # MoE: top_k · capacity_factor expert slots per token
    moe: bool = False               # an MoE feed-forward (no tensor parallelism)


@dataclass(frozen=True)
class ModelSpec:
    """A model's parameters and shapes, from the module itself (``from_module``)."""

    family: str
    vocab_size: int
    layers: tuple[LayerShape, ...]
    embed: Params                   # first stage: embeddings (a tied output layer included)
    head: Params                    # last stage: everything else outside the blocks (+ tied)
    total: Params                   # unique trainable parameters (a tied weight once)
    head_width: int                 # input width of the output layer
    head_matmul_params: int         # Linear weights outside the blocks (output layer, heads)
    dropout: float = 0.0
    vocab_parallel: bool = False    # tp splits the embedding, output layer and loss (GPT)
    largest_sharded: int = 0        # elements of the largest tp-split parameter (whole)
    largest_replicated: int = 0     # elements of the largest replicated parameter

    def largest_param(self, tp: int = 1) -> int:
        """Elements of the largest parameter one of ``tp`` ranks holds (a flat gradient bucket
        grows by up to one parameter past its cap)."""
        return max(-(-self.largest_sharded // tp), self.largest_replicated)

    @classmethod
    def from_module(cls, model: nn.Module, family: str = "", dropout: float = 0.0,
                    block_lists: Sequence[str] | None = None) -> "ModelSpec":
        """Count ``model``'s trainable parameters (on any device, ``meta`` included); what
        tensor parallelism splits is the model's ``tp_plan`` (the vocabulary for GPT only)."""
        plan = tp_plan_of(model)
        vocab_parallel = plan is not None and plan.vocab_parallel
        split_names = tensor_parallel_parameters(model, block_lists)
        names: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                names.setdefault(id(p), []).append(name)
                params[id(p)] = p
        sharded = {i for i, ns in names.items()
                   if any(n in split_names for n in ns)}
        split = lambda ids: Params(  # noqa: E731
            sum(params[i].numel() for i in ids if i in sharded),
            sum(params[i].numel() for i in ids if i not in sharded))
        blocks = [block for _, block in find_blocks(model, block_lists)]
        in_blocks: set[int] = set()
        layers = []
        for block in blocks:
            ids = {id(p) for p in block.parameters() if id(p) in params}
            in_blocks |= ids
            layers.append(_layer_shape(block, split(ids)))
        owners = {name: type(mod) for name, mod in model.named_modules()}
        embed_ids, head_ids = set(), set()
        for i in set(params) - in_blocks:
            for n in names[i]:
                owner = owners.get(n.rpartition(".")[0])
                is_embedding = owner is not None and "Embedding" in owner.__name__
                (embed_ids if is_embedding else head_ids).add(i)
        block_ids = {id(b) for b in blocks}
        prefixes = tuple(name + "." for name, mod in model.named_modules()
                         if id(mod) in block_ids)
        head_linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear)
                        and not (name + ".").startswith(prefixes)]
        head_width = max((m.in_features for m in head_linears), default=layers[-1].d_model
                         if layers else 0)
        vocab = max((m.out_features for m in head_linears), default=0)
        return cls(family=family, vocab_size=vocab, layers=tuple(layers),
                   embed=split(embed_ids), head=split(head_ids), total=split(set(params)),
                   head_width=head_width,
                   head_matmul_params=sum(m.weight.numel() for m in head_linears),
                   dropout=dropout, vocab_parallel=vocab_parallel,
                   largest_sharded=max((params[i].numel() for i in sharded), default=0),
                   largest_replicated=max((params[i].numel() for i in set(params) - sharded),
                                          default=0))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def stage_params(self, lo: int, hi: int, n_stages: int, stage: int) -> Params:
        """Trainable parameters of pipeline stage ``stage`` holding blocks ``[lo, hi)``."""
        if n_stages == 1:
            return self.total
        out = Params()
        for layer in self.layers[lo:hi]:
            out = out + layer.params
        if stage == 0:
            out = out + self.embed
        if stage == n_stages - 1:
            out = out + self.head
        return out


def _layer_shape(block: nn.Module, params: Params) -> LayerShape:
    attn = getattr(block, "attn", None)
    ffn = getattr(block, "ffn", None)
    if attn is None or ffn is None:
        raise ValueError(f"{type(block).__name__}: the planner knows blocks with .attn "
                         f"(q/k/v/out_proj) and .ffn (up/down or MoE experts)")
    d_model = attn.q_proj.in_features
    n_heads = attn.q_proj.out_features // attn.d_head
    attn_mm = sum(m.weight.numel() for m in attn.modules() if isinstance(m, nn.Linear))
    cross = getattr(block, "cross_attn", None)
    if cross is not None:
        attn_mm += sum(m.weight.numel() for m in cross.modules() if isinstance(m, nn.Linear))
    if hasattr(ffn, "experts"):                          # models.moe.MoEFeedForward
        expert = ffn.experts[0]
        d_ff = expert.up.out_features
        ffn_mm = ffn.top_k * (expert.up.weight.numel() + expert.down.weight.numel()) \
            + ffn.router.weight.numel()
        ffn_tokens = ffn.top_k * ffn.capacity_factor
    else:
        d_ff = ffn.up.out_features
        ffn_mm = ffn.up.weight.numel() + ffn.down.weight.numel()
        ffn_tokens = 1.0
    return LayerShape(d_model=d_model, n_heads=n_heads, d_ff=d_ff, params=params,
                      matmul_params=attn_mm + ffn_mm, cross_attention=cross is not None,
                      ffn_tokens=ffn_tokens, moe=hasattr(ffn, "experts"))


def partition(spec: ModelSpec, pp: int) -> list[tuple[int, int]]:
    """Blocks ``[lo, hi)`` of each of ``pp`` stages: contiguous, at least one block each,
    minimising the largest stage's parameter count (embeddings on the first stage, the head on
    the last): the pipeline's min-max partitioner with its ``"nested"`` tie-break."""
    n = spec.n_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp}: needs 1 <= pp <= n_layers ({n})")
    return partition_balanced([layer.params.total for layer in spec.layers], pp,
                              first_extra=spec.embed.total, last_extra=spec.head.total,
                              ties="nested")


# ------------------------------------------------------------------ model states (ZeRO)
@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes of one GPU, as ``memory_report`` names them, and where they live."""

    param: float
    grad: float
    optimizer: float            # fp32 master + moments (+ host gradient copy when offloaded)
    device: float
    host: float

    @property
    def total(self) -> float:
        return self.param + self.grad + self.optimizer


def model_state_bytes(psi: int, stage: int, dp: int, param_dtype: str = "bf16",
                      offload_optimizer: bool = False, offload_params: bool = False,
                      gpu: bool = True) -> ModelStates:
    """ZeRO's per-GPU model states (module doc). ``psi``: trainable parameters this GPU's
    stage and tp slice hold; ``dp``: the ZeRO group size N; ``gpu``: a GPU run, whose
    optimizer offload adds the step's fp32 gradient copy on the host (a CPU run has none;
    ``memory_report`` does not count it: see the module doc)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    b = DTYPE_BYTES[param_dtype]
    shards = 1 if stage == 0 else dp
    param = psi * b / dp if stage == 3 else psi * b
    grad = psi * b / dp if stage >= 2 else psi * b
    # fp32, nothing offloaded: the master aliases the parameters / stage-3 shard (module doc)
    aliased = b == 4 and not offload_optimizer and not offload_params
    optim = (ADAM_BYTES - (4 if aliased else 0)) * psi / shards
    staging = STAGING_BYTES * psi / shards if offload_optimizer and gpu else 0.0
    host = (optim + staging if offload_optimizer else 0.0) + (param if offload_params else 0.0)
    total = param + grad + optim + staging
    return ModelStates(param=param, grad=grad, optimizer=optim + staging,
                       device=total - host, host=host)


def transient_bytes(stage: int, params: Params, layers: Sequence[LayerShape], tp: int,
                    param_dtype: str, bucket_mb: float = 25.0, inflight: int = 2) -> float:
    """Device bytes the strategy holds for a moment, outside ``memory_report``: stage 2's
    reduce buckets, stage 3's gathered units (root + two blocks) and reduce-scatter buffers."""
    b = DTYPE_BYTES[param_dtype]
    psi = params.per_rank(tp)
    if stage == 2:
        return min((inflight + 1) * bucket_mb * 2 ** 20, psi * b)
    if stage == 3:
        block = max((layer.params.per_rank(tp) for layer in layers), default=0)
        root = psi - sum(layer.params.per_rank(tp) for layer in layers)
        return b * (root + 2 * block + inflight * block)
    return 0.0


def step_transient_bytes(spec: ModelSpec, params: Params, layers: Sequence[LayerShape],
                         stage: int, dp: int, tp: int, param_dtype: str,
                         bucket_mb: float = 25.0, offload_optimizer: bool = False) -> float:
    """Device bytes the optimizer step holds for a moment, after backward (the activations and
    the head's transients are gone by then, so this competes with them for the peak rather
    than adding to it). ``step_master_shards`` (actors/zero.py; ZeRO-3 the same) works on an
    fp32 copy of this rank's gradient slices — ``.float()`` of the ``param_dtype`` gradients,
    4Ψ/N' bytes (N' = 1 for stage 0, else dp; none in fp32, where it is a view) — alive until
    the step returns; meanwhile it squares them for the global norm one flat slice at a time
    (``g.pow(2)``: 4 bytes times the largest slice — a bucket, which closes at ``bucket_mb``
    and so holds at most one parameter more, or for stage 3 the largest unit over N), and
    stages 0-2 then cast the updated masters to ``param_dtype`` for the all-gather (bΨ/N',
    none for fp32 masters on the device: the master is the parameters' own slice) into full
    buckets (bΨ when N' > 1), held until the next forward copies them into the parameters.
    ZeRO-3 copies the masters into its shards in place."""
    b = DTYPE_BYTES[param_dtype]
    psi = params.per_rank(tp)
    shards = 1 if stage == 0 else dp
    copy = 0.0 if b == 4 else 4.0 * psi / shards
    if stage == 3:
        block = max((layer.params.per_rank(tp) for layer in layers), default=0)
        root = psi - sum(layer.params.per_rank(tp) for layer in layers)
        return copy + 4.0 * max(block, root) / dp
    squares = 4.0 * min(psi, bucket_mb * 2 ** 20 / b + spec.largest_param(tp)) / shards
    cast = b * psi / shards if (b < 4 or offload_optimizer) else 0.0
    gathered = cast + (b * psi if shards > 1 else 0.0)
    return copy + max(squares, gathered)


# ------------------------------------------------------------------ activations
def layer_activation_bytes(layer: LayerShape, seq: int, micro_batch: int, act_bytes: int,
                           tp: int = 1, sequence_parallel: bool = False,
                           dropout: bool = False, attention: str = "fused") -> float:
    """Bytes one block saves for backward for one micro-batch (Korthikanti et al. eq. 1-4,
    itemised in the module doc)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    s, b, h, a, f, e = seq, micro_batch, layer.d_model, layer.n_heads, layer.d_ff, act_bytes
    sbh, mask = s * b * h, (1 if dropout else 0)
    ln_stats = 8 * s * b                                 # mean + rstd, fp32
    sub_attention = 1 + int(layer.cross_attention)
    replicated = sub_attention * ((2 * e + mask) * sbh + ln_stats) \
        + (2 * e + mask) * sbh + ln_stats                # + the MLP's
    sharded = sub_attention * 4 * e * sbh + 2 * e * s * b * f * layer.ffn_tokens
    if attention == "eager":
        scores = a * s * s * b * ((2 * e + 1) if dropout else e)
    else:
        scores = 4 * a * s * b                           # log-sum-exp, fp32
    scores *= sub_attention
    rep = replicated / tp if sequence_parallel else replicated
    return rep + (sharded + scores) / tp


def korthikanti_layer_bytes(seq: int, micro_batch: int, d_model: int, n_heads: int, tp: int = 1,
                            sequence_parallel: bool = False) -> float:
    """The paper's closed forms (16-bit activations, dropout, f = 4h, unfused attention):
    eq. 1 ``sbh(34 + 5as/h)``, eq. 2 ``sbh(10 + 24/t + 5as/(ht))``, eq. 4 ``sbh/t·(34 +
    5as/h)``."""
    s, b, h, a, t = seq, micro_batch, d_model, n_heads, tp
    if sequence_parallel:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def checkpointed_layer_bytes(layer: LayerShape, seq: int, micro_batch: int, act_bytes: int,
                             tp: int = 1, sequence_parallel: bool = False) -> float:
    """What a checkpointed block keeps: its input (the paper's 2sbh in 16 bits)."""
    kept = act_bytes * seq * micro_batch * layer.d_model
    return kept / tp if sequence_parallel else kept


def head_activation_bytes(spec: ModelSpec, seq: int, micro_batch: int, act_bytes: int,
                          tp: int = 1, sequence_parallel: bool = False) -> float:
    """Last stage, per micro-batch: final-LN input and output-layer input (e·sbh each), LN
    statistics, the loss's fp32 log-probabilities (4·sbV, /t when the vocabulary is
    tensor-parallel), its row mask and label index."""
    s, b, e = seq, micro_batch, act_bytes
    rep = 2 * e * s * b * spec.head_width + 8 * s * b
    rep = rep / tp if sequence_parallel else rep
    vocab_tp = tp if spec.vocab_parallel else 1
    return rep + 4 * s * b * spec.vocab_size / vocab_tp + 9 * s * b


def head_transient_bytes(spec: ModelSpec, seq: int, micro_batch: int, act_bytes: int,
                         tp: int = 1, logits_kept: bool = True) -> float:
    """Last stage, one micro-batch: the output layer's logits and the loss's temporaries alive
    at the peak of forward + backward, on top of :func:`head_activation_bytes` (which holds
    the saved fp32 log-probabilities, 4 bytes per logit). Unlike the saved activations these
    exist for one micro-batch at a time, so they are added once, not per micro-batch in flight.

    Per logit (N = s·b rows, every token labelled for a causal LM; V/t columns; e = bytes of
    ``param_dtype``), read off the code and what autograd allocates:

    * ``models.losses.cross_entropy`` (tp = 1): forward makes the logits (e), their row
      selection ``logits[valid]`` (e, a copy — freed once ``.float()`` returns), its fp32 copy
      (4; for fp32 the selection itself) and ``log_softmax``'s output (4, saved). Backward:
      ``gather``'s gradient is a dense fp32 [N, V] (4), ``log_softmax``'s backward writes
      the fp32 gradient of its input (4) while its saved output and incoming gradient are
      still alive, then ``.float()``'s backward casts it to e and the selection's backward
      scatters it into zeros (e). The most alive at once is at ``log_softmax``'s backward:
      logits + saved log-probs + two fp32 gradients = e + 4 + 4 + 4, i.e. **e + 8** beyond
      the saved log-probs (forward's worst is e + 4; the casts after it 2e, the log-probs
      being freed by then). The logits (e) count only where the caller keeps them through
      backward: the ZeRO / data-parallel strategies do (``weighted_forward_backward`` holds
      the model output, logits included); a pipeline stage returns only the loss (**8**).
      Label smoothing adds only [N]-sized terms to this peak.
    * ``actors.parallel.tensor.loss.vocab_parallel_cross_entropy`` (vocabulary-parallel GPT,
      tp > 1):
      forward holds the logits (e), the selected rows (e, the Function's input), their fp32
      copy (4; none in fp32), ``x − max`` (4) and its exponential (4, saved as the softmax):
      2e + 8 (e = 2) or 3·4 (e = 4), i.e. **12** beyond the saved softmax either way;
      backward (the softmax's clone, its cast, the scatter) stays at or below it.

    Measured (bench/results/plan_gpu_check.json; tests/test_plan.py): ZeRO-0, bf16, one H100,
    GPT h = 1024, 8 blocks, V = 32000, s = 1024, b = 4 (Ψ = 134,588,416; sbV = 131,072,000)::

        model states  16Ψ                               2,153,414,656  (memory_report: equal)
        activations   stage_activation_bytes            1,617,539,072  (saved: 1,617,539,200)
        head          (2 + 8)·sbV                       1,310,720,000
        predicted peak                                  5,081,673,728
        measured peak (max_memory_allocated)            5,119,399,424  (predicted: −0.74%)

    The 37,725,696-byte residual is 33,554,432 (cuBLAS's 32 MiB workspace on Hopper, which
    PyTorch allocates through its caching allocator at the first matmul, inside this first
    forward: the next run, whose workspace existed before, rose exactly 32 MiB less above its
    start) + 3,145,728 (allocated before the forward beyond ``memory_report``'s states:
    allocator blocks counted whole and small buffers) + 1,025,536 (about 1 MB of small tensors
    not itemised: token ids on the device, per-token loss terms, 512-byte rounding). Those
    per-process constants are the ``--headroom``'s, as is the CUDA context (outside the
    allocator)."""
    s, b, e = seq, micro_batch, act_bytes
    if spec.vocab_parallel and tp > 1:
        return 12.0 * s * b * spec.vocab_size / tp
    return ((e if logits_kept else 0) + 8.0) * s * b * spec.vocab_size


def embed_activation_bytes(spec: ModelSpec, seq: int, micro_batch: int,
                           tp: int = 1, sequence_parallel: bool = False) -> float:
    """First stage, per micro-batch: token and position ids (int64), the embedding dropout
    mask."""
    width = spec.layers[0].d_model if spec.layers else spec.head_width
    mask = seq * micro_batch * width if spec.dropout > 0 else 0
    return 8 * seq * (micro_batch + 1) + (mask / tp if sequence_parallel else mask)


def in_flight(stage: int, pp: int, micro_batches: int, schedule: str = "1f1b") -> int:
    """Micro-batches whose activations stage ``stage`` holds at once: GPipe all ``m``, 1F1B
    at most ``pp − stage`` (Narayanan et al. 2021, sec. 2.2); without a pipeline one."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if pp == 1:
        return 1
    return micro_batches if schedule == "gpipe" else min(pp - stage, micro_batches)


def recomputed_block_bytes(spec: ModelSpec, lo: int, hi: int, *, seq: int, micro_batch: int,
                           act_bytes: int, tp: int = 1, sequence_parallel: bool = False,
                           attention: str = "fused") -> float:
    """With checkpointing: the full activations of the largest of blocks ``[lo, hi)``, alive
    while backward recomputes that block (part of :func:`stage_activation_bytes`)."""
    return max((layer_activation_bytes(layer, seq, micro_batch, act_bytes,
                                       dropout=spec.dropout > 0, attention=attention, tp=tp,
                                       sequence_parallel=sequence_parallel)
                for layer in spec.layers[lo:hi]), default=0.0)


def stage_activation_bytes(spec: ModelSpec, lo: int, hi: int, stage: int, pp: int, *,
                           seq: int, micro_batch: int, micro_batches: int, act_bytes: int,
                           tp: int = 1, sequence_parallel: bool = False,
                           recompute: bool = False, attention: str = "fused",
                           schedule: str = "1f1b") -> float:
    """Peak saved activations of one rank of pipeline stage ``stage`` (blocks ``[lo, hi)``)."""
    args = dict(tp=tp, sequence_parallel=sequence_parallel)
    if recompute:
        per_mb = sum(checkpointed_layer_bytes(layer, seq, micro_batch, act_bytes, **args)
                     for layer in spec.layers[lo:hi])
        once = recomputed_block_bytes(spec, lo, hi, seq=seq, micro_batch=micro_batch,
                                      act_bytes=act_bytes, attention=attention, **args)
    else:
        per_mb = sum(layer_activation_bytes(layer, seq, micro_batch, act_bytes,
                                            dropout=spec.dropout > 0, attention=attention,
                                            **args) for layer in spec.layers[lo:hi])
        once = 0.0
    if stage == 0:
        per_mb += embed_activation_bytes(spec, seq, micro_batch, **args)
    if stage == pp - 1:
        per_mb += head_activation_bytes(spec, seq, micro_batch, act_bytes, **args)
    return in_flight(stage, pp, micro_batches, schedule) * per_mb + once


# ------------------------------------------------------------------ step time
_H100 = calibration("h100").values


@dataclass(frozen=True)
class Hardware:
    """What the step-time estimate assumes about the machines (defaults: H100 SXM nodes, with
    ``mfu`` and ``host_memory_gbs`` fitted to measured H100 steps: cluster/calibration.py;
    :meth:`for_kind` takes another kind's calibration)."""

    gpus_per_node: int = 8
    peak_tflops: float = _H100["peak_tflops"]   # dense bf16/fp16 matmul peak per GPU
    mfu: float = _H100["mfu"]       # fraction of peak the matmuls reach (fitted)
    nvlink_gbs: float = 300.0       # per-GPU bus bandwidth of collectives within a node (GB/s)
    network_gbs: float = 25.0       # per-GPU bandwidth across nodes (a 200 Gb/s NIC per GPU)
    pcie_gbs: float = 25.0          # host <-> device per GPU
    host_memory_gbs: float = _H100["host_memory_gbs"]  # a node's host rate for CPU Adam (fitted)
    latency_us: float = 10.0        # fixed cost of one collective or send (Hockney's alpha)
    bucket_mb: float = 25.0         # gradient bucket / reduce bucket (ZeroConfig.bucket_mb)
    fp32_speed: float = 0.5         # fp32 matmuls' rate as a fraction of peak_tflops
    kind: str = "h100"              # the calibration the fitted fields came from

    @classmethod
    def for_kind(cls, kind: str, **overrides: float) -> "Hardware":
        """The defaults with device kind ``kind``'s calibrated values, then ``overrides``."""
        return cls(**{**calibration(kind).values, "kind": kind, **overrides})

    def __post_init__(self) -> None:
        calibration(self.kind)
        for key in ("gpus_per_node", "peak_tflops", "mfu", "nvlink_gbs", "network_gbs",
                    "pcie_gbs", "host_memory_gbs", "latency_us", "bucket_mb", "fp32_speed"):
            if not getattr(self, key) > 0:
                raise ValueError(f"hardware.{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("mfu", "fp32_speed"):
            if getattr(self, key) > 1:
                raise ValueError(f"hardware.{key}: must be <= 1, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by term (see the module doc)."""

    compute: float              # pipeline time of the matmuls (bubble and recompute included)
    tp: float
    pp: float
    dp: float
    offload: float
    total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total",
                           self.compute + self.tp + self.pp + self.dp + self.offload)


def _ring(volume_factor: float, nbytes: float, gbs: float) -> float:
    return volume_factor * nbytes / (gbs * 1e9)


def step_time(spec: ModelSpec, bounds: Sequence[tuple[int, int]], *, dp: int, tp: int,
              stage: int, offload_optimizer: bool, offload_params: bool, micro_batches: int,
              micro_batch: int, seq: int, recompute: bool, param_dtype: str,
              hw: Hardware) -> StepTime:
    """Estimated step time of a layout (module doc); ``bounds`` from :func:`partition`."""
    pp, m, e = len(bounds), micro_batches, DTYPE_BYTES[param_dtype]
    alpha = hw.latency_us * 1e-6
    tokens = seq * micro_batch
    speed = hw.fp32_speed if param_dtype == "fp32" else 1.0
    flops_per_s = tp * hw.peak_tflops * 1e12 * hw.mfu * speed
    comp, tpc = [], []
    for i, (lo, hi) in enumerate(bounds):
        blocks = sum(6 * tokens * layer.matmul_params
                     + 12 * tokens * seq * layer.d_model * (1 + layer.cross_attention)
                     for layer in spec.layers[lo:hi])
        flops = blocks * (4 / 3 if recompute else 1.0)
        if i == pp - 1:
            flops += 6 * tokens * spec.head_matmul_params
        comp.append(flops / flops_per_s)
        reduces = sum((4 + 2 * recompute) * (1 + layer.cross_attention)
                      for layer in spec.layers[lo:hi])
        tpc.append(_ring(2 * (tp - 1) / tp, reduces * e * tokens * spec.layers[lo].d_model,
                         hw.nvlink_gbs) + reduces * alpha if tp > 1 else 0.0)
    slots = m + pp - 1
    worst = max(range(pp), key=lambda i: comp[i] + tpc[i])
    pp_bw = hw.nvlink_gbs if tp * pp <= hw.gpus_per_node else hw.network_gbs
    pp_time = slots * 2 * (e * tokens * spec.head_width / (pp_bw * 1e9) + alpha) \
        if pp > 1 else 0.0
    world = dp * tp * pp
    dp_bw = hw.nvlink_gbs if world <= hw.gpus_per_node else hw.network_gbs
    dp_time, off_time = 0.0, 0.0
    for i, (lo, hi) in enumerate(bounds):
        psi = spec.stage_params(lo, hi, pp, i).per_rank(tp)
        nbytes = psi * e
        ring = (dp - 1) / dp
        volume = {0: 2, 1: 3, 2: m + 1, 3: 3 * m}[stage] * ring if dp > 1 else 0.0
        buckets = max(1, math.ceil(nbytes / (hw.bucket_mb * 2 ** 20)))
        calls = {0: buckets, 1: 2 * buckets, 2: (m + 1) * buckets,
                 3: 3 * m * (hi - lo + 1)}[stage] if dp > 1 else 0
        dp_time = max(dp_time, _ring(volume, nbytes, dp_bw) + calls * alpha)
        shards = 1 if stage == 0 else dp
        t_off = 0.0
        if offload_optimizer:
            t_off += 8 * psi / shards / (hw.pcie_gbs * 1e9)
            t_off += 28 * psi / shards / (hw.host_memory_gbs * 1e9 / hw.gpus_per_node)
        if offload_params:
            t_off += 2 * m * nbytes / dp / (hw.pcie_gbs * 1e9)
        off_time = max(off_time, t_off)
    return StepTime(compute=slots * comp[worst], tp=slots * tpc[worst], pp=pp_time,
                    dp=dp_time, offload=off_time)


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def memory_bytes(text: str) -> int:
    """``"80GB"`` (10⁹ bytes a GB), ``"80GiB"`` (2³⁰), ``"512MB"``, ``"1.5TB"``,
    ``"85899345920"`` (bytes) → bytes; anything else is a ValueError saying what is wrong."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"memory size {text!r}: expected a number and a unit such as '80GB', "
                         f"'80GiB', '512MB', or plain bytes")
    value, unit = float(match.group(1)), match.group(2)
    if unit.lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: unknown unit {unit!r}; use B, KB, MB, GB, TB "
                         f"(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    nbytes = value * _UNITS[unit.lower()]
    if not math.isfinite(nbytes) or nbytes < 1:
        raise ValueError(f"memory size {text!r}: must be a finite size of at least one byte")
    return int(nbytes)


def human_seconds(t: float) -> str:
    """Seconds as s / ms / µs with 3 significant digits."""
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if t >= size:
            return f"{t / size:.3g} {unit}"
    return f"{t / 1e-6:.3g} µs"


def human_bytes(n: float) -> str:
    """Bytes as GiB / MiB / KiB with 3 significant digits (what nvidia-smi calls GB)."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} B"
