"""Typed configuration of the transformer families (GPT, BERT, ELECTRA, T5).

One dataclass says what to build; `models.families.registry.build_model` turns it into an
``nn.Module`` and `models.objectives.objective_for` picks how packed token blocks become a batch
for it. Every value is checked in ``__post_init__`` and a bad one raises ``ConfigError`` naming
the key path (``model.n_heads``), so a typo in a YAML file fails at load time, not after an hour
of training. The families, layers and objectives: docs/models.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from bmray.models.typed_config import (ConfigError, check_choice, check_int, check_positive,
                                       from_dict)

FAMILIES = ("gpt", "bert", "electra", "t5")
POS_ENCODINGS = ("learned", "sinusoidal")
ELECTRA_SAMPLING = ("gumbel", "multinomial")


def _check_unit_interval(path: str, value: float) -> None:
    """0 <= value < 1 (dropout, label smoothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{path}: must be a number in [0, 1), got {value!r}")


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (Shazeer et al. 2017; GShard, Lepikhin et al. 2020;
    Switch Transformer, Fedus et al. 2021).

    ``top_k=1`` is Switch routing, ``top_k=2`` GShard routing. Every ``every``-th block (blocks
    ``every-1, 2*every-1, ...``) gets an MoE feed-forward; the others keep the dense one (Switch and
    GShard replace every other FFN). ``capacity_factor`` scales each expert's buffer:
    ``capacity = ceil(capacity_factor * top_k * tokens / num_experts)``; tokens routed beyond it are
    dropped (they pass through the residual only). ``aux_loss_weight`` is alpha of the
    load-balancing loss (Fedus et al. 2021 use 1e-2).
    """

    num_experts: int = 4
    top_k: int = 1
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    every: int = 2

    def __post_init__(self) -> None:
        p = "model.moe"
        check_choice(f"{p}.top_k", self.top_k, (1, 2))
        check_int(f"{p}.num_experts", self.num_experts, minimum=1)
        if self.num_experts < self.top_k:
            raise ConfigError(f"{p}.num_experts: must be >= top_k ({self.top_k}), got {self.num_experts}")
        check_positive(f"{p}.capacity_factor", self.capacity_factor)
        check_positive(f"{p}.aux_loss_weight", self.aux_loss_weight, allow_zero=True)
        check_int(f"{p}.every", self.every, minimum=1)


@dataclass
class ModelConfig:
    """What model to build (the fields: docs/models.md, "Configuration" and "Families")."""

    family: str                                  # "gpt" | "bert" | "electra" | "t5"
    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    n_decoder_layers: int | None = None          # t5: defaults to n_layers
    max_seq_len: int = 256
    dropout: float = 0.1
    pos_encoding: str = "learned"                # "learned" | "sinusoidal"
    tie_embeddings: bool = True
    label_smoothing: float = 0.0
    moe: MoEConfig | None = None
    electra_generator_scale: float = 0.25        # electra: generator hidden size / d_model
    electra_sampling: str = "gumbel"             # electra: "gumbel" (Gumbel-max) | "multinomial"
    electra_disc_weight: float = 50.0            # electra: lambda of Clark et al. 2020, eq. 1
    # special token ids (set from the tokenizer by the job)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    mask_id: int = 4
    cls_id: int = 5
    sep_id: int = 6
    sentinel_ids: list[int] = field(default_factory=list)   # t5 span-corruption sentinels

    def __post_init__(self) -> None:
        p = "model"
        check_choice(f"{p}.family", self.family, FAMILIES)
        check_choice(f"{p}.pos_encoding", self.pos_encoding, POS_ENCODINGS)
        check_choice(f"{p}.electra_sampling", self.electra_sampling, ELECTRA_SAMPLING)
        for key in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len"):
            check_int(f"{p}.{key}", getattr(self, key), minimum=1)
        if self.n_decoder_layers is not None:
            check_int(f"{p}.n_decoder_layers", self.n_decoder_layers, minimum=1)
        if self.d_model % self.n_heads:
            raise ConfigError(f"{p}.n_heads: {self.n_heads} does not divide model.d_model "
                              f"({self.d_model})")
        _check_unit_interval(f"{p}.dropout", self.dropout)
        _check_unit_interval(f"{p}.label_smoothing", self.label_smoothing)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"{p}.tie_embeddings: expected true or false, got {self.tie_embeddings!r}")
        if isinstance(self.moe, dict):          # built from a plain mapping in code, not via from_dict
            self.moe = from_dict(MoEConfig, self.moe, f"{p}.moe")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"{p}.moe: expected a mapping or MoEConfig, got {self.moe!r}")
        specials = ("pad_id", "bos_id", "eos_id", "unk_id", "mask_id", "cls_id", "sep_id")
        for key in specials:
            check_int(f"{p}.{key}", getattr(self, key), minimum=0)
            if getattr(self, key) >= self.vocab_size:
                raise ConfigError(f"{p}.{key}: {getattr(self, key)} is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")
        for i, sid in enumerate(self.sentinel_ids):
            check_int(f"{p}.sentinel_ids[{i}]", sid, minimum=0)
            if sid >= self.vocab_size:
                raise ConfigError(f"{p}.sentinel_ids[{i}]: {sid} is outside the vocabulary "
                                  f"(vocab_size={self.vocab_size})")
        check_positive(f"{p}.electra_disc_weight", self.electra_disc_weight)
        check_positive(f"{p}.electra_generator_scale", self.electra_generator_scale)
        if self.family == "electra":
            d_gen, h_gen = self.electra_generator_dims()[:2]
            if d_gen < 1 or d_gen % h_gen:
                raise ConfigError(f"{p}.electra_generator_scale: {self.electra_generator_scale} gives a "
                                  f"generator width {d_gen} not divisible by its {h_gen} heads")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    def special_ids(self) -> list[int]:
        """Ids that are never masked or drawn as random replacements."""
        return sorted({self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id,
                       self.cls_id, self.sep_id, *self.sentinel_ids})

    def electra_generator_dims(self) -> tuple[int, int, int]:
        """(d_model, n_heads, d_ff) of the ELECTRA generator: each scaled by
        ``electra_generator_scale`` (Clark et al. 2020, sec. 3.2: a generator 1/4-1/2 the
        discriminator's size works best); same depth as the discriminator."""
        s = self.electra_generator_scale
        n_heads = max(1, round(self.n_heads * s))
        return int(self.d_model * s), n_heads, max(1, int(math.ceil(self.d_ff * s)))
