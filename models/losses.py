"""Token losses shared by the families.

``cross_entropy`` is written out (rather than calling ``F.cross_entropy``) so the label-smoothing
formula is visible and testable against the built-in: with smoothing eps the target distribution
is ``(1 - eps) * onehot(y) + eps / V`` (Szegedy et al. 2016, sec. 7; Vaswani et al. 2017, 5.4), so

    loss = (1 - eps) * (-log p_y) + eps * mean_j(-log p_j),

averaged over the positions whose label is not ``ignore_index``. Computed in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy; logits [..., V], labels [...]. Zero (with grad) if nothing counts.

    Only the non-ignored rows go through log-softmax: for masked LM that is ~15% of the tokens.
    """
    vocab = logits.size(-1)
    logits = logits.reshape(-1, vocab)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits[valid].float(), dim=-1)
    nll = -logp.gather(1, labels[valid][:, None]).squeeze(1)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (-logp.mean(dim=-1))
    return nll.mean()


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of non-ignored positions whose argmax equals the label (python float, for logs)."""
    valid = labels != ignore_index
    n = int(valid.sum())
    if n == 0:
        return 0.0
    return float((logits.argmax(dim=-1)[valid] == labels[valid]).float().sum()) / n


def lm_loss_and_metrics(logits: Tensor, labels: Tensor, aux_loss: Tensor | None,
                        label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """A language-model head's loss (token CE + the MoE aux loss, if any) and its metrics —
    shared by the decoder-only and encoder-decoder families."""
    lm_loss = cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss = lm_loss if aux_loss is None else lm_loss + aux_loss
    metrics = {"lm_loss": float(lm_loss.detach()), "lm_acc": accuracy(logits, labels)}
    if aux_loss is not None:
        metrics["aux_loss"] = float(aux_loss.detach())
    return loss, metrics
