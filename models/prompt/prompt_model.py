"""Prompt models for classification: template + verbalizer + a pre-trained model, three kinds.

PromptForMaskedLM: any module mapping ``(input_ids, attention_mask)`` to vocabulary logits (our
BERT, a `transformers` masked LM, a MiniLM with a head). A label word of k pieces is scored
with the template's mask expanded to k masks, ``log p(w|x) = sum_i log softmax(z_{m_i})[t_i]``
(PET, Schick & Schütze 2021, one pass). PromptForCausalLM (GPT): the mask must end the
template; the word is scored teacher-forced, ``sum_i log p(t_i | x, t_<i)``.
PromptForSeq2SeqLM (T5): the mask is the first sentinel; the decoder scores
``<extra_id_0> t_1 .. t_k`` teacher-forced.

Soft template tokens are rows of ``soft.weight``, written over the word-embedding output at
their positions by a forward hook that lives only for the call (the base model is not edited).
``freeze_base`` turns off the base's gradients. The LM and T5 models also generate from a
filled template (``generate``). Docs: docs/prompt_learning.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.data.classification import Example
from bmray.models.generation import GenerationConfig, generate
from bmray.models.prompt.template import EncodedPrompt, Template, TemplateError
from bmray.models.prompt.tokenization import PromptTokenizer, wrap
from bmray.models.prompt.verbalizer import ManualVerbalizer, SoftVerbalizer, VerbalizerError

EMBEDDING_NAMES = ("embed.tok", "shared", "word_embeddings", "wte")   # ours, T5, HF BERT, HF GPT-2


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's word-embedding table: ``get_input_embeddings()`` where the model has it, else
    the first ``nn.Embedding`` whose name ends with one of EMBEDDING_NAMES."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter) and isinstance(getter(), nn.Embedding):
        return getter()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and any(name == n or name.endswith("." + n) for n in EMBEDDING_NAMES):
            return mod
    raise TemplateError(f"cannot find the word embedding of a {type(model).__name__}; pass embedding=")


def checked_max_length(model: nn.Module, max_length: int | None) -> int:
    """``max_length``, or the model's position limit when None (512 if it states none); a
    length beyond the limit is an error, not an index error deep in the embedding."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)
    if max_length is None:
        return int(limit or 512)
    if max_length < 1 or (limit is not None and max_length > limit):
        raise TemplateError(f"max_length={max_length} is outside 1..{limit or 'inf'} (the "
                            f"{type(model).__name__}'s position limit)")
    return max_length


def logits_of(out: Any) -> Tensor:
    """Vocabulary logits from a model output: a tensor or anything with ``.logits``."""
    return out if isinstance(out, Tensor) else out.logits


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, T] ids padded on the right with ``pad_id`` and the matching 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class SoftTokens(nn.Module):
    """The template's soft-token table [n_soft, D]: rows with an init word start as the mean
    embedding of that word's pieces, the others ~ N(0, std of the embedding table)."""

    def __init__(self, template: Template, embedding: nn.Embedding, tok: PromptTokenizer):
        super().__init__()
        table = embedding.weight.detach()
        rows = []
        for word in template.soft_words:
            if word is None:
                rows.append(torch.randn(table.size(1)) * table.float().std())
                continue
            ids = tok.encode(word, space_before=True)
            if tok.unk_id is not None and tok.unk_id in ids:
                raise TemplateError(f"{template!r}: soft-token init word {word!r} is not in the vocabulary")
            rows.append(table[ids].float().mean(0))
        self.weight = nn.Parameter(torch.stack(rows) if rows else torch.zeros(0, table.size(1)))

    @contextlib.contextmanager
    def inject(self, embedding: nn.Embedding, match: Callable[[Tensor], bool], cols: Tensor,
               soft_ids: Tensor, rows: Tensor | None = None) -> Iterator[None]:
        """While open, a call of ``embedding`` on ids for which ``match(ids)`` holds gets
        ``weight[soft_ids]`` written at ``(rows, cols)`` (``rows`` None: at ``cols`` of every
        row); other calls (a T5 decoder's, a cached generation step's) are untouched."""
        if cols.numel() == 0:
            yield
            return

        def hook(module, inputs, output):
            if not match(inputs[0]):
                return output
            if rows is None:
                n = output.size(0)
                r = torch.arange(n, device=output.device).repeat_interleave(len(cols))
                return output.index_put((r, cols.repeat(n)), self.weight[soft_ids.repeat(n)].to(output.dtype))
            return output.index_put((rows, cols), self.weight[soft_ids].to(output.dtype))

        handle = embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


class PromptModel(nn.Module):
    """What the three kinds share: encoding, soft tokens, labels, loss, prediction."""

    def __init__(self, model: nn.Module, template: Template | str, verbalizer: nn.Module,
                 tokenizer: Any, max_length: int | None = None, freeze_base: bool = True,
                 embedding: nn.Embedding | None = None):
        super().__init__()
        self.template = template if isinstance(template, Template) else Template(template)
        self.tok = wrap(tokenizer)
        self.verbalizer = verbalizer
        self.max_length = checked_max_length(model, max_length)
        self.check()                                    # bad input fails before any compute
        self.base = model
        # part of the base, so not registered again here (no duplicate in state_dict)
        self.__dict__["embedding"] = embedding if embedding is not None else input_embedding(model)
        self.soft = SoftTokens(self.template, self.embedding, self.tok)
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
        self.word_pieces: list[list[int]] = []
        if isinstance(verbalizer, ManualVerbalizer):
            mask_part = next(p for p in self.template.parts if p.kind == "mask")
            self.word_pieces = verbalizer.tokenize_words(self.tok, mask_part.space_before)

    def check(self) -> None:
        """Template and verbalizer fit this kind of model (overridden per kind)."""
        if self.template.n_masks != 1:
            raise TemplateError(f"{self.template!r} has {self.template.n_masks} {{mask}} parts; "
                                f"{type(self).__name__} needs exactly one")
        if self.tok.mask_id is None:
            raise TemplateError(f"{type(self).__name__} needs a tokenizer with a mask/sentinel token")

    def encode(self, examples: Sequence[Example], n_mask: int = 1) -> list[EncodedPrompt]:
        return [self.template.encode(ex, self.tok, self.max_length, n_mask) for ex in examples]

    def run(self, forward: Callable[..., Any], input_ids: Tensor, soft_rows: Tensor,
            soft_cols: Tensor, soft_ids: Tensor, **kwargs) -> Any:
        """``forward(input_ids=..., **kwargs)`` with the soft tokens written in."""
        with self.soft.inject(self.embedding, lambda ids: ids is input_ids, soft_cols, soft_ids, soft_rows):
            return forward(input_ids=input_ids, **kwargs)

    @staticmethod
    def soft_index(encoded: Sequence[EncodedPrompt], repeat: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, soft ids) of every soft position; row ``i * repeat + r`` is encoded[i]."""
        rows, cols, ids = [], [], []
        for i, e in enumerate(encoded):
            for r in range(repeat):
                rows += [i * repeat + r] * len(e.soft_positions)
                cols += e.soft_positions
                ids += e.soft_ids
        as_long = lambda x: torch.tensor(x, dtype=torch.long)     # noqa: E731
        return as_long(rows), as_long(cols), as_long(ids)

    def word_log_probs(self, examples: Sequence[Example]) -> Tensor:
        """log p(w | x) of every label word, over all its pieces: [B, W]."""
        raise NotImplementedError

    def forward(self, examples: Sequence[Example]) -> Tensor:
        """Class scores [B, C] (log-probability-like; argmax is the prediction)."""
        return self.verbalizer.class_scores(self.word_log_probs(examples))

    def targets(self, examples: Sequence[Example]) -> Tensor:
        return torch.tensor([self.verbalizer.label_index(ex.label) for ex in examples])

    def loss(self, examples: Sequence[Example]) -> Tensor:
        """Cross-entropy of the class scores against the examples' labels."""
        scores = self(examples)
        return F.cross_entropy(scores.float(), self.targets(examples).to(scores.device))

    @torch.no_grad()
    def calibrate(self, support: Sequence[Example]) -> Tensor:
        """KPT's contextualised calibration: the verbalizer's prior over label words is
        estimated on ``support`` (unlabelled inputs; their labels are not read)."""
        return self.verbalizer.calibrate(self.word_log_probs(support))

    @torch.no_grad()
    def label_word_vectors(self) -> Tensor:
        """[W, D] mean input embedding of each label word's pieces: q(v) for KPT's relevance."""
        table = self.embedding.weight
        return torch.stack([table[torch.tensor(p, device=table.device)].float().mean(0)
                            for p in self.word_pieces])

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> list[str]:
        return [self.verbalizer.labels[i] for i in self(examples).argmax(-1).tolist()]

    def generation_config(self, max_new_tokens: int = 16) -> GenerationConfig:
        """Greedy, stopping at the tokenizer's eos."""
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_id=self.tok.eos_id,
                                pad_id=self.tok.pad_id)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device


class PromptForMaskedLM(PromptModel):
    """``model(input_ids=, attention_mask=)`` -> logits [B, T, V]; with a SoftVerbalizer,
    ``hidden_fn(input_ids=, attention_mask=)`` -> hidden states [B, T, D] (default:
    ``model.encode``, what our BERT has)."""

    def __init__(self, model: nn.Module, template: Template | str, verbalizer: nn.Module,
                 tokenizer: Any, max_length: int | None = None, freeze_base: bool = True,
                 embedding: nn.Embedding | None = None, hidden_fn: Callable[..., Tensor] | None = None):
        super().__init__(model, template, verbalizer, tokenizer, max_length, freeze_base, embedding)
        self.hidden_fn = hidden_fn or getattr(model, "encode", None)
        if verbalizer.needs_hidden and self.hidden_fn is None:
            raise VerbalizerError(f"SoftVerbalizer needs hidden states: {type(model).__name__} has no "
                                  "encode(); pass hidden_fn=")

    def check(self) -> None:
        if self.template.n_masks == 0:
            raise TemplateError(f"{self.template!r} has no {{mask}}: a masked LM predicts the label "
                                "word at the mask")
        super().check()

    def _batch(self, examples: Sequence[Example], n_mask: int):
        enc = self.encode(examples, n_mask)
        ids, attn = pad_right([e.input_ids for e in enc], self.tok.pad_id)
        masks = torch.tensor([e.mask_positions for e in enc], dtype=torch.long)   # [B, n_mask]
        dev = self.device
        rows, cols, sids = (t.to(dev) for t in self.soft_index(enc))
        return ids.to(dev), attn.to(dev), masks.to(dev), rows, cols, sids

    def word_log_probs(self, examples: Sequence[Example]) -> Tensor:
        out = None                                      # [B, W], made on the logits' device
        for k in sorted({len(p) for p in self.word_pieces}):   # one pass per piece count
            ids, attn, masks, rows, cols, sids = self._batch(examples, k)
            logits = logits_of(self.run(self.base, ids, rows, cols, sids, attention_mask=attn))
            at_mask = logits.gather(1, masks[..., None].expand(-1, -1, logits.size(-1)))   # [B, k, V]
            logp = F.log_softmax(at_mask.float(), dim=-1)
            for w, pieces in enumerate(self.word_pieces):
                if len(pieces) != k:
                    continue
                if out is None:
                    out = logp.new_zeros(len(examples), len(self.word_pieces))
                target = torch.tensor(pieces, device=logp.device)
                out[:, w] = logp[:, torch.arange(k, device=logp.device), target].sum(-1)
        return out

    def forward(self, examples: Sequence[Example]) -> Tensor:
        if not self.verbalizer.needs_hidden:
            return super().forward(examples)
        ids, attn, masks, rows, cols, sids = self._batch(examples, 1)
        hidden = self.run(self.hidden_fn, ids, rows, cols, sids, attention_mask=attn)
        return self.verbalizer.class_scores_from_hidden(hidden[torch.arange(len(examples)), masks[:, 0]])


class PromptForCausalLM(PromptModel):
    """``model(input_ids=, attention_mask=)`` -> next-token logits [B, T, V] (our GPT, GPT-2)."""

    def check(self) -> None:
        if not self.template.mask_is_last:
            raise TemplateError(f"{self.template!r}: a causal LM predicts the next token, so the "
                                "template must end with its one {mask}")
        if self.verbalizer.needs_hidden:
            raise VerbalizerError("SoftVerbalizer scores a mask's hidden state: use PromptForMaskedLM")
        super().check()

    def word_log_probs(self, examples: Sequence[Example]) -> Tensor:
        enc = self.encode(examples)
        n_words = len(self.word_pieces)
        seqs, starts = [], []
        for e in enc:
            prefix = e.input_ids[:e.mask_positions[0]]                  # the mask and framing after it go
            for pieces in self.word_pieces:
                seqs.append(prefix + pieces[:-1])
                starts.append(len(prefix) - 1)                          # logits here predict piece 0
        ids, attn = pad_right(seqs, self.tok.pad_id)
        dev = self.device
        rows, cols, sids = (t.to(dev) for t in self.soft_index(enc, repeat=n_words))
        ids, attn = ids.to(dev), attn.to(dev)
        logp = F.log_softmax(logits_of(self.run(self.base, ids, rows, cols, sids,
                                                attention_mask=attn)).float(), dim=-1)
        return _teacher_forced(logp, starts, self.word_pieces, len(examples))


    @torch.no_grad()
    def generate(self, example: Example, config: GenerationConfig | None = None) -> str:
        """Fill the template with ``example`` and continue it from the mask (greedy by
        default, up to eos); returns the new text."""
        e = self.encode([example])[0]
        prompt = torch.tensor([e.input_ids[:e.mask_positions[0]]], device=self.device)
        n = prompt.size(1)
        with self.soft.inject(self.embedding, lambda ids: ids.dim() == 2 and ids.size(1) >= n,
                              torch.tensor(e.soft_positions, device=self.device),
                              torch.tensor(e.soft_ids, device=self.device)):
            out = generate(self.base, prompt, config or self.generation_config())
        return self.tok.decode(_until(out[0, n:].tolist(), self.tok.eos_id))


class PromptForSeq2SeqLM(PromptModel):
    """``model(input_ids=, attention_mask=, decoder_input_ids=)`` -> decoder logits (our T5).
    The decoder starts with ``decoder_start_id`` (default: ``model.config.bos_id``, what our T5
    trains with; a `transformers` T5 uses ``decoder_start_token_id``)."""

    def __init__(self, model: nn.Module, template: Template | str, verbalizer: nn.Module,
                 tokenizer: Any, max_length: int | None = None, freeze_base: bool = True,
                 embedding: nn.Embedding | None = None, decoder_start_id: int | None = None):
        super().__init__(model, template, verbalizer, tokenizer, max_length, freeze_base, embedding)
        cfg = getattr(model, "config", None)
        start = decoder_start_id if decoder_start_id is not None else getattr(
            cfg, "decoder_start_token_id", getattr(cfg, "bos_id", None))
        if start is None:
            raise TemplateError("PromptForSeq2SeqLM needs decoder_start_id (the model's config has none)")
        self.decoder_start_id = int(start)

    def check(self) -> None:
        if self.verbalizer.needs_hidden:
            raise VerbalizerError("SoftVerbalizer scores a mask's hidden state: use PromptForMaskedLM")
        super().check()

    def word_log_probs(self, examples: Sequence[Example]) -> Tensor:
        enc = self.encode(examples)
        n_words = len(self.word_pieces)
        enc_ids, enc_attn = pad_right([e.input_ids for e in enc for _ in range(n_words)], self.tok.pad_id)
        dec = [[self.decoder_start_id, self.tok.mask_id] + p[:-1] for _ in enc for p in self.word_pieces]
        dec_ids, _ = pad_right(dec, self.tok.pad_id)                     # causal: pads after are unseen
        dev = self.device
        rows, cols, sids = (t.to(dev) for t in self.soft_index(enc, repeat=n_words))
        enc_ids = enc_ids.to(dev)
        out = self.run(self.base, enc_ids, rows, cols, sids, attention_mask=enc_attn.to(dev),
                       decoder_input_ids=dec_ids.to(dev))
        logp = F.log_softmax(logits_of(out).float(), dim=-1)
        return _teacher_forced(logp, [1] * len(dec), self.word_pieces, len(examples))


    @torch.no_grad()
    def generate(self, example: Example, config: GenerationConfig | None = None) -> str:
        """Fill the template with ``example`` and let the decoder write the masked span
        (``<extra_id_0> span ...``: the leading sentinel is dropped, eos ends it)."""
        e = self.encode([example])[0]
        ids = torch.tensor([e.input_ids], device=self.device)
        config = config or self.generation_config()
        if config.decoder_start_id is None:
            config = dataclasses.replace(config, decoder_start_id=self.decoder_start_id)
        with self.soft.inject(self.embedding, lambda x: x is ids,
                              torch.tensor(e.soft_positions, device=self.device),
                              torch.tensor(e.soft_ids, device=self.device)):
            out = generate(self.base, ids, config)[0, 1:].tolist()
        if out and out[0] == self.tok.mask_id:
            out = out[1:]
        return self.tok.decode(_until(out, self.tok.eos_id))


def _until(ids: list[int], stop: int | None) -> list[int]:
    return ids[:ids.index(stop)] if stop is not None and stop in ids else ids


def _teacher_forced(logp: Tensor, starts: Sequence[int], word_pieces: Sequence[Sequence[int]],
                    batch: int) -> Tensor:
    """Row ``b * W + w`` of ``logp`` [B*W, T, V] scores word w from position ``starts[row]``:
    ``sum_i logp[row, start + i, pieces[i]]`` -> [B, W]."""
    n_words = len(word_pieces)
    rows, cols, toks, owner = [], [], [], []
    for row, start in enumerate(starts):
        pieces = word_pieces[row % n_words]
        rows += [row] * len(pieces)
        cols += range(start, start + len(pieces))
        toks += pieces
        owner += [row] * len(pieces)
    dev = logp.device
    picked = logp[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev),
                  torch.tensor(toks, device=dev)]
    sums = logp.new_zeros(batch * n_words).index_add(0, torch.tensor(owner, device=dev), picked)
    return sums.view(batch, n_words)
