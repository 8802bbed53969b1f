"""Absolute positional encodings: fixed sinusoids or learned embeddings.

Vaswani et al. 2017, sec. 3.5: ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``,
``PE(pos, 2i+1) = cos(pos / 10000^(2i/d))``; they report learned embeddings (as GPT and BERT
use) perform nearly identically. Both take explicit position ids so a decoder with a KV cache can
continue from the cache length.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """[n_positions, d_model] table of Vaswani et al. 2017, sec. 3.5 (odd d: last cos dropped)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids; no parameters (the table is a non-persistent buffer, rebuilt on load)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        _check_range(positions, self.max_len)
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position (GPT, Radford et al. 2018; BERT, Devlin et al. 2019)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        _check_range(positions, self.max_len)
        return self.weight[positions]


def _check_range(positions: Tensor, max_len: int) -> None:
    if positions.numel() and int(positions.max()) >= max_len:
        raise ValueError(f"position {int(positions.max())} is beyond max_seq_len={max_len}; "
                         f"raise model.max_seq_len or use shorter sequences")


def build_positional(kind: str, max_len: int, d_model: int) -> nn.Module:
    """``kind`` is ModelConfig.pos_encoding: "learned" | "sinusoidal"."""
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(max_len, d_model)
    if kind == "learned":
        return LearnedPositionalEmbedding(max_len, d_model)
    raise ValueError(f"unknown positional encoding {kind!r}")
