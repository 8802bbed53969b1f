"""Token losses shared by the families.

``cross_entropy`` is torch's fused ``F.cross_entropy`` on the rows that count, in float32. With
label smoothing eps the target distribution is ``(1 - eps) * onehot(y) + eps / V``, so

    loss = (1 - eps) * (-log p_y) + eps * mean_j(-log p_j),

averaged over the positions whose label is not ``ignore_index`` (the formula the tests check it
against, written out). Why the fused kernel, and the references: docs/models.md, "Layers".
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

# Whether heads compute their logged metrics (accuracies). The training loop turns them off on
# steps it does not log: an argmax over B·T·V logits costs ~2% of a small GPT's step.
_metrics_on = [True]


@contextlib.contextmanager
def step_metrics(enabled: bool) -> Iterator[None]:
    """Within this block, heads compute their accuracies (``enabled``) or skip them."""
    previous, _metrics_on[0] = _metrics_on[0], bool(enabled)
    try:
        yield
    finally:
        _metrics_on[0] = previous


def metrics_enabled() -> bool:
    return _metrics_on[0]


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy; logits [..., V], labels [...]. Zero (with grad) if nothing counts.

    When fewer than half the positions count (masked LM: ~15%), only those rows go through the
    softmax; otherwise all rows do, the ignored ones dropped by the kernel (no copy).
    """
    vocab = logits.size(-1)
    logits = logits.reshape(-1, vocab)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    counted = int(valid.sum())
    if counted == 0:
        return logits.sum() * 0.0
    if 2 * counted < labels.numel():
        logits, labels = logits[valid], labels[valid]
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Fraction of non-ignored positions whose argmax equals the label (0 if none count): a
    0-d float64 tensor on the logits' device, so logging it costs no host sync of its own."""
    valid = labels != ignore_index
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
    return correct.double() / valid.sum().clamp(min=1)


def lm_loss_and_metrics(logits: Tensor, labels: Tensor, aux_loss: Tensor | None,
                        label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """A language-model head's loss (token CE + the MoE aux loss, if any) and its metrics
    (detached tensors; the accuracy only under ``step_metrics(True)``) — shared by the
    decoder-only and encoder-decoder families."""
    lm_loss = cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss = lm_loss if aux_loss is None else lm_loss + aux_loss
    metrics = {"lm_loss": lm_loss.detach()}
    if metrics_enabled():
        metrics["lm_acc"] = accuracy(logits, labels)
    if aux_loss is not None:
        metrics["aux_loss"] = aux_loss.detach()
    return loss, metrics
