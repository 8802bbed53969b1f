"""What every model family's ``forward`` returns.

One output type for all families, so the training loop, evaluation and generation read
``out.loss`` / ``out.logits`` / ``out.past_key_values`` without knowing which family they drive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class ModelOutput:
    """Result of a forward pass.

    logits: GPT/T5: next-token logits [B, T, V]; BERT: masked-LM logits [B, T, V];
        ELECTRA: replaced-token-detection logits of the discriminator [B, T].
    loss: the total loss ``backward()`` is called on (task losses + weighted MoE aux loss);
        None when no labels were given.
    aux_loss: MoE load-balancing loss, already multiplied by ``moe.aux_loss_weight`` and
        included in ``loss``; None for a dense model.
    past_key_values: KV cache, a list (one per decoder layer) of ``(k, v)`` shaped
        [B, n_heads, T_past, d_head]; None unless ``use_cache=True``.
    metrics: detached 0-d tensors (or floats) for logging (``{"lm_loss": ..., "nsp_acc": ...}``),
        left on the device: the loop reads them all in the step's one host transfer.
    """

    logits: Tensor | None
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    past_key_values: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
