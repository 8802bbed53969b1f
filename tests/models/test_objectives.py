"""Objectives (causal LM, dynamic masking + NSP, ELECTRA sampling, T5 span corruption) and losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bmray.models.families.bert import sample_tokens
from bmray.models.config import ModelConfig
from bmray.models.layers.losses import accuracy, cross_entropy
from bmray.models.objectives import CausalLM, Electra, MaskedLM, SpanCorruption, objective_for

torch.set_num_threads(1)
V = 100
CFG = ModelConfig(family="bert", vocab_size=V, sentinel_ids=list(range(90, 100)))
SPECIALS = set(CFG.special_ids())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks(b=4, length=32, seed=0):
    return torch.randint(7, 90, (b, length), generator=gen(seed))


# ------------------------------------------------------------------------------------------- losses

def _smoothed_ce_reference(logits, labels, eps):
    """The formula written out in float64: mean over counted positions of
    (1 - eps) * -log p_y + eps * mean_j -log p_j."""
    x = logits.reshape(-1, logits.size(-1)).double()
    y = labels.reshape(-1)
    keep = y != -100
    logp = x[keep] - torch.logsumexp(x[keep], dim=-1, keepdim=True)
    nll = -logp.gather(1, y[keep][:, None]).squeeze(1)
    return ((1 - eps) * nll + eps * -logp.mean(dim=-1)).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("ignored", ["few", "most"])     # all rows / only the counted rows
def test_cross_entropy_matches_the_formula_with_smoothing_and_ignore_index(eps, ignored):
    g = gen(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    if ignored == "most":           # masked LM: fewer than half the positions count
        labels[1:, :] = -100
    ours = cross_entropy(logits, labels, label_smoothing=eps)
    ref = _smoothed_ce_reference(logits, labels, eps)
    torch.testing.assert_close(ours.double(), ref)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2.float())
    # and torch's own smoothing agrees
    torch.testing.assert_close(ours, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1),
                                                     ignore_index=-100, label_smoothing=eps))


def test_cross_entropy_with_nothing_to_predict_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_accuracy_ignores_ignored_positions():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    assert float(accuracy(logits, torch.tensor([[1, 1, -100]]))) == pytest.approx(0.5)



# ------------------------------------------------------------------------------------------ causal

def test_causal_lm_shifts_blocks():
    x = blocks()
    x[0, -1] = 0
    batch = CausalLM(pad_id=0)(x, gen(0))
    assert torch.equal(batch["input_ids"], x[:, :-1])
    assert torch.equal(batch["labels"][1:], x[1:, 1:])
    assert batch["labels"][0, -1] == -100                       # pad targets are ignored


# -------------------------------------------------------------------------------- dynamic masking

def _mlm(nsp=False, **kw):
    return MaskedLM(vocab_size=V, mask_id=CFG.mask_id, pad_id=CFG.pad_id, cls_id=CFG.cls_id,
                    sep_id=CFG.sep_id, special_ids=CFG.special_ids(), nsp=nsp, **kw)


def test_dynamic_masking_is_seeded_by_the_generator():
    mlm, x = _mlm(), blocks()
    a, b = mlm(x, gen(1)), mlm(x, gen(1))
    c = mlm(x, gen(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mlm_labels"] != -100, c["mlm_labels"] != -100)


def test_masking_proportions_80_10_10_over_many_tokens():
    mlm = _mlm()
    x = blocks(b=64, length=256, seed=3)
    x[:, ::17] = CFG.sep_id                                    # specials are never chosen
    batch = mlm(x, gen(5))
    labels, inp = batch["mlm_labels"], batch["input_ids"]
    chosen = labels != -100
    candidates = ~torch.isin(x, torch.tensor(sorted(SPECIALS)))
    assert not (chosen & ~candidates).any()
    assert torch.equal(labels[chosen], x[chosen])              # labels are the original tokens
    assert torch.equal(inp[~chosen], x[~chosen])               # unchosen tokens untouched
    n = int(chosen.sum())
    assert n / int(candidates.sum()) == pytest.approx(0.15, abs=0.01)
    as_mask = (inp[chosen] == CFG.mask_id).float().mean().item()
    kept = (inp[chosen] == x[chosen]).float().mean().item()
    randomised = 1 - as_mask - kept
    # a random replacement equals the original with prob 1/|pool|; expected kept ~ 0.1 + 0.1/83
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.015)
    assert randomised == pytest.approx(0.1, abs=0.015)
    replaced = inp[chosen & (inp != CFG.mask_id) & (inp != x)]
    assert not torch.isin(replaced, torch.tensor(sorted(SPECIALS))).any()


def test_nsp_pairs_are_cls_a_sep_b_sep_with_correct_labels():
    mlm = _mlm(nsp=True, mask_prob=0.0)
    x = blocks(b=8, length=21)
    batch = mlm(x, gen(0))
    ids, types, nsp = batch["input_ids"], batch["token_type_ids"], batch["nsp_labels"]
    n, half = 21 - 3, (21 - 3) // 2
    assert ids.shape == x.shape and "mlm_labels" in batch
    assert (ids[:, 0] == CFG.cls_id).all() and (ids[:, half + 1] == CFG.sep_id).all()
    assert (ids[:, -1] == CFG.sep_id).all()
    assert torch.equal(ids[:, 1:half + 1], x[:, :half])
    assert (types[:, :half + 2] == 0).all() and (types[:, half + 2:] == 1).all()
    for row in range(8):
        seg_b = ids[row, half + 2:-1]
        if nsp[row] == 0:
            assert torch.equal(seg_b, x[row, half:n])
        else:
            others = [r for r in range(8) if r != row]
            assert any(torch.equal(seg_b, x[r, half:n]) for r in others)
    many = mlm(blocks(b=2000, length=8), gen(1))["nsp_labels"].float().mean().item()
    assert many == pytest.approx(0.5, abs=0.04)


def test_objective_for_each_family():
    assert isinstance(objective_for(ModelConfig(family="gpt", vocab_size=V)), CausalLM)
    bert = objective_for(ModelConfig(family="bert", vocab_size=V))
    assert isinstance(bert, MaskedLM) and bert.nsp
    electra = objective_for(ModelConfig(family="electra", vocab_size=V))
    assert isinstance(electra, Electra) and not electra.nsp
    assert set(electra(blocks(), gen(0))) == {"input_ids", "attention_mask", "mlm_labels"}
    t5 = objective_for(ModelConfig(family="t5", vocab_size=V, sentinel_ids=[90, 91, 92]))
    assert isinstance(t5, SpanCorruption) and t5.sentinel_ids == [90, 91, 92]


# -------------------------------------------------------------------------------- ELECTRA sampling

@pytest.mark.parametrize("method", ["gumbel", "multinomial"])
def test_replacement_sampling_follows_the_generator_softmax(method):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4)
    draws = sample_tokens(logits, method, gen(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    assert torch.equal(draws, sample_tokens(logits, method, gen(0)))
    assert not torch.equal(draws, sample_tokens(logits, method, gen(1)))


# --------------------------------------------------------------------------------- span corruption

def _reconstruct(inputs, targets, sentinels, eos):
    """Undo span corruption: each sentinel in the input is replaced by what follows it in the target."""
    spans, current = {}, None
    for tok in targets:
        if tok == eos:
            break
        if tok in sentinels:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out = []
    for tok in inputs:
        if tok == eos:
            break
        out.extend(spans[tok] if tok in sentinels else [tok])
    return out


def test_span_corruption_reconstructs_and_has_t5_counts():
    sentinels = list(range(90, 100))
    sc = SpanCorruption(sentinel_ids=sentinels, eos_id=2)
    x = blocks(b=6, length=60)
    batch = sc(x, gen(0))
    num_noise, num_spans = round(60 * 0.15), round(round(60 * 0.15) / 3)
    assert batch["input_ids"].shape == (6, 60 - num_noise + num_spans + 1)
    assert batch["labels"].shape == (6, num_noise + num_spans + 1)
    for row in range(6):
        inp, tgt = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert _reconstruct(inp, tgt, set(sentinels), 2) == x[row].tolist()
        used = [t for t in inp if t in sentinels]
        assert used == sentinels[:num_spans]                   # sentinels in order, one per span
        assert [t for t in tgt if t in sentinels] == used
        assert inp[-1] == 2 and tgt[-1] == 2
    again = sc(x, gen(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert not torch.equal(sc(x, gen(1))["input_ids"], batch["input_ids"])


def test_span_lengths_average_mean_span():
    sc = SpanCorruption(sentinel_ids=list(range(90, 100)), eos_id=2, mean_span=3.0)
    lengths = []
    for seed in range(200):
        mask = sc.noise_mask(100, gen(seed))
        assert int(mask.sum()) == 15 and not mask[0]
        runs = torch.diff(torch.cat([torch.tensor([0]), mask.long(), torch.tensor([0])]))
        starts, ends = (runs == 1).nonzero().flatten(), (runs == -1).nonzero().flatten()
        assert len(starts) == 5
        lengths += (ends - starts).tolist()
    assert sum(lengths) / len(lengths) == pytest.approx(3.0)


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruption(sentinel_ids=[90], eos_id=2)(blocks(length=60), gen(0))
