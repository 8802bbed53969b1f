"""Delta training on a gang equals single-process delta training (tests/equivalence.py: the
per-step losses, the per-step pre-clip gradient norms and the final delta and head weights,
with clipping and without), data parallelism reduces only the trainable parameters, and the
frozen base is bit-identical after training on every rank. A gradient reduction scaled by 2
(a missing 1/N) must fail the same checks."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from bmray.actors.train.adapt import build_adapt_trainer
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.models.typed_config import load_yaml
from tests.conftest import REPO
from tests.equivalence import EPS, assert_same_run, scaled_reduction

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


def _fit(out_dir, workers, clip, tok_dir=None, fault=None, prompt=False):
    """Train on this rank (a gang's, or alone); losses, norms, trainable weights, and whether
    every frozen base tensor is bit-identical to what it was before training."""
    cfg = config(out_dir, workers, clip,
                 *([] if tok_dir is None else [f"base.tokenizer_dir={tok_dir}"]), prompt=prompt)
    trainer, task = build_adapt_trainer(cfg, out_dir)
    before = {k: v.clone() for k, v in task.base.state_dict().items()}
    with scaled_reduction(fault) if fault else contextlib.nullcontext():
        result = trainer.fit()
    module = trainer.strategy.module
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    reduced = sorted(n for n, p in module.named_parameters()
                     if any(p is q for q in getattr(trainer.strategy, "params", [])))
    return {"losses": result.losses, "grad_norms": result.grad_norms, "weights": trainable,
            "base_unchanged": all(torch.equal(v, before[k])
                                  for k, v in task.base.state_dict().items()),
            "reduced": reduced, "rank": dist.get_rank() if dist.is_initialized() else 0}


_REF: dict = {}


def reference(tmp_path_factory, clip, prompt=False):
    """The single-process run (its tokenizer is shared with the gang runs)."""
    if (clip, prompt) not in _REF:
        out = tmp_path_factory.mktemp(f"ref{clip}")
        _REF[clip, prompt] = _fit(str(out), 1, clip, prompt=prompt), str(out / "tokenizer")
    return _REF[clip, prompt]


@pytest.mark.parametrize("workers,clip", [(2, 0.5), (4, 0.5), (2, 0.0)],
                         ids=["2", "4", "2-no-clip"])
def test_lora_on_a_gang_equals_one_process(gangs, tmp_path_factory, workers, clip):
    ref, tok = reference(tmp_path_factory, clip)
    assert ref["base_unchanged"]
    if clip:
        assert min(ref["grad_norms"].values()) > clip      # clipping really acts
    out_dir = str(tmp_path_factory.mktemp(f"gang{workers}"))
    outs = gangs(workers).execute(_fit, out_dir, workers, clip, tok)
    steps = range(1, STEPS + 1)
    for out in outs:
        assert_same_run(out, ref["losses"], ref["grad_norms"], ref["weights"], steps,
                        what=f"rank {out['rank']}")
        assert out["base_unchanged"]
        # only the delta and the head are in the gradient buckets
        assert out["reduced"] == sorted(ref["weights"])
        assert all(".deltas." in n or n.startswith("head.") for n in out["reduced"])


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
        assert out["base_unchanged"] and out["reduced"] == sorted(ref["weights"])
