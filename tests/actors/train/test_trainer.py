"""The training loop against references: an uninterrupted run (resume), the hand-computed
schedule, torch's clip_grad_norm_ + AdamW, one big batch (accumulation), a direct
cross-entropy (perplexity), and json.loads (metrics)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bmray.actors.train.lr_schedule import build_scheduler
from bmray.actors.train.config import CheckpointConfig, TrainConfig
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.config import ModelConfig
from bmray.models.data import BlockStream, eval_batches
from bmray.models.objectives import CausalLM
from bmray.models.families.registry import build_model

from tests.tiny_corpus import BLOCK, build_pack

torch.set_num_threads(1)
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """(pack path, vocab size): a real BPE tokenizer and a real packed corpus, built once."""
    return build_pack(tmp_path_factory.mktemp("pack"), eval_blocks=12)


def model_cfg(vocab: int, dropout: float = 0.1, d_model: int = 32) -> ModelConfig:
    return ModelConfig(family="gpt", vocab_size=vocab, d_model=d_model, n_heads=2, n_layers=1,
                       d_ff=64, max_seq_len=32, dropout=dropout)


def make_trainer(pack, cfg: TrainConfig, *, seed=0, dropout=0.1, ckpt=None, batch=8,
                 objective=None, eval_data=True, init_seed=None) -> Trainer:
    path, vocab = pack
    seed_everything(seed if init_seed is None else init_seed)
    mc = model_cfg(vocab, dropout)
    model = build_model(mc)
    stream = BlockStream(path, BLOCK, batch, seed=seed)
    evals = (lambda: eval_batches(path, BLOCK, 4)) if eval_data else None
    return Trainer(model, objective or CausalLM(), stream, cfg, eval_data=evals,
                   checkpoint=ckpt, model_config=mc, seed=seed)


def test_resume_reaches_the_same_losses_and_weights(pack, tmp_path):
    cfg = TrainConfig(max_steps=12, micro_batches=2, lr=3e-3, warmup_steps=3, device="cpu")
    full = make_trainer(pack, cfg, eval_data=False)
    ref = full.fit()
    assert sorted(ref.losses) == list(range(1, 13))

    ckpt = CheckpointConfig(dir=str(tmp_path / "ck"), every=5)
    first = make_trainer(pack, cfg, ckpt=ckpt, eval_data=False)
    part = first.fit(until=5)
    assert part.step == 5 and part.checkpoint.endswith("step_00000005")
    for k in range(1, 6):
        assert part.losses[k] == pytest.approx(ref.losses[k], abs=1e-6)
    del first
    # New process-state objects, a different init and global RNG: the restore must overwrite all.
    second = make_trainer(pack, cfg, ckpt=ckpt, eval_data=False, init_seed=999)
    rest = second.fit()
    assert rest.resumed_from.endswith("step_00000005")
    assert sorted(rest.losses) == list(range(6, 13))
    for k in range(6, 13):
        assert rest.losses[k] == pytest.approx(ref.losses[k], abs=0), k
    a, b = full.strategy.module.state_dict(), second.strategy.module.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


def test_schedule_matches_hand_formula():
    cfg = TrainConfig(max_steps=10, lr=1.0, min_lr=0.1, warmup_steps=3, device="cpu")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    got = []
    for _ in range(12):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1 / 3, 2 / 3, 1.0]
    for s in range(3, 10):   # cosine from 1.0 to 0.1 over steps 3..10
        expected.append(0.1 + 0.45 * (1 + math.cos(math.pi * (s - 3) / 7)))
    expected += [0.1, 0.1]
    assert got == pytest.approx(expected, abs=1e-12)


def test_clip_and_step_match_torch_reference(pack):
    cfg = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=0, grad_clip=0.05, weight_decay=0.1,
                      device="cpu")
    trainer = make_trainer(pack, cfg, dropout=0.0, eval_data=False)
    strategy = trainer.strategy
    blocks = next(iter(trainer.data))
    strategy.forward_backward(CausalLM()(blocks), 1.0)
    ref = copy.deepcopy(strategy.module)
    for p, q in zip(ref.parameters(), strategy.module.parameters()):
        p.grad = q.grad.clone()
    params = [p for p in ref.parameters()]
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ref_opt.step()
    norm = strategy.clip_and_step(0.05)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    assert float(norm) > 0.05                      # clipping was active
    for (name, p), q in zip(strategy.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert p.grad is None                      # zero_grad(set_to_none)


class MaskSome(CausalLM):
    """CausalLM that also ignores labels of tokens with even id: uneven counts per micro-batch."""

    def __call__(self, blocks, generator=None):
        batch = super().__call__(blocks, generator)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] % 2 == 0, -100)
        return batch


def test_accumulation_equals_one_big_batch(pack):
    torch.manual_seed(0)
    grads = {}
    for micro in (1, 4):
        cfg = TrainConfig(max_steps=5, micro_batches=micro, device="cpu")
        trainer = make_trainer(pack, cfg, dropout=0.0, batch=10, objective=MaskSome(),
                               eval_data=False)
        blocks = next(iter(trainer.data))          # 10 blocks: 3+3+2+2 when micro=4
        batches = trainer.micro_batches(blocks, 0)
        counts = [int((b["labels"] != -100).sum()) for b in batches]
        if micro == 4:
            assert len(set(counts)) > 1           # weights really differ
        stats = trainer.accumulate(batches)
        grads[micro] = {n: p.grad.clone() for n, p in trainer.strategy.module.named_parameters()}
        grads[f"loss{micro}"] = stats["loss"]
    # the loss of the big batch, computed directly
    assert grads["loss4"] == pytest.approx(grads["loss1"], abs=1e-6)
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_perplexity_is_exp_mean_token_ce(pack):
    cfg = TrainConfig(max_steps=3, eval_batches=100, device="cpu")
    trainer = make_trainer(pack, cfg)
    trainer.fit()
    row = trainer.evaluate()
    model = trainer.strategy.module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for blocks in eval_batches(pack[0], BLOCK, 4):
            x, y = blocks[:, :-1], blocks[:, 1:].masked_fill(blocks[:, 1:] == 0, -100)
            logits = model(x).logits
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((y != -100).sum())
    assert row["eval_tokens"] == count
    assert row["loss"] == pytest.approx(total / count, rel=1e-6)
    assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_metrics_are_json_lines_with_the_fields(pack, tmp_path):
    path = tmp_path / "metrics.jsonl"
    cfg = TrainConfig(max_steps=4, eval_every=2, log_every=1, metrics_path=str(path),
                      device="cpu")
    result = make_trainer(pack, cfg).fit()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * BLOCK
    for r in eval_rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert result.rows == rows


def test_adamw_is_fused_on_cpu_when_available(pack):
    trainer = make_trainer(pack, TrainConfig(max_steps=1, device="cpu"), eval_data=False)
    assert trainer.strategy.optimizer.defaults.get("fused") or \
        trainer.strategy.optimizer.defaults.get("foreach")
    decay, no_decay = trainer.strategy.optimizer.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] > 0
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_accuracy_only_on_logged_steps_and_read_once_per_step(pack, monkeypatch):
    """log_every 2: the model computes its accuracy on steps 2 and 4 only (an argmax over
    B·T·V logits per micro-batch is skipped on the others); its metrics stay tensors until the
    loop's one transfer; and the logged lm_acc of a 2-micro-batch step is the exact accuracy of
    the whole batch — correct argmaxes over target tokens, counted here directly on a copy of
    the model taken before the step."""
    import bmray.models.layers.losses as losses

    calls = []
    real = losses.accuracy
    monkeypatch.setattr(losses, "accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(max_steps=4, micro_batches=2, log_every=2, device="cpu", echo=False)
    trainer = make_trainer(pack, cfg, dropout=0.0, eval_data=False)
    rows, expected = [], {}
    for step in range(1, 5):
        before = copy.deepcopy(trainer.strategy.module)
        n_calls = len(calls)
        row = trainer.train_step()
        rows.append(row)
        assert len(calls) - n_calls == (2 if step % 2 == 0 else 0), step
        if step % 2 == 0:
            batch = CausalLM()(_step_blocks(pack, step))
            with torch.no_grad():
                logits = before(**batch).logits
            valid = batch["labels"] != -100
            expected[step] = float(((logits.argmax(-1) == batch["labels"]) & valid).sum()
                                   / valid.sum())
    assert [("lm_acc" in r) for r in rows] == [False, True, False, True]
    for step, acc in expected.items():
        assert rows[step - 1]["lm_acc"] == pytest.approx(acc, rel=1e-9)
    out = build_model(model_cfg(pack[1], 0.0))(**CausalLM()(_step_blocks(pack, 1)))
    assert all(torch.is_tensor(v) for v in out.metrics.values())


def _step_blocks(pack, step: int) -> torch.Tensor:
    """The global batch of a 1-rank stream's ``step`` (1-based)."""
    stream = iter(BlockStream(pack[0], BLOCK, 8, seed=0))
    for _ in range(step - 1):
        next(stream)
    return next(stream)
