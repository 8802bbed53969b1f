"""Structured pruning: score attention heads and FFN neurons, then physically remove them.

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?", sec. 4.1): put a
mask variable ξ_h = 1 on each head's output (a neuron's activation, for the FFN) and accumulate
``I_h = Σ_batches |∂L/∂ξ_h|`` over calibration batches (as their code does, per batch), optionally
ℓ2-normalised within each layer (their sec. 4.2). ``neuron_weight_importance`` is the cheap,
data-free alternative ``‖W_up[i, :]‖₂ · ‖W_down[:, i]‖₂``.

``prune_heads(model, {attention: [heads]})`` / ``prune_ffn(model, {ffn: [neurons]})`` cut the
rows of q/k/v (the FFN's up) and the columns of the output projection (the FFN's down) and put
smaller ``nn.Linear`` modules in their place: the model gets fewer parameters and less compute,
and equals the dense model with those heads' outputs / neurons' activations zeroed. Sites are
named by module: our ``MultiHeadAttention`` (``blocks.0.attn``, ``decoder_blocks.1.cross_attn``)
and ``FeedForward`` (``blocks.0.ffn``), and a Hugging Face BERT's ``BertAttention``
(``encoder.layer.0.attention``: ``self.query/key/value``, ``output.dense``; its head count and
``all_head_size`` are updated) and ``BertLayer`` (``encoder.layer.0``: ``intermediate.dense``,
``output.dense``). Head and neuron indices count the heads the module holds *now*.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from bmray.models.compress.prune import is_masked
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.layers.moe import FeedForward
from bmray.models.typed_config import ConfigError

__all__ = ["HeadSite", "FFNSite", "attention_sites", "ffn_sites", "default_loss", "head_importance",
           "neuron_importance", "neuron_weight_importance", "lowest", "prune_heads",
           "prune_ffn", "kept_sizes", "shrink_to", "count_parameters"]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class HeadSite:
    """An attention module's projections: ``qkv`` and ``out`` as (owner, attribute) pairs."""

    module: nn.Module
    qkv: list[tuple[nn.Module, str]]
    out: tuple[nn.Module, str]
    d_head: int

    @property
    def n_heads(self) -> int:
        owner, attr = self.qkv[0]
        return getattr(owner, attr).out_features // self.d_head


@dataclass
class FFNSite:
    """A feed-forward module's first (``up``) and second (``down``) Linear, as (owner, attr)."""

    module: nn.Module
    up: tuple[nn.Module, str]
    down: tuple[nn.Module, str]

    @property
    def width(self) -> int:
        return getattr(*self.up).out_features


def _is_hf_attention(m: nn.Module) -> bool:
    s = getattr(m, "self", None)
    return all(hasattr(s, a) for a in ("query", "key", "value", "attention_head_size")) and \
        isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)


def _is_hf_ffn(m: nn.Module) -> bool:
    return isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear) and \
        isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)


def attention_sites(model: nn.Module) -> dict[str, HeadSite]:
    """Every attention module whose heads can be removed, by dotted name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            out[name] = HeadSite(m, [(m, "q_proj"), (m, "k_proj"), (m, "v_proj")],
                                 (m, "out_proj"), m.d_head)
        elif _is_hf_attention(m):
            s = m.self
            out[name] = HeadSite(m, [(s, "query"), (s, "key"), (s, "value")],
                                 (m.output, "dense"), s.attention_head_size)
    return out


def ffn_sites(model: nn.Module) -> dict[str, FFNSite]:
    """Every dense feed-forward whose neurons can be removed, by dotted name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FeedForward):
            out[name] = FFNSite(m, (m, "up"), (m, "down"))
        elif _is_hf_ffn(m):
            out[name] = FFNSite(m, (m.intermediate, "dense"), (m.output, "dense"))
    return out


# ---------------------------------------------------------------- importance

def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` (a dict batch) or ``model(batch).loss``."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.loss


def _mask_gradients(model: nn.Module, linears: dict[str, nn.Linear], sizes: dict[str, int],
                    repeat: dict[str, int], batches: Iterable[Any], loss_fn: LossFn
                    ) -> dict[str, Tensor]:
    """Σ over batches of |∂L/∂ξ| for a mask ξ (ones, ``sizes[name]`` long, each entry repeated
    ``repeat[name]`` times) multiplying the input of each named Linear."""
    masks = {n: torch.ones(sizes[n], requires_grad=True, device=lin.weight.device)
             for n, lin in linears.items()}
    total = {n: torch.zeros(sizes[n], dtype=torch.float64) for n in linears}
    handles = []
    for name, lin in linears.items():
        def hook(mod, args, name=name):
            xi = masks[name].repeat_interleave(repeat[name]).to(args[0].dtype)
            return (args[0] * xi,) + tuple(args[1:])
        handles.append(lin.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()                                  # no dropout: one deterministic score
    count = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
            for n, g in zip(masks, grads):
                if g is not None:
                    total[n] += g.detach().abs().double().cpu()
            count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ConfigError("calibration: importance needs calibration data (the batches were empty)")
    return {n: t.float() for n, t in total.items()}


def _normalise(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: s / s.norm().clamp_min(1e-20) for n, s in scores.items()}


def head_importance(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = default_loss,
                    normalize: bool = True) -> dict[str, Tensor]:
    """``{attention name: [n_heads] importance}`` (Michel et al. 2019)."""
    sites = attention_sites(model)
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no attention module prune_heads knows")
    scores = _mask_gradients(model, {n: getattr(*s.out) for n, s in sites.items()},
                             {n: s.n_heads for n, s in sites.items()},
                             {n: s.d_head for n, s in sites.items()}, batches, loss_fn)
    return _normalise(scores) if normalize else scores


def neuron_importance(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = default_loss,
                      normalize: bool = True) -> dict[str, Tensor]:
    """``{ffn name: [d_ff] importance}``: Michel et al.'s criterion with a mask per neuron."""
    sites = ffn_sites(model)
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no feed-forward module prune_ffn knows")
    scores = _mask_gradients(model, {n: getattr(*s.down) for n, s in sites.items()},
                             {n: s.width for n, s in sites.items()},
                             {n: 1 for n in sites}, batches, loss_fn)
    return _normalise(scores) if normalize else scores


def neuron_weight_importance(model: nn.Module) -> dict[str, Tensor]:
    """``‖W_up[i, :]‖₂ · ‖W_down[:, i]‖₂`` per neuron i: no data needed."""
    return {n: (getattr(*s.up).weight.detach().norm(dim=1)
                * getattr(*s.down).weight.detach().norm(dim=0)).float().cpu()
            for n, s in ffn_sites(model).items()}


def lowest(importance: dict[str, Tensor], fraction: float, per_layer: bool = False,
           keep_at_least: int = 1) -> dict[str, list[int]]:
    """The ``fraction`` of units with the lowest importance, over all sites at once (Michel et
    al. prune globally) or within each site; every site keeps ``keep_at_least`` units."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"fraction: must be in [0, 1), got {fraction!r}")
    if per_layer:
        out = {}
        for n, s in importance.items():
            k = min(int(fraction * s.numel() + 0.5), s.numel() - keep_at_least)
            out[n] = sorted(s.argsort()[:max(k, 0)].tolist())
        return out
    entries = sorted((float(v), n, i) for n, s in importance.items() for i, v in enumerate(s))
    budget = int(fraction * len(entries) + 0.5)
    left = {n: s.numel() for n, s in importance.items()}
    out = {n: [] for n in importance}
    for _, n, i in entries:
        if budget == 0:
            break
        if left[n] > keep_at_least:
            out[n].append(i)
            left[n] -= 1
            budget -= 1
    return {n: sorted(v) for n, v in out.items()}


# ---------------------------------------------------------------- physical removal

def _sliced(lin: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` of the weight's ``dim`` (0: outputs, 1: inputs)."""
    index = index.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, index)
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach()[index])
    new.weight.requires_grad_(lin.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def _check_units(kind: str, name: str, units: Iterable[int], total: int) -> list[int]:
    units = list(units)
    bad = [u for u in units if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < total]
    if bad:
        raise ConfigError(f"{kind}.{name}: {bad} out of range; it has {total}")
    if len(set(units)) != len(units):
        raise ConfigError(f"{kind}.{name}: repeated indices in {units}")
    if len(units) >= total:
        raise ConfigError(f"{kind}.{name}: cannot remove all {total}; keep at least one")
    return sorted(units)


def _check_sites(kind: str, wanted: dict[str, Any], sites: dict[str, Any], model: nn.Module
                 ) -> None:
    unknown = [n for n in wanted if n not in sites]
    if unknown:
        raise ConfigError(f"{kind}: {unknown} not in {type(model).__name__}; candidates: "
                          f"{', '.join(list(sites)[:40])}")


def _check_unmasked(kind: str, name: str, linears: list[nn.Linear]) -> None:
    if any(is_masked(lin) for lin in linears):
        raise ConfigError(f"{kind}.{name}: its weights carry pruning masks; remove_masks first")


def prune_heads(model: nn.Module, heads: dict[str, Iterable[int]]) -> None:
    """Remove the given heads of each named attention module (see the module docstring)."""
    sites = attention_sites(model)
    _check_sites("heads", heads, sites, model)
    plan = {}
    for name, hs in heads.items():
        site = sites[name]
        plan[name] = _check_units("heads", name, hs, site.n_heads)
        _check_unmasked("heads", name, [getattr(*p) for p in site.qkv + [site.out]])
    for name, removed in plan.items():
        site = sites[name]
        if not removed:
            continue
        kept = [h for h in range(site.n_heads) if h not in removed]
        d = site.d_head
        index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
        for owner, attr in site.qkv:
            setattr(owner, attr, _sliced(getattr(owner, attr), index, 0))
        setattr(site.out[0], site.out[1], _sliced(getattr(*site.out), index, 1))
        inner = site.qkv[0][0]
        if hasattr(inner, "num_attention_heads"):          # Hugging Face: its own counts
            inner.num_attention_heads = len(kept)
            inner.all_head_size = len(kept) * d


def prune_ffn(model: nn.Module, neurons: dict[str, Iterable[int]]) -> None:
    """Remove the given neurons of each named feed-forward module."""
    sites = ffn_sites(model)
    _check_sites("neurons", neurons, sites, model)
    plan = {}
    for name, ns in neurons.items():
        site = sites[name]
        plan[name] = _check_units("neurons", name, ns, site.width)
        _check_unmasked("neurons", name, [getattr(*site.up), getattr(*site.down)])
    for name, removed in plan.items():
        site = sites[name]
        if not removed:
            continue
        gone = set(removed)
        index = torch.tensor([i for i in range(site.width) if i not in gone], dtype=torch.long)
        setattr(site.up[0], site.up[1], _sliced(getattr(*site.up), index, 0))
        setattr(site.down[0], site.down[1], _sliced(getattr(*site.down), index, 1))


def kept_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{"heads": {attention: n_heads}, "ffn": {ffn: width}}``: what a manifest records so a
    loader can rebuild the pruned shapes (:func:`shrink_to`) before loading the weights."""
    return {"heads": {n: s.n_heads for n, s in attention_sites(model).items()},
            "ffn": {n: s.width for n, s in ffn_sites(model).items()}}


def shrink_to(model: nn.Module, sizes: dict[str, dict[str, int]]) -> None:
    """Cut a freshly built model to ``kept_sizes`` (trailing heads / neurons go; the weights
    are then overwritten by ``load_state_dict``)."""
    heads, ffn = attention_sites(model), ffn_sites(model)
    _check_sites("heads", sizes.get("heads", {}), heads, model)
    _check_sites("neurons", sizes.get("ffn", {}), ffn, model)
    prune_heads(model, {n: list(range(k, heads[n].n_heads))
                        for n, k in sizes.get("heads", {}).items()})
    prune_ffn(model, {n: list(range(k, ffn[n].width)) for n, k in sizes.get("ffn", {}).items()})


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied weight once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
