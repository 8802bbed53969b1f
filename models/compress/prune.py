"""Unstructured and n:m pruning of ``nn.Linear`` weights, applied from outside by module name.

* ``magnitude`` (Han et al. 2015): prune the smallest ``|W_ij|``, per layer or over every target
  at once (``scope="global"``).
* ``wanda`` (Sun et al. 2023): score ``S_ij = |W_ij| · ‖X_j‖₂`` with ``X_j`` the j-th input feature
  over every calibration token; the lowest scores of each output row i are pruned.
* ``n:m`` / ``2:4`` (Mishra et al. 2021): in each group of m consecutive input weights of a row
  keep the n largest ``|w|`` (2:4 is the pattern sparse tensor cores run).

``compute_masks`` -> ``{name: bool mask}`` (True = keep); ``apply_masks`` registers each as a
parametrization, ``weight = original ⊙ mask``. A gradient hook would not do: AdamW keeps the
running moments of a weight that was live before it was pruned, so the next step moves it off
zero; the parametrization makes the weight the forward sees zero whatever the optimizer does to
``original``, and the mask is a buffer in the state_dict, so a checkpoint keeps the pattern.
Re-applying updates the mask in place (the optimizer keeps its parameters). ``remove_masks``
bakes the zeros in and gives back the plain ``weight`` key. docs/compression.md, "Pruning".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bmray.models.delta.base import match_modules
from bmray.models.typed_config import ConfigError

__all__ = ["PruneConfig", "DEFAULT_SKIP", "WeightMask", "prune_targets", "compute_masks",
           "apply_masks", "remove_masks", "is_masked", "prune", "sparsity_report",
           "run_calibration", "input_norms"]

METHODS = ("magnitude", "wanda", "n:m", "2:4")
SCOPES = ("layer", "global")
# Output layers and poolers stay dense by default (they are small and the most sensitive):
# our families' lm_head / mlm_head / nsp_head, the classifier's head, BERT's pooler.
# A Linear whose weight is tied to an embedding is never a target.
DEFAULT_SKIP = ("*head*", "*pooler*", "*classifier*")


@dataclass(frozen=True)
class PruneConfig:
    """``method``: magnitude | wanda | n:m | 2:4 (= n:m with n=2, m=4); ``sparsity`` in [0, 1)
    (magnitude, wanda; n:m prunes 1 - n/m); ``scope``: layer | global (magnitude only);
    ``n`` kept of every ``m``; ``targets``: module patterns (``match_modules``; None = every
    ``nn.Linear``); ``skip``: patterns left dense (None = :data:`DEFAULT_SKIP`)."""

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    n: int = 2
    m: int = 4
    targets: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune.method: {self.method!r} is not one of {list(METHODS)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"prune.scope: {self.scope!r} is not one of {list(SCOPES)}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"prune.sparsity: must be a number in [0, 1), got {s!r}")
        if self.scope == "global" and self.method != "magnitude":
            raise ConfigError(f"prune.scope: 'global' applies to method magnitude only "
                              f"(method {self.method!r} compares within each layer)")
        for key in ("n", "m"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"prune.{key}: must be an integer >= 1, got {v!r}")
        if self.n >= self.m:
            raise ConfigError(f"prune.n: must be < prune.m ({self.m}), got {self.n}")
        if self.method == "2:4" and (self.n, self.m) != (2, 4):
            raise ConfigError(f"prune.n / prune.m: method '2:4' keeps 2 of 4, got "
                              f"{self.n}:{self.m} (use method 'n:m')")
        for key in ("targets", "skip"):
            if isinstance(getattr(self, key), str):
                raise ConfigError(f"prune.{key}: expected a list of patterns, "
                                  f"got {getattr(self, key)!r}")

    @property
    def is_nm(self) -> bool:
        return self.method in ("n:m", "2:4")


class WeightMask(nn.Module):
    """The parametrization ``W -> W ⊙ mask``; ``mask`` is a (state_dict) buffer."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def _tied_to_embedding(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def prune_targets(model: nn.Module, cfg: PruneConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules ``cfg`` prunes, in ``named_modules`` order. A
    ``targets``/``skip`` pattern that matches nothing, or a target whose weight is tied to an
    embedding, is a ConfigError."""
    if cfg.targets is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    else:
        names = match_modules(model, cfg.targets, (nn.Linear,))
    skipped: set[str] = set()
    for pattern in (DEFAULT_SKIP if cfg.skip is None else cfg.skip):
        try:
            skipped.update(match_modules(model, [pattern], (nn.Linear,)))
        except ConfigError:
            if cfg.skip is not None:        # a user's pattern must select something
                raise
    modules = dict(model.named_modules())
    tied = _tied_to_embedding(model)
    out = []
    for name in names:
        if name in skipped:
            continue
        if id(modules[name].weight) in tied:
            if cfg.targets is not None:
                raise ConfigError(f"prune.targets: {name!r} shares its weight with an "
                                  f"embedding; a tied weight cannot be pruned on its own")
            continue
        out.append(name)
    if not out:
        raise ConfigError("prune.targets: no nn.Linear left to prune after prune.skip")
    return out


# ---------------------------------------------------------------- calibration

def run_calibration(model: nn.Module, batches: Iterable[Any]) -> int:
    """Forward every calibration batch (a dict -> ``model(**batch)``, a tensor ->
    ``model(batch)``) without gradients, in eval mode; returns how many ran."""
    was_training = model.training
    model.eval()
    count = 0
    with torch.no_grad():
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
            count += 1
    model.train(was_training)
    return count


def input_norms(model: nn.Module, names: list[str], batches: Iterable[Any]) -> dict[str, Tensor]:
    """``‖X_j‖₂`` per input feature j of each named Linear over every calibration token
    (all leading dimensions flattened): the activation factor of Wanda's score."""
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].in_features, dtype=torch.float64) for n in names}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].size(-1)).double()
            sums[name] += x.pow(2).sum(dim=0).cpu()
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        count = run_calibration(model, batches)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ConfigError("prune.calibration: method wanda needs calibration data "
                          "(the batches were empty)")
    return {n: s.sqrt().float() for n, s in sums.items()}


# ---------------------------------------------------------------- masks

def _keep_top(scores: Tensor, n_prune: int) -> Tensor:
    """Bool mask over ``scores``' last dim keeping all but the ``n_prune`` lowest (exact count,
    ties broken by position)."""
    keep = scores.size(-1) - n_prune
    mask = torch.zeros_like(scores, dtype=torch.bool)
    idx = scores.topk(keep, dim=-1, largest=True, sorted=False).indices
    return mask.scatter_(-1, idx, True)


def _n_prune(sparsity: float, numel: int) -> int:
    return int(sparsity * numel + 0.5)          # round half up


def _nm_mask(weight: Tensor, n: int, m: int, name: str) -> Tensor:
    out_f, in_f = weight.shape
    if in_f % m:
        raise ConfigError(f"prune.m: {m} does not divide {name}'s in_features ({in_f})")
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    return _keep_top(groups, m - n).reshape(out_f, in_f)


def compute_masks(model: nn.Module, cfg: PruneConfig,
                  calibration: Iterable[Any] | None = None) -> dict[str, Tensor]:
    """``{linear name: bool mask}`` (True = keep) of ``cfg``'s method over the current
    (already masked, if masks are applied) weights. Wanda needs ``calibration`` batches."""
    names = prune_targets(model, cfg)
    modules = dict(model.named_modules())
    if cfg.method == "wanda" and calibration is None:
        raise ConfigError("prune.calibration: method wanda needs calibration data")
    if cfg.is_nm:
        for name in names:                      # every shape checked before any compute
            if modules[name].in_features % cfg.m:
                raise ConfigError(f"prune.m: {cfg.m} does not divide {name}'s in_features "
                                  f"({modules[name].in_features})")
        return {n: _nm_mask(modules[n].weight, cfg.n, cfg.m, n) for n in names}
    weights = {n: modules[n].weight.detach() for n in names}
    if cfg.method == "wanda":
        norms = input_norms(model, names, calibration)
        return {n: _keep_top(w.abs() * norms[n].to(w.device)[None, :],
                             _n_prune(cfg.sparsity, w.size(1))) for n, w in weights.items()}
    if cfg.scope == "layer":
        return {n: _keep_top(w.abs().reshape(-1), _n_prune(cfg.sparsity, w.numel())).view_as(w)
                for n, w in weights.items()}
    flat = torch.cat([w.abs().reshape(-1).float().cpu() for w in weights.values()])
    keep = _keep_top(flat, _n_prune(cfg.sparsity, flat.numel()))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return out


def is_masked(module: nn.Module) -> bool:
    """Whether ``apply_masks`` has put a mask on this module's weight."""
    return _masked(module) is not None


def _masked(module: nn.Module) -> WeightMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, WeightMask)), None)


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero each named Linear's pruned weights and keep them zero while it trains (see the
    module docstring). A module already masked gets its mask replaced in place."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"masks: {name!r} is not an nn.Linear of {type(model).__name__}")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ConfigError(f"masks: {name!r} mask {tuple(mask.shape)} does not match its "
                              f"weight {tuple(module.weight.shape)}")
    for name, mask in masks.items():
        module = modules[name]
        mask = mask.to(device=module.weight.device, dtype=torch.bool)
        existing = _masked(module)
        if existing is not None:
            existing.mask.copy_(mask)
        else:
            parametrize.register_parametrization(module, "weight", WeightMask(mask))


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent: the weights keep their zeros as a plain ``weight``
    parameter (the same Parameter object as ``original``). Returns the names unmasked."""
    done = []
    for name, module in model.named_modules():
        if _masked(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            done.append(name)
    return done


def prune(model: nn.Module, cfg: PruneConfig, calibration: Iterable[Any] | None = None
          ) -> dict[str, Tensor]:
    """``compute_masks`` then ``apply_masks``; returns the masks."""
    masks = compute_masks(model, cfg, calibration)
    apply_masks(model, masks)
    return masks


def sparsity_report(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Zeros / size / sparsity of each Linear weight (as the forward sees it) and in total:
    ``{"layers": {name: {"zeros", "numel", "sparsity"}}, "total": {...}}``."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, nn.Linear)] if names is None \
        else list(names)
    layers, zeros, numel = {}, 0, 0
    for name in names:
        w = modules[name].weight.detach()
        z, k = int((w == 0).sum()), w.numel()
        layers[name] = {"zeros": z, "numel": k, "sparsity": z / k}
        zeros, numel = zeros + z, numel + k
    return {"layers": layers,
            "total": {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1)}}
