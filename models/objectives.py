"""Pre-training objectives: how a family turns packed token blocks into a batch.

Each objective is a callable ``objective(blocks: LongTensor[B, L], generator) -> dict[str, Tensor]``
whose keys are keyword arguments of the family's ``forward``. Every random choice is drawn from
the ``torch.Generator`` passed in (the trainer seeds it from (seed, step, rank)), so the same
step always sees the same batch and a resumed run is exact; different generators give different
masks, which is RoBERTa's dynamic masking (Liu et al. 2019, sec. 4.1: a new mask every time a
sequence is fed, instead of BERT's masks fixed at preprocessing).

* ``CausalLM``      GPT: ``input_ids = blocks[:, :-1]``, ``labels = blocks[:, 1:]``.
* ``MaskedLM``      BERT: 15% of the non-special tokens are chosen; of those 80% become [MASK],
                    10% a random token, 10% stay (Devlin et al. 2019, sec. 3.1). With ``nsp``,
                    each block becomes ``[CLS] A [SEP] B [SEP]`` from its two halves, and half the
                    time B is replaced by the same span of another block (NSP label 1 = random).
* ``Electra``       the same masking without NSP; the generator inside the model fills the masks.
* ``SpanCorruption`` T5 (Raffel et al. 2020, sec. 3.1.4): 15% noise in spans of mean length 3;
                    each span becomes one sentinel in the input, the target lists the sentinels
                    followed by the tokens they replaced (``random_spans_noise_mask`` of the T5
                    code: non-noise and noise lengths are random segmentations, interleaved).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bmray.models.config import ModelConfig
from bmray.models.layers.losses import IGNORE_INDEX
from bmray.models.typed_config import ConfigError


@dataclass
class CausalLM:
    """Left-to-right LM: position t predicts token t+1 (labels are aligned for the model)."""

    pad_id: int = 0

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        labels = blocks[:, 1:].masked_fill(blocks[:, 1:] == self.pad_id, IGNORE_INDEX)
        return {"input_ids": blocks[:, :-1], "labels": labels}


@dataclass
class MaskedLM:
    """BERT masked LM (+ optional NSP) with dynamic 80/10/10 masking."""

    vocab_size: int
    mask_id: int
    pad_id: int
    cls_id: int
    sep_id: int
    special_ids: list[int] = field(default_factory=list)   # never masked, never drawn as random
    mask_prob: float = 0.15
    nsp: bool = True

    def __post_init__(self) -> None:
        specials = {self.pad_id, self.mask_id, self.cls_id, self.sep_id, *self.special_ids}
        self._specials = torch.tensor(sorted(specials), dtype=torch.long)
        pool = torch.ones(self.vocab_size, dtype=torch.bool)
        pool[self._specials[self._specials < self.vocab_size]] = False
        self._random_pool = pool.nonzero().squeeze(1)     # ids a "random token" may be
        if self._random_pool.numel() == 0:
            raise ValueError("no non-special token id to draw random replacements from")

    def mask_tokens(self, ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(masked ids, labels): labels hold the original id where chosen, -100 elsewhere."""
        dev = ids.device
        candidate = ~torch.isin(ids, self._specials.to(dev))
        chosen = (torch.rand(ids.shape, generator=generator, device=dev) < self.mask_prob) & candidate
        labels = ids.masked_fill(~chosen, IGNORE_INDEX)
        action = torch.rand(ids.shape, generator=generator, device=dev)
        pool = self._random_pool.to(dev)
        random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator, device=dev)]
        out = torch.where(chosen & (action < 0.8), torch.full_like(ids, self.mask_id), ids)
        out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
        return out, labels

    def sentence_pairs(self, blocks: Tensor, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``[CLS] A [SEP] B [SEP]`` of length L from each block: (ids, token_type_ids, nsp_labels).

        A is the first half of the block's first L-3 tokens, B the second half (label 0) or, with
        probability 1/2, the same span of another block of the batch (label 1). With a batch of one,
        the "random" B is the block's own first tokens.
        """
        b, length = blocks.shape
        n = length - 3
        if n < 2:
            raise ValueError(f"blocks of length {length} are too short for NSP pairs")
        half = n // 2
        dev = blocks.device
        is_random = torch.rand(b, generator=generator, device=dev) < 0.5
        if b > 1:
            other = (torch.arange(b, device=dev)
                     + torch.randint(1, b, (b,), generator=generator, device=dev)) % b
            b_random = blocks[other, half:n]
        else:
            b_random = blocks[:, : n - half]
        seg_b = torch.where(is_random[:, None], b_random, blocks[:, half:n])
        cls = blocks.new_full((b, 1), self.cls_id)
        sep = blocks.new_full((b, 1), self.sep_id)
        ids = torch.cat([cls, blocks[:, :half], sep, seg_b, sep], dim=1)
        types = torch.zeros_like(ids)
        types[:, half + 2:] = 1
        return ids, types, is_random.long()

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        ids = blocks
        if self.nsp:
            ids, batch["token_type_ids"], batch["nsp_labels"] = self.sentence_pairs(blocks, generator)
        masked, labels = self.mask_tokens(ids, generator)
        batch.update(input_ids=masked, attention_mask=(ids != self.pad_id).long(), mlm_labels=labels)
        return batch


@dataclass
class Electra(MaskedLM):
    """ELECTRA input: the masked-LM corruption without NSP (the model's generator fills the masks)."""

    nsp: bool = False


def random_segmentation(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Split n items into k non-empty segments uniformly at random; returns the k lengths."""
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return edges.diff()


@dataclass
class SpanCorruption:
    """T5 span corruption with sentinels; inputs and labels end with eos."""

    sentinel_ids: list[int]
    eos_id: int
    pad_id: int = 0
    noise_density: float = 0.15
    mean_span: float = 3.0

    def span_counts(self, length: int) -> tuple[int, int]:
        """(noise tokens, spans) for a block of ``length``, as T5's random_spans_noise_mask."""
        num_noise = min(max(round(length * self.noise_density), 1), length - 1)
        num_spans = max(round(num_noise / self.mean_span), 1)
        return num_noise, min(num_spans, num_noise, length - num_noise)

    def noise_mask(self, length: int, generator: torch.Generator | None = None) -> Tensor:
        """Boolean [length]: alternating non-noise / noise segments, starting with non-noise."""
        num_noise, num_spans = self.span_counts(length)
        noise_len = random_segmentation(num_noise, num_spans, generator)
        keep_len = random_segmentation(length - num_noise, num_spans, generator)
        lengths = torch.stack([keep_len, noise_len], dim=1).reshape(-1)
        flags = torch.tensor([False, True]).repeat(num_spans)
        return flags.repeat_interleave(lengths)

    def _sentinelize(self, ids: Tensor, mask: Tensor, sentinels: Tensor) -> Tensor:
        """Replace each run of masked tokens by the next sentinel (T5's noise_span_to_unique_sentinel
        + nonnoise_span_to_unique_sentinel, which are this function on mask and ~mask)."""
        prev = torch.cat([mask.new_zeros(1), mask[:-1]])
        start = mask & ~prev
        span = (start.long().cumsum(0) - 1).clamp(min=0)
        vals = torch.where(start, sentinels[span], ids)
        return vals[~mask | start]

    def __call__(self, blocks: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        b, length = blocks.shape
        num_spans = self.span_counts(length)[1]
        if num_spans > len(self.sentinel_ids):
            raise ValueError(f"span corruption of length-{length} blocks needs {num_spans} sentinels, "
                             f"model.sentinel_ids has {len(self.sentinel_ids)}")
        sentinels = torch.tensor(self.sentinel_ids, dtype=torch.long)
        eos = torch.tensor([self.eos_id], dtype=torch.long)
        inputs, targets = [], []
        for row in blocks.cpu():
            mask = self.noise_mask(length, generator)
            inputs.append(torch.cat([self._sentinelize(row, mask, sentinels), eos]))
            targets.append(torch.cat([self._sentinelize(row, ~mask, sentinels), eos]))
        input_ids = torch.stack(inputs).to(blocks.device)
        labels = torch.stack(targets).to(blocks.device)
        return {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_id).long(),
                "labels": labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)}


Objective = CausalLM | MaskedLM | SpanCorruption


def objective_for(cfg: ModelConfig) -> Objective:
    """The pre-training objective of ``cfg.family`` with the paper defaults."""
    masking = dict(vocab_size=cfg.vocab_size, mask_id=cfg.mask_id, pad_id=cfg.pad_id, cls_id=cfg.cls_id,
                   sep_id=cfg.sep_id, special_ids=cfg.special_ids())
    if cfg.family == "gpt":
        return CausalLM(pad_id=cfg.pad_id)
    if cfg.family == "bert":
        return MaskedLM(**masking, nsp=True)
    if cfg.family == "electra":
        return Electra(**masking)
    if cfg.family == "t5":
        if not cfg.sentinel_ids:
            raise ConfigError("model.sentinel_ids: t5 span corruption needs sentinel token ids "
                              "(set them from the tokenizer's special_ids())")
        return SpanCorruption(sentinel_ids=list(cfg.sentinel_ids), eos_id=cfg.eos_id, pad_id=cfg.pad_id)
    raise ConfigError(f"model.family: no objective for {cfg.family!r}")
