"""DeltaModel: a frozen base with any number of named deltas (PEFT's ``PeftModel``, several
adapters at once).

The base is frozen on wrapping (its ``requires_grad`` flags are remembered); each ``add`` attaches
a delta by name; deltas on the same module compose in attach order (forward hooks run in
registration order). ``mixed`` routes each batch row to one delta (or to the bare base) for one
forward over the shared base; ``unwrap`` detaches everything and hands back the base exactly as it
was. ``save``/``load`` move one delta alone (io.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from bmray.models.delta.base import Delta, DeltaConfig
from bmray.models.delta.grouped import group_lora
from bmray.models.delta.io import load_delta, read_manifest, save_delta
from bmray.models.delta.registry import build_delta
from bmray.models.typed_config import ConfigError

__all__ = ["DeltaModel"]


class DeltaModel(nn.Module):
    """``base`` frozen, ``deltas`` an ``nn.ModuleDict`` name → attached :class:`Delta`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.base_flags = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        lists = getattr(base, "block_lists", None)
        if lists:
            self.block_lists = tuple("base." + p for p in lists)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    # ------------------------------------------------------------------ deltas
    def add(self, name: str, config_or_delta: DeltaConfig | Delta) -> Delta:
        """Attach a delta (built from a config, or given) under ``name``."""
        if not name or "." in name or name in self.deltas:
            raise ConfigError(f"delta name {name!r}: must be new, non-empty and without dots "
                              f"(have {list(self.deltas)})")
        delta = (config_or_delta if isinstance(config_or_delta, Delta)
                 else build_delta(config_or_delta))
        delta.attach(self.base)
        self.deltas[name] = delta
        return delta

    def get(self, name: str) -> Delta:
        if name not in self.deltas:
            raise KeyError(f"no delta named {name!r}; have {list(self.deltas)}")
        return self.deltas[name]

    def remove(self, name: str) -> Delta:
        """Detach (unmerging first) and forget ``name``; returns the delta, reusable elsewhere."""
        delta = self.get(name)
        if getattr(delta, "merged", False):
            delta.unmerge()
        delta.detach()
        del self.deltas[name]
        return delta

    def merge(self, name: str) -> None:
        """Fold ``name`` into the base's weights (methods that support it: LoRA)."""
        delta = self.get(name)
        if not callable(getattr(delta, "merge", None)):
            raise ConfigError(f"{delta.config.method} delta {name!r} cannot be merged")
        delta.merge()

    def unmerge(self, name: str, exact: bool = True) -> None:
        delta = self.get(name)
        if not callable(getattr(delta, "unmerge", None)):
            raise ConfigError(f"{delta.config.method} delta {name!r} cannot be unmerged")
        delta.unmerge(exact=exact)

    def unwrap(self) -> nn.Module:
        """Detach every delta, restore the base's ``requires_grad`` flags, return the base."""
        for name in list(self.deltas):
            self.remove(name)
        for n, p in self.base.named_parameters():
            p.requires_grad_(self.base_flags[n])
        return self.base

    # ------------------------------------------------------------------ mixed batches
    @contextmanager
    def mixed(self, assignment: Sequence[str | None]) -> Iterator[None]:
        """Row i of the next forwards uses delta ``assignment[i]`` alone (None: the bare base)."""
        unknown = sorted({a for a in assignment if a is not None and a not in self.deltas})
        if unknown:
            raise ConfigError(f"mixed: unknown delta(s) {unknown}; have {list(self.deltas)}")
        merged = [n for n, d in self.deltas.items() if getattr(d, "merged", False)]
        if merged:
            raise ConfigError(f"mixed: delta(s) {merged} are merged into the base; unmerge first")
        device = next((p.device for p in self.base.parameters()), torch.device("cpu"))
        saved = {n: d.rows for n, d in self.deltas.items()}

        def check_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
            if x is not None and x.dim() > 0 and x.shape[0] != len(assignment):
                raise ConfigError(f"mixed: {len(assignment)} rows assigned, the batch has "
                                  f"{x.shape[0]}")

        check = self.base.register_forward_pre_hook(check_batch, with_kwargs=True, prepend=True)
        grouped: list[Any] = []
        try:
            by_name = {}
            for n, d in self.deltas.items():
                rows = [i for i, a in enumerate(assignment) if a == n]
                by_name[n] = torch.tensor(rows, dtype=torch.long, device=device)
                # every row to one delta: rows=None, its plain (unindexed) path
                d.rows = None if rows and len(rows) == len(assignment) else by_name[n]
            # two or more LoRA deltas: one batched product per site (grouped.py)
            grouped, taken = group_lora(self.base, dict(self.deltas), by_name, len(assignment))
            for n in taken:
                self.deltas[n].rows = by_name[n][:0]
            yield
        finally:
            for handle in grouped:
                handle.remove()
            check.remove()
            for n, d in self.deltas.items():
                d.rows = saved[n]

    # ------------------------------------------------------------------ state, counts, files
    def delta_state_dict(self, name: str | None = None) -> dict[str, Tensor]:
        """Only delta tensors: one delta's ``state_dict``, or all as ``"<name>.<key>"``."""
        if name is not None:
            return self.get(name).state_dict()
        return {f"{n}.{k}": v for n, d in self.deltas.items() for k, v in d.state_dict().items()}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_fraction(self) -> float:
        total = sum(p.numel() for p in self.parameters())
        return self.num_trainable() / total if total else 0.0

    def save(self, name: str, directory: str | Path) -> Path:
        return save_delta(self.get(name), directory, self.base)

    def load(self, directory: str | Path, name: str | None = None) -> Delta:
        """Load a saved delta onto this base (identity checked) and attach it as ``name``
        (default: the directory's name)."""
        read_manifest(directory)                      # a clear error before any work
        delta = load_delta(directory, base=self.base)
        return self.add(name or Path(directory).name, delta)
