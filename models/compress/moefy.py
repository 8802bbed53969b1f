"""MoEfication: a dense FFN's neurons carved into experts, of which each token runs only k.

Zhang et al. 2022 ("MoEfication: Transformer Feed-forward Layers are Mixtures of Experts")
observe that few FFN neurons fire per token. For ``FFN(x) = W2 act(W1 x + b1) + b2`` with
d_ff neurons, the neurons (rows of W1, columns of W2) are split into E experts of d_ff / E each
by *balanced* k-means over the rows of W1 (the paper's parameter-clustering split); W1, b1 and
W2 are permuted so expert e holds one contiguous block. Then ``FFN(x) = b2 + sum_e W2_e act(W1_e
x + b1_e)`` exactly, and dropping all but k experts per token costs k / E of the FFN's compute.

Which k: a router is trained on captured hidden states to predict, per token, the experts whose
neurons' summed positive activation ``sum_{i in e} max(0, act(W1 x + b1)_i)`` is largest (the
paper's ground-truth selection; its "MLP selection" learns to predict it). ``MoefiedFFN`` runs
the chosen experts only (an index gather per expert, no dense product times a mask) and sums
their outputs unweighted, so with k = E it is the original FFN. Works on our ``FeedForward``
(``up``/``down``) and on a BERT-style ``intermediate`` + ``output.dense`` pair (the MiniLM):
there the ``intermediate`` becomes an identity and ``output.dense`` the MoEfied FFN.
docs/compression.md, "MoEfication".
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.delta.base import match_modules
from bmray.models.layers.moe import FeedForward
from bmray.models.typed_config import ConfigError, check_choice, check_int

__all__ = ["MoefyConfig", "MoefiedFFN", "MoefyResult", "BertStyleIntermediate", "balanced_kmeans",
           "moefy", "moefied_modules", "dense_experts", "capture_inputs", "expert_labels",
           "expert_recall", "train_router", "train_routers"]

ROUTERS = ("mlp", "linear")


@dataclass(frozen=True)
class MoefyConfig:
    """``num_experts`` E (must divide each target's d_ff), ``top_k`` experts run per token,
    ``router`` "mlp" (two layers, tanh) or "linear", ``targets``: FFN module name patterns (our
    ``FeedForward`` or a BERT-style ``intermediate``), ``kmeans_iters`` and ``seed`` of the split."""

    num_experts: int = 8
    top_k: int = 2
    router: str = "mlp"
    router_hidden: int = 128
    targets: tuple[str, ...] = ("re:.*(ffn|intermediate)",)
    kmeans_iters: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        p = "moefy"
        check_int(f"{p}.num_experts", self.num_experts, minimum=1)
        check_int(f"{p}.top_k", self.top_k, minimum=1, maximum=self.num_experts)
        check_choice(f"{p}.router", self.router, ROUTERS)
        check_int(f"{p}.router_hidden", self.router_hidden, minimum=1)
        check_int(f"{p}.kmeans_iters", self.kmeans_iters, minimum=0)
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"{p}.targets: expected a non-empty list of patterns, "
                              f"got {self.targets!r}")


@runtime_checkable
class BertStyleIntermediate(Protocol):
    """``transformers``' BertIntermediate (and its kin): ``dense`` then ``intermediate_act_fn``;
    its sibling ``output`` holds the second linear ``output.dense``."""

    dense: nn.Linear
    intermediate_act_fn: Callable[[Tensor], Tensor]


def balanced_kmeans(points: Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> Tensor:
    """Cluster id [n] of each row of ``points`` [n, d], every cluster exactly n / k rows.

    Lloyd's k-means with the assignment step constrained to equal sizes (balanced k-means,
    Malinen & Fränti 2014, which MoEfication uses). The constrained assignment is solved greedily:
    all (point, centroid) pairs in increasing distance, each point taking the nearest centroid
    that still has room — a capacity-respecting approximation of their Hungarian assignment."""
    n = points.size(0)
    if n % num_clusters:
        raise ValueError(f"{num_clusters} clusters do not divide {n} points")
    cap = n // num_clusters
    x = points.detach().double().cpu()
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:num_clusters]].clone()
    assign = torch.arange(n) // cap                      # k = 1 or iters = 0: a valid split
    for _ in range(max(iters, 1) if num_clusters > 1 else 0):
        dist = torch.cdist(x, centroids).numpy()         # [n, k]
        new = _greedy_capacity_assignment(dist, cap)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(num_clusters):
            centroids[c] = x[assign == c].mean(dim=0)
    return assign


def _greedy_capacity_assignment(dist: np.ndarray, cap: int) -> Tensor:
    n, k = dist.shape
    order = np.argsort(dist, axis=None, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, cap, dtype=np.int64)
    left = n
    for flat in order.tolist():
        i, c = divmod(flat, k)
        if assign[i] < 0 and room[c] > 0:
            assign[i] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(assign)


class MoefiedFFN(nn.Module):
    """``b2 + sum_{e in top-k(router(x))} W2_e act(W1_e x + b1_e)``, experts run by gather.

    Parameters per expert, contiguous: ``up_weight`` [E, m, d_in], ``up_bias`` [E, m],
    ``down_weight`` [E, m, d_out] (W2's columns, transposed), ``down_bias`` [d_out]; ``perm`` [d_ff]
    is the original neuron order (expert e holds neurons ``perm[e*m:(e+1)*m]``). ``dense = True``
    (or :func:`dense_experts`) runs every expert, i.e. the original FFN.
    """

    def __init__(self, up: nn.Linear, down: nn.Linear, act: Callable[[Tensor], Tensor],
                 perm: Tensor, num_experts: int, top_k: int, router: str = "mlp",
                 router_hidden: int = 128):
        super().__init__()
        d_ff, d_in, d_out = up.out_features, up.in_features, down.out_features
        if down.in_features != d_ff:
            raise ValueError(f"down has {down.in_features} inputs, up has {d_ff} outputs")
        if d_ff % num_experts:
            raise ValueError(f"num_experts {num_experts} does not divide d_ff {d_ff}")
        if sorted(perm.tolist()) != list(range(d_ff)):
            raise ValueError("perm must be a permutation of range(d_ff)")
        m = d_ff // num_experts
        self.num_experts, self.top_k, self.expert_size = num_experts, top_k, m
        self.act = act
        self.register_buffer("perm", perm.clone().long())
        w1 = up.weight.detach()[perm]
        b1 = up.bias.detach()[perm] if up.bias is not None else torch.zeros(d_ff, dtype=w1.dtype)
        w2 = down.weight.detach()[:, perm]
        self.up_weight = nn.Parameter(w1.reshape(num_experts, m, d_in).clone())
        self.up_bias = nn.Parameter(b1.reshape(num_experts, m).clone())
        self.down_weight = nn.Parameter(w2.t().reshape(num_experts, m, d_out).clone())
        self.down_bias = nn.Parameter(down.bias.detach().clone() if down.bias is not None
                                      else torch.zeros(d_out, dtype=w2.dtype))
        if router == "linear":
            self.router = nn.Linear(d_in, num_experts)
        else:
            self.router = nn.Sequential(nn.Linear(d_in, router_hidden), nn.Tanh(),
                                        nn.Linear(router_hidden, num_experts))
        self.router.to(device=w1.device, dtype=w1.dtype)
        self.dense = False

    @property
    def compute_fraction(self) -> float:
        """Share of the FFN's multiply-adds a token uses: k / E (the router's are not counted)."""
        return 1.0 if self.dense else self.top_k / self.num_experts

    def expert_scores(self, x: Tensor) -> Tensor:
        """[N, E]: each expert's summed positive activation on tokens x [N, d_in] (dense; labels)."""
        h = self.act(torch.einsum("nd,emd->nem", x, self.up_weight) + self.up_bias)
        return h.clamp(min=0).sum(dim=-1)

    def select(self, x: Tensor) -> Tensor:
        """[N, k] expert ids the router picks for tokens x [N, d_in]."""
        return self.router(x).topk(self.top_k, dim=-1).indices

    def forward(self, x: Tensor, experts: Tensor | None = None) -> Tensor:
        """``experts`` [N, k] overrides the router's choice (N = tokens of x flattened)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        if experts is None:
            experts = (torch.arange(self.num_experts, device=x.device).expand(tokens.size(0), -1)
                       if self.dense else self.select(tokens))
        out = self.down_bias.expand(tokens.size(0), -1).clone()
        for e in range(self.num_experts):
            token_idx = (experts == e).any(dim=-1).nonzero(as_tuple=True)[0]
            if token_idx.numel() == 0:
                continue
            h = self.act(F.linear(tokens[token_idx], self.up_weight[e], self.up_bias[e]))
            out.index_add_(0, token_idx, h @ self.down_weight[e])
        return out.view(*shape[:-1], out.size(-1))


@dataclass
class MoefyResult:
    """What :func:`moefy` did: the MoEfied modules by their name in the model (a BERT pair's is
    ``….output.dense``) and the FFN compute used."""

    sites: dict[str, MoefiedFFN] = field(default_factory=dict)

    @property
    def compute_fraction(self) -> float:
        return float(np.mean([m.compute_fraction for m in self.sites.values()])) if self.sites else 1.0


def _ffn_parts(model: nn.Module, name: str, module: nn.Module
               ) -> tuple[nn.Linear, nn.Linear, Callable[[Tensor], Tensor]]:
    if isinstance(module, FeedForward):
        return module.up, module.down, nn.GELU()
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    down = getattr(getattr(parent, "output", None), "dense", None)
    if not isinstance(down, nn.Linear):
        raise ConfigError(f"moefy.targets: {name} has no sibling output.dense linear to pair with")
    return module.dense, down, module.intermediate_act_fn


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def moefy(model: nn.Module, config: MoefyConfig) -> MoefyResult:
    """Replace every targeted FFN of ``model`` (in place) by a :class:`MoefiedFFN` with an
    untrained router; then call :func:`train_router`. Every site is checked (d_ff divisible by E)
    before any clustering."""
    names = match_modules(model, config.targets, (FeedForward, BertStyleIntermediate))
    parts = {n: _ffn_parts(model, n, model.get_submodule(n)) for n in names}
    for n, (up, _, _) in parts.items():
        if up.out_features % config.num_experts:
            raise ConfigError(f"moefy.num_experts: {config.num_experts} does not divide d_ff "
                              f"{up.out_features} of layer {n}")
    result = MoefyResult()
    for n, (up, down, act) in parts.items():
        assign = balanced_kmeans(up.weight, config.num_experts, config.kmeans_iters, config.seed)
        perm = torch.argsort(assign, stable=True).to(up.weight.device)
        ffn = MoefiedFFN(up, down, act, perm, config.num_experts, config.top_k, config.router,
                         config.router_hidden)
        site = n
        if not isinstance(model.get_submodule(n), FeedForward):
            # BERT: intermediate -> identity, output.dense -> the MoEfied FFN
            _set_module(model, n, nn.Identity())
            parent = n.rpartition(".")[0]
            site = f"{parent}.output.dense" if parent else "output.dense"
        _set_module(model, site, ffn)
        result.sites[site] = ffn
    return result


def moefied_modules(model: nn.Module) -> dict[str, MoefiedFFN]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoefiedFFN)}


@contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """Run every MoEfied FFN of ``model`` with all experts (the original model) inside."""
    mods = list(moefied_modules(model).values())
    old = [m.dense for m in mods]
    for m in mods:
        m.dense = True
    try:
        yield
    finally:
        for m, d in zip(mods, old):
            m.dense = d


def capture_inputs(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
    """Each MoEfied FFN's input tokens [N, d_in] over ``batches`` (a mapping is passed as keyword
    arguments, anything else positionally), captured with all experts on, i.e. the hidden states
    of the original model. Padding is left out: where a mapping has an ``attention_mask`` of
    the FFN input's [batch, length], only its real tokens are kept."""
    mods = moefied_modules(model)
    seen: dict[str, list[Tensor]] = {n: [] for n in mods}
    mask: list[Tensor | None] = [None]

    def keep(name: str, x: Tensor) -> None:
        m = mask[0]
        if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
            seen[name].append(x.detach()[m.to(x.device).bool()])
        else:
            seen[name].append(x.detach().reshape(-1, x.size(-1)))

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(n, args[0]))
               for n, m in mods.items()]
    try:
        with torch.no_grad(), dense_experts(model):
            for batch in batches:
                if isinstance(batch, Mapping):
                    mask[0] = batch.get("attention_mask")
                    model(**batch)
                else:
                    mask[0] = None
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


def expert_labels(ffn: MoefiedFFN, x: Tensor) -> Tensor:
    """Multi-hot [N, E] of the k experts with the largest summed positive activation."""
    with torch.no_grad():
        top = ffn.expert_scores(x).topk(ffn.top_k, dim=-1).indices
    return torch.zeros(x.size(0), ffn.num_experts, dtype=x.dtype, device=x.device).scatter_(1, top, 1.0)


def expert_recall(ffn: MoefiedFFN, x: Tensor) -> float:
    """Fraction of the true top-k experts (by :func:`expert_labels`) the router picks; chance
    is k / E."""
    with torch.no_grad():
        labels = expert_labels(ffn, x)
        hit = labels.gather(1, ffn.select(x)).sum()
    return (hit / labels.sum()).item()


def train_router(ffn: MoefiedFFN, x: Tensor, steps: int = 300, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0) -> list[float]:
    """Fit ``ffn.router`` to :func:`expert_labels` on tokens x [N, d_in] by multi-label BCE with
    Adam (the FFN's own weights untouched); returns the loss per step."""
    if x.dim() != 2 or x.size(1) != ffn.up_weight.size(-1):
        raise ValueError(f"x must be [N, {ffn.up_weight.size(-1)}], got {tuple(x.shape)}")
    if steps < 1 or x.size(0) == 0:
        raise ValueError(f"train_router needs steps >= 1 and tokens, got {steps} steps, "
                         f"{x.size(0)} tokens")
    labels = expert_labels(ffn, x)
    opt = torch.optim.Adam(ffn.router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.size(0), (min(batch_size, x.size(0)),), generator=g).to(x.device)
        loss = F.binary_cross_entropy_with_logits(ffn.router(x[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_routers(model: nn.Module, batches: Iterable[Any], steps: int = 300, lr: float = 1e-3,
                  batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Capture every MoEfied FFN's inputs over ``batches`` and train its router
    (:func:`train_router`); returns each site's expert recall on those tokens."""
    inputs = capture_inputs(model, batches)
    mods = moefied_modules(model)
    if not inputs:
        raise ValueError("train_routers: the batches reached no MoEfied FFN (empty calibration data?)")
    recall = {}
    for n, x in inputs.items():
        train_router(mods[n], x, steps, lr, batch_size, seed)
        recall[n] = expert_recall(mods[n], x)
    return recall
