"""An extractive span reader: a linear start/end head over a BERT-family encoder.

BERT's SQuAD head (Devlin et al. 2019, sec. 4.2): one linear layer maps each final hidden
state to a start and an end logit; the loss is (CE(start) + CE(end)) / 2 over the positions a
span may use ([CLS] and the context tokens; the rest are masked out). A span (s, e) scores
start[s] + end[e] with s <= e and at most ``max_answer_tokens`` tokens; over a context's
windows the best span wins. SQuAD v2 (Rajpurkar et al. 2018): the null score is
start[CLS] + end[CLS] (the smallest over the windows, as HF's ``utils_qa.py``), and the reader
abstains (predicts "") when null - best > a threshold tuned on dev data (``tune_threshold``).
The encoder is our BERT (``encode``) or a ``transformers`` encoder such as the MiniLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.layers.losses import metrics_enabled
from bmray.models.outputs import ModelOutput
from bmray.models.qa.windows import SpanTokenizer, Window, collate, make_windows
from bmray.models.retrieval.encoder import last_hidden

MASKED = -1e4        # logit of a position no span may use (finite: no NaN in fp16 softmax)


def span_mask(context_mask: Tensor) -> Tensor:
    """Positions a start/end may take: the context tokens and [CLS] (position 0)."""
    valid = context_mask.bool().clone()
    valid[:, 0] = True
    return valid


class SpanReader(nn.Module):
    """forward(input_ids, attention_mask, token_type_ids, context_mask, start_positions,
    end_positions) -> ModelOutput(logits [B, T, 2] (start, end; masked), loss)."""

    def __init__(self, encoder: nn.Module, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.qa_outputs = nn.Linear(hidden, 2)
        lists = getattr(encoder, "block_lists", None)
        if lists:
            self.block_lists = tuple("encoder." + p for p in lists)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, context_mask: Tensor | None = None,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                **_: Any) -> ModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # segment ids: question 0, context 1, as in BERT's pair inputs
        hidden = last_hidden(self.encoder, input_ids, attention_mask, token_type_ids)
        logits = self.qa_outputs(self.dropout(hidden)).float()
        valid = span_mask(attention_mask if context_mask is None else context_mask)
        logits = logits.masked_fill(~valid.unsqueeze(-1), MASKED)
        loss, metrics = None, {}
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(logits[..., 0], start_positions)
                    + F.cross_entropy(logits[..., 1], end_positions)) / 2
            if metrics_enabled():
                hit = (logits[..., 0].argmax(-1) == start_positions) \
                    & (logits[..., 1].argmax(-1) == end_positions)
                metrics["span_acc"] = hit.float().mean().detach()
        return ModelOutput(logits=logits, loss=loss, metrics=metrics)


@dataclass(frozen=True)
class Prediction:
    """The best span of one (question, context): its text and character span, its score
    start + end, the null score, and ``answer`` — "" when null - score > the threshold."""

    text: str
    start: int
    end: int
    score: float
    null_score: float
    answer: str

    @property
    def null_margin(self) -> float:
        """null - best: the quantity the threshold is compared with."""
        return self.null_score - self.score


def best_span(start_logits: Tensor, end_logits: Tensor, context_mask: Tensor,
              max_answer_tokens: int) -> tuple[float, int, int] | None:
    """(score, s, e) maximising start[s] + end[e] over context tokens s <= e < s + max; None
    when the window has no context token."""
    ctx = context_mask.bool()
    if not ctx.any():
        return None
    scores = start_logits.float()[:, None] + end_logits.float()[None, :]
    n = scores.size(0)
    pos = torch.arange(n)
    length = pos[None, :] - pos[:, None]
    ok = ctx[:, None] & ctx[None, :] & (length >= 0) & (length < max_answer_tokens)
    flat = scores.masked_fill(~ok, float("-inf")).flatten()
    i = int(flat.argmax())
    return float(flat[i]), i // n, i % n


def decode(windows: Sequence[Window], logits: Tensor, context: str, max_answer_tokens: int = 30,
           threshold: float = 0.0) -> Prediction:
    """The prediction for one context from its windows' logits [W, T, 2] (rows in order)."""
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    if len(windows) != logits.size(0):
        raise ValueError(f"{len(windows)} windows but logits for {logits.size(0)}")
    best, null = None, float("inf")
    for w, lg in zip(windows, logits):
        null = min(null, float(lg[0, 0] + lg[0, 1]))
        ctx = torch.tensor([o is not None for o in w.offsets]
                           + [False] * (lg.size(0) - len(w.offsets)))
        found = best_span(lg[:, 0], lg[:, 1], ctx, max_answer_tokens)
        if found and (best is None or found[0] > best[0]):
            best = (found[0], w.offsets[found[1]][0], w.offsets[found[2]][1])
    if best is None:
        return Prediction("", 0, 0, float("-inf"), null, "")
    score, start, end = best
    text = context[start:end]
    return Prediction(text, start, end, score, null,
                      "" if null - score > threshold else text)


def tune_threshold(null_margins: Sequence[float], score_if_answered: Sequence[float],
                   score_if_abstained: Sequence[float]) -> tuple[float, float]:
    """The threshold t maximising the mean score when a question abstains iff its
    null - best margin > t (the SQuAD v2 script's ``find_best_thresh``), and that mean."""
    d = np.asarray(null_margins, dtype=np.float64)
    if d.size == 0:
        raise ValueError("tune_threshold: no questions")
    ans, null = np.asarray(score_if_answered, float), np.asarray(score_if_abstained, float)
    cands = np.concatenate([[d.min() - 1.0], np.unique(d)])     # first: always abstain
    means = np.where(d[None, :] > cands[:, None], null[None, :], ans[None, :]).mean(1)
    i = int(means.argmax())
    return float(cands[i]), float(means[i])


def read(reader: nn.Module, tokenizer: SpanTokenizer, questions: Sequence[str],
         contexts: Sequence[str], max_length: int = 384, doc_stride: int = 128,
         max_answer_tokens: int = 30, threshold: float = 0.0, batch_size: int = 32
         ) -> list[Prediction]:
    """Predictions for (question, context) pairs: window, run ``reader`` in batches, decode."""
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    windows = [w for i, (q, c) in enumerate(zip(questions, contexts))
               for w in make_windows(q, c, tokenizer, max_length, doc_stride, example=i)]
    device = next(reader.parameters()).device
    rows: list[Tensor] = []
    was_training = reader.training
    reader.eval()
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            batch = collate(windows[lo:lo + batch_size], tokenizer.pad_id)
            out = reader(**{k: v.to(device) for k, v in batch.items()
                            if k not in ("start_positions", "end_positions")})
            rows.extend(F.pad(out.logits.cpu(), (0, 0, 0, max_length - out.logits.size(1)),
                              value=MASKED))
    reader.train(was_training)
    groups: dict[int, list[int]] = {}
    for j, w in enumerate(windows):
        groups.setdefault(w.example, []).append(j)
    preds = []
    for i, context in enumerate(contexts):
        idx = groups[i]
        preds.append(decode([windows[j] for j in idx], torch.stack([rows[j] for j in idx]),
                            context, max_answer_tokens, threshold))
    return preds
