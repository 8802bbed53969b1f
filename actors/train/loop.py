"""The training loop, written once for every strategy: ``Trainer`` and ``train``.

One optimizer step (``Trainer.train_step``): take this rank's slice of the next global batch,
split it into ``micro_batches`` (objective generators seeded from seed, step, micro-batch,
rank), weight micro-batch i by n_i / N (its target tokens over the step's, summed over ranks:
exactly the full batch's loss), ``strategy.run_micro_batches``, ``strategy.clip_and_step``
(global-norm clipping, AdamW), then the lr scheduler (lr_schedule.py).

``fit`` evaluates, logs JSON-lines metrics (metrics.py) and saves / resumes the whole state —
model, optimizer, scheduler, RNG, data position, loop counters — so a resumed run continues
exactly (checkpoints.py). The loop never asks which strategy it runs: it only uses the
Strategy contract (actors/parallel/strategy.py). The why of each step: docs/training_loop.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bmray.models.layers.losses import step_metrics

from bmray.actors.train import checkpoints as ckpt
from bmray.actors.train.metrics import MetricsLogger
from bmray.actors.train.sharded_state import consolidate_sharded
from bmray.actors.train.lr_schedule import build_scheduler
from bmray.actors.parallel.strategy import MicroResult, SingleProcess, Strategy
from bmray.actors.train.config import CheckpointConfig, TrainConfig

IGNORE_INDEX = -100
_TRAIN, _EVAL = 0, 1          # seed-sequence domains of the objective's generators


# ---------------------------------------------------------------- RNG

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) — call before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def objective_seed(seed: int, step: int, micro: int, rank: int, domain: int = _TRAIN) -> int:
    """A 63-bit seed for the objective's generator, a pure function of where we are in the run
    (numpy's SeedSequence hashes the tuple, so nearby tuples give unrelated streams)."""
    ss = np.random.SeedSequence(seed, spawn_key=(domain, step, micro, rank))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def capture_rng() -> dict[str, Any]:
    """Global RNG states (dropout draws from torch's), as plain data for ``torch.load``."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


# ---------------------------------------------------------------- token accounting

def count_targets(batch: dict[str, Any], objective: Any = None) -> int:
    """How many tokens the batch's loss averages over: the weight of its micro-batch.

    An objective may say so itself (``objective.num_targets(batch)``); otherwise the labels
    that are not ignored (``labels``: GPT / T5, ``mlm_labels``: BERT / ELECTRA); otherwise every
    input token. For BERT's NSP and ELECTRA's discriminator term the weight is the masked-token
    count, an approximation (their losses are not means over those tokens).
    """
    if objective is not None and hasattr(objective, "num_targets"):
        return int(objective.num_targets(batch))
    for key in ("labels", "mlm_labels"):
        labels = batch.get(key)
        if torch.is_tensor(labels):
            return int((labels != IGNORE_INDEX).sum())
    return int(batch["input_ids"].numel())


def token_ce_sum(out: Any, batch: dict[str, Any], objective: Any = None) -> tuple[float, int]:
    """(sum of token cross-entropies, token count) of one eval batch, for perplexity.

    Computed from the logits where they line up with the labels (GPT / T5: ``labels``,
    BERT: ``mlm_labels``), so perplexity is exp(mean CE) whatever label smoothing, NSP or MoE
    aux loss the training loss contains. ELECTRA's logits are the discriminator's, so its
    generator's ``mlm_loss`` metric is used; any other model: its loss minus the aux loss.
    """
    logits = getattr(out, "logits", None)
    for key in ("labels", "mlm_labels"):
        labels = batch.get(key)
        if torch.is_tensor(labels) and torch.is_tensor(logits) and logits.dim() == labels.dim() + 1 \
                and logits.shape[:-1] == labels.shape:
            labels = labels.to(logits.device)
            ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            return float(ce), int((labels != IGNORE_INDEX).sum())
    n = count_targets(batch, objective)
    metrics = getattr(out, "metrics", None) or {}
    if "mlm_loss" in metrics:
        return float(metrics["mlm_loss"]) * n, n
    loss = out.loss - out.aux_loss if getattr(out, "aux_loss", None) is not None else out.loss
    return float(loss) * n, n


# ---------------------------------------------------------------- the loop

class _GlobalCount:
    """The step's target-token count summed over ranks, waited for on first use (or already
    known: the previous step's loss reduction carried it, see ``Trainer.train_step``)."""

    def __init__(self, pending: Callable[[], list[float]], step: int) -> None:
        self._pending, self._step, self._value = pending, step, None

    def __call__(self) -> float:
        if self._value is None:
            self._value = self._pending()[0]
            if self._value <= 0:
                raise ValueError(f"step {self._step}: the batch has no target tokens")
        return self._value


class _LazyWeight:
    """``count / global count`` as a float, computed when the strategy's backward asks."""

    def __init__(self, count: int, total: _GlobalCount) -> None:
        self.count, self.total = count, total

    def __float__(self) -> float:
        return self.count / self.total()


@dataclass
class _NextStep:
    """A step's batch read ahead during the previous step, so that its global target count
    travels in the previous step's loss reduction (``Strategy.reduce_step_stats``: inside the
    gradient reductions where the strategy can, else one small collective per step).
    ``data_state``: the stream's position before these blocks were read — what a checkpoint
    taken now must record, since the step has not run."""

    step: int
    blocks: torch.Tensor
    data_state: Any
    batches: list[dict[str, Any]] | None = None
    counts: list[int] | None = None
    total: Callable[[], float] | None = None     # waits for the previous step's reduction


@dataclass
class TrainResult:
    """What ``train`` / ``Trainer.fit`` returns."""

    step: int                                   # optimizer steps done (incl. before a resume)
    losses: dict[int, float]                    # step -> train loss, for the steps this call ran
    eval: dict[str, Any] | None                 # the last eval row (loss, perplexity, ...)
    checkpoint: str | None                      # the newest checkpoint written or resumed from
    averaged_checkpoint: str | None             # <dir>/averaged when checkpoint.average_last
    resumed_from: str | None                    # the checkpoint this call started from
    rows: list[dict] = field(default_factory=list)   # every metrics row logged by this call
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> pre-clip gradient norm


def _step_scalars(result: MicroResult, keys: list[str]) -> torch.Tensor:
    """[loss, aux loss, *metrics] of one micro-batch as one float64 vector on its device (a
    metric it lacks counts 0; python floats are copied to the device, which needs no sync)."""
    device = result.loss.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    parts = [result.loss, result.aux_loss if result.aux_loss is not None else zero]
    parts += [result.metrics.get(k, zero) for k in keys]
    return torch.stack([torch.as_tensor(v, device=device).double().reshape(()) for v in parts])


class Trainer:
    """Holds the state of one run: strategy (model + optimizer), scheduler, data position, step.

    ``data`` yields LongTensor[b, L] block batches (``models.data.BlockStream``; any iterator
    works, but only one with ``state_dict``/``load_state_dict`` resumes at the same position).
    ``eval_data`` is a zero-argument callable returning a fresh iterable of block batches
    (e.g. ``lambda: eval_batches(pack, L, G)``) or a re-iterable such as a list.
    """

    def __init__(self, model: nn.Module, objective: Callable, data: Iterable[torch.Tensor],
                 cfg: TrainConfig, *, strategy: Strategy | None = None,
                 eval_data: Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor] | None = None,
                 checkpoint: CheckpointConfig | None = None, model_config: Any = None,
                 seed: int = 0, metrics: MetricsLogger | None = None) -> None:
        self.cfg = cfg
        self.objective = objective
        self.data = data
        self._data_iter = iter(data)
        self.eval_data = eval_data
        self.ckpt_cfg = checkpoint or CheckpointConfig()
        self.model_config = model_config if model_config is not None else getattr(model, "config", None)
        self.seed = seed
        self.strategy = strategy or SingleProcess(cfg.device)
        self.strategy.setup(model, cfg)
        self.scheduler = build_scheduler(self.strategy.optimizer, cfg)
        self.metrics = metrics or MetricsLogger(
            cfg.metrics_path if self.strategy.is_main else None,
            echo=cfg.echo and self.strategy.is_main)
        self.step = 0                 # optimizer steps completed
        self.tokens = 0               # input tokens consumed, all ranks
        self.elapsed = 0.0            # seconds spent in train steps, all sessions of the run
        self.last_checkpoint: str | None = None
        self._log_time, self._log_tokens = 0.0, 0      # train-step seconds / tokens since last log
        self._next: _NextStep | None = None             # the next step's batch, read ahead

    # ------------------------------------------------------------ one step
    def _generator(self, step: int, micro: int, domain: int = _TRAIN) -> torch.Generator:
        return torch.Generator().manual_seed(
            objective_seed(self.seed, step, micro, self.strategy.rank, domain))

    def micro_batches(self, blocks: torch.Tensor, step: int) -> list[dict[str, Any]]:
        """The objective applied to each of ``micro_batches`` slices of ``blocks``."""
        if blocks.size(0) < self.cfg.micro_batches:
            raise ValueError(f"train.micro_batches: {self.cfg.micro_batches} micro-batches but "
                             f"only {blocks.size(0)} blocks per step on this rank")
        pieces = torch.tensor_split(blocks, self.cfg.micro_batches, dim=0)
        return [self.objective(p, self._generator(step, i)) for i, p in enumerate(pieces)]

    def accumulate(self, batches: list[dict[str, Any]], input_tokens: int = 0) -> dict[str, float]:
        """Forward + backward of one step's micro-batches with token-count weights; returns the
        step's loss (token-weighted, summed over ranks) and the models' own metrics, and as
        ``input_tokens`` the sum over ranks of ``input_tokens`` (in the same reduction)."""
        return self.accumulate_async(batches, input_tokens)()

    def accumulate_async(self, batches: list[dict[str, Any]], input_tokens: int = 0,
                         counts: list[int] | None = None,
                         total: Callable[[], float] | None = None,
                         read_ahead: Callable[[], _NextStep | None] | None = None
                         ) -> Callable[[], dict[str, float]]:
        """``accumulate``, but the reduction of the step's losses is only started: the returned
        callable waits for it. ``train_step`` calls it after ``clip_and_step``, so the loss
        all-reduce travels with the gradient all-reduces instead of adding a round trip.

        ``total()``: the global target count when it is already on its way (read ahead, it
        rides in the previous step's loss reduction); else it is all-reduced while the first
        micro-batch runs forward. Either way the lazy weights wait for it only when backward
        needs it. ``read_ahead()``, called before the forward passes (so that nothing stands
        between the last backward and the reduction), reads the next step's batch; its target
        count joins this step's loss reduction (``Strategy.reduce_step_stats``: data
        parallelism sends it inside the last gradient bucket)."""
        counts = counts if counts is not None else [count_targets(b, self.objective)
                                                    for b in batches]
        nxt = read_ahead() if read_ahead is not None else None
        if total is not None:
            total_of = _GlobalCount(lambda: [total()], self.step)
        else:
            total_of = _GlobalCount(self.strategy.all_reduce_sum_async([sum(counts)]), self.step)
        self.strategy.train(True)
        # the models' accuracies only on the steps that are logged (the same on every rank)
        with step_metrics((self.step + 1) % self.cfg.log_every == 0):
            results = self.strategy.run_micro_batches(
                batches, [_LazyWeight(c, total_of) for c in counts])
        total = total_of()
        weights = [c / total for c in counts]
        keys = sorted({k for r in results for k in r.metrics})
        wt = torch.tensor(weights, dtype=torch.float64)
        # one host transfer for every micro-batch's loss, aux loss and metrics
        columns = torch.stack([_step_scalars(r, keys) for r in results]).cpu()
        values = (wt[:, None] * columns).sum(dim=0).tolist()
        ahead = nxt is not None and nxt.counts is not None
        pending = self.strategy.reduce_step_stats(
            values, [int(input_tokens)] + ([sum(nxt.counts)] if ahead else []))
        done: list[tuple[list[float], list[int]]] = []

        def reduced() -> tuple[list[float], list[int]]:
            if not done:
                done.append(pending())
            return done[0]
        if ahead:
            nxt.total = lambda: reduced()[1][1]
        has_aux = any(r.aux_loss is not None for r in results)

        def finish() -> dict[str, float]:
            sums, tokens = reduced()
            out = {"loss": sums[0], "target_tokens": int(total), "input_tokens": tokens[0]}
            if has_aux:
                out["aux_loss"] = sums[1]
            out.update(zip(keys, sums[2:]))
            return out
        return finish

    def _read_ahead(self) -> _NextStep | None:
        """Read the next step's blocks and build its micro-batches now (no collective: the
        objective's generators are seeded by step). None when the data is exhausted; a batch
        the objective rejects is kept and fails when its step runs, as it would have."""
        state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        try:
            blocks = next(self._data_iter)
        except StopIteration:
            return None
        nxt = _NextStep(self.step + 1, blocks, state)
        try:
            nxt.batches = self.micro_batches(blocks, nxt.step)
            nxt.counts = [count_targets(b, self.objective) for b in nxt.batches]
        except Exception:       # noqa: BLE001 - re-raised when the step runs
            nxt.batches = nxt.counts = None
        self._next = nxt
        return nxt

    def train_step(self, read_ahead: bool = False) -> dict[str, Any]:
        """One optimizer step; returns its metrics row (also logged every ``log_every``).

        With ``read_ahead`` (``fit`` sets it when another step follows) the next step's batch
        is read during this one and its global target count rides in this step's loss
        all-reduce, so a step costs one small collective besides the gradients'."""
        return self._start_step(read_ahead)()

    def _start_step(self, read_ahead: bool) -> Callable[[], dict[str, Any]]:
        """Run one optimizer step; return the callable that waits for the step's loss
        all-reduce and makes (and logs) its row. ``fit`` calls it only after the next step
        has started, so waiting for the loss never holds a rank at the end of a step: like
        torch DDP's loop, the ranks meet only in the gradient reductions (the loss reduction
        is long done by then, and the next step's count rode in it)."""
        t0 = time.perf_counter()
        nxt, self._next = self._next, None
        if nxt is not None and nxt.step == self.step:
            blocks = nxt.blocks
            batches = nxt.batches if nxt.batches is not None else \
                self.micro_batches(blocks, self.step)      # raises what read-ahead caught
            counts, total = nxt.counts, nxt.total
        else:
            blocks = next(self._data_iter)
            batches, counts, total = self.micro_batches(blocks, self.step), None, None
        lr = self.scheduler.get_last_lr()[0]
        finish = self.accumulate_async(batches, blocks.numel(), counts, total,
                                       self._read_ahead if read_ahead else None)
        grad_norm = self.strategy.clip_and_step(self.cfg.grad_clip)
        self.scheduler.step()
        self.step += 1
        step = self.step
        dt = time.perf_counter() - t0

        def complete() -> dict[str, Any]:
            stats = finish()
            step_tokens = stats.pop("input_tokens")
            self.tokens += step_tokens
            self._log_tokens += step_tokens
            self.elapsed += dt
            self._log_time += dt
            row = {"step": step, "loss": stats.pop("loss"), "lr": lr,
                   "grad_norm": float(grad_norm), "tokens": self.tokens, **stats}
            if step % self.cfg.log_every == 0:
                row["tokens_per_s"] = self._log_tokens / max(self._log_time, 1e-9)
                row["elapsed_s"] = self.elapsed
                self._log_time, self._log_tokens = 0.0, 0
                if self.strategy.is_main:
                    self.metrics.log({"split": "train", **row})
            return row
        return complete

    # ------------------------------------------------------------ eval
    def _eval_iterable(self) -> Iterable[torch.Tensor]:
        data = self.eval_data
        return data() if callable(data) else data

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean token cross-entropy and perplexity over up to ``eval_batches`` batches."""
        if self.eval_data is None:
            raise ValueError("evaluate: no eval_data was given to the Trainer")
        self.strategy.train(False)
        ce, n = 0.0, 0
        batches = itertools.islice(self._eval_iterable(), self.cfg.eval_batches)
        for b, blocks in enumerate(batches):
            if blocks.numel() == 0:       # a rank's share of a short last batch
                continue
            batch = self.objective(blocks, self._generator(0, b, _EVAL))
            out = self.strategy.forward(batch)
            s, c = token_ce_sum(out, batch, self.objective)
            ce, n = ce + s, n + c
        ce, n = self.strategy.all_reduce_sum([ce, n])
        self.strategy.train(True)
        mean = ce / max(n, 1)
        row = {"split": "eval", "step": self.step, "loss": mean, "perplexity": math.exp(mean),
               "eval_tokens": int(n)}
        if self.strategy.is_main:
            self.metrics.log(row)
        return row

    # ------------------------------------------------------------ checkpoints
    def trainable_names(self) -> set[str]:
        """State-dict names of the parameters that train (what ``trainable_only`` keeps)."""
        return {n for n, p in self.strategy.module.named_parameters() if p.requires_grad}

    def full_model_state(self) -> dict[str, Any]:
        """The whole model's state dict in the single-process format: the module's own where
        every rank holds it whole, else consolidated (ZeRO-3 shards, tensor-parallel slices) —
        then a collective every rank calls."""
        s = self.strategy
        if s.collective_state_dict and s.replicated:
            return s.state_dict()["model"]
        return s.module.state_dict()

    def state_dict(self) -> dict[str, Any]:
        state = self.strategy.state_dict()
        if self.ckpt_cfg.trainable_only:
            keep = self.trainable_names()
            state["model"] = {k: v for k, v in state["model"].items() if k in keep}
        if self._next is not None:          # the read-ahead batch belongs to the next step
            data = self._next.data_state
        else:
            data = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        state.update(scheduler=self.scheduler.state_dict(), rng=capture_rng(), data=data,
                     loop={"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed})
        return state

    def save(self, root: str | None = None) -> str:
        """Write a checkpoint of the current step under ``root`` (default checkpoint.dir).

        Called on every rank. A replicated strategy (single process, data parallel): rank 0
        writes the one state file; a sharded one: every rank writes its file into the temp
        directory, then rank 0 commits (manifest + rename). Every rank returns after the
        checkpoint is committed (a barrier), so none can read a half-written one.
        """
        root = root or self.ckpt_cfg.dir
        if not root:
            raise ckpt.CheckpointError("save: no checkpoint directory (checkpoint.dir) is set")
        s = self.strategy
        writes = s.is_main or not s.replicated
        # A strategy whose state_dict is a collective (ZeRO consolidates its shards) needs
        # every rank in it, even those that write nothing.
        state = self.state_dict() if writes or s.collective_state_dict else None
        mc = self.model_config
        manifest = {"model_config": dataclasses.asdict(mc) if dataclasses.is_dataclass(mc) else mc,
                    "train_config": dataclasses.asdict(self.cfg), "seed": self.seed,
                    "data_state": state["data"] if state else None, "tokens": self.tokens,
                    "train_world_size": s.world_size,
                    "sharded_state": bool(getattr(s, "sharded_checkpoint", False))}
        files = 1 if s.replicated else s.world_size
        if s.replicated:
            if s.is_main:
                ckpt.save_checkpoint(root, self.step, state, manifest=manifest, rank=0,
                                     world_size=files, keep_last=self.ckpt_cfg.keep_last)
        else:
            if s.is_main:
                ckpt.begin_checkpoint(root, self.step)
            s.barrier()
            ckpt.write_rank_state(root, self.step, state, s.rank)
            s.barrier()
            if s.is_main:
                ckpt.commit_checkpoint(root, self.step, manifest=manifest, world_size=files,
                                       keep_last=self.ckpt_cfg.keep_last)
        s.barrier()
        self.last_checkpoint = ckpt.checkpoint_path(root, self.step)
        return self.last_checkpoint

    def restore(self, path: str) -> dict[str, Any]:
        """Load a checkpoint (a step directory, or a root: its ``latest``); return its manifest.

        Everything is checked before the model is touched: a missing, truncated or unreadable
        file raises CorruptCheckpointError naming it; a checkpoint of another model raises
        CheckpointError naming the manifest's first differing architecture field, or the
        first mismatching parameter and both shapes.
        """
        path = ckpt.resolve_checkpoint(path)
        ckpt.check_model_config(path, ckpt.read_manifest(path), self.model_config)
        info = ckpt.verify_checkpoint(path)
        if info.get("sharded_state"):
            # a sharded ZeRO checkpoint: reassemble the full state from every rank's file,
            # then the strategy's load_state_dict re-shards it (any world size and stage)
            manifest, state = consolidate_sharded(path)
        else:
            one_file = len(info.get("files") or [None]) == 1
            rank = 0 if self.strategy.replicated or one_file else self.strategy.rank
            manifest, state = ckpt.load_checkpoint(path, rank)
        shapes = self.strategy.checkpoint_shapes()
        if self.ckpt_cfg.trainable_only:
            # the frozen tensors are not in the checkpoint: they stay as built
            keep = self.trainable_names()
            shapes = {k: v for k, v in shapes.items() if k in keep}
        ckpt.check_compatible(shapes, state["model"], source=f"checkpoint {path!r}")
        if self.ckpt_cfg.trainable_only:
            state["model"] = {**self.full_model_state(), **state["model"]}
        self.strategy.load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self._next = None
        if state.get("data") is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        loop = state["loop"]
        self.step, self.tokens, self.elapsed = loop["step"], loop["tokens"], loop["elapsed_s"]
        self.last_checkpoint = path
        return manifest

    def _resume(self, root: str) -> str | None:
        """Restore the newest good checkpoint under ``root`` (None: there is none, or it is
        the one this trainer is already at). A damaged one (CorruptCheckpointError) is
        skipped for the one before it, so a crash or a bad disk during a save never loses the
        run; a checkpoint of another model is an error. Logs a ``resume`` metrics row."""
        skipped: list[str] = []
        for path in ckpt.resume_candidates(root):
            if path == self.last_checkpoint:
                return None
            try:
                self.restore(path)
            except ckpt.CorruptCheckpointError as exc:
                skipped.append(str(exc))
                print(f"[bmray] skipping a damaged checkpoint: {exc}", flush=True)
                continue
            if self.strategy.is_main:
                self.metrics.log({"split": "resume", "step": self.step, "checkpoint": path,
                                  "skipped": skipped})
            return path
        if skipped:
            raise ckpt.CheckpointError(f"no usable checkpoint under {root!r}: "
                                       + "; ".join(skipped))
        return None

    # ------------------------------------------------------------ the run
    def fit(self, until: int | None = None) -> TrainResult:
        """Train to step ``until`` (default ``train.max_steps``), resuming from
        ``checkpoint.dir/latest`` when ``checkpoint.resume`` and one exists.

        Evaluates every ``eval_every`` steps and at the end; checkpoints every
        ``checkpoint.every`` steps and at the end; averages the last k at the end of the
        run when ``checkpoint.average_last`` is set.
        """
        cc = self.ckpt_cfg
        until = self.cfg.max_steps if until is None else until
        first_row = len(self.metrics.rows)
        resumed = self._resume(cc.dir) if cc.dir and cc.resume else None
        losses: dict[int, float] = {}
        grad_norms: dict[int, float] = {}
        last_eval, saved_at = None, None
        pending: Callable[[], dict[str, Any]] | None = None

        def complete_pending() -> None:
            nonlocal pending
            if pending is not None:
                row = pending()
                losses[row["step"]] = row["loss"]
                grad_norms[row["step"]] = row["grad_norm"]
                pending = None

        while self.step < until:
            started = self._start_step(read_ahead=self.step + 1 < until)
            complete_pending()          # the previous step's row: its reduction is done
            pending = started
            evals = self.eval_data is not None and self.cfg.eval_every and \
                self.step % self.cfg.eval_every == 0
            saves = cc.dir and cc.every and self.step % cc.every == 0
            if evals or saves:
                complete_pending()      # rows in step order, counters final for the checkpoint
            if evals:
                last_eval = self.evaluate()
            if saves:
                self.save()
                saved_at = self.step
        complete_pending()
        if self.eval_data is not None and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self.evaluate()
        if cc.dir and saved_at != self.step and (losses or resumed is None):
            self.save()
        averaged = None
        if cc.dir and cc.average_last and self.step >= self.cfg.max_steps:
            if self.strategy.is_main:
                ckpt.save_average(cc.dir, cc.average_last)
            self.strategy.barrier()
            averaged = ckpt.averaged_path(cc.dir)
        self.strategy.flush()
        return TrainResult(step=self.step, losses=losses, grad_norms=grad_norms, eval=last_eval,
                           checkpoint=self.last_checkpoint, averaged_checkpoint=averaged,
                           resumed_from=resumed, rows=self.metrics.rows[first_row:])


def train(model: nn.Module, objective: Callable, data: Iterable[torch.Tensor], cfg: TrainConfig,
          **kwargs: Any) -> TrainResult:
    """``Trainer(model, objective, data, cfg, **kwargs).fit()`` — see :class:`Trainer`."""
    return Trainer(model, objective, data, cfg, **kwargs).fit()
