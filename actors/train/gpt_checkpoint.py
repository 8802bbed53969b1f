"""Find and load a pre-trained GPT for generation: the checkpoint and the tokenizer it was trained with.

``bmray generate`` and the Serve app's generation deployment both start from a pre-training
experiment; what they must refuse is the same (no checkpoint, a family that does not generate
left to right, no tokenizer, a tokenizer larger than the model's vocabulary, i.e. another
model's). Each error says which of the two files is wrong (``part``), so a caller can name its
own config key.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.adapt import load_base_checkpoint
from bmray.actors.train.experiment import ExperimentConfig
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.tokenizer import Tokenizer
from bmray.models.typed_config import from_dict


class GPTCheckpointError(ValueError):
    """``part`` is "checkpoint" or "tokenizer": which of the two cannot generate."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(part, message)
        self.part, self.message = part, message

    def __str__(self) -> str:
        return self.message


def locate_gpt(exp: ExperimentConfig, checkpoint: str | None = None) -> tuple[str, str]:
    """(checkpoint directory, tokenizer directory), absolute, both checked: ``checkpoint`` (a
    directory or a root whose latest step is taken) or else the experiment's ``checkpoint.dir``."""
    root = checkpoint or exp.checkpoint.dir
    if not root:
        raise GPTCheckpointError("checkpoint", "the experiment sets no checkpoint.dir; name a "
                                               "checkpoint")
    try:
        path = ckpt.resolve_checkpoint(root)
        manifest = ckpt.read_manifest(path)
    except (ckpt.CheckpointError, OSError) as exc:
        raise GPTCheckpointError("checkpoint", f"no checkpoint at {root!r}: {exc}") from exc
    saved = manifest.get("model_config")
    family = saved.get("family") if isinstance(saved, dict) else None
    if family != "gpt":
        raise GPTCheckpointError("checkpoint", f"{path!r} is not a GPT pre-training checkpoint "
                                               f"(family {family!r}); generation needs a "
                                               f"left-to-right model (family 'gpt')")
    tok_dir = exp.data.tokenizer_path
    try:
        tok = Tokenizer.load(tok_dir)
    except (FileNotFoundError, OSError) as exc:
        raise GPTCheckpointError("tokenizer", f"no tokenizer at {tok_dir!r} (the experiment's "
                                              f"data.tokenizer_dir / data.pack_dir): {exc}") from exc
    if tok.vocab_size > int(saved.get("vocab_size", 0)):
        raise GPTCheckpointError("tokenizer", f"the tokenizer at {tok_dir!r} has {tok.vocab_size} "
                                              f"tokens, the checkpoint's model "
                                              f"{saved.get('vocab_size')}: another model's")
    return str(Path(path).resolve()), str(Path(tok_dir).resolve())


def load_gpt(checkpoint: str, tokenizer: str) -> tuple[torch.nn.Module, Tokenizer]:
    """The checkpoint's GPT (eval mode, weights and architecture checked) and its tokenizer."""
    manifest = ckpt.read_manifest(checkpoint)
    mc = from_dict(ModelConfig, manifest["model_config"], "checkpoint.model_config")
    model = build_model(mc)
    load_base_checkpoint(model, mc, checkpoint)
    return model.eval(), Tokenizer.load(tokenizer)
