"""The Strategy interface: everything the training loop needs from "how the model is run".

The loop (bmray.actors.train.loop) is written once. Data parallelism, the parameter server,
ZeRO-1/2/3, mixed precision, tensor and pipeline parallelism differ in how a micro-batch's
gradients are produced, reduced and applied, not in the loop around them. Each subclasses
:class:`Strategy`; the loop never asks which one it has (torchtitan applies parallelisms from
outside the model in the same spirit).

The contract, in the loop's order of calls: ``setup`` → per step ``run_micro_batches`` (after
it the gradients equal ∂/∂θ Σ_ranks Σ_i wᵢ·lossᵢ, a *sum* over ranks) → ``clip_and_step``
(returns the pre-clip global norm) → ``all_reduce_sum`` / ``reduce_step_stats`` for the logged
numbers; ``forward`` for eval, ``state_dict`` / ``load_state_dict``, ``barrier``, and
``replicated`` (one checkpoint file for all ranks, or one per rank). docs/architecture.md
("The strategy contract") has the table of every method.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from bmray.actors.train.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible, else CPU (the strategies are device-agnostic)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def takes_weight_decay(p: nn.Parameter) -> bool:
    """build_adamw's rule: weight decay on matrices only (biases, norms: none)."""
    return p.dim() >= 2


def build_adamw(model: nn.Module, cfg: TrainConfig, params: Sequence[nn.Parameter] | None = None
                ) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with decay on matrices only (biases, norms: none).

    Uses the fused kernel where torch offers it (CUDA, and CPU in torch >= 2.4), else the
    foreach implementation; both compute the same update.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        keep = {id(p) for p in params}
        named = [(n, p) for n, p in named if id(p) in keep]
    decay = [p for _, p in named if takes_weight_decay(p)]
    no_decay = [p for _, p in named if not takes_weight_decay(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def weighted_forward_backward(model: nn.Module, batch: dict[str, Any], device: torch.device,
                              weight: Any) -> MicroResult:
    """Forward ``batch``, then backpropagate ``float(weight) * loss``.

    ``weight`` is only converted after the forward pass: the trainer passes a lazy weight
    whose global token count is still being all-reduced, so that small collective overlaps
    the first forward instead of stalling before it.
    """
    out = model(**move_batch(batch, device))
    (out.loss * float(weight)).backward()
    aux = getattr(out, "aux_loss", None)
    return MicroResult(out.loss.detach(), None if aux is None else aux.detach(),
                       dict(getattr(out, "metrics", None) or {}))


def split_step_stats(sums: Sequence[float], n_values: int) -> tuple[list[float], list[int]]:
    """``reduce_step_stats``'s answer from one summed list: values first, then counts."""
    return list(sums[:n_values]), [int(round(c)) for c in sums[n_values:]]


class MicroResult(NamedTuple):
    """What the loop keeps of one micro-batch: detached scalars, not the logits (keeping the
    outputs of every micro-batch would hold B×T×V logits per micro-batch until the step ends)."""

    loss: torch.Tensor                 # detached total loss (incl. aux) of the micro-batch
    aux_loss: torch.Tensor | None      # detached MoE aux loss, already included in ``loss``
    metrics: dict[str, Any]            # the model's own metrics (0-d tensors or floats)


class Strategy(ABC):
    """How a model is run on this rank: see the module docstring for the contract."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    model: nn.Module                   # what forward is called on (possibly a wrapper)
    optimizer: torch.optim.Optimizer
    replicated: bool = True            # same state on every rank: one checkpoint file
    collective_state_dict: bool = False  # state_dict() is a collective: every rank calls it
    collective_forward: bool = False    # forward() is a collective (ZeRO-3 gathers, TP reduces)

    @property
    def is_main(self) -> bool:
        """The rank that logs metrics and writes shared checkpoint files."""
        return self.rank == 0

    @property
    def module(self) -> nn.Module:
        """The plain, unwrapped model (for state dicts and shape checks)."""
        return getattr(self.model, "module", self.model)

    @abstractmethod
    def setup(self, model: nn.Module, cfg: TrainConfig) -> None: ...

    def data_shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """(index, count) of the data slice this rank reads, given its gang rank and size.
        Every rank reads its own slice; ranks that hold parts of one model replica
        (tensor / pipeline parallel: parallel/mesh.py) read the same one."""
        return rank, world_size

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-batches whose gradients need no communication yet."""
        return contextlib.nullcontext()

    @abstractmethod
    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        """Run the model on ``batch`` and backpropagate ``weight * output.loss``."""

    def run_micro_batches(self, batches: Sequence[dict[str, Any]], weights: Sequence[float]
                          ) -> list[MicroResult]:
        outputs = []
        last = len(batches) - 1
        for i, (batch, weight) in enumerate(zip(batches, weights)):
            ctx = self.no_sync() if i < last else contextlib.nullcontext()
            with ctx:
                outputs.append(self.forward_backward(batch, weight))
        return outputs

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm`` (0: no clipping), step, zero grads;
        return the pre-clip norm as a 0-d tensor (no host sync until the loop logs it)."""

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**move_batch(batch, self.device))

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a few scalars (one collective for all of them)."""
        return [float(v) for v in values]

    def all_reduce_sum_async(self, values: Sequence[float]) -> Callable[[], list[float]]:
        """Start ``all_reduce_sum(values)``; the returned callable waits and returns the sums.
        Collectives must still be issued in the same order on every rank."""
        out = self.all_reduce_sum(values)
        return lambda: out

    def reduce_step_stats(self, values: Sequence[float], counts: Sequence[int] = ()
                          ) -> Callable[[], tuple[list[float], list[int]]]:
        """Start the cross-rank sum of a step's logged ``values`` (losses, metrics) and
        non-negative integer ``counts`` (tokens), called once per step right after the
        micro-batches' backward; the returned callable waits and returns (sums, counts).

        The default is one ``all_reduce_sum_async`` in float64 (counts exact below 2**53).
        Data parallelism overrides it to send them inside the step's last gradient bucket:
        a collective costs the same few context switches whatever its size, so a step then
        costs exactly as many collectives as torch DDP's, logging included."""
        pending = self.all_reduce_sum_async([*map(float, values), *map(float, counts)])
        return lambda: split_step_stats(pending(), len(values))

    def barrier(self) -> None:
        """Block until every rank gets here (a no-op in one process)."""

    def flush(self) -> None:
        """Wait for this rank's in-flight communication (the end of a run: nothing may still be
        on its way to a peer or a server when ``fit`` returns). A no-op where all is waited."""

    def train(self, mode: bool = True) -> None:
        """Switch train/eval mode; the loop calls it every step, so the walk over every
        submodule happens only when the mode changes."""
        if self.model.training != mode:
            self.model.train(mode)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of the model state a checkpoint holds (checked before loading one):
        the module's own, or the full model's where this rank holds a part of it."""
        return {k: tuple(v.shape) for k, v in self.module.state_dict().items()}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def memory_report(self) -> dict[str, int]:
        """Bytes held by this rank for parameters, gradients and optimizer state."""
        params = sum(p.numel() * p.element_size() for p in self.parameters())
        grads = sum(p.grad.numel() * p.grad.element_size()
                    for p in self.parameters() if p.grad is not None)
        optim = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        return {"param_bytes": params, "grad_bytes": grads, "optimizer_bytes": optim}


class SingleProcess(Strategy):
    """One process, one device, no communication: the reference every other strategy must
    match (their tests compare against it)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = resolve_device(device) if isinstance(device, str) else device

    def setup(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model = model.to(self.device)
        self.optimizer = build_adamw(self.model, cfg)

    def forward_backward(self, batch: dict[str, Any], weight: float) -> MicroResult:
        return weighted_forward_backward(self.model, batch, self.device, weight)

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
