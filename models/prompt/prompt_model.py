"""Prompt models for classification: template + verbalizer + a pre-trained model, three kinds.

PromptForMaskedLM: any module mapping ``(input_ids, attention_mask)`` to vocabulary logits (our
BERT, a `transformers` masked LM, a MiniLM with a head). A label word of k pieces is scored
with the template's mask expanded to k masks, ``log p(w|x) = sum_i log softmax(z_{m_i})[t_i]``
(PET, Schick & Schütze 2021, one pass). PromptForCausalLM (GPT): the mask must end the
template; the word is scored teacher-forced, ``sum_i log p(t_i | x, t_<i)``.
PromptForSeq2SeqLM (T5): the mask is the first sentinel; the decoder scores
``<extra_id_0> t_1 .. t_k`` teacher-forced.

``collate(examples)`` makes a batch of tensors (the template filled with one mask) and
``forward(**batch)`` returns a ModelOutput (class scores as logits; loss and accuracy with
labels), so the training loop drives a prompt model like any other. Soft template tokens are
rows of ``soft.weight``, written over the word-embedding output by a forward hook that lives
only for the call (the base model is not edited); ``freeze_base`` turns off the base's
gradients. The LM and T5 models also ``generate`` from a filled template.
Docs: docs/prompt_learning.md.
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
from bmray.models.outputs import ModelOutput
from bmray.models.prompt.template import EncodedPrompt, Template, TemplateError
from bmray.models.prompt.tokenization import PromptTokenizer, wrap
from bmray.models.prompt.verbalizer import ManualVerbalizer, VerbalizerError

EMBEDDING_NAMES = ("embed.tok", "shared", "word_embeddings", "wte")   # ours, T5, HF BERT, HF GPT-2


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's word-embedding table: the encoder's ``get_input_embeddings()`` for a
    `transformers` encoder-decoder (its T5 encoder has its own module tied to ``shared``), the
    model's where it has one, else the first ``nn.Embedding`` named like EMBEDDING_NAMES."""
    encoder = getattr(model, "get_encoder", None)
    getter = getattr(encoder() if callable(encoder) else model, "get_input_embeddings", None)
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


def same_ids(a: Tensor, b: Tensor) -> bool:
    """``a`` is ``b`` or a same-shaped view of its storage (a model may reshape its input)."""
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


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
        fired = []

        def hook(module, inputs, output):
            if not match(inputs[0]):
                return output
            fired.append(True)
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
        if not fired:       # silently dropped soft tokens would train nothing
            raise TemplateError("the soft tokens were not written: the model never called its word "
                                "embedding on the prompt's ids (pass embedding= if it has several)")


class PromptModel(nn.Module):
    """What the three kinds share: collation, soft tokens, labels, loss, prediction.

    A batch (``collate``): input_ids, attention_mask [B, T] (right-padded), mask_pos [B] (the
    one mask), soft_pos / soft_ids [B, S] (-1 pads), labels [B] (class indices, optional).
    """

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
        # room kept at encoding for a k-piece word's k - 1 extra tokens (masks or teacher forcing)
        self.reserve = max((len(p) for p in self.word_pieces), default=1) - 1

    def check(self) -> None:
        """Template and verbalizer fit this kind of model (overridden per kind)."""
        if self.template.n_masks != 1:
            raise TemplateError(f"{self.template!r} has {self.template.n_masks} {{mask}} parts; "
                                f"{type(self).__name__} needs exactly one")
        if self.tok.mask_id is None:
            raise TemplateError(f"{type(self).__name__} needs a tokenizer with a mask/sentinel token")

    # ------------------------------------------------------------------ batches
    def encode(self, examples: Sequence[Example]) -> list[EncodedPrompt]:
        budget = self.max_length - self.reserve
        try:
            return [self.template.encode(ex, self.tok, budget) for ex in examples]
        except TemplateError as err:
            if not self.reserve:
                raise
            raise TemplateError(f"{err} (max_length {self.max_length} less {self.reserve} kept for "
                                "the longest label word's extra pieces)") from None

    def collate(self, examples: Sequence[Example], labels: bool = True) -> dict[str, Tensor]:
        """The batch of tensors ``forward`` takes; ``labels`` reads each example's label."""
        enc = self.encode(examples)
        ids, attn = pad_right([e.input_ids for e in enc], self.tok.pad_id)
        n_soft = max(len(e.soft_positions) for e in enc)
        soft_pos = torch.full((len(enc), n_soft), -1, dtype=torch.long)
        soft_ids = torch.full((len(enc), n_soft), -1, dtype=torch.long)
        for i, e in enumerate(enc):
            soft_pos[i, :len(e.soft_positions)] = torch.tensor(e.soft_positions, dtype=torch.long)
            soft_ids[i, :len(e.soft_ids)] = torch.tensor(e.soft_ids, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": attn, "soft_pos": soft_pos, "soft_ids": soft_ids,
                 "mask_pos": torch.tensor([e.mask_positions[0] for e in enc], dtype=torch.long)}
        if labels:
            batch["labels"] = torch.tensor([self.verbalizer.label_index(ex.label) for ex in examples])
        dev = self.device
        return {k: v.to(dev) for k, v in batch.items()}

    def run(self, forward: Callable[..., Any], input_ids: Tensor, soft_pos: Tensor, soft_ids: Tensor,
            **kwargs) -> Any:
        """``forward(input_ids=..., **kwargs)`` with the soft tokens written in; row b of
        ``soft_pos``/``soft_ids`` [B, S] (-1 pads) belongs to row b of ``input_ids``."""
        valid = soft_pos >= 0
        rows = torch.arange(soft_pos.size(0), device=soft_pos.device)[:, None].expand_as(soft_pos)
        with self.soft.inject(self.embedding, lambda ids: same_ids(ids, input_ids), soft_pos[valid],
                              soft_ids[valid], rows[valid]):
            return forward(input_ids=input_ids, **kwargs)

    # ------------------------------------------------------------------ scoring
    def word_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        """log p(w | x) of every label word, over all its pieces: [B, W]."""
        raise NotImplementedError

    def class_scores(self, batch: dict[str, Tensor]) -> Tensor:
        """Class scores [B, C] (log-probability-like; argmax is the prediction)."""
        return self.verbalizer.class_scores(self.word_log_probs(batch))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mask_pos: Tensor, soft_pos: Tensor,
                soft_ids: Tensor, labels: Tensor | None = None) -> ModelOutput:
        """ModelOutput(logits = class scores [B, C], loss = cross-entropy with ``labels``,
        metrics = {"accuracy"})."""
        scores = self.class_scores({"input_ids": input_ids, "attention_mask": attention_mask,
                                    "mask_pos": mask_pos, "soft_pos": soft_pos, "soft_ids": soft_ids})
        if labels is None:
            return ModelOutput(logits=scores)
        labels = labels.to(scores.device)
        loss = F.cross_entropy(scores.float(), labels)
        accuracy = (scores.detach().argmax(-1) == labels).float().mean()
        return ModelOutput(logits=scores, loss=loss, metrics={"accuracy": accuracy})

    def scores(self, examples: Sequence[Example]) -> Tensor:
        """Class scores [B, C] of ``examples`` (their labels are not read)."""
        return self.class_scores(self.collate(examples, labels=False))

    def loss(self, examples: Sequence[Example]) -> Tensor:
        """Cross-entropy of the class scores against the examples' labels."""
        return self(**self.collate(examples)).loss

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> list[str]:
        return [self.verbalizer.labels[i] for i in self.scores(examples).argmax(-1).tolist()]

    @torch.no_grad()
    def calibrate(self, support: Sequence[Example]) -> Tensor:
        """KPT's contextualised calibration: the verbalizer's prior over label words is
        estimated on ``support`` (unlabelled inputs; their labels are not read)."""
        return self.verbalizer.calibrate(self.word_log_probs(self.collate(support, labels=False)))

    @torch.no_grad()
    def label_word_vectors(self) -> Tensor:
        """[W, D] mean input embedding of each label word's pieces: q(v) for KPT's relevance."""
        table = self.embedding.weight
        return torch.stack([table[torch.tensor(p, device=table.device)].float().mean(0)
                            for p in self.word_pieces])

    def generation_config(self, max_new_tokens: int = 16) -> GenerationConfig:
        """Greedy, stopping at the tokenizer's eos."""
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_id=self.tok.eos_id,
                                pad_id=self.tok.pad_id)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device


def expand_mask(batch: dict[str, Tensor], k: int, mask_id: int) -> dict[str, Tensor]:
    """The batch with its one mask at ``mask_pos`` widened to k masks (later tokens and soft
    positions shift right by k - 1); ``mask_pos`` becomes [B, k]."""
    ids, attn, m = batch["input_ids"], batch["attention_mask"], batch["mask_pos"][:, None]
    j = torch.arange(ids.size(1) + k - 1, device=ids.device)[None]
    src = torch.where(j < m, j, j - (k - 1)).expand(ids.size(0), -1)
    in_mask = (j >= m) & (j < m + k)
    soft_pos = batch["soft_pos"]
    return {"input_ids": ids.gather(1, src).masked_fill(in_mask, mask_id),
            "attention_mask": attn.gather(1, src).masked_fill(in_mask, 1),
            "mask_pos": m + torch.arange(k, device=ids.device)[None],
            "soft_pos": torch.where(soft_pos > m, soft_pos + (k - 1), soft_pos),
            "soft_ids": batch["soft_ids"]}


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

    def word_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        columns: list[Tensor | None] = [None] * len(self.word_pieces)
        for k in sorted({len(p) for p in self.word_pieces}):   # one pass per piece count
            b = expand_mask(batch, k, self.tok.mask_id)
            logits = logits_of(self.run(self.base, b["input_ids"], b["soft_pos"], b["soft_ids"],
                                        attention_mask=b["attention_mask"]))
            at_mask = logits.gather(1, b["mask_pos"][..., None].expand(-1, -1, logits.size(-1)))
            logp = F.log_softmax(at_mask.float(), dim=-1)                       # [B, k, V]
            for w, pieces in enumerate(self.word_pieces):
                if len(pieces) == k:
                    target = torch.tensor(pieces, device=logp.device)
                    columns[w] = logp[:, torch.arange(k, device=logp.device), target].sum(-1)
        return torch.stack(columns, dim=1)

    def class_scores(self, batch: dict[str, Tensor]) -> Tensor:
        if not self.verbalizer.needs_hidden:
            return super().class_scores(batch)
        hidden = self.run(self.hidden_fn, batch["input_ids"], batch["soft_pos"], batch["soft_ids"],
                          attention_mask=batch["attention_mask"])
        at_mask = hidden[torch.arange(hidden.size(0), device=hidden.device), batch["mask_pos"]]
        return self.verbalizer.class_scores_from_hidden(at_mask)


class PromptForCausalLM(PromptModel):
    """``model(input_ids=, attention_mask=)`` -> next-token logits [B, T, V] (our GPT, GPT-2)."""

    def check(self) -> None:
        if not self.template.mask_is_last:
            raise TemplateError(f"{self.template!r}: a causal LM predicts the next token, so the "
                                "template must end with its one {mask}")
        if self.verbalizer.needs_hidden:
            raise VerbalizerError("SoftVerbalizer scores a mask's hidden state: use PromptForMaskedLM")
        super().check()

    def word_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        n_words = len(self.word_pieces)
        seqs, starts = [], []
        for row, m in zip(batch["input_ids"].tolist(), batch["mask_pos"].tolist()):
            for pieces in self.word_pieces:             # the mask and the framing after it go
                seqs.append(row[:m] + pieces[:-1])
                starts.append(m - 1)                    # the logits here predict piece 0
        ids, attn = pad_right(seqs, self.tok.pad_id)
        dev = self.device
        ids = ids.to(dev)
        logits = logits_of(self.run(self.base, ids, batch["soft_pos"].repeat_interleave(n_words, 0),
                                    batch["soft_ids"].repeat_interleave(n_words, 0),
                                    attention_mask=attn.to(dev)))
        return teacher_forced(F.log_softmax(logits.float(), dim=-1), starts, self.word_pieces)

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
        return self.tok.decode(until(out[0, n:].tolist(), self.tok.eos_id))


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
        self.reserve = 0                    # the word goes to the decoder, not the encoder

    def check(self) -> None:
        if self.verbalizer.needs_hidden:
            raise VerbalizerError("SoftVerbalizer scores a mask's hidden state: use PromptForMaskedLM")
        super().check()

    def word_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        n_words, n = len(self.word_pieces), batch["input_ids"].size(0)
        rep = lambda t: t.repeat_interleave(n_words, 0)                    # noqa: E731
        dec = [[self.decoder_start_id, self.tok.mask_id] + p[:-1] for p in self.word_pieces] * n
        dec_ids, _ = pad_right(dec, self.tok.pad_id)          # causal: pads after a word are unseen
        enc_ids = rep(batch["input_ids"])
        out = self.run(self.base, enc_ids, rep(batch["soft_pos"]), rep(batch["soft_ids"]),
                       attention_mask=rep(batch["attention_mask"]), decoder_input_ids=dec_ids.to(self.device))
        return teacher_forced(F.log_softmax(logits_of(out).float(), dim=-1), [1] * len(dec),
                              self.word_pieces)

    @torch.no_grad()
    def generate(self, example: Example, config: GenerationConfig | None = None) -> str:
        """Fill the template with ``example`` and let the decoder write the masked span
        (``<extra_id_0> span ...``: the leading sentinel is dropped, eos ends it)."""
        e = self.encode([example])[0]
        ids = torch.tensor([e.input_ids], device=self.device)
        config = config or self.generation_config()
        if config.decoder_start_id is None:
            config = dataclasses.replace(config, decoder_start_id=self.decoder_start_id)
        with self.soft.inject(self.embedding, lambda x: same_ids(x, ids),
                              torch.tensor(e.soft_positions, device=self.device),
                              torch.tensor(e.soft_ids, device=self.device)):
            out = generate(self.base, ids, config)[0, 1:].tolist()
        if out and out[0] == self.tok.mask_id:
            out = out[1:]
        return self.tok.decode(until(out, self.tok.eos_id))


def until(ids: list[int], stop: int | None) -> list[int]:
    """``ids`` up to (without) the first ``stop``."""
    return ids[:ids.index(stop)] if stop is not None and stop in ids else ids


def teacher_forced(logp: Tensor, starts: Sequence[int], word_pieces: Sequence[Sequence[int]]) -> Tensor:
    """Row ``b * W + w`` of ``logp`` [B*W, T, V] scores word w from position ``starts[row]``:
    ``sum_i logp[row, start + i, pieces[i]]`` -> [B, W]."""
    n_words = len(word_pieces)
    rows, cols, toks = [], [], []
    for row, start in enumerate(starts):
        pieces = word_pieces[row % n_words]
        rows += [row] * len(pieces)
        cols += range(start, start + len(pieces))
        toks += pieces
    dev = logp.device
    rows_t = torch.tensor(rows, device=dev)
    picked = logp[rows_t, torch.tensor(cols, device=dev), torch.tensor(toks, device=dev)]
    sums = logp.new_zeros(len(starts)).index_add(0, rows_t, picked)
    return sums.view(-1, n_words)
