"""Adaptation in one process: the task model against torch written out, rows and streams,
delta-only checkpoints (size, contents, exact resume, base identity), the frozen base after
training, and bad input failing before any step."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from bmray.actors.train.adapt import build_adapt_trainer, build_task, load_minilm, run_adapt
from bmray.actors.train.adapt_config import load_adapt_config
from bmray.actors.train.checkpoints import CheckpointError, load_checkpoint, read_manifest
from bmray.models.classifier import SequenceClassifier
from bmray.models.data.classification import Example
from bmray.models.data.task_rows import (ClassificationObjective, RowStream, encode_rows,
                                         eval_row_batches)
from bmray.models.delta.base import base_identity
from bmray.models.delta.model import DeltaModel
from bmray.models.delta.lora import LoraConfig
from bmray.models.typed_config import ConfigError, load_yaml
from tests.conftest import REPO

torch.set_num_threads(1)
TINY = os.path.join(REPO, "configs", "adapt_tiny.yaml")
ONE = ["scaling.num_workers=1"]


def tiny(tmp_path, *overrides):
    return load_adapt_config(TINY, [*ONE, f"out_dir={tmp_path}", *overrides])


# ---------------------------------------------------------------- the task model

@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_on_minilm_equals_the_formula(pooling):
    """logits = W pool(BertModel(x).last_hidden_state) + b; loss = mean CE; accuracy =
    mean(argmax == label); with LoRA attached the same formula reads the LoRA'd encoder."""
    torch.manual_seed(0)
    base, tok = load_minilm(dropout=0.0)
    base.eval()
    enc = tok(["what is a lake ?", "who wrote hamlet"], padding="max_length", max_length=12,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.tensor([2, 0])
    dm = DeltaModel(base)
    dm.add("t", LoraConfig(targets=("query", "value"), rank=2))
    for p in dm.deltas.parameters():            # B starts at 0: make the delta do something
        torch.nn.init.normal_(p, std=0.05)
    model = SequenceClassifier(dm, 384, 3, pooling=pooling).eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    h = base(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = mask[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)
    logits = pooled @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    assert float(out.metrics["accuracy"]) == float((logits.argmax(-1) == labels).float().mean())
    # the LoRA is really in the path: without it the logits differ
    dm.remove("t")
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_classifier_on_our_bert_reads_the_masked_encoder():
    """Our BERT family: pooled ``encode(ids, attention_mask)`` (padding masked out) → head."""
    from bmray.models.config import ModelConfig
    from bmray.models.families.registry import build_model

    torch.manual_seed(0)
    bert = build_model(ModelConfig(family="bert", vocab_size=64, d_model=16, n_heads=2,
                                   n_layers=1, d_ff=32, max_seq_len=16, dropout=0.0)).eval()
    ids = torch.randint(7, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    model = SequenceClassifier(DeltaModel(bert), 16, 4, pooling="mean").eval()
    out = model(input_ids=ids, attention_mask=mask)
    h = bert.encode(ids, attention_mask=mask)
    m = mask[..., None].float()
    ref = ((h * m).sum(1) / m.sum(1)) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-6)


def test_rows_objective_and_stream():
    exs = [Example(f"q{i}", None, "AB"[i % 2]) for i in range(10)]
    rows = encode_rows(exs, lambda ex: [7, 8, 9, 10, 11][: 1 + int(ex.text_a[1:]) % 5],
                       max_length=3, labels=["A", "B"], pad_id=0)
    assert rows.shape == (10, 4)
    assert rows[4].tolist() == [7, 8, 9, 0] and rows[1].tolist() == [7, 8, 0, 1]
    batch = ClassificationObjective(pad_id=0)(rows[:2])
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="label 'C'"):
        encode_rows([Example("x", None, "C")], lambda ex: [1], 3, ["A", "B"], 0)
    # the ranks' slices of a step, concatenated, are the single process's batch; every row
    # is seen once per epoch; a stream resumed from its state reads the same batches
    one = RowStream(rows, 4, seed=3)
    two = [RowStream(rows, 4, r, 2, seed=3) for r in range(2)]
    seen = []
    for _ in range(5):
        b = next(one)
        assert torch.equal(b, torch.cat([next(s) for s in two]))
        seen += b[:, 0].tolist()
    assert sorted(seen[:10]) == sorted(rows[:, 0].tolist())
    again = RowStream(rows, 4, seed=3)
    again.load_state_dict(one.state_dict())
    assert torch.equal(next(again), next(one))
    halves = eval_row_batches(rows, 4, 1, 2)
    assert [len(h) for h in halves] == [2, 2, 1]


# ---------------------------------------------------------------- run, checkpoints, resume

def test_delta_only_checkpoint_resume_and_frozen_base(tmp_path):
    """The checkpoint holds the delta and head (and their optimizer state), not the base:
    its file is a few times the delta's size, ~1/30 of the base's. A run stopped at step 3 and
    resumed in a fresh process equals the uninterrupted run; the base is bit-identical."""
    cfg = tiny(tmp_path / "a", "train.eval_every=0")
    trainer, task = build_adapt_trainer(cfg, str(tmp_path / "a"))
    base_before = {k: v.clone() for k, v in task.base.state_dict().items()}
    full = trainer.fit()
    for k, v in task.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert base_identity(task.base) == task.identity
    path = full.checkpoint
    _, state = load_checkpoint(path)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert set(state["model"]) == trainable
    assert all(".deltas." in n or n.startswith("head.") for n in trainable)
    delta_bytes = sum(p.numel() * 4 for n, p in task.model.named_parameters() if n in trainable)
    base_bytes = sum(v.numel() * v.element_size() for v in task.base.state_dict().values())
    size = os.path.getsize(os.path.join(path, "rank_00000.pt"))
    assert size < 3 * delta_bytes + 64 * 1024 and size < base_bytes / 4, (size, delta_bytes,
                                                                          base_bytes)
    manifest = read_manifest(path)
    assert manifest["model_config"]["base"] == task.identity
    # stop at 3, resume in a new trainer built from scratch
    cfg_b = tiny(tmp_path / "b", "train.eval_every=0")
    first, _ = build_adapt_trainer(cfg_b, str(tmp_path / "b"))
    part = first.fit(until=3)
    second, _ = build_adapt_trainer(cfg_b, str(tmp_path / "b"))
    rest = second.fit()
    assert rest.resumed_from is not None and second.step == 6
    losses = {**part.losses, **rest.losses}
    assert losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    ref = {n: p for n, p in trainer.strategy.module.named_parameters() if n in trainable}
    for n, p in second.strategy.module.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p, ref[n], rtol=1e-6, atol=1e-7)


def test_resume_onto_another_base_is_an_error(tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=2", "train.eval_every=0")
    trainer, _ = build_adapt_trainer(cfg, str(tmp_path))
    trainer.fit()
    other = tiny(tmp_path, "train.max_steps=2", "train.eval_every=0", "seed=1")
    with pytest.raises(CheckpointError, match="trained on another base"):
        build_adapt_trainer(other, str(tmp_path))


def test_run_adapt_reports_and_saves_the_delta(tmp_path):
    rows = []
    result = run_adapt(tiny(tmp_path), out_dir=str(tmp_path), on_eval=rows.append)
    assert [r["step"] for r in rows] == [3, 6] and result.metrics == rows[-1]
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["examples"] == 64
    assert 0 < result.trainable_params < result.total_params / 10
    assert result.latency_ms > 0 and result.peak_memory_bytes > 0
    assert result.delta_bytes == sum(os.path.getsize(os.path.join(result.delta_dir, f))
                                     for f in os.listdir(result.delta_dir))
    assert 0 < result.checkpoint_bytes < 10 * result.delta_bytes
    files = sorted(os.listdir(result.delta_dir))
    assert files == ["delta.safetensors", "manifest.json"]
    assert sorted(os.listdir(result.head_dir)) == ["head.json", "head.safetensors"]
    # the saved delta loads onto the same base and gives the trained model's logits
    cfg = tiny(tmp_path)
    task = build_task(cfg, str(tmp_path / "tokenizer"))
    trained = task.deltas.get("task")
    from bmray.models.delta.io import load_delta
    loaded = load_delta(result.delta_dir, base=task.base)
    assert set(loaded.state_dict()) == set(trained.state_dict())


def test_full_fine_tuning_trains_the_base(tmp_path):
    cfg = tiny(tmp_path, "delta=null", "train.max_steps=2", "train.eval_every=0")
    trainer, task = build_adapt_trainer(cfg, str(tmp_path))
    before = {k: v.clone() for k, v in task.base.state_dict().items()}
    result = trainer.fit()
    assert task.deltas is None
    changed = [k for k, v in task.base.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    _, state = load_checkpoint(result.checkpoint)
    assert any(k.startswith("backbone.") for k in state["model"])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("override,match", [
    ("delta.rnak=4", r"delta: unknown key\(s\) \['rnak'\]"),
    ("task.datset=trec", r"task: unknown key\(s\) \['datset'\]"),
    ("task.dataset=imdb", r"task.dataset: 'imdb' is not one of"),
    ("delta.method=lorra", r"delta.method: 'lorra' is not one of"),
    ("base.kind=gpt2", r"base.kind: 'gpt2' is not one of"),
    ("task.batch_size=7", r"task.batch_size: 7 is not divisible"),
    ("strategy.kind=param_server", r"strategy.kind: adaptation runs single, ddp, zero"),
    ("task.max_length=64", r"task.max_length: 64 is longer than base.model.max_seq_len"),
])
def test_config_errors_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_adapt_config(TINY, [f"out_dir={tmp_path}", override])


@pytest.mark.parametrize("config,overrides,match", [
    ("adapt_tiny", ["strategy.kind=mesh", "strategy.tp=2", "strategy.pp=2"],
     r"strategy.pp: adaptation does not split"),
    ("adapt_tiny", ["strategy.kind=mesh", "strategy.tp=4", "scaling.num_workers=2"],
     r"strategy.tp: 4 does not divide scaling.num_workers 2"),
    ("adapt_trec_lora", ["strategy.kind=mesh", "strategy.tp=2", "scaling.num_workers=2"],
     r"strategy.tp: tensor parallelism needs a base of our family"),
    ("adapt_trec_prompt", ["strategy.kind=mesh", "strategy.tp=2", "scaling.num_workers=2"],
     r"strategy.tp: tensor parallelism needs a base of our family"),
    ("adapt_tiny", ["strategy.kind=zero", "strategy.stage=3", "strategy.sharded_checkpoint=true"],
     r"strategy.sharded_checkpoint: an adaptation checkpoint holds the trainable tensors"),
    ("adapt_tiny", ["strategy.kind=mesh", "strategy.tp=2", "task.batch_size=5",
                    "scaling.num_workers=4"], r"task.batch_size: 5 is not divisible by the 2 "),
])
def test_strategy_choices_a_delta_run_cannot_take(tmp_path, config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_adapt_config(os.path.join(REPO, "configs", f"{config}.yaml"),
                          [f"out_dir={tmp_path}", *overrides])


def test_tensor_parallel_refuses_a_non_lora_delta_on_split_layers(tmp_path):
    """Adapters on the attention output (a row-parallel layer) cannot follow a split: the
    driver's build_task says so before any worker starts."""
    raw = {**load_yaml(TINY), "delta": {"method": "adapter", "targets": ["out_proj"],
                                        "bottleneck": 8}}
    cfg = load_adapt_config(raw, [f"out_dir={tmp_path}", "strategy.kind=mesh", "strategy.tp=2"])
    with pytest.raises(ConfigError, match=r"only LoRA is split to match"):
        build_task(cfg, str(tmp_path / "tok"))


@pytest.mark.parametrize("overrides,match", [
    (["delta.targets=[q_projj]"], r"targets: 'q_projj' matches no Linear"),
    (["delta.rank=40"], r"delta.rank: 40 exceeds min\(in, out\) = 32"),
    (["task.few_shot_k=100"], r"task.few_shot_k: .*class 'ABBR' has 86 examples"),
])
def test_bad_task_input_fails_before_any_step(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_task(tiny(tmp_path, *overrides), str(tmp_path / "tok"))


def test_a_delta_saved_for_another_base_is_refused(tmp_path):
    result = run_adapt(tiny(tmp_path / "a", "train.max_steps=1", "train.eval_every=0"),
                       out_dir=str(tmp_path / "a"))
    # same architecture, other weights (another seed): a clear error naming both bases
    cfg = tiny(tmp_path / "b", f"delta.load={result.delta_dir}", "seed=1")
    with pytest.raises(ConfigError, match=r"the delta was saved for BertForPretraining .*"
                                          r"this base is BertForPretraining"):
        build_task(cfg, str(tmp_path / "a" / "tokenizer"))
    # onto its own base it loads, and asking for another method is an error
    ok = tiny(tmp_path / "a", f"delta.load={result.delta_dir}")
    assert build_task(ok, str(tmp_path / "a" / "tokenizer")).deltas.get("task") is not None
    raw = load_yaml(TINY)
    raw.update(out_dir=str(tmp_path / "a"), scaling={"num_workers": 1},
               delta={"method": "bitfit", "targets": ["ln_1"], "load": result.delta_dir})
    with pytest.raises(ConfigError, match="holds a lora delta, the config asks for bitfit"):
        build_task(load_adapt_config(raw), str(tmp_path / "a" / "tokenizer"))


def test_world_labels_are_a_task(tmp_path):
    """The synthetic world's documents, labelled by entity type (or region)."""
    for label, classes in (("type", {"person", "city", "company", "country", "river"}),
                           ("region", None)):
        cfg = tiny(tmp_path, "task.dataset=world", "task.world_entities=20",
                   f"task.world_label={label}", "task.few_shot_k=null", "task.eval_limit=null")
        task = build_task(cfg, str(tmp_path / f"tok_{label}"))
        assert len(task.train_rows) and len(task.eval_rows)
        if classes is not None:
            assert set(task.labels) <= classes and len(task.labels) >= 3
        assert int(task.train_rows[:, -1].max()) < len(task.labels)


@pytest.mark.parametrize("delta", ["lora", None], ids=["lora", "soft-prompt-only"])
def test_prompt_runs_train_only_the_delta_and_soft_tokens(tmp_path, delta):
    """A prompt over the MiniLM's MLM head: the masked LM stays frozen; the checkpoint and
    the artifacts hold the delta and the template's soft tokens only."""
    from bmray.models.prompt.label_words import TREC_MANUAL

    raw = load_yaml(TINY)
    raw.update(base={"kind": "minilm"}, out_dir=str(tmp_path), scaling={"num_workers": 1},
               prompt={"template": "{soft*2} {text_a:shorten} It is about {mask} ."},
               delta={"method": "lora", "targets": ["query"], "rank": 2} if delta else None)
    raw["task"].update(max_length=32, eval_limit=16)
    raw["train"].update(max_steps=2, eval_every=0)
    result = run_adapt(load_adapt_config(raw), out_dir=str(tmp_path))
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["examples"] == 16
    _, state = load_checkpoint(result.checkpoint)
    assert "prompt.soft.weight" in state["model"]
    assert all(k == "prompt.soft.weight" or ".deltas." in k for k in state["model"])
    assert any(".deltas." in k for k in state["model"]) == bool(delta)
    assert (result.delta_dir is not None) == bool(delta)
    assert sorted(os.listdir(result.prompt_dir)) == ["prompt.json", "soft.safetensors"]
    assert result.trainable_params == sum(v.numel() for v in state["model"].values())
    saved = json.loads(open(os.path.join(result.prompt_dir, "prompt.json")).read())
    assert saved["label_words"] == TREC_MANUAL          # the dataset's default words


def prompt_run(tmp_path, **prompt):
    return tiny(tmp_path, "train.max_steps=3", "train.eval_every=0", "delta.rank=2",
                "prompt={template: '{text_a:shorten} It is a {mask} .'}",
                *[f"prompt.{k}={v}" for k, v in prompt.items()])


def test_a_knowledgeable_verbalizer_is_calibrated_on_unlabelled_training_inputs(tmp_path):
    """KPT in an adapt run: the dataset's expanded word sets, the prior over label words
    estimated on the first ``calibration_examples`` training inputs — log P~(w) = log mean_x
    p(w | x), written out here — and words below the relevance threshold dropped."""
    from bmray.models.prompt.label_words import TREC_KNOWLEDGEABLE
    from bmray.models.prompt.verbalizer import KnowledgeableVerbalizer

    cfg = prompt_run(tmp_path, kind="knowledgeable", calibration_examples=8,
                     refine_threshold=1.0)
    task = build_task(cfg, str(tmp_path / "tok"))
    prompt = task.model.prompt
    v = prompt.verbalizer
    assert isinstance(v, KnowledgeableVerbalizer)
    assert v.words == tuple(w for label in sorted(TREC_KNOWLEDGEABLE)
                            for w in TREC_KNOWLEDGEABLE[label])
    train = [task.objective.examples[int(i)] for i in range(8)]
    with torch.no_grad():
        logp = prompt.word_log_probs(prompt.collate(train, labels=False)).double()
    torch.testing.assert_close(v.log_prior.double(), torch.log(logp.exp().mean(0)),
                               rtol=1e-5, atol=1e-5)
    relevance = v.relevance(prompt.label_word_vectors())
    keep = (relevance >= 1.0) | torch.isin(torch.arange(len(v.words)), torch.tensor(v.anchor))
    assert torch.equal(v.keep, keep) and not bool(keep.all())


def test_a_soft_verbalizer_starts_at_its_words_and_trains(tmp_path):
    """WARP in an adapt run: class vectors initialised at the mean input embedding of each
    class's label words (their pieces' mean), trained with the delta, saved beside the prompt."""
    from bmray.models.prompt.label_words import TREC_MANUAL as words
    from bmray.models.prompt.verbalizer import SoftVerbalizer

    cfg = prompt_run(tmp_path, kind="soft")
    task = build_task(cfg, str(tmp_path / "tok"))
    v = task.model.prompt.verbalizer
    assert isinstance(v, SoftVerbalizer) and v.weight.requires_grad
    table = task.model.prompt.embedding.weight.detach()
    tok = task.model.prompt.tok                 # the mask follows a space in the template
    for c, label in enumerate(v.labels):
        per_word = [table[torch.tensor(tok.encode(w, space_before=True))].mean(0)
                    for w in words[label]]
        torch.testing.assert_close(v.weight[c].detach(), torch.stack(per_word).mean(0))
    before = v.weight.detach().clone()
    result = run_adapt(cfg, out_dir=str(tmp_path / "run"))
    saved = safetensors.torch.load_file(os.path.join(result.prompt_dir, "verbalizer.safetensors"))
    assert not torch.equal(saved["weight"], before)
    _, state = load_checkpoint(result.checkpoint)
    torch.testing.assert_close(state["model"]["prompt.verbalizer.weight"], saved["weight"])


def test_family_base_from_a_pretraining_checkpoint(tmp_path):
    """``base.checkpoint``: the pre-trained weights are the base's; another architecture is a
    CheckpointError naming the differing field."""
    from bmray.actors.train.checkpoints import save_checkpoint
    from bmray.models.families.registry import build_model

    cfg = tiny(tmp_path)
    torch.manual_seed(123)
    pretrained = build_model(cfg.base.model)
    save_checkpoint(str(tmp_path / "pre"), 5, {"model": pretrained.state_dict()},
                    manifest={"model_config": dataclasses.asdict(cfg.base.model)})
    task = build_task(tiny(tmp_path, f"base.checkpoint={tmp_path}/pre"), str(tmp_path / "tok"))
    for k, v in pretrained.state_dict().items():
        assert torch.equal(task.base.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="model_config.d_ff is 64 in the checkpoint"):
        build_task(tiny(tmp_path, f"base.checkpoint={tmp_path}/pre", "base.model.d_ff=128"),
                   str(tmp_path / "tok"))
