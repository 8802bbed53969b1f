"""Per-row application of an additive delta: what makes a mixed batch exact.

A site's delta adds ``f(x)`` to its output. With ``rows`` (a 1-D LongTensor of batch rows, dim 0)
only those rows get it: ``out[rows] += f(x[rows])``, computed on the selected rows alone (no
wasted compute on the others) and out of place, so autograd sees an ordinary op
(``Tensor.index_add``). ``rows=None`` adds to every row.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["add_at_rows"]


def add_at_rows(output: Tensor, rows: Tensor | None, fn: Callable[..., Tensor],
                *inputs: Tensor) -> Tensor:
    """``output + fn(*inputs)`` on the rows ``rows`` (all rows when None); the addend is cast
    to ``output``'s dtype (a float32 delta on a bf16 base)."""
    if rows is None:
        return output + fn(*inputs).to(output.dtype)
    rows = rows.to(output.device)
    picked = [x.index_select(0, rows) for x in inputs]
    return output.index_add(0, rows, fn(*picked).to(output.dtype).expand(
        (rows.numel(),) + tuple(output.shape[1:])))
