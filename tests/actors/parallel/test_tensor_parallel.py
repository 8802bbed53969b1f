"""Tensor parallelism (actors/parallel/tensor/) against the single-process model.

One gang of 4 Ray workers (gloo, 1 thread each). Process groups per worker, made once:
tp=2 as [0, 1] and [2, 3] (the second checks group ranks vs global ranks), tp=4 as
[0, 1, 2, 3]. Every worker also builds the full single-process model from the same seed and
computes the reference itself, so each rank compares its own TP result.

Reference: the plain model of models/ (``models.losses.cross_entropy`` for the loss), a tiny
GPT with an uneven vocabulary (31 = 7*4+3: shards 16/15 at tp=2, 8/8/8/7 at tp=4) and an
uneven FFN (d_ff 70: 18/18/17/17 at tp=4), d_model 32, 4 heads, 2 layers, tied embeddings.
Dropout is 0 for every equality test (a TP run cannot draw the single process's masks: the
attention and sequence-parallel dropout use per-rank streams by design); the RNG scheme is
tested on its own (identical outer streams, different forked streams per TP rank).

Tolerance (fp32): the TP model computes the same sums split into per-rank partial sums added by
all-reduce / reduce-scatter, and the loss uses a max/log-sum-exp assembled from shards, so
results differ from the single process by float32 rounding only (~1e-7 relative per op, a few
ops deep): losses and logits rtol 1e-5 / atol 1e-6, gradients rtol 1e-5 / atol 1e-6.
After 5 AdamW steps, weights rtol 1e-5 / atol 1e-5 with Adam's eps = 1e-5 (not 1e-8): Adam's
update ``m / (sqrt(v) + eps)`` reacts to a change of a near-zero gradient element with a slope up
to ``lr / eps``, so with eps 1e-8 a 1e-9 rounding difference (which the float32 loss alone
produces, even at tp=1) becomes a ~1e-4 weight difference — and the key bias, whose true
gradient is identically zero (softmax ignores a shift shared by all keys), gets +-lr steps from
pure noise in both runs. eps 1e-5 bounds that slope at 300, so rounding stays below 1e-6, while
a real mistake (a missing or doubled reduction) still moves weights by O(lr) = 3e-3 per step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from bmray.actors.parallel.tensor import (
    ColumnParallelLinear, CopyToTensorParallel, GatherFromSequenceParallel,
    GatherFromTensorParallel, ReduceFromTensorParallel, ReduceScatterToSequenceParallel,
    RowParallelLinear, ScatterToSequenceParallel, TensorParallelLM, VocabParallelEmbedding,
    apply_tensor_parallel, gather_tensor_parallel_state, shard_tensor_parallel_state,
    split_sizes, sync_sequence_parallel_grads, tensor_parallel_dims, tensor_parallel_loss,
    tensor_parallel_rng, vocab_parallel_cross_entropy)
from bmray.models.config import ModelConfig
from bmray.models.layers.losses import cross_entropy
from bmray.models.families.registry import build_model
from bmray.models.structure import tensor_parallel_parameters
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)

TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 31
B, T = 2, 8
ADAMW = dict(lr=3e-3, weight_decay=0.1, eps=1e-5)     # eps: see the module docstring


def gpt_config(**kw) -> ModelConfig:
    base = dict(family="gpt", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=70,
                max_seq_len=16, dropout=0.0, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def batch(seed: int, masked: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and aligned labels (some ignored); optionally a left-padded row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, :3] = -100
    out = {"input_ids": ids, "labels": labels}
    if masked:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :2] = 0
        labels[1, :2] = -100
        out["attention_mask"] = mask
    return out


# --------------------------------------------------------------------- worker-side groups
_GROUPS: dict[int, object] = {}


def _group(tp: int):
    """This worker's TP group of size tp (all ranks create all groups once, in one order)."""
    if not _GROUPS:
        _GROUPS[2] = [dist.new_group([0, 1]), dist.new_group([2, 3])][dist.get_rank() // 2]
        _GROUPS[4] = dist.new_group([0, 1, 2, 3])
    return _GROUPS[tp]


@pytest.fixture(scope="module")
def gang(gangs):
    return gangs(4)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_dict_close(got: dict, want: dict, tol: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"{what} {k}: {m}")


# ---------------------------------------------------------------------------- operators
def _operators(tp: int) -> bool:
    group = _group(tp)
    r = dist.get_rank(group)
    xs = [torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(s)) for s in range(tp)]
    gs = [torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(100 + s)) for s in range(tp)]
    total_x, total_g = sum(xs), sum(gs)

    def run(op, x, grad, *args):
        x = x.clone().requires_grad_()
        y = op.apply(x, group, *args)
        y.backward(grad)
        return y.detach(), x.grad

    # f: identity forward, all-reduce backward
    y, gx = run(CopyToTensorParallel, xs[r], gs[r])
    torch.testing.assert_close(y, xs[r], **TOL)
    torch.testing.assert_close(gx, total_g, **TOL)
    # g: all-reduce forward, identity backward
    y, gx = run(ReduceFromTensorParallel, xs[r], gs[r])
    torch.testing.assert_close(y, total_x, **TOL)
    torch.testing.assert_close(gx, gs[r], **TOL)
    # sequence all-gather forward, reduce-scatter backward
    big = [torch.cat([g] * tp, dim=1) * (s + 1) for s, g in enumerate(gs)]
    y, gx = run(GatherFromSequenceParallel, xs[r], big[r])
    torch.testing.assert_close(y, torch.cat(xs, dim=1), **TOL)
    torch.testing.assert_close(gx, torch.tensor_split(sum(big), tp, dim=1)[r], **TOL)
    # reduce-scatter forward, all-gather backward
    small = [torch.tensor_split(g, tp, dim=1)[0] for g in gs]
    y, gx = run(ReduceScatterToSequenceParallel, xs[r], small[r])
    torch.testing.assert_close(y, torch.tensor_split(total_x, tp, dim=1)[r], **TOL)
    torch.testing.assert_close(gx, torch.cat(small, dim=1), **TOL)
    # split forward (replicated input), all-gather backward
    y, gx = run(ScatterToSequenceParallel, xs[0], small[r])
    torch.testing.assert_close(y, torch.tensor_split(xs[0], tp, dim=1)[r], **TOL)
    torch.testing.assert_close(gx, torch.cat(small, dim=1), **TOL)
    # last-dim all-gather of uneven chunks forward, split backward
    sizes = split_sizes(7, tp)
    parts = [torch.randn(2, 3, n, generator=torch.Generator().manual_seed(7 + s))
             for s, n in enumerate(sizes)]
    grad = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(99))
    y, gx = run(GatherFromTensorParallel, parts[r], grad, sizes)
    torch.testing.assert_close(y, torch.cat(parts, dim=-1), **TOL)
    torch.testing.assert_close(gx, torch.tensor_split(grad, tp, dim=-1)[r], **TOL)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_operators_forward_and_backward(gang, tp):
    assert all(gang.execute(_operators, tp))


# ------------------------------------------------------------------- layers on their own
def _layers(tp: int) -> bool:
    group = _group(tp)
    torch.manual_seed(3)
    col, row = torch.nn.Linear(6, 10), torch.nn.Linear(10, 5)
    emb = torch.nn.Embedding(VOCAB, 4)
    x = torch.randn(3, 6)
    ids = torch.randint(0, VOCAB, (3, 5))
    want = row(torch.relu(col(x)))
    pc = ColumnParallelLinear.from_linear(col, group)
    pr = RowParallelLinear.from_linear(row, group)
    torch.testing.assert_close(pr(torch.relu(pc(x))), want, **TOL)
    gathered = ColumnParallelLinear.from_linear(col, group, gather_output=True)(x)
    torch.testing.assert_close(gathered, col(x), **TOL)
    pe = VocabParallelEmbedding.from_embedding(emb, group)
    sizes = split_sizes(VOCAB, tp)
    r = dist.get_rank(group)
    assert (pe.vocab_start, pe.vocab_end) == (sum(sizes[:r]), sum(sizes[:r + 1]))
    torch.testing.assert_close(pe(ids), emb(ids), **TOL)
    assert pc.weight.tp_dim == 0 and pc.bias.tp_dim == 0 and pr.weight.tp_dim == 1
    assert not hasattr(pr.bias, "tp_dim")
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_layers_equal_full_layers(gang, tp):
    assert all(gang.execute(_layers, tp))


# ------------------------------------------------------------------ vocab-parallel loss
def _cross_entropy(tp: int, smoothing: float, all_ignored: bool) -> bool:
    group = _group(tp)
    r = dist.get_rank(group)
    g = torch.Generator().manual_seed(5)
    full = (torch.randn(3, 8, VOCAB, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 8), generator=g)
    labels[torch.rand(3, 8, generator=g) < 0.25] = -100
    labels[0, 0], labels[0, 1] = 0, VOCAB - 1            # the first and last shard's edges
    if all_ignored:
        labels.fill_(-100)
    want = cross_entropy(full, labels, label_smoothing=smoothing)
    want.backward()
    start = sum(split_sizes(VOCAB, tp)[:r])
    local = torch.tensor_split(full.detach(), tp, dim=-1)[r].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, labels, group, start, label_smoothing=smoothing)
    got.backward()
    torch.testing.assert_close(got, want.detach(), **TOL)
    grads = [None] * tp
    dist.all_gather_object(grads, local.grad, group=group)
    torch.testing.assert_close(torch.cat(grads, dim=-1), full.grad, **TOL)
    return True


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("smoothing,all_ignored", [(0.0, False), (0.1, False), (0.1, True)])
def test_vocab_parallel_cross_entropy_matches_full(gang, tp, smoothing, all_ignored):
    assert all(gang.execute(_cross_entropy, tp, smoothing, all_ignored))


# --------------------------------------------------------------------- GPT equivalence
def _gpt_step(tp: int, sp: bool, smoothing: float) -> dict:
    group = _group(tp)
    cfg = gpt_config(label_smoothing=smoothing)
    ref = build(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), group, sequence_parallel=sp)
    lm = TensorParallelLM(model, group)
    data = batch(11, masked=sp)
    out_ref = ref(**data)
    out_ref.loss.backward()
    out = lm(**data)
    out.loss.backward()
    sync_sequence_parallel_grads(model, group)
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    assert float(out.metrics["lm_acc"]) == float(out_ref.metrics["lm_acc"])
    r = dist.get_rank(group)
    torch.testing.assert_close(out.logits, torch.tensor_split(out_ref.logits, tp, dim=-1)[r], **TOL)
    full = gather_tensor_parallel_state(_grads(model), model, group)
    _assert_dict_close(full, _grads(ref), TOL, "grad")
    assert model.lm_head.weight is model.embed.tok.weight
    return {"loss": float(out.loss), "ref": float(out_ref.loss)}


@pytest.mark.parametrize("tp,sp,smoothing", [(2, False, 0.0), (2, True, 0.1),
                                             (4, False, 0.1), (4, True, 0.0)])
def test_gpt_loss_and_grads_equal_single_process(gang, tp, sp, smoothing):
    results = gang.execute(_gpt_step, tp, sp, smoothing)
    assert len({r["loss"] for r in results}) == 1        # one loss on every TP rank


def _gpt_train(tp: int, sp: bool, steps: int) -> list[float]:
    group = _group(tp)
    ref = build(gpt_config())
    model = apply_tensor_parallel(copy.deepcopy(ref), group, sequence_parallel=sp)
    lm = TensorParallelLM(model, group)
    opt_ref = torch.optim.AdamW(ref.parameters(), **ADAMW)
    opt = torch.optim.AdamW(lm.parameters(), **ADAMW)
    losses = []
    for step in range(steps):
        data = batch(100 + step)
        loss_ref = ref(**data).loss
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        loss = lm(**data).loss
        loss.backward()
        sync_sequence_parallel_grads(model, group)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        losses.append(float(loss))
    full = gather_tensor_parallel_state(lm.module.state_dict(), model, group)
    _assert_dict_close(full, ref.state_dict(), WEIGHT_TOL, "weight")
    return losses


@pytest.mark.parametrize("tp,sp", [(2, True), (4, False)])
def test_adamw_steps_equal_single_process(gang, tp, sp):
    losses = gang.execute(_gpt_train, tp, sp, 5)
    assert losses[0] == losses[tp - 1] and losses[0][0] != losses[0][-1]


def test_single_process_path_without_torch_distributed():
    """group=None with no process group: tp=1, every collective skipped, same loss/grads."""
    assert not dist.is_initialized()
    for sp in (False, True):
        ref = build(gpt_config(label_smoothing=0.1))
        model = apply_tensor_parallel(copy.deepcopy(ref), None, sequence_parallel=sp)
        data = batch(3)
        loss_ref = ref(**data).loss
        loss_ref.backward()
        loss = TensorParallelLM(model)(**data).loss
        loss.backward()
        sync_sequence_parallel_grads(model)
        torch.testing.assert_close(loss, loss_ref, **TOL)
        _assert_dict_close(_grads(model), _grads(ref), TOL, "grad")
        got, _ = tensor_parallel_loss(model(data["input_ids"]).logits, data["labels"], model)
        torch.testing.assert_close(got, loss_ref, **TOL)


def test_dropout_masks_are_recomputed_identically_under_activation_checkpointing():
    """The forked dropout streams are a function of the outer RNG state, which checkpointing
    restores for the recomputation: with dropout on, checkpointed and plain runs of the same TP
    model (tp=1, SP on, so every dropout is forked) give the same loss and gradients."""
    from bmray.actors.parallel.activation_checkpointing import apply_activation_checkpointing

    results = []
    for checkpointed in (False, True):
        model = apply_tensor_parallel(build(gpt_config(dropout=0.3)), None, sequence_parallel=True)
        if checkpointed:
            apply_activation_checkpointing(model)
        torch.manual_seed(9)
        loss = TensorParallelLM(model)(**batch(6)).loss
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    _assert_dict_close(results[1][1], results[0][1], dict(rtol=0, atol=0), "grad")
    plain = build(gpt_config(dropout=0.3))
    torch.manual_seed(9)
    assert not torch.equal(plain(**batch(6)).loss.detach(), results[0][0])   # dropout is on


# ----------------------------------------------------------- other families: blocks only
def _encoder_families(tp: int) -> bool:
    group = _group(tp)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(7, VOCAB, (B, T), generator=g)
    labels = torch.randint(7, VOCAB, (B, T), generator=g)
    labels[:, ::3] = -100
    cases = [("bert", {"input_ids": ids, "mlm_labels": labels,
                       "nsp_labels": torch.tensor([0, 1])}),
             ("t5", {"input_ids": ids, "labels": labels[:, :5]})]
    for family, data in cases:
        ref = build(gpt_config(family=family))
        model = apply_tensor_parallel(copy.deepcopy(ref), group)
        assert not model.tensor_parallel.vocab_parallel
        loss_ref = ref(**data).loss
        loss_ref.backward()
        loss = model(**data).loss
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        full = gather_tensor_parallel_state(_grads(model), model, group)
        _assert_dict_close(full, _grads(ref), TOL, f"{family} grad")
    return True


def test_bert_and_t5_blocks_equal_single_process(gang):
    assert all(gang.execute(_encoder_families, 2))


# ---------------------------------------------------------------------- state round trip
def _round_trip(tp: int) -> bool:
    group = _group(tp)
    ref = build(gpt_config())
    model = apply_tensor_parallel(build(gpt_config(), seed=1), group)    # other weights
    full = ref.state_dict()
    model.load_state_dict(shard_tensor_parallel_state(full, model, group))
    back = gather_tensor_parallel_state(model.state_dict(), model, group)
    _assert_dict_close(back, full, dict(rtol=0, atol=0), "state")
    dims = tensor_parallel_dims(model)
    assert dims["embed.tok.weight"] == dims["lm_head.weight"] == 0
    assert dims["blocks.0.attn.out_proj.weight"] == 1 and "blocks.0.attn.out_proj.bias" not in dims
    assert "blocks.0.ln_1.weight" not in dims
    data = batch(4)
    torch.testing.assert_close(TensorParallelLM(model, group)(**data).loss, ref(**data).loss, **TOL)
    # the dims survive a deep copy (which drops Parameter attributes such as tp_dim)
    assert tensor_parallel_dims(copy.deepcopy(model)) == dims
    return True


@pytest.mark.parametrize("tp", [4])
def test_gather_of_shard_is_identity(gang, tp):
    assert all(gang.execute(_round_trip, tp))


# ----------------------------------------------------------------------------- dropout RNG
def _rng(tp: int) -> dict:
    group = _group(tp)
    torch.manual_seed(1234)                        # same outer seed on every TP rank
    with tensor_parallel_rng(group):
        forked = torch.rand(6)
    outer = torch.rand(6)
    torch.manual_seed(1234)
    with tensor_parallel_rng(group):
        again = torch.rand(6)
    assert torch.equal(forked, again)              # a function of the outer state: recomputable
    # replicated activations stay identical across TP ranks with dropout on (non-SP)
    model = apply_tensor_parallel(build(gpt_config(dropout=0.2)), group)
    seen = {}
    model.ln_f.register_forward_hook(lambda m, a, o: seen.setdefault("h", o.detach()))
    torch.manual_seed(7)
    TensorParallelLM(model, group)(**batch(5)).loss.backward()
    hidden = [None] * tp
    dist.all_gather_object(hidden, seen["h"], group=group)
    assert all(torch.equal(h, hidden[0]) for h in hidden)
    return {"forked": forked, "outer": outer}


def test_dropout_rng_per_rank_inside_shared_outside(gang):
    res = gang.execute(_rng, 2)
    assert not torch.equal(res[0]["forked"], res[1]["forked"])     # per-rank stream
    assert torch.equal(res[0]["outer"], res[1]["outer"])           # outer stream in step
    torch.manual_seed(1234)
    torch.rand(1)                                                  # the fork consumed one draw
    assert not torch.equal(res[0]["forked"], res[0]["outer"])


# ---------------------------------------------------------------------------- bad input
def _errors(tp: int) -> list[str]:
    group = _group(tp)
    out = []
    bad = [lambda: apply_tensor_parallel(build(gpt_config(n_heads=2)), group),
           lambda: apply_tensor_parallel(build(gpt_config(d_model=48, n_heads=6)), group),
           lambda: apply_tensor_parallel(build(gpt_config(moe={"num_experts": 2, "every": 1})), group),
           lambda: apply_tensor_parallel(build(gpt_config(family="bert")), group, sequence_parallel=True),
           lambda: apply_tensor_parallel(apply_tensor_parallel(build(gpt_config()), group), group),
           lambda: apply_tensor_parallel(build(gpt_config(family="electra", n_heads=4)), group),
           lambda: TensorParallelLM(apply_tensor_parallel(build(gpt_config(family="bert")), group), group)]
    for fn in bad:
        with pytest.raises(ConfigError) as info:
            fn()
        out.append(str(info.value))
    model = build(gpt_config(n_heads=2))             # a refusal leaves the model as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        apply_tensor_parallel(model, group)
    assert not hasattr(model, "tensor_parallel")
    assert type(model.blocks[0].attn.q_proj) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sp = TensorParallelLM(apply_tensor_parallel(build(gpt_config()), group, sequence_parallel=True), group)
    with pytest.raises(ValueError) as info:
        sp(input_ids=torch.zeros(1, 6, dtype=torch.long), labels=torch.zeros(1, 6, dtype=torch.long))
    out.append(str(info.value))
    return out


def test_bad_input_is_refused_with_a_clear_error(gang):
    msgs = gang.execute(_errors, 4)[0]
    assert "2 attention heads cannot be split over 4" in msgs[0] and "blocks.0.attn" in msgs[0]
    assert "6 attention heads" in msgs[1]
    assert "mixture-of-experts" in msgs[2] and "blocks.0.ffn" in msgs[2]
    assert "sequence parallelism is supported for the GPT family only" in msgs[3]
    assert "already applied" in msgs[4]
    assert "generator.blocks.0.attn" in msgs[5] and "1 attention heads" in msgs[5]
    assert "not vocabulary-parallel" in msgs[6]
    assert "length 6 is not divisible by 4" in msgs[7]


@pytest.mark.parametrize("family", ["gpt", "bert", "electra", "t5"])
def test_split_parameters_are_the_plans(family):
    """One table: what tensor parallelism splits (tensor_parallel_dims) is what the family's
    tp_plan names (models.structure.tensor_parallel_parameters, the cost model's count)."""
    assert not dist.is_initialized()
    model = build(gpt_config(family=family))
    planned = tensor_parallel_parameters(model)
    assert set(tensor_parallel_dims(apply_tensor_parallel(model, None))) == planned
