"""A mixed batch of LoRA deltas as one batched product per site (Punica's SGMV, Chen et al. 2023;
S-LoRA, Sheng et al. 2023).

Row-by-row routing (rows.py) runs each delta on its own rows: at a site with D deltas that is D
gathers, 2·D small matrix products and D scatters. When two or more LoRA deltas share a site in
one mixed batch, :func:`group_lora` hooks that site once instead: the row's factors are gathered
(``A[idx]``: [B, r, in], ``B[idx]``: [B, out, r]) and applied with two batched products,
``out[b] += s_b · (x_b A_bᵀ) B_bᵀ`` — four kernels per site whatever D is. Factors of lower rank
are zero-padded to the largest (a zero row of A meets a zero column of B: nothing added). Rows
without a LoRA delta are left out (gathered only when the group does not cover the batch).
Dropout while training, a tensor-parallel site or a merged delta keep the row-by-row path.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from bmray.models.delta.base import site_name
from bmray.models.delta.lora import LoraDelta, LoraSite
from bmray.models.delta.rows import add_at_rows

__all__ = ["GroupedLoraSite", "group_lora"]


class GroupedLoraSite:
    """The forward hook of one site shared by several LoRA deltas in a mixed batch."""

    def __init__(self, sites: Sequence[LoraSite], rows: Sequence[Tensor], batch: int):
        self.sites = list(sites)
        self.rows = list(rows)                           # per site: its delta's batch rows
        index = torch.full((batch,), -1, dtype=torch.long)
        for d, r in enumerate(self.rows):
            index[r.cpu()] = d
        covered = index >= 0
        self.all_rows = bool(covered.all())
        self.picked = covered.nonzero().flatten()        # the rows some delta changes
        self.index = index[self.picked]                  # and which delta, in that order
        self.rank = max(s.A.shape[0] for s in self.sites)
        self._stacked: tuple[Any, tuple[Tensor, Tensor, Tensor]] | None = None

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked [D, r, in] A, [D, out, r] B (zero-padded to the largest rank), [D] scales.
        Without autograd the stacks are kept for the next forwards of the batch's context while
        no factor has changed (their version counters); with it they are rebuilt each time,
        so gradients reach the deltas' own parameters."""
        if torch.is_grad_enabled():
            return self._stack(device, dtype)
        key = (device, dtype, tuple(t._version for s in self.sites for t in (s.A, s.B)))
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, self._stack(device, dtype))
        return self._stacked[1]

    def _stack(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        r = self.rank
        a = torch.stack([nn.functional.pad(s.A, (0, 0, 0, r - s.A.shape[0])) for s in self.sites])
        b = torch.stack([nn.functional.pad(s.B, (0, r - s.B.shape[1])) for s in self.sites])
        scale = torch.tensor([s.scale for s in self.sites], dtype=dtype, device=device)
        return a.to(device, dtype), b.to(device, dtype), scale

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["input"]
        if module.training and any(s.dropout.p > 0 for s in self.sites):
            for site, rows in zip(self.sites, self.rows):   # per-row dropout: row by row
                output = add_at_rows(output, rows, site.lora, x, inplace=True)
            return output
        a, b, scale = self._factors(output.device, self.sites[0].A.dtype)
        index = self.index.to(output.device)
        xs = x if self.all_rows else x.index_select(0, self.picked.to(x.device))
        n = xs.shape[0]
        code = torch.bmm(xs.reshape(n, -1, xs.shape[-1]).to(a.dtype),
                         a.index_select(0, index).transpose(1, 2))        # [n, tokens, r]
        code = code * scale.index_select(0, index).view(n, 1, 1)
        update = torch.bmm(code, b.index_select(0, index).transpose(1, 2))   # [n, tokens, out]
        update = update.view(xs.shape[:-1] + (update.shape[-1],)).to(output.dtype)
        if self.all_rows:
            return output.add_(update) if not torch.is_grad_enabled() else output + update
        rows = self.picked.to(output.device)
        if torch.is_grad_enabled():
            return output.index_add(0, rows, update)
        return output.index_add_(0, rows, update)


def group_lora(base: nn.Module, deltas: dict[str, Any], rows: dict[str, Tensor],
               batch: int) -> tuple[list[Any], list[str]]:
    """Take over the LoRA deltas (unmerged, not tensor-parallel) that have rows in this batch,
    when there are two or more: every module where any of them has a site gets one
    :class:`GroupedLoraSite` hook for its sites there. Returns the hook handles (remove them
    after the batch) and the names taken over — the caller gives those empty ``rows`` so that
    their own hooks stand aside."""
    taken = [n for n, d in deltas.items()
             if isinstance(d, LoraDelta) and d.attached and n in rows and rows[n].numel() > 0
             and not any(s.merged or s.split is not None for s in d.sites.values())]
    if len(taken) < 2:
        return [], []
    at: dict[str, tuple[list[LoraSite], list[Tensor]]] = {}
    for n in taken:
        for key, site in deltas[n].sites.items():
            sites, site_rows = at.setdefault(site_name(key), ([], []))
            sites.append(site)
            site_rows.append(rows[n])
    modules = dict(base.named_modules())
    handles = [modules[name].register_forward_hook(GroupedLoraSite(sites, site_rows, batch),
                                                   with_kwargs=True)
               for name, (sites, site_rows) in at.items()]
    return handles, taken
