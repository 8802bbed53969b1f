"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``length`` P trainable vectors are prepended to the input embeddings,
``[p_1..p_P; e(x_1)..e(x_T)]``; only they train. Init (sec. 3.2): "random" uniform in
[-0.5, 0.5]; "vocab" rows of the embedding matrix drawn at random; "tokens" the embeddings of
given ids (e.g. a caller's tokenised words, repeated cyclically up to P).

Where it hooks in (none of our models takes ``inputs_embeds``): a pre-hook on the model root
lengthens ``input_ids`` by P placeholder ids and ``attention_mask`` / ``token_type_ids`` (and the
LM/MLM ``labels``, with -100, except for an encoder-decoder whose labels are the decoder's) to
match; a forward hook on the token embedding writes the prompt over the placeholders; a root
post-hook cuts the prompt positions out of the per-token outputs (``logits``,
``last_hidden_state``, ``hidden_states``; not for an encoder-decoder, whose outputs are the
decoder's), so they line up with the caller's tokens.

Positions: a prompted row is ``[prompt; tokens]``: the prompt takes positions 0..P-1 and the
tokens follow from P (models with absolute positions need ``max_seq_len >= P + T``). A row not
routed to the delta (mixed batch) is ``[tokens; placeholders]`` with the placeholders masked out,
so its tokens keep positions 0..T-1 and it computes the bare base. A KV-cached decoding step
(``past_key_values`` given) adds nothing: the cache already holds the prompt.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bmray.models.delta.base import (Delta, DeltaConfig, SiteDelta, match_modules, site_key,
                                     site_name)
from bmray.models.delta.base import bound_arguments
from bmray.models.delta.rows import row_flags
from bmray.models.typed_config import ConfigError, check_choice, check_int

__all__ = ["SoftPromptConfig", "SoftPrompt", "PromptSite", "INITS", "PER_TOKEN_OUTPUTS",
           "input_embedding_name"]

INITS = ("random", "vocab", "tokens")
PER_TOKEN_OUTPUTS = ("logits", "last_hidden_state", "hidden_states")
EMBEDDING_NAMES = ("embed.tok", "shared", "embeddings.word_embeddings")


@dataclass(frozen=True)
class SoftPromptConfig(DeltaConfig):
    """``targets``: the token embedding (empty: found by :func:`input_embedding_name`)."""

    length: int = 20
    init: str = "vocab"
    init_token_ids: tuple[int, ...] = ()
    seed: int = 0
    method: ClassVar[str] = "soft_prompt"
    site_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Embedding,)

    def __post_init__(self) -> None:
        p = self.method
        check_int(f"{p}.length", self.length, minimum=1)
        check_choice(f"{p}.init", self.init, INITS)
        check_int(f"{p}.seed", self.seed, minimum=0)
        if (self.init == "tokens") != bool(self.init_token_ids):
            raise ConfigError(f"{p}.init_token_ids: needed exactly when init is 'tokens' "
                              f"(init={self.init!r}, init_token_ids={self.init_token_ids!r})")
        for i, t in enumerate(self.init_token_ids):
            check_int(f"{p}.init_token_ids[{i}]", t, minimum=0)


def input_embedding_name(model: nn.Module) -> str:
    """The dotted name of the token embedding: ``get_input_embeddings()`` of a transformers
    model, else ``embed.tok`` (GPT, BERT) or ``shared`` (T5)."""
    modules = dict(model.named_modules())
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        emb = getter()
        for name, m in modules.items():
            if m is emb and name:
                return name
    for name in EMBEDDING_NAMES:
        if isinstance(modules.get(name), nn.Embedding):
            return name
    raise ConfigError(f"soft prompt: {type(model).__name__} has no token embedding "
                      f"({'/'.join(EMBEDDING_NAMES)}); name it in targets")


class PromptSite(SiteDelta):
    """The prompt vectors [P, D] (the site is the token embedding)."""

    def __init__(self, prompt: Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt)

    def vectors(self) -> Tensor:
        return self.prompt


@dataclass
class Frame:
    """One soft prompt's rewrite of one forward call (innermost last on the model's stack)."""

    delta: "SoftPrompt"
    flags: Tensor | None = None         # [B] rows given the prompt
    ids: Tensor | None = None           # the input_ids after this delta's rewrite
    consumed: bool = False
    strip: bool = False
    extended: bool = False


_FRAMES: "weakref.WeakKeyDictionary[nn.Module, list[Frame]]" = weakref.WeakKeyDictionary()


def place(t: Tensor, flags: Tensor, p: int, front: int, back: int) -> Tensor:
    """[B, T] -> [B, P + T]: ``[front * P; t]`` for flagged rows, ``[t; back * P]`` for the rest."""
    b = t.size(0)
    ahead = torch.cat([t.new_full((b, p), front), t], dim=1)
    behind = torch.cat([t, t.new_full((b, p), back)], dim=1)
    return torch.where(flags[:, None], ahead, behind)


class SoftPrompt(Delta):
    """Prompt tuning: ``length`` vectors in front of the input embeddings."""

    config: SoftPromptConfig

    def build_site(self, name: str, module: nn.Module) -> PromptSite:
        cfg = self.config
        weight = module.weight.detach()
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "random":
            prompt = torch.rand(cfg.length, weight.size(1), generator=g) - 0.5
        else:
            if cfg.init == "vocab":
                ids = torch.randint(0, weight.size(0), (cfg.length,), generator=g)
            else:
                bad = [t for t in cfg.init_token_ids if t >= weight.size(0)]
                if bad:
                    raise ConfigError(f"{cfg.method}.init_token_ids: {bad} outside the "
                                      f"vocabulary of {name} ({weight.size(0)} rows)")
                ids = torch.tensor(cfg.init_token_ids).repeat(cfg.length)[:cfg.length]
            prompt = weight.cpu()[ids].float()
        return PromptSite(prompt.to(weight.dtype))

    def attach(self, model: nn.Module) -> "SoftPrompt":
        if self.attached:
            raise RuntimeError(f"{self.config.method} delta is already attached; detach first")
        if self.config.targets:
            names = match_modules(model, self.config.targets, (nn.Embedding,))
            if len(names) != 1:
                raise ConfigError(f"{self.config.method}.targets: a soft prompt needs exactly one "
                                  f"token embedding, matched {names}")
            name = names[0]
        else:
            name = input_embedding_name(model)
        emb = dict(model.named_modules())[name]
        if not len(self.sites):
            self.sites[site_key(name)] = self.build_site(name, emb)
            self.to(device=emb.weight.device)
        elif site_name(next(iter(self.sites))) != name:
            raise ConfigError(f"{self.config.method} delta was built for "
                              f"{site_name(next(iter(self.sites)))}, this model's is {name}")
        site = next(iter(self.sites.values()))
        params = inspect.signature(model.forward).parameters
        enc_dec = "decoder_input_ids" in params
        self._handles += [
            model.register_forward_pre_hook(
                lambda m, a, k: self._root_pre(m, a, k, enc_dec), with_kwargs=True),
            emb.register_forward_hook(lambda m, a, out: self._embed_post(model, a, out, site)),
            model.register_forward_hook(self._root_post, with_kwargs=True, prepend=True)]
        self._bind(model)
        return self

    # ------------------------------------------------------------------ hooks
    def _root_pre(self, model: nn.Module, args: tuple, kwargs: dict, enc_dec: bool):
        if not self._active():
            return None
        kw = bound_arguments(model, args, kwargs)
        ids, p = kw.get("input_ids"), self.config.length
        if ids is None:
            raise ValueError("a soft prompt needs input_ids (inputs_embeds are not supported)")
        if kw.get("position_ids") is not None:
            raise ValueError("a soft prompt sets the positions itself; do not pass position_ids")
        frame = Frame(self)
        stack = _FRAMES.setdefault(model, [])
        if any(f.delta is self for f in stack):      # left over from a forward that raised
            stack.clear()
        stack.append(frame)
        mask = kw.get("attention_mask")
        if kw.get("past_key_values") is not None or kw.get("cache") is not None:
            if self.rows is not None:
                raise ValueError("a soft prompt in a mixed batch cannot decode with a KV cache; "
                                 "decode with use_cache=False")
            if mask is not None and mask.size(1) != ids.size(1):    # base past + new: add P
                kw["attention_mask"] = torch.cat([mask.new_ones(mask.size(0), p), mask], 1)
            return (), kw
        flags = row_flags(ids.size(0), self.rows, ids.device)
        kw["input_ids"] = place(ids, flags, p, 0, 0)
        if mask is not None or self.rows is not None:
            mask = torch.ones_like(ids) if mask is None else mask
            kw["attention_mask"] = place(mask, flags, p, 1, 0)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = place(kw["token_type_ids"], flags, p, 0, 0)
        if not enc_dec:
            for name in ("labels", "mlm_labels"):
                if kw.get(name) is not None:
                    kw[name] = place(kw[name], flags, p, -100, -100)
        frame.flags, frame.ids, frame.extended = flags, kw["input_ids"], True
        frame.strip = not enc_dec
        return (), kw

    def _embed_post(self, model: nn.Module, args: tuple, output: Tensor, site: PromptSite):
        frames = _FRAMES.get(model, [])
        mine = [i for i, f in enumerate(frames) if f.delta is self and f.extended]
        if not mine or frames[mine[-1]].consumed or args[0] is not frames[-1].ids:
            return None          # not the call on the prompted input_ids (e.g. a T5 decoder)
        k = mine[-1]
        frame = frames[k]
        frame.consumed = True
        b, p = output.size(0), self.config.length
        offset = torch.zeros(b, dtype=torch.long, device=output.device)
        for later in frames[k + 1:]:         # prompts added after this one sit in front of it
            if later.extended:
                offset += later.delta.config.length * later.flags.long()
        idx = (offset[:, None] + torch.arange(p, device=output.device))[..., None]
        idx = idx.expand(b, p, output.size(-1))
        prompt = site.vectors().to(output.dtype).expand(b, p, -1)
        return torch.where(frame.flags[:, None, None], output.scatter(1, idx, prompt), output)

    def _root_post(self, model: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self._active():
            return None
        frame = _FRAMES[model].pop()
        if frame.delta is not self:
            raise RuntimeError("soft prompt hooks ran out of order")
        if not frame.extended:
            return None
        if not frame.consumed:
            raise ValueError(f"soft prompt: the embedding {site_name(next(iter(self.sites)))} "
                             f"never embedded the model's input_ids; check targets")
        if not frame.strip:
            return None
        return strip_prompt(output, frame.flags, self.config.length)


def strip_prompt(output: Any, flags: Tensor, p: int) -> Any:
    """Cut P prompt positions out of the per-token outputs: the first P of a prompted row,
    the last P of the others."""
    def cut(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() < 2 or t.size(0) != flags.size(0):
            return t
        keep = torch.arange(t.size(1) - p, device=t.device)[None] + p * flags.long()[:, None]
        keep = keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        return t.gather(1, keep)

    if isinstance(output, Tensor):
        return cut(output)
    for name in PER_TOKEN_OUTPUTS:
        value = getattr(output, name, None)
        if isinstance(value, tuple):
            setattr(output, name, tuple(cut(v) for v in value))
        elif value is not None:
            setattr(output, name, cut(value))
    return output
