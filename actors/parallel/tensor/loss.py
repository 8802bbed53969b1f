"""The loss of a vocabulary-parallel model from its logit shard (Shoeybi et al. 2019, sec. 3,
"output embedding"; docs/tensor_parallel.md).

``vocab_parallel_cross_entropy`` all-reduces only per-token scalars ([N] max, then one [3N+1]
sum of exp-sum, target logit and logit-sum), never the [N, V] logits; with ``s = x - max`` and
``Z = sum_j exp(s_j)`` over all ranks, ``loss = log Z - (1-eps) s_y - eps/V sum_j s_j``, whose
gradient ``softmax - (1-eps) onehot - eps/V`` is local to the shard. ``vocab_parallel_accuracy``
finds the global argmax from two [N] all-reduces. ``tensor_parallel_loss`` and
``TensorParallelLM`` give a TP GPT the (loss, metrics) of
``models.layers.losses.lm_loss_and_metrics``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bmray.actors.comm import collectives as C
from bmray.actors.parallel.tensor.ops import group_size
from bmray.actors.parallel.tensor.plan import TensorParallelInfo, tensor_parallel_info
from bmray.models.layers.losses import IGNORE_INDEX, metrics_enabled
from bmray.models.outputs import ModelOutput
from bmray.models.typed_config import ConfigError

__all__ = ["TensorParallelLM", "tensor_parallel_loss", "vocab_parallel_accuracy",
           "vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from logits [N, V_local] (rows = counted tokens), labels [N] (global ids).

    With ``s = x - max`` (max over the whole vocabulary), ``Z = sum_j exp(s_j)`` over all ranks:
    ``loss = log Z - (1-eps) s_y - eps/V sum_j s_j`` (= models.layers.losses.cross_entropy's
    ``(1-eps)(-log p_y) + eps mean_j(-log p_j)``), whose gradient is
    ``p_j - (1-eps)[j = y] - eps/V``: local to the shard, no communication backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None,
                vocab_start: int, eps: float) -> Tensor:
        x = logits.float()
        n, v_local = x.shape
        top = x.max(dim=-1).values
        if group_size(group) > 1:
            C.all_reduce(top, op="max", group=group)
        shifted = x - top[:, None]
        exp = shifted.exp()
        local = labels - vocab_start
        mine = (local >= 0) & (local < v_local)
        local = local.masked_fill(~mine, 0)
        target = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(~mine, 0.0)
        stats = torch.cat([exp.sum(-1), target, shifted.sum(-1), x.new_full((1,), v_local)])
        if group_size(group) > 1:
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
    ``models.layers.losses.cross_entropy`` on the full logits, value and gradient. Zero (with a
    zero gradient) if no label counts. Every rank of ``group`` must call it with the same labels.
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
    """``models.layers.losses.accuracy`` from a vocabulary shard: the global argmax is the
    smallest id holding the global max (torch's argmax returns the first), from two [N]
    all-reduces. A 0-d float64 tensor on the logits' device (no host sync)."""
    logits = local_logits.reshape(-1, local_logits.size(-1)).float()
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    top, arg = logits.max(dim=-1)
    best = top.clone()
    if group_size(group) > 1:
        C.all_reduce(best, op="max", group=group)
    cand = torch.where(top == best, arg + vocab_start, torch.full_like(arg, torch.iinfo(arg.dtype).max))
    if group_size(group) > 1:
        C.all_reduce(cand, op="min", group=group)
    return ((cand == labels) & valid).sum().double() / valid.sum().clamp(min=1)



def tensor_parallel_loss(local_logits: Tensor, labels: Tensor,
                         model: nn.Module | TensorParallelInfo,
                         aux_loss: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``models.layers.losses.lm_loss_and_metrics`` for a vocabulary-parallel model: (loss,
    metrics) from this rank's logit shard. ``model`` is the TP model (or a pipeline stage that
    carries its ``tensor_parallel`` info, or the info itself); label smoothing is the model
    config's.
    Metrics: lm_loss, lm_acc (+ aux_loss). A collective: all TP ranks call it."""
    info = tensor_parallel_info(model)
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
        info = tensor_parallel_info(model)
        if not info.vocab_parallel:
            raise ConfigError(f"TensorParallelLM: {type(model).__name__} is not vocabulary-"
                              f"parallel (GPT family only); call the model directly")
        if group_size(group) != info.tp_size:
            raise ConfigError(f"TensorParallelLM: group has {group_size(group)} ranks but the model "
                              f"was made tensor-parallel over {info.tp_size}")
        self.module = model

    def forward(self, labels: Tensor | None = None, **batch: Any) -> ModelOutput:
        out = self.module(**batch)
        if labels is None:
            return out
        loss, metrics = tensor_parallel_loss(out.logits, labels, self.module, out.aux_loss)
        return ModelOutput(logits=out.logits, loss=loss, aux_loss=out.aux_loss,
                           past_key_values=out.past_key_values, metrics=metrics)
