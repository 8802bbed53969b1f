"""The memory report of the sharded strategies: model-state bytes by kind and location.

Keys and their meaning are in docs/zero.md ("Memory report").
"""
from __future__ import annotations

from typing import Any


def memory_totals(param: int, grad: int, optim: dict[str, int],
                  by_location: dict[str, dict[str, int]], **extra: Any) -> dict[str, Any]:
    """The memory report both ZeRO strategies return: totals by kind and by location."""
    report: dict[str, Any] = {
        "param_bytes": param, "grad_bytes": grad, "optimizer_bytes": sum(optim.values()),
        "model_state_bytes": param + grad + sum(optim.values()), **extra,
        "by_location": by_location}
    for where in ("device", "host", "disk"):
        report[where] = sum(v[where] for v in by_location.values())
    return report
