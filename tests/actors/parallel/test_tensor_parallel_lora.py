"""LoRA on tensor-parallel layers (models/delta/lora.py's ShardedLinear, actors/parallel/tensor/
delta.py) against the formula and against single-process LoRA training.

One gang of 4 Ray workers (gloo); TP groups tp=2 as [0, 1] and [2, 3], tp=4 as [0, 1, 2, 3].
Every worker also runs the single-process reference itself from the same seeds.

* Layers: a Megatron MLP (column -> ReLU -> row) with LoRA on both layers against the formula
  ``y = x Wᵀ + b + s · x Aᵀ Bᵀ`` written out on the full tensors, with random non-zero B:
  output and the gradients of x, W-free factors A and B (gathered), for a column layer fed by
  its own f and one fed by the caller's f (q/k/v's ``input_is_parallel_ready``).
* Training: a tiny GPT (uneven FFN 70 and vocabulary 31) with LoRA on q_proj, v_proj,
  out_proj, ffn.up and ffn.down, 4 AdamW steps under TP against the same steps in one process,
  in both orders (attach then parallelize; parallelize then attach): per-step losses, per-step
  gathered LoRA gradients, final gathered factors allclose; the frozen base bit-identical.
* Merge under TP equals unmerged; exact unmerge restores the shards bit-exactly; a mixed
  batch (one row with the delta, one bare) equals one process's.
* LoRA on q/k/v under sequence parallelism: one step against one process. LoRA dropout on
  uneven row shards: the outer RNG stream stays in step across TP ranks (one loss).

Tolerances (fp32, tests/equivalence.py): TP sums the same terms split into per-rank partial
sums, so it differs from one process by rounding only: losses and gradients rtol 1e-5 /
atol 1e-6, weights rtol 1e-5 / atol 1e-5 with AdamW eps = 1e-3 (equivalence.EPS: rounding
noise on near-zero gradients is not amplified to ~lr). A missing reduction (of A's gradient
in a column layer, of the code in a row layer) changes results by O(1), far above these.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from bmray.actors.parallel.tensor import (ColumnParallelLinear, CopyToTensorParallel,
                                          RowParallelLinear, TensorParallelLM,
                                          apply_tensor_parallel, gather_tensor_parallel_state,
                                          tensor_parallel_dims)
from bmray.actors.parallel.tensor.delta import (parallelize_delta_model,
                                                tensor_parallel_module_names)
from bmray.models.config import ModelConfig
from bmray.models.delta.adapter import AdapterConfig
from bmray.models.delta.bitfit import BitFitConfig
from bmray.models.delta.lora import LoraConfig, LoraDelta
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError
from tests.equivalence import EPS, LOSS_TOL, WEIGHT_TOL

torch.set_num_threads(1)

GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
VOCAB, B, T, STEPS = 31, 2, 8, 4
ADAMW = dict(lr=1e-2, weight_decay=0.0, eps=EPS)
TARGETS = ("q_proj", "v_proj", "out_proj", "re:.*ffn\\.(up|down)")
LORA = LoraConfig(targets=TARGETS, rank=4, alpha=8.0)


def gpt_config(**kw) -> ModelConfig:
    base = dict(family="gpt", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=70,
                max_seq_len=16, dropout=0.0, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(gpt_config())


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


_GROUPS: dict[int, object] = {}


def _group(tp: int):
    if not _GROUPS:
        _GROUPS[2] = [dist.new_group([0, 1]), dist.new_group([2, 3])][dist.get_rank() // 2]
        _GROUPS[4] = dist.new_group([0, 1, 2, 3])
    return _GROUPS[tp]


@pytest.fixture(scope="module")
def gang(gangs):
    return gangs(4)


def _full(delta: LoraDelta, group, grads: bool = False) -> dict[str, torch.Tensor]:
    """The delta's factors (or their gradients), shards gathered into full tensors."""
    state = ({n: p.grad.detach().clone() for n, p in delta.named_parameters()} if grads
             else {k: v.detach().clone() for k, v in delta.state_dict().items()})
    return gather_tensor_parallel_state(state, delta, group)


def _close(got: dict, want: dict, tol: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"{what} {k}: {m}")


# ------------------------------------------------------------------ layers vs the formula
class MLP(nn.Module):
    """up (column) -> ReLU -> down (row), Megatron's MLP; ``f_outside``: the caller applies f
    (as TensorParallelAttention does for q/k/v)."""

    def __init__(self, up: nn.Module, down: nn.Module, f_outside: bool = False, group=None):
        super().__init__()
        self.up, self.down, self.f_outside, self.group = up, down, f_outside, group

    def forward(self, x):
        if self.f_outside:
            x = CopyToTensorParallel.apply(x, self.group)
        return self.down(torch.relu(self.up(x)))


def _layers(tp: int, f_outside: bool) -> bool:
    group = _group(tp)
    r, s = 3, 5.0 / 3
    g = torch.Generator().manual_seed(4)
    up, down = nn.Linear(6, 10), nn.Linear(10, 7)
    for p in [*up.parameters(), *down.parameters()]:
        p.data = torch.randn(p.shape, generator=g)
    A1, B1 = torch.randn(r, 6, generator=g), torch.randn(10, r, generator=g)
    A2, B2 = torch.randn(r, 10, generator=g), torch.randn(7, r, generator=g)
    x, dy = torch.randn(4, 6, generator=g), torch.randn(4, 7, generator=g)

    # the formula on full tensors
    ref = {n: t.clone().requires_grad_() for n, t in
           {"A1": A1, "B1": B1, "A2": A2, "B2": B2, "x": x}.items()}
    x_ = ref["x"]
    h = torch.relu(x_ @ up.weight.t() + up.bias + s * x_ @ ref["A1"].t() @ ref["B1"].t())
    y_ref = h @ down.weight.t() + down.bias + s * h @ ref["A2"].t() @ ref["B2"].t()
    y_ref.backward(dy)

    up_p = ColumnParallelLinear.from_linear(up, group, input_is_parallel_ready=f_outside)
    mlp = MLP(up_p, RowParallelLinear.from_linear(down, group), f_outside, group)
    delta = LoraDelta(LoraConfig(targets=("up", "down"), rank=r, alpha=5.0)).attach(mlp)
    full = {"sites.up.A": A1, "sites.up.B": B1, "sites.down.A": A2, "sites.down.B": B2}
    dims = tensor_parallel_dims(delta)
    assert dims == {"sites.up.B": 0, "sites.down.A": 1}
    delta.load_state_dict({k: torch.tensor_split(v, tp, dims[k])[dist.get_rank(group)]
                           if k in dims else v for k, v in full.items()})
    xt = x.clone().requires_grad_()
    y = mlp(xt)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, **GRAD_TOL)
    torch.testing.assert_close(xt.grad, ref["x"].grad, **GRAD_TOL)
    want = {"sites.up.A": ref["A1"].grad, "sites.up.B": ref["B1"].grad,
            "sites.down.A": ref["A2"].grad, "sites.down.B": ref["B2"].grad}
    _close(_full(delta, group, grads=True), want, GRAD_TOL, "grad")
    # merge: W_shard + s·B_shard A (column), W_shard + s·B A_shard (row) = unmerged output
    before = [p.detach().clone() for p in mlp.parameters()]
    delta.merge()
    torch.testing.assert_close(mlp(x), y_ref.detach(), **GRAD_TOL)
    delta.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters()))
    return True


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("f_outside", [False, True])
def test_column_and_row_lora_equal_the_formula(gang, tp, f_outside):
    assert all(gang.execute(_layers, tp, f_outside))


# ------------------------------------------------------------ GPT training vs one process
def _randomize_b(delta: LoraDelta, seed: int) -> None:
    """Non-zero B (on the full-size factors), so the first step trains A too."""
    g = torch.Generator().manual_seed(seed)
    for site in delta.sites.values():
        site.B.data = torch.randn(site.B.shape, generator=g) * 0.1


def _step(lm, delta, opt, data, group=None):
    loss = lm(**data).loss
    loss.backward()
    grads = _full(delta, group, grads=True) if group is not None else {
        n: p.grad.detach().clone() for n, p in delta.named_parameters()}
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


def _train(tp: int, order: str) -> list[float]:
    group = _group(tp)
    # single process
    ref_base = build()
    base_state = {k: v.clone() for k, v in ref_base.state_dict().items()}
    ref = DeltaModel(ref_base)
    torch.manual_seed(42)
    ref_delta = ref.add("lora", LORA)
    if order == "attach_first":
        _randomize_b(ref_delta, 7)
    # tensor-parallel
    if order == "attach_first":
        model = DeltaModel(build())
        torch.manual_seed(42)
        delta = model.add("lora", LORA)
        _randomize_b(delta, 7)
        parallelize_delta_model(model, group)
    else:
        model = DeltaModel(apply_tensor_parallel(build(), group))
        torch.manual_seed(42)
        delta = model.add("lora", LORA)
        model.tensor_parallel = model.base.tensor_parallel
    _close(_full(delta, group), {k: v.detach() for k, v in ref_delta.state_dict().items()},
           dict(rtol=0, atol=0), "initial factors")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"deltas.lora.{n}" for n, _ in delta.named_parameters()}
    lm = TensorParallelLM(model, group)
    opt_ref = torch.optim.AdamW(ref.parameters(), **ADAMW)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for step in range(STEPS):
        data = batch(100 + step)
        loss_ref, grads_ref = _step(ref, ref_delta, opt_ref, data)
        loss, grads = _step(lm, delta, opt, data, group)
        torch.testing.assert_close(loss, loss_ref, **LOSS_TOL)
        _close(grads, grads_ref, GRAD_TOL, f"step {step} grad")
        losses.append(float(loss))
    _close(_full(delta, group), {k: v.detach() for k, v in ref_delta.state_dict().items()},
           WEIGHT_TOL, "trained factors")
    # the frozen base: bit-identical, here and in the reference
    base_now = gather_tensor_parallel_state(model.base.state_dict(), model.base, group)
    _close(base_now, base_state, dict(rtol=0, atol=0), "tp base")
    _close(ref_base.state_dict(), base_state, dict(rtol=0, atol=0), "reference base")
    # merged under TP equals unmerged; exact unmerge restores the shards bit-exactly
    shards = {k: v.clone() for k, v in model.base.state_dict().items()}
    data = batch(999)
    with torch.no_grad():
        unmerged = lm(**data)
        model.merge("lora")
        merged = lm(**data)
        model.unmerge("lora")
    torch.testing.assert_close(merged.logits, unmerged.logits, **GRAD_TOL)
    torch.testing.assert_close(merged.loss, unmerged.loss, **LOSS_TOL)
    _close(model.base.state_dict(), shards, dict(rtol=0, atol=0), "unmerged base")
    # a mixed batch (row 0 with the delta, row 1 bare) under TP equals one process's
    with torch.no_grad(), model.mixed(["lora", None]), ref.mixed(["lora", None]):
        torch.testing.assert_close(lm(**data).loss, ref(**data).loss, **LOSS_TOL)
    return losses


@pytest.mark.parametrize("tp,order", [(2, "attach_first"), (4, "attach_first"),
                                      (2, "parallelize_first"), (4, "parallelize_first")])
def test_lora_training_under_tp_equals_single_process(gang, tp, order):
    losses = gang.execute(_train, tp, order)
    assert losses[0] == losses[tp - 1] and losses[0][0] != losses[0][-1]


# ------------------------------------------- sequence parallelism (q/k/v), LoRA dropout
def _sp_and_dropout(tp: int) -> dict:
    group = _group(tp)
    # LoRA on q/k/v under sequence parallelism (the attention gathers their input): one step
    cfg = LoraConfig(targets=("q_proj", "k_proj", "v_proj"), rank=4, alpha=8.0)
    ref = DeltaModel(build())
    torch.manual_seed(3)
    ref_delta = ref.add("lora", cfg)
    _randomize_b(ref_delta, 5)
    model = DeltaModel(apply_tensor_parallel(build(), group, sequence_parallel=True))
    torch.manual_seed(3)
    delta = model.add("lora", cfg)
    with torch.no_grad():                     # the same B, cut to this rank's rows
        for key, site in delta.sites.items():
            site.B.copy_(torch.tensor_split(ref_delta.sites[key].B, tp, 0)[dist.get_rank(group)])
    model.tensor_parallel = model.base.tensor_parallel
    data = batch(8)
    loss_ref, loss = ref(**data).loss, TensorParallelLM(model, group)(**data).loss
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, **LOSS_TOL)
    _close(_full(delta, group, grads=True),
           {n: p.grad for n, p in ref_delta.named_parameters()}, GRAD_TOL, "sp grad")
    # LoRA dropout on every split layer (uneven FFN shards): the row layers draw in the TP
    # fork, so the outer stream stays in step across TP ranks and the loss is one number
    drop = DeltaModel(build())
    drop.add("lora", LoraConfig(targets=TARGETS, rank=4, dropout=0.3))
    _randomize_b(drop.get("lora"), 6)
    parallelize_delta_model(drop, group)
    torch.manual_seed(11)
    out = TensorParallelLM(drop, group)(**batch(9)).loss
    out.backward()
    return {"loss": float(out), "after": torch.rand(4)}


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_qkv_and_lora_dropout(gang, tp):
    res = gang.execute(_sp_and_dropout, tp)
    assert len({r["loss"] for r in res[:tp]}) == 1
    assert all(torch.equal(r["after"], res[0]["after"]) for r in res[:tp])


# ------------------------------------------------------------------------ no process group
def test_single_process_path_and_what_is_split():
    """group=None without torch.distributed: tp = 1, the parallel layers are ShardedLinears
    holding everything; LoRA there equals LoRA on the plain model."""
    assert not dist.is_initialized()
    ref = DeltaModel(build())
    torch.manual_seed(1)
    _randomize_b(ref.add("lora", LORA), 2)
    model = DeltaModel(build())
    torch.manual_seed(1)
    _randomize_b(model.add("lora", LORA), 2)
    parallelize_delta_model(model, None)
    names = tensor_parallel_module_names(build())
    assert {"blocks.0.attn", "blocks.0.attn.q_proj", "blocks.1.ffn.down", "embed.tok",
            "lm_head"} <= names and "blocks.0.ffn" not in names and "blocks.0.ln_1" not in names
    data = batch(3)
    loss_ref, loss = ref(**data).loss, TensorParallelLM(model)(**data).loss
    torch.testing.assert_close(loss, loss_ref, **LOSS_TOL)
    assert tensor_parallel_dims(model)["deltas.lora.sites.blocks:0:attn:q_proj.B"] == 0
    assert tensor_parallel_dims(model)["deltas.lora.sites.blocks:0:ffn:down.A"] == 1


# ---------------------------------------------------------------------------- bad input
def _errors(tp: int) -> list[str]:
    group = _group(tp)
    out = []

    def refused(fn) -> None:
        with pytest.raises(ConfigError) as info:
            fn()
        out.append(str(info.value))

    # another method on a split linear: refused, the model left as it was (deltas attached)
    model = DeltaModel(build())
    model.add("lora", LORA)
    model.add("adapter", AdapterConfig(targets=("out_proj",), bottleneck=4))
    refused(lambda: parallelize_delta_model(model, group))
    assert type(model.base.blocks[0].attn.out_proj) is nn.Linear
    assert all(d.attached for d in model.deltas.values())
    # BitFit on LayerNorms is not on a split module: allowed
    ok = DeltaModel(build())
    ok.add("bitfit", BitFitConfig(targets=("ln_1",)))
    parallelize_delta_model(ok, group)
    # merged; sequence parallelism
    merged = DeltaModel(build())
    merged.add("lora", LORA)
    merged.merge("lora")
    refused(lambda: parallelize_delta_model(merged, group))
    sp = DeltaModel(build())
    sp.add("lora", LORA)
    refused(lambda: parallelize_delta_model(sp, group, sequence_parallel=True))
    # parallelize first with SP: LoRA on a row layer refused before any site is built
    tp_sp = apply_tensor_parallel(build(), group, sequence_parallel=True)
    delta = LoraDelta(LoraConfig(targets=("out_proj",), rank=4))
    refused(lambda: delta.attach(tp_sp))
    assert len(delta.sites) == 0 and not delta.attached
    # a sharded delta onto a plain model; the rank is checked against the full layer
    tp_model = apply_tensor_parallel(build(), group)
    sharded = LoraDelta(LoraConfig(targets=("out_proj",), rank=4)).attach(tp_model)
    sharded.detach()
    refused(lambda: sharded.attach(build()))
    refused(lambda: LoraDelta(LoraConfig(targets=("out_proj",), rank=33)).attach(tp_model))
    return out


def test_bad_input_is_refused_with_a_clear_error(gang):
    msgs = gang.execute(_errors, 4)[0]
    assert "'adapter' (adapter) has sites on modules tensor parallelism splits" in msgs[0]
    assert "blocks.0.attn.out_proj" in msgs[0] and "only LoRA" in msgs[0]
    assert "merged into the base" in msgs[1]
    assert "sequence_parallel=True" in msgs[2]
    assert "RowParallelLinear under sequence parallelism" in msgs[3]
    assert "'blocks.0.attn.out_proj' holds A (4, 8)" in msgs[4] and "32 -> 32" in msgs[4]
    assert "33 exceeds min(in, out) = 32" in msgs[5]
