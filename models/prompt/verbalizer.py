"""Verbalizers: map a model's predictions at the mask to class scores.

Every verbalizer but the soft one works on ``word_logp`` [B, W]: log p(w | x) of each label word,
computed by the prompt model over ALL the word's pieces (PET, Schick & Schütze 2021: a word of k
pieces fills k masks; an LM or a decoder scores it teacher-forced). A class's score is the log of
the mean probability of its words: ``s_c = log(1/|V_c| sum_{w in V_c} p(w | x))``.

ManualVerbalizer: hand-picked label words (PET). KnowledgeableVerbalizer (KPT, Hu et al. 2022):
expanded word sets, contextualised calibration ``p(w|x) / P~(w)`` with the prior ``P~`` averaged
over unlabelled support inputs, relevance refinement dropping words with ``r(v, y) < 1``.
SoftVerbalizer (WARP, Hambardzumyan et al. 2021): learned class vectors scored against the
mask's hidden state. Formulas and choices: docs/prompt_learning.md.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.prompt.tokenization import PromptTokenizer


class VerbalizerError(ValueError):
    """A label word that cannot be used (unknown to the tokenizer, empty), or a bad label set."""


def _label_word_lists(label_words: Mapping[str, Sequence[str] | str]) -> dict[str, list[str]]:
    if not label_words:
        raise VerbalizerError("a verbalizer needs at least one label")
    out = {}
    for label, words in label_words.items():
        words = [words] if isinstance(words, str) else list(words)
        if not words or any(not isinstance(w, str) or not w.strip() for w in words):
            raise VerbalizerError(f"label {label!r}: label words must be non-empty strings, got {words!r}")
        out[str(label)] = [w.strip() for w in words]
    return out


class ManualVerbalizer(nn.Module):
    """``label_words``: label -> its words; class score = log mean of its words' probabilities."""

    needs_hidden = False

    def __init__(self, label_words: Mapping[str, Sequence[str] | str]):
        super().__init__()
        lists = _label_word_lists(label_words)
        self.labels: tuple[str, ...] = tuple(lists)
        self.words: tuple[str, ...] = tuple(w for ws in lists.values() for w in ws)
        self.word_class: tuple[int, ...] = tuple(c for c, ws in enumerate(lists.values()) for _ in ws)
        member = torch.zeros(len(self.labels), len(self.words))
        member[list(self.word_class), list(range(len(self.words)))] = 1.0
        self.register_buffer("member", member, persistent=False)          # [C, W] 0/1

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise VerbalizerError(f"label {label!r} is not one of the verbalizer's {list(self.labels)}")
        return self.labels.index(label)

    def tokenize_words(self, tok: PromptTokenizer, space_before: bool) -> list[list[int]]:
        """Pieces of every label word as it reads at the mask; an unknown piece is an error."""
        out = []
        for word in self.words:
            ids = tok.encode(word, space_before)
            if not ids:
                raise VerbalizerError(f"label word {word!r} tokenizes to nothing")
            if tok.unk_id is not None and tok.unk_id in ids:
                raise VerbalizerError(f"label word {word!r} is not in the vocabulary (it tokenizes "
                                      f"to the unknown token: {ids})")
            out.append(ids)
        return out

    def aggregate(self, word_logp: Tensor, member: Tensor) -> Tensor:
        """``log(sum_w member[c, w] p(w)) - log(sum_w member[c, w])``: [B, W] -> [B, C]."""
        log_member = torch.log(member.to(word_logp.dtype))                   # 0 -> -inf
        total = torch.logsumexp(word_logp[:, None, :] + log_member[None], dim=-1)
        return total - torch.log(member.sum(-1).to(word_logp.dtype))[None]

    def class_scores(self, word_logp: Tensor) -> Tensor:
        """Class scores [B, C] from label-word log-probs [B, W]."""
        return self.aggregate(word_logp, self.member)


class KnowledgeableVerbalizer(ManualVerbalizer):
    """KPT: expanded label words (the first word of each class is its anchor, the class name),
    contextualised calibration and relevance refinement (Hu et al. 2022, sec. 3.2-3.3)."""

    def __init__(self, label_words: Mapping[str, Sequence[str] | str]):
        super().__init__(label_words)
        self.register_buffer("log_prior", torch.zeros(len(self.words)), persistent=False)
        self.register_buffer("keep", torch.ones(len(self.words), dtype=torch.bool), persistent=False)
        self.anchor = tuple(self.word_class.index(c) for c in range(len(self.labels)))

    @classmethod
    def from_file(cls, path: str | Path, labels: Sequence[str]) -> "KnowledgeableVerbalizer":
        """KPT's word-list format: line i holds class ``labels[i]``'s words, comma-separated,
        the anchor first; blank lines are skipped."""
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) != len(labels):
            raise VerbalizerError(f"{path}: {len(lines)} word lines for {len(labels)} labels {list(labels)}")
        return cls({lab: [w for w in ln.split(",") if w.strip()] for lab, ln in zip(labels, lines)})

    def calibrate(self, support_word_logp: Tensor) -> Tensor:
        """Set ``log P~(w) = log mean_x p(w | x)`` over unlabelled support inputs [N, W]; returns it.
        Class scores then use ``log p(w | x) - log P~(w)`` (KPT eq. 6)."""
        if support_word_logp.dim() != 2 or support_word_logp.size(1) != len(self.words):
            raise VerbalizerError(f"calibrate expects [N, {len(self.words)}] label-word log-probs, "
                                  f"got {list(support_word_logp.shape)}")
        n = support_word_logp.size(0)
        self.log_prior = (torch.logsumexp(support_word_logp.detach(), 0) - math.log(n)).to(self.log_prior)
        return self.log_prior

    def relevance(self, word_vectors: Tensor) -> Tensor:
        """r(v, y) of every word v for its own class y (KPT eq. 5, as a TF-IDF-like ratio):
        ``cos(q(v), q(y)) * (|Y| - 1) / sum_{y' != y} cos(q(v), q(y'))`` with ``q(y)`` the
        anchor's vector; the denominator is clamped at 1e-6 * (|Y| - 1)."""
        if len(self.labels) < 2:
            raise VerbalizerError("relevance refinement needs at least two classes")
        q = F.normalize(word_vectors.float(), dim=-1)
        cos = q @ q[list(self.anchor)].T                                     # [W, C]
        own = cos[range(len(self.words)), list(self.word_class)]
        others = cos.sum(-1) - own
        n_other = len(self.labels) - 1
        return own * n_other / others.clamp_min(1e-6 * n_other)

    def refine(self, word_vectors: Tensor, threshold: float = 1.0) -> list[str]:
        """Drop the words with ``relevance < threshold`` (anchors are kept); returns the dropped."""
        r = self.relevance(word_vectors)
        keep = r >= threshold
        keep[list(self.anchor)] = True
        self.keep = keep.to(self.keep.device)
        return [w for w, k in zip(self.words, keep.tolist()) if not k]

    def class_scores(self, word_logp: Tensor) -> Tensor:
        member = self.member * self.keep[None].to(self.member.dtype)
        return self.aggregate(word_logp - self.log_prior[None].to(word_logp.dtype), member)


class SoftVerbalizer(nn.Module):
    """WARP: ``score_c = <w_c, h_mask> + b_c`` with learned class vectors ``w_c`` (initialised
    from ``init`` [C, D], e.g. label-word embeddings, or randomly)."""

    needs_hidden = True

    def __init__(self, labels: Sequence[str], hidden_size: int, init: Tensor | None = None):
        super().__init__()
        self.labels = tuple(str(lab) for lab in labels)
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise VerbalizerError(f"labels must be distinct and non-empty, got {list(labels)}")
        if init is not None and tuple(init.shape) != (len(self.labels), hidden_size):
            raise VerbalizerError(f"init must be [{len(self.labels)}, {hidden_size}], got {list(init.shape)}")
        weight = init.detach().clone().float() if init is not None else \
            torch.randn(len(self.labels), hidden_size) * hidden_size ** -0.5
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(len(self.labels)))

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise VerbalizerError(f"label {label!r} is not one of the verbalizer's {list(self.labels)}")
        return self.labels.index(label)

    def class_scores_from_hidden(self, hidden: Tensor) -> Tensor:
        """[B, D] hidden states at the mask -> [B, C] class scores."""
        return hidden @ self.weight.to(hidden.dtype).T + self.bias.to(hidden.dtype)
