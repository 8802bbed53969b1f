"""Delta training on a gang equals single-process delta training (tests/equivalence.py: the
per-step losses, the per-step pre-clip gradient norms and the final delta and head weights,
with clipping and without) under data parallelism, ZeRO-2, the frozen base sharded by ZeRO-3
and LoRA split by tensor parallelism (alone and with two data-parallel replicas); only the
trainable parameters are reduced, and the frozen base is bit-identical after training on
every rank (read back consolidated where the strategy shards it). A gradient reduction
scaled by 2 (a missing 1/N) must fail the same checks."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from bmray.actors.train.adapt import build_adapt_trainer, build_task, run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.models.delta.model import DeltaModel
from bmray.models.typed_config import load_yaml
from tests.conftest import REPO
from tests.equivalence import EPS, WEIGHT_TOL, assert_same_run, scaled_reduction

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")
STEPS = 8


PROMPT = {"template": "{soft*2} {text_a:shorten} It is a {mask} ."}     # TREC's words


def config(out_dir, workers, clip, *extra, prompt=None):
    raw = load_yaml(TINY)
    if prompt:
        raw["prompt"] = PROMPT
    return load_adapt_config(raw, [
        f"scaling.num_workers={workers}", f"out_dir={out_dir}", f"train.max_steps={STEPS}",
        f"train.eps={EPS}", f"train.grad_clip={clip}", "train.warmup_steps=2",
        "train.eval_every=0", "checkpoint.every=0", "task.few_shot_k=8", "train.micro_batches=2",
        *extra])


def _fit(out_dir, workers, clip, tok_dir=None, fault=None, prompt=False, strategy=()):
    """Train on this rank (a gang's, or alone): losses, norms, the trainable weights and the
    frozen base after training (consolidated: a collective where the strategy shards), the
    parameters the strategy reduces, the run's memory report."""
    cfg = config(out_dir, workers, clip,
                 *([] if tok_dir is None else [f"base.tokenizer_dir={tok_dir}"]), *strategy,
                 prompt=prompt)
    trainer, task = build_adapt_trainer(cfg, out_dir)
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        result = trainer.fit()
    trains = {n for n, p in task.model.named_parameters() if p.requires_grad}
    full = trainer.full_model_state()
    reduced = sorted(n for n, p in task.model.named_parameters()
                     if any(p is q for q in getattr(trainer.strategy, "params", [])))
    return {"losses": result.losses, "grad_norms": result.grad_norms,
            "weights": {k: v.clone() for k, v in full.items() if k in trains},
            "base": {k: v.clone() for k, v in full.items() if k not in trains},
            "reduced": reduced, "memory": trainer.strategy.memory_report(),
            "rank": dist.get_rank() if dist.is_initialized() else 0}


def base_unchanged(out, ref) -> bool:
    """Every frozen tensor after training bit-identical to the reference's base as built."""
    return out["base"].keys() == ref["built"].keys() and all(
        torch.equal(v, ref["built"][k]) for k, v in out["base"].items())


_REF: dict = {}


def reference(tmp_path_factory, clip, prompt=False):
    """The single-process run (its tokenizer is shared with the gang runs)."""
    if (clip, prompt) not in _REF:
        out = tmp_path_factory.mktemp(f"ref{clip}")
        cfg = config(str(out), 1, clip, prompt=prompt)
        _, task = build_adapt_trainer(cfg, str(out))       # the frozen base as built
        built = {k: v.clone() for k, v in task.model.state_dict().items()
                 if k not in {n for n, p in task.model.named_parameters() if p.requires_grad}}
        ref = _fit(str(out), 1, clip, prompt=prompt)
        frozen = sum(p.numel() * p.element_size() for p in task.model.parameters()
                     if not p.requires_grad)              # each tied parameter once
        _REF[clip, prompt] = {**ref, "built": built, "frozen_bytes": frozen}, \
            str(out / "tokenizer")
    return _REF[clip, prompt]


@pytest.mark.parametrize("workers,clip", [(2, 0.5), (4, 0.5), (2, 0.0)],
                         ids=["2", "4", "2-no-clip"])
def test_lora_on_a_gang_equals_one_process(gangs, tmp_path_factory, workers, clip):
    ref, tok = reference(tmp_path_factory, clip)
    assert base_unchanged(ref, ref)
    if clip:
        assert min(ref["grad_norms"].values()) > clip      # clipping really acts
    out_dir = str(tmp_path_factory.mktemp(f"gang{workers}"))
    outs = gangs(workers).execute(_fit, out_dir, workers, clip, tok)
    steps = range(1, STEPS + 1)
    for out in outs:
        assert_same_run(out, ref["losses"], ref["grad_norms"], ref["weights"], steps,
                        what=f"rank {out['rank']}")
        assert base_unchanged(out, ref)
        # only the delta and the head are in the gradient buckets
        assert out["reduced"] == sorted(ref["weights"])
        assert all(".deltas." in n or n.startswith("head.") for n in out["reduced"])


STRATEGIES = {
    "zero2": (2, ["strategy.kind=zero", "strategy.stage=2"]),
    "zero3": (2, ["strategy.kind=zero", "strategy.stage=3"]),
    "zero3-4": (4, ["strategy.kind=zero", "strategy.stage=3"]),
    "tp2": (2, ["strategy.kind=mesh", "strategy.tp=2"]),
    "tp2-dp2": (4, ["strategy.kind=mesh", "strategy.tp=2", "strategy.zero_stage=0"]),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lora_under_zero_and_tensor_parallel_equals_one_process(gangs, tmp_path_factory, name):
    """The same run under ZeRO-2, ZeRO-3 (the frozen base sharded: each rank keeps ~1/N of it,
    with no gradient and no optimizer state) and tensor parallelism (LoRA's factors split with
    q_proj / v_proj, column-parallel; a replicated head), against one process."""
    workers, strategy = STRATEGIES[name]
    ref, tok = reference(tmp_path_factory, 0.5)
    out_dir = str(tmp_path_factory.mktemp(name))
    for out in gangs(workers).execute(_fit, out_dir, workers, 0.5, tok, strategy=strategy):
        assert_same_run(out, ref["losses"], ref["grad_norms"], ref["weights"],
                        range(1, STEPS + 1), what=f"{name} rank {out['rank']}")
        assert base_unchanged(out, ref), name
        assert out["reduced"] == sorted(ref["weights"])
        if name.startswith("zero3"):
            m = out["memory"]
            frozen = ref["frozen_bytes"]
            assert m["frozen_param_bytes"] == frozen
            # this rank's shards: 1/N of the base plus at most N - 1 padding elements a unit
            assert frozen / workers <= m["frozen_bytes"] <= frozen / workers + 4 * 8 * workers
            assert m["frozen_saved_bytes"] == frozen - m["frozen_bytes"]


def test_a_wrong_gradient_scale_fails_the_checks(gangs, tmp_path_factory):
    for clip in (0.5, 0.0):
        ref, tok = reference(tmp_path_factory, clip)
        out_dir = str(tmp_path_factory.mktemp("fault"))
        out = gangs(2).execute(_fit, out_dir, 2, clip, tok, fault=2.0)[0]
        with pytest.raises(AssertionError, match="grad norms"):
            assert_same_run(out, out["losses"], ref["grad_norms"], None, range(1, STEPS + 1))
        if not clip:
            with pytest.raises(AssertionError, match="weight|deltas|head"):
                assert_same_run(out, out["losses"], None, ref["weights"], range(1, STEPS + 1))


def test_a_prompt_run_on_a_gang_equals_one_process(gangs, tmp_path_factory):
    """The prompt path (template + TREC's words over our BERT's MLM head, LoRA + soft tokens):
    each rank collates its own examples; 2 workers equal one process."""
    ref, tok = reference(tmp_path_factory, 0.5, prompt=True)
    assert any(n.endswith("soft.weight") for n in ref["weights"])
    out_dir = str(tmp_path_factory.mktemp("prompt2"))
    for out in gangs(2).execute(_fit, out_dir, 2, 0.5, tok, prompt=True):
        assert_same_run(out, ref["losses"], ref["grad_norms"], ref["weights"],
                        range(1, STEPS + 1), what=f"rank {out['rank']}")
        assert base_unchanged(out, ref) and out["reduced"] == sorted(ref["weights"])


def _run(out_dir, workers, tok_dir, strategy, steps, resume):
    cfg = config(out_dir, workers, 0.5, f"base.tokenizer_dir={tok_dir}", *strategy,
                 f"train.max_steps={steps}", "checkpoint.every=4", f"checkpoint.resume={resume}",
                 "task.eval_limit=65")      # a last eval batch of one row: rank 1 has none
    return run_adapt(cfg, out_dir=out_dir).to_dict()


@pytest.mark.parametrize("name", ["zero3", "tp2"])
def test_run_adapt_saves_the_whole_delta_and_resumes_when_sharded(gangs, tmp_path_factory, name):
    """``run_adapt`` under ZeRO-3 / tensor parallelism: the saved delta and head are the whole
    trained tensors (read back from the files against one process's weights), the delta loads
    onto a fresh base (its identity is the base as built, not the sharded one), a rank with
    no rows in the last eval batch still joins the collective forwards, and a trainable-only
    checkpoint resumes under the same strategy."""
    workers, strategy = STRATEGIES[name]
    ref, tok = reference(tmp_path_factory, 0.5)
    out_dir = str(tmp_path_factory.mktemp(f"run-{name}"))
    first = gangs(workers).execute(_run, out_dir, workers, tok, strategy, STEPS, False)[0]
    delta = safetensors.torch.load_file(os.path.join(first["delta_dir"], "delta.safetensors"))
    head = safetensors.torch.load_file(os.path.join(first["head_dir"], "head.safetensors"))
    assert first["metrics"]["examples"] == 65
    saved = {**{f"backbone.deltas.task.{k}": v for k, v in delta.items()},
             **{f"head.{k}": v for k, v in head.items()}}
    assert saved.keys() == ref["weights"].keys()
    for k, v in ref["weights"].items():
        torch.testing.assert_close(saved[k], v, **WEIGHT_TOL, msg=lambda m, k=k: f"{k}: {m}")
    cfg = config(out_dir, 1, 0.5, f"base.tokenizer_dir={tok}")
    fresh = build_task(dataclasses.replace(cfg, delta=dataclasses.replace(cfg.delta, config=None)),
                       tok)
    DeltaModel(fresh.base).load(first["delta_dir"])         # identity checked: no error
    if name == "zero3":
        assert first["memory"]["frozen_saved_bytes"] > 0
    again = gangs(workers).execute(_run, out_dir, workers, tok, strategy, STEPS + 2, True)[0]
    assert again["step"] == STEPS + 2 and sorted(again["losses"]) == [STEPS + 1, STEPS + 2]
