"""Knowledge distillation: a frozen teacher's outputs train a smaller student.

* ``kd_logits_loss``: T²·KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015; the T² keeps the
  gradient's scale as T changes, since the soft targets' gradients scale as 1/T²).
* ``hidden_mse``: MSE between a student layer's hidden state (through a learned linear
  projection when the widths differ) and its teacher layer's (TinyBERT, Jiao et al. 2020).
* ``attention_mse``: MSE between attention maps (TinyBERT), or ``kind="kl"``: KL between the
  teacher's and the student's attention distributions (MiniLM, Wang et al. 2020).
* ``layer_map``: student layer i ← teacher layer j, "uniform" j = (i+1)·L_t/L_s − 1, or explicit.
* ``DistillationModel``: student (trainable) + teacher (frozen, eval mode) whose forward returns
  a ModelOutput with loss = α·task + β·KD + γ·hidden + δ·attention, so the one Trainer trains it
  under any strategy (under ZeRO-3 the teacher's blocks are units of frozen parameters only).
* ``student_from_teacher``: a shallower copy initialised from chosen teacher layers
  (DistilBERT, Sanh et al. 2019: every other layer).
Padding is masked everywhere (``attention_mask``: 1 = real token). Docs: docs/compression.md.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.compress.capture import (Capture, attention_site, block_list_paths,
                                           blocks_of, check_layers, hidden_width,
                                           one_block_list)
from bmray.models.config import ModelConfig
from bmray.models.outputs import ModelOutput
from bmray.models.structure import find_blocks
from bmray.models.typed_config import ConfigError, check_choice

__all__ = ["ATTENTION_LOSSES", "DistillConfig", "DistillationModel", "LABEL_KEYS",
           "attention_mse", "hidden_mse", "kd_logits_loss", "layer_map", "masked_mean",
           "student_from_teacher"]

ATTENTION_LOSSES = ("mse", "kl")
LABEL_KEYS = ("labels", "mlm_labels", "nsp_labels")     # what the teacher is not given
WEIGHTS = ("task_weight", "kd_weight", "hidden_weight", "attention_weight")


# ---------------------------------------------------------------- losses

def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` (same shape, 1 = real) is set."""
    if mask is None:
        return x.mean()
    if mask.shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover values of shape "
                         f"{tuple(x.shape)}")
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def kd_logits_loss(student: Tensor, teacher: Tensor, temperature: float,
                   mask: Tensor | None = None) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)): summed over the last (class) axis,
    averaged over the other positions (those where ``mask`` is 1). Hinton et al. 2015."""
    if student.shape != teacher.shape:
        raise ValueError(f"kd_logits_loss: student logits {tuple(student.shape)} and teacher "
                         f"logits {tuple(teacher.shape)} differ")
    if not temperature > 0:
        raise ValueError(f"kd_logits_loss: temperature must be > 0, got {temperature!r}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return temperature ** 2 * masked_mean(kl, mask)


def hidden_mse(student: Tensor, teacher: Tensor, proj: nn.Module | None = None,
               mask: Tensor | None = None) -> Tensor:
    """MSE(proj(student), teacher) over the features, averaged over the real positions
    ([B, T, D] with ``mask`` [B, T]). TinyBERT eq. 8 (``proj`` = W_h when widths differ)."""
    s = proj(student) if proj is not None else student
    if s.shape != teacher.shape:
        raise ValueError(f"hidden_mse: student hidden {tuple(s.shape)} and teacher hidden "
                         f"{tuple(teacher.shape)} differ (a projection maps the student's width "
                         f"onto the teacher's)")
    return masked_mean((s.float() - teacher.detach().float()).pow(2).mean(dim=-1), mask)


def attention_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None,
                  kind: str = "mse") -> Tensor:
    """Distance between attention maps [B, H, T, T] (probabilities).

    ``"mse"`` (TinyBERT eq. 7): mean squared difference over heads and (real query, real
    key) pairs. ``"kl"`` (MiniLM eq. 4): KL(teacher row ‖ student row) summed over keys,
    averaged over heads and real queries. ``mask`` [B, T]: 1 = real token."""
    check_choice("distill.attention_loss", kind, ATTENTION_LOSSES)
    if student.shape != teacher.shape:
        raise ValueError(f"attention maps differ: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)} (the same heads and length are needed)")
    s, t = student.float(), teacher.detach().float()
    b, h, tq, _ = s.shape
    if kind == "mse":
        d = (s - t).pow(2)
        if mask is None:
            return d.mean()
        m = mask.to(d.dtype)
        pairs = (m[:, None, :, None] * m[:, None, None, :]).expand_as(d)
        return (d * pairs).sum() / pairs.sum().clamp(min=1.0)
    tiny = torch.finfo(s.dtype).tiny
    kl = torch.where(t > 0, t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log()),
                     torch.zeros_like(t)).sum(dim=-1)                     # [B, H, T]
    rows = None if mask is None else mask[:, None, :].expand(b, h, tq)
    return masked_mean(kl, rows)


def layer_map(spec: str | Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer of each student layer: ``"uniform"`` j = (i+1)·L_t/L_s − 1 (floored;
    6→3: 1, 3, 5: each student layer learns from the last of its group), or an explicit list
    of L_s teacher indices. Out of range: ConfigError naming ``distill.layer_map``."""
    if isinstance(spec, str):
        check_choice("distill.layer_map", spec, ("uniform",))
        if n_student > n_teacher:
            raise ConfigError(f"distill.layer_map: a uniform map needs a student no deeper than "
                              f"the teacher ({n_student} > {n_teacher} layers)")
        return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
    out = list(spec)
    if len(out) != n_student:
        raise ConfigError(f"distill.layer_map: {len(out)} entries for a {n_student}-layer student")
    for i, j in enumerate(out):
        if not 0 <= j < n_teacher:
            raise ConfigError(f"distill.layer_map[{i}]: teacher layer {j} is outside the "
                              f"teacher's {n_teacher} layers")
    return out


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss: ``task_weight`` α · the student's own task loss + ``kd_weight``
    β · KD on logits at ``temperature`` + ``hidden_weight`` γ · hidden MSE + ``attention_weight``
    δ · attention loss (``attention_loss``: "mse" | "kl"), the last two over ``layer_map``.
    Defaults: Hinton et al.'s weighted average of hard and soft targets at T = 2."""

    task_weight: float = 0.5
    kd_weight: float = 0.5
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    temperature: float = 2.0
    layer_map: str | tuple[int, ...] = "uniform"
    attention_loss: str = "mse"

    def __post_init__(self) -> None:
        for key in WEIGHTS:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"distill.{key}: must be a number >= 0, got {v!r}")
        if not any(getattr(self, key) > 0 for key in WEIGHTS):
            raise ConfigError(f"distill: every weight ({', '.join(WEIGHTS)}) is 0: nothing "
                              f"would train")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"distill.temperature: must be a number > 0, got {t!r}")
        check_choice("distill.attention_loss", self.attention_loss, ATTENTION_LOSSES)
        lm = self.layer_map
        if isinstance(lm, str):
            check_choice("distill.layer_map", lm, ("uniform",))
        else:
            try:
                lm = tuple(lm)
            except TypeError:
                raise ConfigError(f"distill.layer_map: 'uniform' or a list of teacher layer "
                                  f"indices, got {self.layer_map!r}") from None
            for i, j in enumerate(lm):
                if isinstance(j, bool) or not isinstance(j, int) or j < 0:
                    raise ConfigError(f"distill.layer_map[{i}]: expected a teacher layer index "
                                      f">= 0, got {j!r}")
            object.__setattr__(self, "layer_map", lm)

    @property
    def needs_layers(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


# ---------------------------------------------------------------- the model

def _logits(out: Any) -> Tensor | None:
    return getattr(out, "logits", None)


class DistillationModel(nn.Module):
    """``student`` trained against a frozen ``teacher``; forward(**batch) -> ModelOutput.

    The student sees the whole batch (its task loss needs the labels); the teacher the batch
    without labels, under ``no_grad``, always in eval mode. ``metrics``: each loss term.
    ``block_lists``: the student's then the teacher's (ZeRO-3 units, in the order they run).
    ``student_block_list`` / ``teacher_block_list`` choose the list distilled for a model with
    several."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig, *,
                 student_block_list: str | None = None,
                 teacher_block_list: str | None = None) -> None:
        super().__init__()
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config: expected a DistillConfig, got {type(config).__name__}")
        if student is teacher:
            raise ValueError("the student and the teacher are the same module")
        self.student = student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.config = config          # the Trainer records it in checkpoints
        self.projections: nn.ModuleList | None = None
        self.layers: list[int] = []
        self._captures: tuple[Capture, Capture] | None = None
        try:
            lists = [*("student." + p for p in block_list_paths(student)),
                     *("teacher." + p for p in block_list_paths(teacher))]
            self.block_lists = tuple(lists)
        except ValueError:
            pass                        # not sharded per block: the strategy treats it whole
        if config.needs_layers:
            self._setup_layers(student_block_list, teacher_block_list)

    def _setup_layers(self, s_list: str | None, t_list: str | None) -> None:
        cfg = self.config
        s_blocks = blocks_of(self.student, s_list)
        t_blocks = blocks_of(self.teacher, t_list)
        self.layers = layer_map(cfg.layer_map, len(s_blocks), len(t_blocks))
        if cfg.attention_weight > 0:
            for i, j in enumerate(self.layers):
                hs, ht = attention_site(s_blocks[i]).n_heads, attention_site(t_blocks[j]).n_heads
                if hs != ht:
                    raise ConfigError(f"distill.attention_weight: student layer {i} has {hs} "
                                      f"heads, teacher layer {j} has {ht}; attention maps are "
                                      f"compared head by head")
        if cfg.hidden_weight > 0:
            self.projections = nn.ModuleList(
                nn.Linear(hidden_width(s_blocks[i]), hidden_width(t_blocks[j]))
                if hidden_width(s_blocks[i]) != hidden_width(t_blocks[j]) else nn.Identity()
                for i, j in enumerate(self.layers))
        kinds = dict(hidden=cfg.hidden_weight > 0, attention=cfg.attention_weight > 0)
        self._captures = (
            Capture(self.student, range(len(s_blocks)), block_list=one_block_list(
                self.student, s_list), **kinds),
            Capture(self.teacher, sorted(set(self.layers)), block_list=one_block_list(
                self.teacher, t_list), **kinds))

    def release(self) -> nn.Module:
        """Take the capture hooks off both models and return the student (the next stage of a
        recipe gets a plain model that records nothing)."""
        if self._captures is not None:
            for cap in self._captures:
                cap.remove()
            self._captures = None
        return self.student

    def train(self, mode: bool = True) -> "DistillationModel":
        super().train(mode)
        self.teacher.eval()             # the teacher's dropout never fires
        return self

    def forward(self, **batch: Any) -> ModelOutput:
        cfg = self.config
        if cfg.task_weight > 0 and not any(k in batch for k in LABEL_KEYS):
            raise ValueError(f"distill.task_weight is {cfg.task_weight} but the batch has no "
                             f"labels ({', '.join(LABEL_KEYS)}); set task_weight: 0 to distil "
                             f"without them")
        mask = batch.get("attention_mask")
        teacher_batch = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        caps = self._captures
        try:
            s_out = self.student(**batch)           # the student first: ZeRO-3's unit order
            with torch.no_grad():
                t_out = self.teacher(**teacher_batch)
            terms = self._terms(s_out, t_out, mask)
        finally:
            if caps is not None:
                caps[0].clear()
                caps[1].clear()
        weights = {"task": cfg.task_weight, "kd": cfg.kd_weight, "hidden": cfg.hidden_weight,
                   "attention": cfg.attention_weight}
        loss = sum(weights[k] * v for k, v in terms.items() if weights[k] > 0)
        aux = getattr(s_out, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
        metrics = dict(getattr(s_out, "metrics", None) or {})
        metrics.update({f"{k}_loss": v.detach() for k, v in terms.items()})
        return ModelOutput(logits=_logits(s_out), loss=loss, aux_loss=aux, metrics=metrics)

    def _terms(self, s_out: Any, t_out: Any, mask: Tensor | None) -> dict[str, Tensor]:
        cfg = self.config
        terms: dict[str, Tensor] = {}
        if cfg.task_weight > 0:
            task = getattr(s_out, "loss", None)
            if task is None:
                raise ValueError("distill.task_weight > 0 but the student returned no loss")
            aux = getattr(s_out, "aux_loss", None)
            terms["task"] = task - aux if aux is not None else task    # aux added once
        if cfg.kd_weight > 0:
            s_logits, t_logits = _logits(s_out), _logits(t_out)
            if s_logits is None or t_logits is None:
                raise ValueError(f"distill.kd_weight > 0 needs logits from both models "
                                 f"(student: {type(s_out).__name__}, teacher: "
                                 f"{type(t_out).__name__})")
            pos = mask if mask is not None and s_logits.dim() == mask.dim() + 1 and \
                s_logits.shape[:-1] == mask.shape else None
            terms["kd"] = kd_logits_loss(s_logits, t_logits, cfg.temperature, pos)
        if cfg.needs_layers:
            if self._captures is None:
                raise RuntimeError("this DistillationModel was released: its hooks are off")
            s_cap, t_cap = self._captures
            if cfg.hidden_weight > 0:
                terms["hidden"] = torch.stack([
                    hidden_mse(s_cap.hidden[i], t_cap.hidden[j], self.projections[i], mask)
                    for i, j in enumerate(self.layers)]).mean()
            if cfg.attention_weight > 0:
                terms["attention"] = torch.stack([
                    attention_mse(s_cap.attention(i, mask), t_cap.attention(j, mask), mask,
                                  cfg.attention_loss)
                    for i, j in enumerate(self.layers)]).mean()
        return terms


# ---------------------------------------------------------------- the student

def student_from_teacher(teacher: nn.Module, layers: Sequence[int] | None = None, *,
                         block_list: str | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only blocks ``layers`` (default: every other one, 0, 2,
    4, …: DistilBERT's initialisation) of its block list, every parameter trainable and the
    config's layer count updated (our ``ModelConfig.n_layers``, a ``transformers`` config's
    ``num_hidden_layers``). Pass a plain model: a delta's hooks are not copied."""
    path = one_block_list(teacher, block_list)
    n = len(find_blocks(teacher, [path]))
    layers = check_layers(range(0, n, 2) if layers is None else layers, n,
                          "distill.student_layers")
    student = copy.deepcopy(teacher)
    parent_path, _, attr = path.rpartition(".")
    parent = student.get_submodule(parent_path) if parent_path else student
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(old[j] for j in layers))
    for i, block in enumerate(getattr(parent, attr)):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i         # a transformers layer's cache index
    seen: set[int] = set()
    for m in student.modules():
        c = getattr(m, "config", None)
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        if isinstance(c, ModelConfig):
            key = "n_decoder_layers" if attr == "decoder_blocks" else "n_layers"
            m.config = dataclasses.replace(c, **{key: len(layers)})
        elif hasattr(c, "num_hidden_layers"):
            c.num_hidden_layers = len(layers)
    student.requires_grad_(True)
    return student.train()
