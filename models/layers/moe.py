"""Mixture-of-experts feed-forward layer: Switch (top-1) and GShard (top-2) routing.

A router ``W_r`` gives each token ``p(x) = softmax(x W_r)`` over the experts; each token goes to
its ``top_k``: Switch uses the raw router probability as the gate, GShard renormalises the two
gates ``p / (p_1 + p_2)``. Every expert takes at most
``capacity = ceil(capacity_factor * top_k * tokens / num_experts)`` tokens, first choices before
second ones; a token that finds its expert full is dropped for that choice (the residual still
carries it). The load-balancing loss is ``N * sum_i f_i * P_i`` (1 for uniform routing).

Experts are ordinary ``FeedForward`` modules with ``up``/``down`` projections in the
``nn.ModuleList`` ``experts``, so expert or tensor parallelism can shard them from outside; the
dispatch loops over experts with index gathers (exact, fine for a few experts).
Formulas and papers (Shazeer et al. 2017; Lepikhin et al. 2020; Fedus et al. 2021):
docs/models.md, "Layers".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeedForward(nn.Module):
    """Position-wise FFN ``down(GELU(up(x)))`` (Vaswani et al. 2017, eq. 2, with GELU as in GPT/BERT)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


@dataclass
class Routing:
    """Which expert each token's k-th choice goes to, with what gate, and whether it fit.

    expert_index [N, k] long, gate [N, k] float, keep [N, k] bool (False = dropped by capacity).
    """

    expert_index: Tensor
    gate: Tensor
    keep: Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * top_k * tokens / experts)`` (Fedus et al. 2021, eq. 3, times k)."""
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def route(probs: Tensor, top_k: int, capacity: int) -> Routing:
    """Top-k routing with capacity dropping; ``probs`` [N, E] is the router softmax."""
    n, e = probs.shape
    top_p, top_i = probs.topk(top_k, dim=-1)                     # [N, k]
    gate = top_p if top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(top_i, dtype=torch.bool)
    filled = torch.zeros(e, dtype=torch.long, device=probs.device)   # slots taken per expert
    for j in range(top_k):                                       # first choices claim slots first
        onehot = F.one_hot(top_i[:, j], e)                       # [N, E]
        slot = (onehot.cumsum(dim=0) - 1 + filled) * onehot      # slot index in the chosen expert
        keep[:, j] = (slot.sum(dim=-1) < capacity)
        filled = filled + onehot.sum(dim=0)
    return Routing(top_i, gate, keep)


def load_balancing_loss(probs: Tensor, first_choice: Tensor) -> Tensor:
    """``N * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4); probs [N_tokens, N_experts]."""
    num_experts = probs.size(-1)
    f = F.one_hot(first_choice, num_experts).float().mean(dim=0)    # fraction dispatched, no grad
    p = probs.float().mean(dim=0)                                   # mean router probability
    return num_experts * (f * p).sum()


class MoEFeedForward(nn.Module):
    """Drop-in replacement for ``FeedForward`` returning ``(y, load_balancing_loss)``.

    The loss is unweighted; the model multiplies it by ``moe.aux_loss_weight``. The fraction of
    token-choices dropped by capacity in the last call is kept in ``last_drop_fraction`` (a detached
    0-d tensor, for logging without a device sync).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float = 1.25):
        super().__init__()
        if top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2, got {top_k}")
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(num_experts))
        self.last_drop_fraction = torch.zeros(())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        # router in float32: its softmax decides discrete routes (Fedus et al. 2021, sec. 2.4)
        probs = torch.softmax(self.router(tokens).float(), dim=-1)
        capacity = expert_capacity(tokens.size(0), len(self.experts), self.top_k, self.capacity_factor)
        r = route(probs, self.top_k, capacity)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            sel = (r.expert_index == e) & r.keep                  # [N, k]; a token picks e at most once
            token_idx, choice = sel.nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            gate = r.gate[token_idx, choice].to(tokens.dtype)[:, None]
            out.index_add_(0, token_idx, gate * expert(tokens[token_idx]))
        self.last_drop_fraction = (~r.keep).float().mean().detach()
        return out.view(shape), load_balancing_loss(probs, r.expert_index[:, 0])
