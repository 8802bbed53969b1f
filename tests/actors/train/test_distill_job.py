"""build_distillation: a teacher from an adapt run's directory (base + delta + head) or from a
pre-training checkpoint, a student from its layers, trained by the one Trainer.

The teacher's logits are checked against the adapt run's own artifacts loaded another way
(the saved delta via load_delta, the head from head.safetensors); a pre-training teacher's
weights against the checkpoint's tensors. End to end: the MiniLM fine-tuned (LoRA + head, a
few steps) distilled into a 3-layer student for a few steps: the loss on a fixed batch falls,
the teacher stays bit-identical.
"""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from bmray.actors.train.adapt import build_task, run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.actors.train.checkpoints import load_checkpoint
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.distill import build_distillation
from bmray.actors.train.loop import Trainer
from bmray.models.classifier import pool
from bmray.models.compress.distill import DistillConfig
from bmray.models.config import ModelConfig
from bmray.models.data.task_rows import RowStream
from bmray.models.delta.io import load_delta
from bmray.models.families.registry import build_model
from bmray.models.objectives import CausalLM
from bmray.models.typed_config import ConfigError, load_yaml
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")
FULL = DistillConfig(task_weight=0.5, kd_weight=0.5, hidden_weight=1.0, attention_weight=1.0)


def adapt_run(tmp_path, **base):
    raw = load_yaml(TINY)
    raw.update(out_dir=str(tmp_path), scaling={"num_workers": 1})
    raw["train"].update(max_steps=3, eval_every=0)
    raw["task"].update(eval_limit=16)
    if base:
        raw.update(base=base, delta={"method": "lora", "targets": ["query", "value"], "rank": 2})
    return run_adapt(load_adapt_config(raw), out_dir=str(tmp_path)), raw


def terms_on(model, batch):
    """The loss and its terms on ``batch``, in eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    return {"loss": float(out.loss), **{k: float(v) for k, v in out.metrics.items()
                                        if k.endswith("_loss")}}


def distil(d, steps, lr=2e-3):
    trainer = Trainer(d.model, d.objective, RowStream(d.train_rows, 8, seed=0),
                      TrainConfig(lr=lr, warmup_steps=0, max_steps=steps, device="cpu",
                                  echo=False), model_config=d.manifest)
    return trainer.fit()


def test_teacher_from_an_adapt_run_equals_its_artifacts(tmp_path):
    result, _ = adapt_run(tmp_path)
    d = build_distillation(str(tmp_path), FULL, student_layers=[1])
    assert d.teacher == "adapt" and d.labels and d.train_rows is not None
    teacher, student = d.model.teacher, d.model.student
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    # the teacher by another path: the base rebuilt, the saved delta and head loaded from disk
    cfg = load_adapt_config(TINY, ["scaling.num_workers=1", f"out_dir={tmp_path}"])
    task = build_task(cfg, str(tmp_path / "tokenizer"))
    task.deltas.remove("task")
    task.deltas.add("task", load_delta(result.delta_dir, base=task.base))
    head = safetensors.torch.load_file(os.path.join(result.head_dir, "head.safetensors"))
    batch = d.objective(d.eval_rows[:6])
    with torch.no_grad():
        h = task.base.encode(batch["input_ids"], batch["attention_mask"])
        want = pool(h, batch["attention_mask"], "cls") @ head["weight"].T + head["bias"]
        torch.testing.assert_close(teacher(**batch).logits, want, rtol=1e-5, atol=1e-6)
    # the student: layer 1 of the base (not the delta's), the teacher's head
    base_blocks = task.deltas.unwrap().blocks
    assert len(student.backbone.blocks) == 1 and student.backbone.config.n_layers == 1
    for (n, p), q in zip(student.backbone.blocks[0].named_parameters(),
                         base_blocks[1].parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(student.head.weight, head["weight"])
    assert d.model.block_lists == ("student.backbone.blocks", "teacher.backbone.base.blocks")
    assert d.manifest["teacher"]["identity"] == task.identity


def test_minilm_teacher_distilled_into_three_layers(tmp_path):
    """Pure distillation (no task term: the few-step teacher is what the student learns):
    KD, hidden and attention terms on a fixed batch all fall within 8 steps."""
    adapt_run(tmp_path, kind="minilm", dropout=0.0)
    cfg = DistillConfig(task_weight=0.0, kd_weight=1.0, hidden_weight=1.0, attention_weight=1.0)
    d = build_distillation(str(tmp_path), cfg, student_layers=[0, 2, 4])
    teacher, student = d.model.teacher, d.model.student
    assert len(student.backbone.encoder.layer) == 3
    assert student.backbone.config.num_hidden_layers == 3
    assert d.model.layers == [1, 3, 5]
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    probe = d.objective(d.train_rows[:16])
    before = terms_on(d.model, probe)
    result = distil(d, 8, lr=1e-3)
    after = terms_on(d.model, probe)
    assert after["loss"] < 0.8 * before["loss"], (before, after, result.losses)
    for key in ("kd_loss", "hidden_loss", "attention_loss"):
        assert after[key] < before[key], (key, before, after)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_teacher_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    mc = ModelConfig(family="gpt", vocab_size=40, d_model=32, n_heads=2, n_layers=4, d_ff=64,
                     max_seq_len=16, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 40, (4, 9), generator=g) for _ in range(2)]
    Trainer(build_model(mc), CausalLM(), iter(blocks),
            TrainConfig(lr=1e-3, warmup_steps=0, max_steps=2, device="cpu", echo=False),
            checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"))).fit()
    d = build_distillation(str(tmp_path / "ckpt"), DistillConfig(task_weight=0.0, kd_weight=1.0))
    _, state = load_checkpoint(str(tmp_path / "ckpt"))
    for k, v in d.model.teacher.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert d.teacher == "pretrain" and isinstance(d.objective, CausalLM)
    assert d.model.student.config.n_layers == 2            # every other layer by default
    assert torch.equal(d.model.student.blocks[1].ffn.up.weight,
                       state["model"]["blocks.2.ffn.up.weight"])


def test_bad_teachers(tmp_path):
    with pytest.raises(ConfigError, match="teacher: .* does not exist"):
        build_distillation(str(tmp_path / "nope"), FULL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no complete checkpoint"):
        build_distillation(str(tmp_path / "empty"), FULL)
    adapt_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"distill.student_layers: 2 is not a layer index in "
                                          r"\[0, 2\)"):
        build_distillation(str(tmp_path / "run"), FULL, student_layers=[0, 2])
    with pytest.raises(ConfigError, match=r"distill.layer_map\[0\]: teacher layer 3"):
        build_distillation(str(tmp_path / "run"), DistillConfig(hidden_weight=1.0,
                                                                layer_map=[3]), [0])
    with pytest.raises(TypeError, match="DistillConfig"):
        build_distillation(str(tmp_path / "run"), {"kd_weight": 1.0})


def test_a_full_fine_tuning_teacher_gives_its_tuned_layers(tmp_path):
    raw = load_yaml(TINY)
    raw.update(out_dir=str(tmp_path), scaling={"num_workers": 1}, delta=None)
    raw["train"].update(max_steps=2, eval_every=0)
    raw["task"].update(eval_limit=16)
    result = run_adapt(load_adapt_config(raw), out_dir=str(tmp_path))
    _, state = load_checkpoint(result.checkpoint)
    d = build_distillation(str(tmp_path), FULL, student_layers=[1])
    block = d.model.student.backbone.blocks[0]
    for name, p in block.named_parameters():
        assert torch.equal(p, state["model"][f"backbone.blocks.1.{name}"]), name
    fresh = build_task(load_adapt_config(raw), str(tmp_path / "tokenizer")).base
    assert not torch.equal(block.ffn.up.weight, fresh.blocks[1].ffn.up.weight)   # tuned
    assert d.model.block_lists == ("student.backbone.blocks", "teacher.backbone.blocks")


def test_checkpoints_hold_the_student_only_and_resume(tmp_path):
    """``trainable_only`` checkpoints keep the student (and projections), not the frozen
    teacher; a new run resumes from them to the same student."""
    adapt_run(tmp_path / "run")
    cfg = DistillConfig(hidden_weight=1.0)

    def trainer(steps):
        d = build_distillation(str(tmp_path / "run"), cfg, student_layers=[0])
        return Trainer(d.model, d.objective, RowStream(d.train_rows, 8, seed=0),
                       TrainConfig(lr=1e-3, warmup_steps=0, max_steps=steps, device="cpu",
                                   echo=False), model_config=d.manifest,
                       checkpoint=CheckpointConfig(dir=str(tmp_path / "ck"),
                                                   trainable_only=True))
    first = trainer(2)
    first.fit()
    _, state = load_checkpoint(str(tmp_path / "ck"))
    assert state["model"] and all(k.startswith(("student.", "projections."))
                                  for k in state["model"])
    again = trainer(2)
    again.restore(str(tmp_path / "ck"))
    assert again.step == 2
    for k, v in first.strategy.module.state_dict().items():
        assert torch.equal(v, again.strategy.module.state_dict()[k]), k
