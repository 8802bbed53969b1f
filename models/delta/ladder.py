"""Ladder side-tuning (Sung et al. 2022, "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning").

A small *side network* of width ``d_s = d / r`` runs beside the frozen backbone, one side block
per backbone block. Its inputs are the backbone's block outputs, **detached** and
down-projected (the "ladders"), mixed in by a learned gate (sec. 3.1):

    s_0 = W_0 x_emb,    s_i = SideBlock_i( mu_i * W_i h_i + (1 - mu_i) * s_{i-1} ),
    mu_i = sigmoid(alpha_i / T)        (alpha_i = 0 at init, T = 0.1)

and the head reads ``y = h_out + U LN(s_N)`` (``combine="add"``, U zero-initialised, so an
untrained ladder is the bare base) or ``y = U LN(s_N)`` (``combine="replace"``: the paper feeds
the up-projected side output to the head; it initialises the side network from the pruned
backbone, which we do not). ``h_out`` is the output of the module before the head (``ln_f``;
the last layer of a transformers encoder), itself detached.

Why: no tensor of the backbone requires grad, so autograd records none of its operations and
keeps none of its activations; backpropagation runs through the side network only (the paper:
69% of full fine-tuning's memory saved, against 26% for adapters/LoRA). The side blocks are our
pre-LN ``TransformerBlock``s (causal when the backbone's attention is). Rows not routed to the
delta keep the backbone's output. No KV cache: generate with ``use_cache=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from inspect import signature
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bmray.models.delta.base import (Delta, DeltaConfig, SiteDelta, match_modules, site_key,
                                     site_name)
from bmray.models.delta.base import bound_arguments
from bmray.models.layers.attention import MultiHeadAttention
from bmray.models.layers.blocks import TransformerBlock
from bmray.models.typed_config import ConfigError, check_choice, check_int, check_positive

__all__ = ["LadderConfig", "Ladder", "LadderRung", "LadderHead", "COMBINES"]

COMBINES = ("add", "replace")
OUTPUT_NAMES = ("ln_f", "encoder_ln_f")


@dataclass(frozen=True)
class LadderConfig(DeltaConfig):
    """``targets``: the backbone blocks (empty: the model's first ``block_lists`` entry, or
    ``encoder.layer`` of a transformers encoder); ``output``: the module whose output the head
    reads (empty: ``ln_f`` / ``encoder_ln_f`` / the last block)."""

    reduction_factor: int = 8
    side_heads: int = 4
    temperature: float = 0.1
    combine: str = "add"
    output: str = ""
    method: ClassVar[str] = "ladder"

    def __post_init__(self) -> None:
        p = self.method
        check_int(f"{p}.reduction_factor", self.reduction_factor, minimum=1)
        check_int(f"{p}.side_heads", self.side_heads, minimum=1)
        check_positive(f"{p}.temperature", self.temperature)
        check_choice(f"{p}.combine", self.combine, COMBINES)


class LadderRung(SiteDelta):
    """One backbone block's ladder: down-projection ``W_i``, gate ``alpha_i``, side block."""

    def __init__(self, d: int, d_side: int, heads: int, causal: bool):
        super().__init__()
        self.down = nn.Linear(d, d_side)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.block = TransformerBlock(d_side, heads, 4 * d_side, causal=causal)


class LadderHead(nn.Module):
    """The side network's entry ``W_0`` and exit ``U LN(.)``."""

    def __init__(self, d: int, d_side: int, zero_up: bool):
        super().__init__()
        self.down = nn.Linear(d, d_side)
        self.ln = nn.LayerNorm(d_side)
        self.up = nn.Linear(d_side, d)
        if zero_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)


def first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_first(output: Any, h: Tensor) -> Any:
    return (h, *output[1:]) if isinstance(output, tuple) else h


class Ladder(Delta):
    """Ladder side-tuning over the matched backbone blocks."""

    config: LadderConfig

    def __init__(self, config: LadderConfig):
        super().__init__(config)
        self.head: LadderHead | None = None
        self._side: dict[str, Any] = {}

    def _names(self, model: nn.Module) -> tuple[list[str], str]:
        cfg, modules = self.config, dict(model.named_modules())
        if cfg.targets:
            blocks = match_modules(model, cfg.targets)
        else:
            lists = list(getattr(model, "block_lists", ())) + ["encoder.layer"]
            found = next((n for n in lists if isinstance(modules.get(n), nn.ModuleList)), None)
            if found is None:
                raise ConfigError(f"{cfg.method}: {type(model).__name__} has no block list "
                                  f"(block_lists / encoder.layer); name the blocks in targets")
            blocks = [f"{found}.{i}" for i in range(len(modules[found]))]
        output = cfg.output or next((n for n in OUTPUT_NAMES if n in modules), blocks[-1])
        if output not in modules:
            raise ConfigError(f"{cfg.method}.output: {type(model).__name__} has no module "
                              f"{output!r}")
        return blocks, output

    def attach(self, model: nn.Module) -> "Ladder":
        if self.attached:
            raise RuntimeError(f"{self.config.method} delta is already attached; detach first")
        cfg, modules = self.config, dict(model.named_modules())
        blocks, output = self._names(model)
        ref = next(model.parameters())
        if not len(self.sites):
            d = width(modules[blocks[0]])
            d_side = d // cfg.reduction_factor
            if d_side < 1 or d_side % cfg.side_heads:
                raise ConfigError(f"{cfg.method}.side_heads: side width {d} / "
                                  f"{cfg.reduction_factor} = {d_side} is not a positive "
                                  f"multiple of {cfg.side_heads} heads")
            causal = any(getattr(m, "causal", False) for m in modules[blocks[0]].modules()
                         if isinstance(m, MultiHeadAttention))
            for name in blocks:
                self.sites[site_key(name)] = LadderRung(d, d_side, cfg.side_heads, causal)
            self.head = LadderHead(d, d_side, zero_up=cfg.combine == "add")
            self.to(device=ref.device)
        elif [site_name(k) for k in self.sites] != blocks:
            raise ConfigError(f"{cfg.method} delta was built for blocks "
                              f"{[site_name(k) for k in self.sites]}, this model has {blocks}")
        rungs = list(self.sites.values())
        hooks = [model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                 modules[blocks[0]].register_forward_pre_hook(self._enter, with_kwargs=True)]
        for name, rung in zip(blocks, rungs):
            hooks.append(modules[name].register_forward_hook(
                lambda m, a, out, rung=rung: self._climb(rung, out)))
        hooks.append(modules[output].register_forward_hook(lambda m, a, out: self._exit(out)))
        self._handles += hooks
        self._bind(model)
        return self

    # ------------------------------------------------------------------ hooks
    def _root_pre(self, model: nn.Module, args: tuple, kwargs: dict):
        kw = bound_arguments(model, args, kwargs)
        if kw.get("past_key_values") is not None or kw.get("cache") is not None or \
                (kw.get("use_cache") and "past_key_values" in signature(model.forward).parameters):
            raise ValueError("ladder side-tuning has no KV cache; generate with use_cache=False")
        self._side = {"mask": kw.get("attention_mask")}
        return None

    def _enter(self, block: nn.Module, args: tuple, kwargs: dict):
        if not self._active():
            return None
        kw = bound_arguments(block, args, kwargs)
        if kw.get("past_kv") is not None:
            raise ValueError("ladder side-tuning has no KV cache; generate with use_cache=False")
        x = kw.get("x", kw.get("hidden_states"))
        mask = kw["key_padding_mask"] if "key_padding_mask" in kw else self._side.get("mask")
        rows = None if self.rows is None else self.rows.to(x.device)
        if rows is not None:
            x = x[rows]
            mask = mask[rows] if mask is not None else None
        self._side = {"mask": mask, "s": self.head.down(x.detach())}
        return None

    def _climb(self, rung: LadderRung, output: Any):
        if not self._active():
            return None
        h = first(output).detach()
        if self.rows is not None:
            h = h[self.rows.to(h.device)]
        mu = torch.sigmoid(rung.alpha / self.config.temperature)
        s = mu * rung.down(h) + (1 - mu) * self._side["s"]
        self._side["s"] = rung.block(s, key_padding_mask=self._side["mask"])[0]
        return None

    def _exit(self, output: Any):
        if not self._active():
            return None
        if "s" not in self._side:
            raise RuntimeError(f"ladder: the output module ran before the side network saw the "
                               f"blocks {[site_name(k) for k in self.sites]}; check targets/output")
        h = first(output)
        side = self.head.up(self.head.ln(self._side.pop("s")))
        rows = None if self.rows is None else self.rows.to(h.device)
        base = h.detach() if rows is None else h[rows].detach()
        new = base + side if self.config.combine == "add" else side
        return with_first(output, new if rows is None else h.index_copy(0, rows, new))


def width(block: nn.Module) -> int:
    """The hidden width of a backbone block: its first LayerNorm's."""
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return m.normalized_shape[0]
    raise ConfigError(f"ladder: cannot tell the width of {type(block).__name__} "
                      f"(no LayerNorm in it)")
