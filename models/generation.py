"""Text generation: greedy, sampling (top-k / nucleus) and beam search, with or without a KV cache.

One loop per strategy serves both model shapes:

* decoder-only (GPT): ``model(input_ids, past_key_values=..., use_cache=True, attention_mask=)``
  -> ``.logits``, ``.past_key_values`` (per layer ``(k, v)`` shaped ``[B, H, T, Dh]``);
* encoder-decoder (T5): ``model.encode(input_ids, attention_mask)`` once, then
  ``model.decode(decoder_input_ids, encoder_hidden, encoder_mask, past_key_values=, use_cache=)``
  per step; ``generate`` tells them apart by whether the model has an ``encode`` method.

Decoder prompts of different lengths are LEFT padded (``pad_prompts``): the attention mask
covers the prompt and every generated token, the KV cache keeps the padded keys masked, and
positions count real tokens only, so each row gets the logits it would get alone (the Hugging
Face convention). Returned ids: decoder-only ``[B, T + n]`` (the padded prompt + new tokens),
encoder-decoder ``[B, 1 + n]`` (start token + new tokens); a row is ``pad_id`` after its end.
A row ends at ``eos_id`` (kept) or a stop sequence (cut, see ``models.stopping``);
``stream`` yields greedy and sampled tokens step by step, exactly as ``generate`` returns them. Beam search scores
``sum_logprob / len ** length_penalty`` (the Hugging Face convention, not GNMT's).
Details: docs/generation.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from bmray.models.layers.attention import KVBuffer
from bmray.models.stopping import StopSequences
from bmray.models.typed_config import ConfigError, check_choice, check_int

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class GenerationConfig:
    """How to generate. Every value is checked in ``__post_init__`` (ConfigError names the key)."""

    max_new_tokens: int = 32
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    temperature: float = 1.0          # sample: logits / temperature before filtering
    top_k: int = 0                    # sample: keep the k most likely tokens (0 = off)
    top_p: float = 1.0                # sample: nucleus mass (1.0 = off), Holtzman et al. 2019
    num_beams: int = 1                # beam: beams per input
    length_penalty: float = 1.0       # beam: score = sum_logprob / len ** length_penalty (HF)
    eos_id: int | None = None         # stop a row at this token (None: always max_new_tokens)
    pad_id: int = 0                   # fills a row after its eos
    use_cache: bool = True            # feed one token + KV cache per step (False: re-run all)
    seed: int | None = None           # sample: row b draws from a Generator seeded seed + b
    decoder_start_id: int | None = None  # enc-dec: first decoder token (None: model config bos_id)
    # stop a row (a beam) when its new tokens end with one of these (cut from the output);
    # strings are matched on decoded text (generate/stream need tokenizer=)
    stop: list[str] | list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        p = "generation"
        check_choice(f"{p}.strategy", self.strategy, STRATEGIES)
        check_int(f"{p}.max_new_tokens", self.max_new_tokens, minimum=1)
        check_int(f"{p}.top_k", self.top_k, minimum=0)
        check_int(f"{p}.num_beams", self.num_beams, minimum=1)
        check_int(f"{p}.pad_id", self.pad_id, minimum=0)
        for key in ("eos_id", "seed", "decoder_start_id"):
            if getattr(self, key) is not None:
                check_int(f"{p}.{key}", getattr(self, key), minimum=0)
        for key in ("temperature", "top_p", "length_penalty"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{p}.{key}: expected a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ConfigError(f"{p}.temperature: must be > 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{p}.top_p: must be in (0, 1], got {self.top_p!r}")
        if self.num_beams > 1 and self.strategy != "beam":
            raise ConfigError(f"{p}.num_beams: {self.num_beams} beams need strategy 'beam', "
                              f"got strategy {self.strategy!r}")
        if not isinstance(self.use_cache, bool):
            raise ConfigError(f"{p}.use_cache: expected true or false, got {self.use_cache!r}")
        check_stop(f"{p}.stop", self.stop)


def check_stop(path: str, stop: Any) -> None:
    """A list of non-empty strings, or of non-empty token-id lists; not both."""
    if not isinstance(stop, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of strings or of token-id lists, got {stop!r}")
    kinds = set()
    for i, s in enumerate(stop):
        if isinstance(s, str):
            kinds.add("str")
            if not s:
                raise ConfigError(f"{path}[{i}]: a stop string must not be empty")
            continue
        if not isinstance(s, (list, tuple)) or not s:
            raise ConfigError(f"{path}[{i}]: expected a non-empty string or token-id list, "
                              f"got {s!r}")
        kinds.add("ids")
        for j, t in enumerate(s):
            check_int(f"{path}[{i}][{j}]", t, minimum=0)
    if len(kinds) > 1:
        raise ConfigError(f"{path}: give either strings or token-id lists, not both")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the strategies
# ----------------------------------------------------------------------------------------------

def reorder_cache(past: Any, beam_idx: torch.Tensor) -> Any:
    """``index_select`` dim 0 of every tensor in a nested list/tuple cache (beam search reordering).

    Row ``i`` of the result is row ``beam_idx[i]`` of the input, so after a beam step each new beam
    carries the cache of the beam it extends. Non-tensor leaves (e.g. None) are kept as they are.
    """
    if isinstance(past, torch.Tensor):
        return past.index_select(0, beam_idx.to(past.device))
    if isinstance(past, KVBuffer):
        return past.index_select(beam_idx.to(past.k.device))
    if isinstance(past, (list, tuple)):
        return type(past)(reorder_cache(p, beam_idx) for p in past)
    return past


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf")) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus to ``filter_value``.

    Top-k keeps the ``top_k`` largest logits per row (ties at the k-th value are kept). Nucleus
    (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration", eq. 2): keep the smallest
    set of most-likely tokens whose probability sums to >= ``top_p``, computed on the softmax of the
    (already top-k-filtered) logits. The most likely token is always kept. Returns a new tensor.
    """
    logits = logits.clone()
    vocab = logits.size(-1)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # a token is dropped when the tokens ranked before it already reach top_p
        remove_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def _next_logits(model: torch.nn.Module, seq: torch.Tensor, past: Any, enc: tuple | None,
                 use_cache: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Logits ``[N, V]`` (float32 or wider) for the token after ``seq`` [N, t], and the new cache.

    With a cache only the last token is fed (positions continue from the cache length); without
    one the whole sequence is re-run. ``enc`` is ``(encoder_hidden, encoder_mask)`` for an
    encoder-decoder, None for a decoder-only model. ``mask`` [N, t] (decoder-only, left-padded
    prompts) covers all of ``seq``: the cached keys and the new ones.
    """
    inp = seq[:, -1:] if (use_cache and past is not None) else seq
    cache = past if use_cache else None
    if enc is None:
        if mask is None:
            out = model(inp, past_key_values=cache, use_cache=use_cache)
        else:
            out = model(inp, past_key_values=cache, use_cache=use_cache, attention_mask=mask)
    else:
        out = model.decode(inp, enc[0], enc[1], past_key_values=cache, use_cache=use_cache)
    logits = out.logits[:, -1, :]
    # score in at least float32 (a bf16/fp16 model's log-probs would be too coarse to rank beams)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits, (out.past_key_values if use_cache else None)


def preallocate(past: Any, extra: int) -> Any:
    """A cache that is a list of per-layer ``(k, v)`` [B, H, T, Dh] as ``KVBuffer``s with room
    for ``extra`` more positions (written in place from then on); any other cache unchanged.
    T is the cache's own length (a soft prompt makes it longer than the token sequence)."""
    if not isinstance(past, (list, tuple)) or not all(
            isinstance(layer, tuple) and len(layer) == 2 and all(
                isinstance(t, torch.Tensor) and t.dim() == 4 for t in layer) for layer in past):
        return past
    return [KVBuffer(k, v, k.size(2) + extra) for k, v in past]


def _decoder_start_id(model: torch.nn.Module, config: GenerationConfig) -> int:
    if config.decoder_start_id is not None:
        return config.decoder_start_id
    for attr in ("config", "cfg"):
        bos = getattr(getattr(model, attr, None), "bos_id", None)
        if bos is not None:
            return int(bos)
    raise ValueError("encoder-decoder generation needs a decoder start token: set "
                     "GenerationConfig.decoder_start_id or give the model a config with bos_id")


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                device: torch.device | str | None = None, side: str = "left"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``(input_ids [B, T], attention_mask [B, T])`` (1 = real).

    Left (decoder prompts), so every row's last real token sits in the last column and the new
    tokens of all rows are appended in the same column (the convention Hugging Face requires for
    decoder-only batches); ``positions_for`` then counts real tokens only. Right for encoder
    inputs, whose positions start at the first column.
    """
    check_choice("pad_prompts.side", side, ("left", "right"))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts: need at least one prompt, each with at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, cols] = 1
    return ids, mask


def check_left_padded(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The decoder mask as a long tensor, or None when it has no padding; ValueError when it is
    not ``[B, T]`` like the ids, not 0/1, right padded (a 0 after a 1) or a row is all padding."""
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
    if bool((mask == 1).all()):
        return None
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("decoder-only prompts must be LEFT padded (attention_mask is 0...0 1...1 "
                         "per row); use pad_prompts")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("attention_mask has a row without any real token")
    return mask


def _prepare(model: torch.nn.Module, input_ids: Any, config: GenerationConfig,
             attention_mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """(decoder prefix, decoder mask or None, encoder state or None) of a request."""
    if not isinstance(input_ids, torch.Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a tensor of input_ids; "
                             "lists are padded here")
        side = "right" if hasattr(model, "decode") else "left"
        input_ids, attention_mask = pad_prompts(input_ids, config.pad_id, side=side)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    if hasattr(model, "decode"):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        enc = (model.encode(input_ids, mask), mask)
        start = _decoder_start_id(model, config)
        prefix = torch.full((input_ids.size(0), 1), start, dtype=torch.long,
                            device=input_ids.device)
        return prefix, None, enc
    mask = None if attention_mask is None else check_left_padded(attention_mask, input_ids)
    return input_ids, mask, None


def _stops(config: GenerationConfig, tokenizer: Any) -> StopSequences | None:
    if not config.stop:
        return None
    return StopSequences(config.stop, tokenizer.decode if tokenizer is not None else None)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
             config: GenerationConfig | None = None, attention_mask: torch.Tensor | None = None,
             tokenizer: Any = None) -> torch.Tensor:
    """Generate continuations; see the module docstring for the output.

    ``input_ids``: a ``[B, T]`` tensor (decoder-only: with a left-padded ``attention_mask`` when
    the prompts differ in length) or a list of token-id lists, padded here (``pad_prompts``).
    ``tokenizer`` (anything with ``decode(ids) -> str``) is needed for stop strings only. The
    model is put in eval mode for the call and its previous mode restored afterwards.
    """
    config = config or GenerationConfig()
    stops = _stops(config, tokenizer)
    was_training = model.training
    model.eval()
    try:
        prefix, mask, enc = _prepare(model, input_ids, config, attention_mask)
        if config.strategy == "beam":
            return beam_search(model, prefix, config, enc, mask, stops)
        rows: list[list[int]] = [[] for _ in range(prefix.size(0))]
        for step in decode_steps(model, prefix, config, enc, mask, stops):
            for row, new in zip(rows, step):
                row.extend(new)
        return append_rows(prefix, rows, config.pad_id)
    finally:
        model.train(was_training)


def append_rows(prefix: torch.Tensor, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """``prefix`` [B, t0] followed by each row's new tokens, filled with ``pad_id`` to one width."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((prefix.size(0), width), pad_id, dtype=torch.long, device=prefix.device)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row, dtype=torch.long, device=prefix.device)
    return torch.cat([prefix, out], dim=1)


@torch.no_grad()
def stream(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]],
           config: GenerationConfig | None = None, attention_mask: torch.Tensor | None = None,
           tokenizer: Any = None) -> Iterator[list[list[int]]]:
    """Yield, per decoding step, the new token ids of each row (a list per row, maybe empty).

    Row b's lists joined are exactly the new tokens ``generate`` returns for it (without the
    fill padding). Tokens that a stop sequence could still cut are held back until decided.
    Greedy and sampling only. Text chunks: ``models.text_stream.text_chunks``.
    """
    config = config or GenerationConfig()
    if config.strategy == "beam":
        raise ConfigError("generation.strategy: streaming needs greedy or sample (beam search "
                          "decides its tokens only at the end)")
    stops = _stops(config, tokenizer)
    was_training = model.training
    model.eval()
    try:
        prefix, mask, enc = _prepare(model, input_ids, config, attention_mask)
        yield from decode_steps(model, prefix, config, enc, mask, stops)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Greedy and sampling
# ----------------------------------------------------------------------------------------------

def _row_generators(config: GenerationConfig, batch: int,
                    device: torch.device) -> list[torch.Generator] | None:
    """One Generator per row, seeded ``seed + b``: a row's draws do not depend on the others."""
    if config.strategy != "sample" or config.seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(config.seed + b) for b in range(batch)]


def _pick(logits: torch.Tensor, config: GenerationConfig,
          generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: argmax (greedy) or a draw from the filtered softmax (sample)."""
    if config.strategy == "greedy":
        return logits.argmax(dim=-1)
    filtered = top_k_top_p_filtering(logits / config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g).view(1)
                      for b, g in enumerate(generators)])


def decode_steps(model: torch.nn.Module, prefix: torch.Tensor, config: GenerationConfig,
                 enc: tuple | None = None, mask: torch.Tensor | None = None,
                 stops: StopSequences | None = None) -> Iterator[list[list[int]]]:
    """Extend ``prefix`` [B, t0] one token at a time (greedy or sample), yielding per step the
    tokens each row releases: all of them, except those a stop sequence could still cut.

    A row ends at ``eos_id`` (kept), at a stop sequence (cut) or after ``max_new_tokens``; the
    loop ends when every row has. Sampling divides the logits by ``temperature`` and filters
    them with ``top_k_top_p_filtering``. ``mask`` [B, t0] marks left padding; it grows by a
    column of ones per step (a preallocated buffer, sliced).
    """
    B, device, N = prefix.size(0), prefix.device, config.max_new_tokens
    generators = _row_generators(config, B, device)
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([mask, mask.new_ones(B, N)], dim=1)
    seq, past = prefix, None
    gen: list[list[int]] = [[] for _ in range(B)]
    sent = [0] * B
    done = [False] * B
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(N):
        m = None if full_mask is None else full_mask[:, :seq.size(1)]
        logits, past = _next_logits(model, seq, past, enc, config.use_cache, m)
        if step == 0 and config.use_cache:
            past = preallocate(past, N)
        token = _pick(logits, config, generators).masked_fill(finished, config.pad_id)
        seq = torch.cat([seq, token[:, None]], dim=1)
        released: list[list[int]] = []
        for b, tok in enumerate(token.tolist()):
            if done[b]:
                released.append([])
                continue
            gen[b].append(tok)
            if config.eos_id is not None and tok == config.eos_id:
                done[b] = True
            elif stops is not None:
                cut = stops.cut(gen[b])
                if cut is not None:
                    del gen[b][max(cut, sent[b]):]
                    done[b] = True
            if done[b] or step == N - 1 or stops is None:
                upto = len(gen[b])
            else:
                upto = stops.safe_length(gen[b], sent[b])
            released.append(gen[b][sent[b]:upto])
            sent[b] = upto
        yield released
        if all(done):
            return
        if any(done):
            finished = torch.tensor(done, device=device)


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------

class _Hypotheses:
    """The ``num_beams`` best finished hypotheses of one input, scored with the length penalty."""

    def __init__(self, num_beams: int, length_penalty: float, max_len: int):
        self.num_beams, self.alpha, self.max_len = num_beams, length_penalty, max_len
        self.items: list[tuple[float, list[int]]] = []

    def add(self, logprob_sum: float, tokens: list[int], length: int | None = None) -> None:
        """``length``: the generated length scored (default ``len(tokens)``; a hypothesis cut at
        a stop sequence is scored with the stop tokens, as one ending in eos is)."""
        if not math.isfinite(logprob_sum):
            return
        length = len(tokens) if length is None else length
        self.items.append((logprob_sum / length ** self.alpha, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams:]

    def can_improve(self, best_running: float, cur_len: int) -> bool:
        """Can a running beam (log-prob sum ``best_running``, ``cur_len`` tokens) still get in?

        Exact bound: more tokens only lower the sum (log-probs <= 0), and a finished length L lies in
        [cur_len + 1, max_len]; ``s / L ** alpha`` with ``s <= 0`` is largest at L = max_len for
        alpha > 0 and at L = cur_len + 1 for alpha < 0. So beam search never stops before the
        exhaustive optimum is reachable (unlike HF's default heuristic, which uses cur_len).
        """
        if not math.isfinite(best_running):
            return False
        if len(self.items) < self.num_beams:
            return True
        length = self.max_len if self.alpha > 0 else min(cur_len + 1, self.max_len)
        return best_running / length ** self.alpha > self.items[-1][0]


def beam_search(model: torch.nn.Module, prefix: torch.Tensor, config: GenerationConfig,
                enc: tuple | None = None, mask: torch.Tensor | None = None,
                stops: StopSequences | None = None) -> torch.Tensor:
    """Beam search (Graves 2012; as in Sutskever et al. 2014) with a length penalty and eos.

    Per input we keep ``K = num_beams`` running beams. Each step scores all ``K * V`` one-token
    extensions by summed log-probability and takes the best ``2K`` (at most K of them can end in
    eos, so at least K continue): an eos candidate ranked within the top K becomes a finished
    hypothesis, and the best K non-eos candidates become the next beams (their KV cache is
    reordered with ``reorder_cache``). An input is done when no running beam can beat its K-th
    best finished hypothesis (see ``_Hypotheses.can_improve``). At ``max_new_tokens`` the running
    beams are finished as they are. A candidate that completes a stop sequence finishes as an eos
    one does, cut before the stop and scored with the stop's tokens (so a one-token stop ``[t]``
    gives what ``eos_id=t`` gives, without ``t``). Returns the best hypothesis per input, padded
    with ``pad_id``.
    """
    B, t0 = prefix.shape
    K, N, eos = config.num_beams, config.max_new_tokens, config.eos_id
    device = prefix.device
    seq = prefix.repeat_interleave(K, dim=0)                       # [B*K, t0]
    # left padding: the K beams of an input share its mask, so reordering beams keeps it valid
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([mask, mask.new_ones(B, N)], dim=1).repeat_interleave(K, dim=0)
    if enc is not None:
        enc = (enc[0].repeat_interleave(K, dim=0), enc[1].repeat_interleave(K, dim=0))
    # only beam 0 is live at the start, otherwise the K identical beams would fill the beam
    beam_scores = torch.full((B, K), -float("inf"), dtype=torch.float64, device=device)
    beam_scores[:, 0] = 0.0
    hyps = [_Hypotheses(K, config.length_penalty, N) for _ in range(B)]
    done = [False] * B
    past = None
    for step in range(N):
        m = None if full_mask is None else full_mask[:, :seq.size(1)]
        logits, past = _next_logits(model, seq, past, enc, config.use_cache, m)
        if step == 0 and config.use_cache:
            past = preallocate(past, N)
        logprobs = F.log_softmax(logits, dim=-1)                   # [B*K, V]
        V = logprobs.size(-1)
        cand = (logprobs + beam_scores.view(-1, 1).to(logprobs.dtype)).view(B, K * V)
        cand_scores, cand_idx = torch.topk(cand, min(2 * K, K * V), dim=1)
        cand_scores, cand_idx = cand_scores.tolist(), cand_idx.tolist()
        gen = seq[:, t0:].tolist()                                 # generated tokens per beam
        next_scores, next_tokens, next_beams = [], [], []
        for b in range(B):
            chosen: list[tuple[float, int, int]] = []
            if done[b]:
                chosen = [(0.0, config.pad_id, b * K)] * K
            else:
                for rank, (score, idx) in enumerate(zip(cand_scores[b], cand_idx[b])):
                    beam, token = b * K + idx // V, idx % V
                    tokens = gen[beam] + [token]
                    cut = None
                    if stops is not None and not (eos is not None and token == eos):
                        cut = stops.cut(tokens)
                    if (eos is not None and token == eos) or cut is not None:
                        if rank < K:
                            hyps[b].add(score, tokens if cut is None else tokens[:cut],
                                        len(tokens))
                    else:
                        chosen.append((score, token, beam))
                    if len(chosen) == K:
                        break
                # stop sequences can end more than K of the 2K candidates: dead beams fill in
                chosen += [(-math.inf, config.pad_id, b * K)] * (K - len(chosen))
                best_running = max(score for score, _, _ in chosen)
                done[b] = not hyps[b].can_improve(best_running, step + 1)
            for score, token, beam in chosen:
                next_scores.append(score)
                next_tokens.append(token)
                next_beams.append(beam)
        beam_idx = torch.tensor(next_beams, dtype=torch.long, device=device)
        beam_scores = torch.tensor(next_scores, dtype=torch.float64, device=device).view(B, K)
        seq = torch.cat([seq.index_select(0, beam_idx),
                         torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None]], dim=1)
        if all(done):
            break
        if config.use_cache:
            past = reorder_cache(past, beam_idx)
    gen = seq[:, t0:].tolist()
    scores = beam_scores.view(-1).tolist()
    for b in range(B):
        if not done[b]:
            for k in range(K):
                hyps[b].add(scores[b * K + k], gen[b * K + k])
    best = [hyps[b].items[0][1] if hyps[b].items else [] for b in range(B)]
    width = max(len(tokens) for tokens in best)
    out = torch.full((B, width), config.pad_id, dtype=torch.long, device=device)
    for b, tokens in enumerate(best):
        out[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    return torch.cat([prefix, out], dim=1)
