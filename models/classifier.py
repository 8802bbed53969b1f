"""A sequence classifier over any encoder: pooled hidden state → linear head → cross-entropy.

The standard fine-tuning head (Devlin et al. 2019, sec. 4.1: the final hidden state of [CLS],
one linear layer, softmax). ``pooling="cls"`` takes the first position, ``"mean"`` averages
the non-padding positions (Sentence-BERT's pooling, Reimers & Gurevych 2019). The encoder is
our BERT (``encode``) or a ``transformers`` encoder (``last_hidden_state``): whatever deltas
are attached to it from outside ride along. Returns the family's :class:`ModelOutput` with
``metrics["accuracy"]`` so the training loop logs it like any model metric.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.layers.losses import accuracy, metrics_enabled
from bmray.models.outputs import ModelOutput
from bmray.models.typed_config import check_choice

POOLINGS = ("cls", "mean")


def encoder_states(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states [B, T, D]: ``encoder.encode`` (our BERT) or the output's
    ``last_hidden_state`` (a ``transformers`` encoder such as the MiniLM)."""
    encode = getattr(encoder, "encode", None)
    if callable(encode):
        return encode(input_ids, attention_mask)
    return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """[B, D]: the first position, or the mean over positions where the mask is 1."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class SequenceClassifier(nn.Module):
    """``backbone`` (a bare encoder, or a DeltaModel whose ``base`` is the encoder) + head.

    forward(input_ids, attention_mask, labels=None) -> ModelOutput(logits [B, C], loss)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int,
                 pooling: str = "cls", dropout: float = 0.0):
        super().__init__()
        check_choice("task.pooling", pooling, POOLINGS)
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)
        lists = getattr(backbone, "block_lists", None)
        if lists:
            self.block_lists = tuple("backbone." + p for p in lists)

    @property
    def encoder(self) -> nn.Module:
        """The module whose hidden states are pooled (the base under a DeltaModel)."""
        return getattr(self.backbone, "base", self.backbone)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **_: Any) -> ModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = encoder_states(self.encoder, input_ids, attention_mask)
        logits = self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))
        loss, metrics = None, {}
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            if metrics_enabled():
                metrics["accuracy"] = accuracy(logits, labels)
        return ModelOutput(logits=logits, loss=loss, metrics=metrics)


class PromptClassifier(nn.Module):
    """A prompt model (template + verbalizer + masked LM) as a trainable task model over
    examples: forward(examples, labels=None) -> the prompt model's ModelOutput (class scores,
    cross-entropy, accuracy). ``deltas``: a DeltaModel over the same base (its parameters)."""

    def __init__(self, prompt_model: nn.Module, deltas: nn.Module | None = None):
        super().__init__()
        self.prompt = prompt_model
        self.deltas = deltas

    def forward(self, examples: list, labels: Tensor | None = None, **_: Any) -> ModelOutput:
        batch = self.prompt.collate(examples, labels=False)
        return self.prompt(**batch, labels=labels)
