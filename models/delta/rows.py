"""Per-row application of an additive delta: what makes a mixed batch exact.

A site's delta adds ``f(x)`` to its output. With ``rows`` (a 1-D LongTensor of batch rows, dim 0)
only those rows get it: ``out[rows] += f(x[rows])``, computed on the selected rows alone (no
wasted compute on the others). With autograd recording it is out of place, so autograd sees an
ordinary op (``Tensor.index_add``); with autograd off (inference) the caller may ask for it in
place (``inplace=True``: ``index_add_`` into the module's fresh output, no copy of the whole
output per delta — with eight deltas at a site that is eight copies saved). ``rows=None`` adds
to every row.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["add_at_rows", "row_flags"]


def add_at_rows(output: Tensor, rows: Tensor | None, fn: Callable[..., Tensor],
                *inputs: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """``output + alpha · fn(*inputs)`` on the rows ``rows`` (all rows when None); the addend is
    cast to ``output``'s dtype (a float32 delta on a bf16 base). ``inplace`` writes into
    ``output`` when autograd is off (the caller vouches that nothing else holds ``output``, e.g.
    an ``nn.Linear``'s result); when autograd is on it is ignored."""
    inplace = inplace and not torch.is_grad_enabled()
    if rows is None:
        addend = fn(*inputs).to(output.dtype)
        return output.add_(addend, alpha=alpha) if inplace else output.add(addend, alpha=alpha)
    rows = rows.to(output.device)
    picked = [x.index_select(0, rows) for x in inputs]
    addend = fn(*picked).to(output.dtype).expand((rows.numel(),) + tuple(output.shape[1:]))
    if inplace:
        return output.index_add_(0, rows, addend, alpha=alpha)
    return output.index_add(0, rows, addend, alpha=alpha)


def row_flags(batch: int, rows: Tensor | None, device: torch.device) -> Tensor:
    """[batch] bool: True for the rows a delta applies to (``rows`` None = every row)."""
    if rows is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    flags = torch.zeros(batch, dtype=torch.bool, device=device)
    flags[rows.to(device)] = True
    return flags
